"""``nci provider …``: the model provider's tools (``create-key`` today; sealing comes next)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TextIO

from botocore.exceptions import BotoCoreError, ClientError

from attestation.errors import AttestationError
from attestation.expectations import load_expectations
from kms_policy import generate
from kms_policy.errors import KmsPolicyError
from nci._aws import client

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("provider", help="seal and publish models (model providers)")
    commands = group.add_subparsers(dest="provider_command", metavar="COMMAND", required=True)
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
        "--expect", required=True, type=Path, metavar="FILE", help="the released image's PCRs"
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
    create.add_argument("--region", help="AWS region (default: us-east-1)")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(handler=_create_key)


def _create_key(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        sets = load_expectations(args.expect)
        if len(sets) != 1:
            print(
                f"nci provider create-key: {args.expect} lists {len(sets)} PCR sets; a key policy "
                "pins exactly one released image (create one key per image)",
                file=err,
            )
            return 2
        context = dict(_pair(item) for item in args.context)
        policy = generate(
            measurements=sets[0].values,
            role_arn=args.role,
            provider_arn=args.provider,
            admin_arns=args.admin,
            encryption_context=context or None,
        )
    except (AttestationError, KmsPolicyError, ValueError) as exc:
        print(f"nci provider create-key: {exc}", file=err)
        return 2
    kms = client("kms", endpoint_url=args.endpoint_url, region=args.region)
    try:
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
