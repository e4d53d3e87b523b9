"""``nci provider …``: the model provider's tools.

``create-key`` makes the KMS key with its generated policy; ``seal`` turns a model into a sealed
bundle under a fresh data key; ``publish`` uploads a bundle to S3; ``inspect`` summarises a
manifest (never showing the encrypted data key in full). Errors are one line on stderr and exit
status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from attestation.errors import AttestationError
from attestation.expectations import load_expectations
from kms_policy import generate
from kms_policy.errors import KmsPolicyError
from nci._aws import client, region_of
from nci.train import add_train_commands
from protocol.bundle import DEFAULT_CHUNK_SIZE
from protocol.errors import ProtocolError
from provider import inspect, publish, seal
from provider.errors import ProviderError

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("provider", help="seal and publish models (model providers)")
    commands = group.add_subparsers(dest="provider_command", metavar="COMMAND", required=True)
    add_train_commands(commands)
    create = commands.add_parser(
        "create-key",
        help="create the KMS key whose policy releases the data key only to attested enclaves",
    )
    create.add_argument("--role", required=True, metavar="ARN", help="the parent instance's role")
    create.add_argument(
        "--provider", required=True, metavar="ARN", help="who seals (may call GenerateDataKey)"
    )
    create.add_argument(
        "--admin",
        action="append",
        required=True,
        metavar="ARN",
        help="key administrator (repeatable)",
    )
    create.add_argument(
        "--expect",
        action="append",
        required=True,
        type=Path,
        metavar="FILE",
        help="the released image's PCRs; repeat it during a rollout (--expect OLD --expect NEW): "
        "each image gets its own Allow statement",
    )
    create.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="encryption-context pin (repeatable)",
    )
    create.add_argument("--description", default="nci sealed-model data keys")
    create.add_argument("--endpoint-url", help="KMS endpoint (the local KMS, for example)")
    create.add_argument("--region", help="AWS region (default: the AWS environment's)")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(handler=_create_key)

    seal_cmd = commands.add_parser(
        "seal", help="seal a safetensors model (file or folder) into a bundle under a new data key"
    )
    seal_cmd.add_argument("model", type=Path, metavar="MODEL", help=".safetensors file or folder")
    seal_cmd.add_argument("--kms-key", required=True, metavar="KEY", help="KMS key id or ARN")
    seal_cmd.add_argument("--model-id", required=True, metavar="ID", help="e.g. acme/vlm-7b:1")
    seal_cmd.add_argument("--out", required=True, type=Path, metavar="BUNDLE_DIR")
    seal_cmd.add_argument(
        "--chunk-size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        metavar="BYTES",
        help="a power of two from 4096 to 16 MiB (default: 1 MiB)",
    )
    seal_cmd.add_argument(
        "--context",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra encryption context (repeatable; nci:model and nci:bundle are always set)",
    )
    seal_cmd.add_argument("--endpoint-url", help="KMS endpoint (the local KMS, for example)")
    seal_cmd.add_argument(
        "--region", help="AWS region (default: the --kms-key ARN's, else the AWS environment's)"
    )
    seal_cmd.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    seal_cmd.set_defaults(handler=_seal)

    publish_cmd = commands.add_parser("publish", help="upload a sealed bundle to S3")
    publish_cmd.add_argument("bundle", type=Path, metavar="BUNDLE_DIR")
    publish_cmd.add_argument("url", metavar="s3://BUCKET/PREFIX")
    publish_cmd.add_argument("--endpoint-url", help="S3 endpoint (the local KMS serves S3 too)")
    publish_cmd.add_argument("--region", help="AWS region (default: the AWS environment's)")
    publish_cmd.set_defaults(handler=_publish)

    inspect_cmd = commands.add_parser("inspect", help="summarise a bundle's manifest")
    inspect_cmd.add_argument("bundle", type=Path, metavar="BUNDLE_DIR_OR_MANIFEST")
    inspect_cmd.add_argument("--json", action="store_true", help="print one JSON object")
    inspect_cmd.set_defaults(handler=_inspect)


def _create_key(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        images = []
        for path in args.expect:
            sets = load_expectations(path)
            if len(sets) != 1:
                print(
                    f"nci provider create-key: {path} lists {len(sets)} PCR sets; give one file "
                    "per image (--expect OLD --expect NEW during a rollout)",
                    file=err,
                )
                return 2
            images.append(sets[0].values)
        context = dict(_pair(item) for item in args.context)
        policy = generate(
            measurements=images,
            role_arn=args.role,
            provider_arn=args.provider,
            admin_arns=args.admin,
            encryption_context=context or None,
        )
    except (AttestationError, KmsPolicyError, ValueError) as exc:
        print(f"nci provider create-key: {exc}", file=err)
        return 2
    try:
        kms = client("kms", endpoint_url=args.endpoint_url, region=args.region)
        answer = kms.create_key(
            Policy=policy.to_json(),
            Description=args.description,
            KeySpec="SYMMETRIC_DEFAULT",
            KeyUsage="ENCRYPT_DECRYPT",
        )
    except (ClientError, BotoCoreError) as exc:
        print(f"nci provider create-key: KMS refused or could not be reached: {exc}", file=err)
        return 2
    metadata = answer["KeyMetadata"]
    result = {
        "key_id": metadata["KeyId"],
        "arn": metadata["Arn"],
        "policy": json.loads(policy.to_json()),
    }
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        out.write(f"key id: {result['key_id']}\narn:    {result['arn']}\npolicy:\n")
        out.write(policy.to_json() + "\n")
    return 0


def _pair(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--context {item!r}: expected KEY=VALUE")
    return key, value


def _seal(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        context = dict(_pair(item) for item in args.context)
        region = args.region or region_of(args.kms_key)
        kms = client("kms", endpoint_url=args.endpoint_url, region=region)
        seal(
            args.model,
            kms_client=kms,
            kms_key_id=args.kms_key,
            model_id=args.model_id,
            out=args.out,
            chunk_size=args.chunk_size,
            extra_context=context,
            progress=_progress_bar(err, "sealing"),
        )
        summary = inspect(args.out)
    except (ProviderError, ProtocolError, ValueError, BotoCoreError) as exc:
        print(f"nci provider seal: {exc}", file=err)
        return 2
    if args.json:
        json.dump(summary, out, indent=2)
        out.write("\n")
    else:
        out.write(f"sealed {summary['model_id']} into {args.out}\n")
        _write_summary(summary, out)
    return 0


def _publish(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        s3 = client("s3", endpoint_url=args.endpoint_url, region=args.region)
        keys = publish(args.bundle, args.url, s3_client=s3, progress=_progress_bar(err, "upload"))
    except (ProviderError, ProtocolError) as exc:
        print(f"nci provider publish: {exc}", file=err)
        return 2
    bucket = args.url[len("s3://") :].partition("/")[0]
    for key in keys:
        out.write(f"s3://{bucket}/{key}\n")
    return 0


def _inspect(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        summary = inspect(args.bundle)
    except (ProviderError, ProtocolError) as exc:
        print(f"nci provider inspect: {exc}", file=err)
        return 2
    if args.json:
        json.dump(summary, out, indent=2)
        out.write("\n")
    else:
        _write_summary(summary, out)
    return 0


def _write_summary(summary: dict[str, Any], out: TextIO) -> None:
    key = summary["encrypted_data_key"]
    tensors = summary["tensors"]
    dtypes = ", ".join(
        f"{dtype} {info['count']} ({info['bytes']} bytes)"
        for dtype, info in tensors["by_dtype"].items()
    )
    lines = [
        f"format:             {summary['format']} v{summary['version']}",
        f"model id:           {summary['model_id']}",
        f"bundle id:          {summary['bundle_id']}",
        f"manifest sha256:    {summary['manifest_sha256']}",
        f"kms key:            {summary['kms_key_id']}",
        f"encrypted data key: {key['length']} bytes, sha256 {key['sha256_prefix']}…",
        "encryption context: "
        + ", ".join(f"{k}={v}" for k, v in sorted(summary["encryption_context"].items())),
        f"plaintext:          {summary['plaintext_size']} bytes",
        f"chunks:             {summary['chunk_count']} × {summary['chunk_size']} bytes "
        f"(chunks.bin {summary['sealed_size']} bytes)",
        f"tensors:            {tensors['count']}, {tensors['bytes']} bytes: {dtypes}",
        f"files:              {len(summary['files'])}",
    ]
    lines += [f"  {f['name']} ({f['length']} bytes)" for f in summary["files"]]
    if "chunks_bin" in summary and not summary["chunks_bin"]["complete"]:
        lines.append(f"WARNING: chunks.bin is {summary['chunks_bin']['size']} bytes: incomplete")
    out.write("\n".join(lines) + "\n")


def _progress_bar(err: TextIO, label: str) -> Callable[[int, int], None]:
    """A text bar on a terminal; otherwise one line per 10%."""
    tty = err.isatty()
    state = {"shown": -1}

    def show(done: int, total: int) -> None:
        percent = 100 if total <= 0 else done * 100 // total
        if tty:
            if percent == state["shown"]:
                return
            filled = percent * 30 // 100
            bar = "#" * filled + "." * (30 - filled)
            mib = f"{done / 2**20:.1f}/{total / 2**20:.1f} MiB"
            err.write(f"\r{label} [{bar}] {percent:3d}% {mib}")
            if done >= total:
                err.write("\n")
        else:
            if percent // 10 == state["shown"] // 10 and state["shown"] >= 0:
                return
            err.write(f"{label}: {percent}%\n")
        err.flush()
        state["shown"] = percent

    return show
