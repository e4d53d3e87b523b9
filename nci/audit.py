"""``nci audit …``: the auditor's commands.

``nci audit verify DOC`` checks one attestation document and prints each step; ``nci audit policy``
lints a KMS key policy; ``nci audit eif FILE`` prints the PCRs of an enclave image. Exit status:
0 valid (no error finding), 1 rejected (or a malformed image), 2 usage or I/O error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from botocore.exceptions import BotoCoreError, ClientError

from attestation.document import MAX_DOCUMENT_SIZE
from attestation.eif import EifError, read_eif
from attestation.errors import ConfigError, MeasurementNotPinned
from attestation.expectations import load_expectations, parse_pcr_option
from attestation.policy import (
    Check,
    ExpectedMeasurements,
    ExpectedNonce,
    MaxAge,
    Nonce,
    PcrSet,
    Policy,
    RejectDebugMode,
    UnsafeAllowDebugMode,
)
from attestation.report import AuditReport, audit
from attestation.roots import TrustRoot
from kms_policy import KeyPolicy, check
from kms_policy.errors import KmsPolicyError
from nci._aws import client, region_of

__all__ = ["add_parser"]

EXIT_VALID, EXIT_REJECTED, EXIT_USAGE = 0, 1, 2
_MAX_AGE_LIMIT = 10 * 365 * 86400.0  # ten years; also rejects inf and nan
# base64 or hex text of a maximal document, plus whitespace
_MAX_INPUT = MAX_DOCUMENT_SIZE * 3


class UsageError(Exception):
    """A bad option or an unreadable input: exit status 2."""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit_parser = subparsers.add_parser("audit", help="verify attestation documents (auditors)")
    commands = audit_parser.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    v = commands.add_parser(
        "verify",
        help="verify one attestation document and print each check",
        description="Verify an attestation document: AWS chain, COSE signature, measurements. "
        "DOC is raw CBOR, base64 or hex; '-' reads standard input.",
    )
    v.add_argument("doc", metavar="DOC", help="attestation document file, or - for stdin")
    v.add_argument(
        "--expect",
        type=Path,
        metavar="FILE",
        help="YAML/JSON with one or several accepted PCR sets (nitro-cli Measurements accepted)",
    )
    v.add_argument(
        "--pcr",
        action="append",
        default=[],
        metavar="INDEX=HEX",
        help="expected PCR value (repeatable); added to every --expect set",
    )
    v.add_argument("--nonce", metavar="HEX", help="expected nonce")
    v.add_argument("--max-age", type=float, metavar="SECONDS", help="maximum document age")
    when = v.add_mutually_exclusive_group()
    when.add_argument("--at", metavar="ISO8601", help="verification time (default: now)")
    when.add_argument(
        "--at-document-time",
        action="store_true",
        help="check certificates at the document's own timestamp (authenticity, not freshness)",
    )
    v.add_argument(
        "--allow-debug",
        action="store_true",
        help="UNSAFE: accept debug-mode enclaves, whose memory the parent can read",
    )
    v.add_argument(
        "--trust-local-root",
        type=Path,
        metavar="PEM",
        help="also trust this local (emulator) root; such documents involve no Nitro hardware",
    )
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(handler=_verify_command)

    p = commands.add_parser(
        "policy",
        help="lint a KMS key policy: who can obtain the data key, under which measurements",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--policy", type=Path, metavar="FILE", help="key policy JSON file")
    source.add_argument("--key-id", metavar="ID", help="fetch the policy of this KMS key")
    p.add_argument("--expect", type=Path, metavar="FILE", help="expected PCR set(s)")
    p.add_argument("--role", metavar="ARN", help="the parent instance's role, for targeted rules")
    p.add_argument(
        "--provider", metavar="ARN", help="who seals (the one principal that may make data keys)"
    )
    p.add_argument("--endpoint-url", help="KMS endpoint, with --key-id")
    p.add_argument(
        "--region",
        help="AWS region, with --key-id (default: the key ARN's, else the AWS environment's)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_policy_command)

    e = commands.add_parser(
        "eif",
        help="print the PCRs of an enclave image file, as nitro-cli's Measurements",
        description="Read an EIF strictly and print PCR0, PCR1, PCR2 (and PCR8 if signed) in the "
        "shape of nitro-cli build-enclave's Measurements, which --expect accepts. --json prints "
        "the Measurements object itself; --json --nitro-cli wraps it as nitro-cli build-enclave "
        'prints it, {"Measurements": {...}}, so that the two outputs can be diffed.',
    )
    e.add_argument("file", metavar="FILE", type=Path, help="enclave image file (.eif)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument(
        "--nitro-cli",
        action="store_true",
        help='with --json: the whole nitro-cli build-enclave output, {"Measurements": {...}}',
    )
    e.set_defaults(handler=_eif_command)


def _verify_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        raw = _read_document(args.doc)
        roots = [TrustRoot.aws_nitro_g1()]
        if args.trust_local_root is not None:
            roots.append(TrustRoot.local(_read_small(args.trust_local_root, "local root")))
        now = _parse_time(args.at) if args.at else datetime.now(UTC)
        if args.at_document_time and args.max_age is not None:
            raise UsageError(
                "--max-age checks freshness; it cannot be combined with --at-document-time"
            )
        policy = _policy(args)
    except (UsageError, ConfigError) as exc:
        print(f"nci audit verify: {exc}", file=err)
        return EXIT_USAGE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = audit(
            raw, roots=roots, now=now, policy=policy, at_document_time=args.at_document_time
        )
    for message in sorted({str(w.message) for w in caught}):
        print(f"WARNING: {message}", file=err)
    if args.json:
        json.dump(report.to_json(), out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        _print_human(report, out)
    return EXIT_VALID if report.valid else EXIT_REJECTED


def _policy_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        text = _policy_text(args)
        policy = KeyPolicy.from_json(text)
        expect = [s.values for s in load_expectations(args.expect)] if args.expect else None
        report = check(policy, expect=expect, role_arn=args.role, provider_arn=args.provider)
    except (UsageError, ConfigError, KmsPolicyError) as exc:
        print(f"nci audit policy: {exc}", file=err)
        return EXIT_USAGE
    if args.json:
        json.dump(report.to_json(), out, indent=2)
        out.write("\n")
    else:
        out.write(report.summary() + "\n")
    return EXIT_VALID if report.ok else EXIT_REJECTED


def _eif_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path: Path = args.file
    if args.nitro_cli and not args.json:
        print("nci audit eif: --nitro-cli is an output shape of --json", file=err)
        return EXIT_USAGE
    try:
        with path.open("rb") as fh:
            image = read_eif(fh)
    except OSError as exc:
        print(f"nci audit eif: cannot read {path}: {exc.strerror or exc}", file=err)
        return EXIT_USAGE
    except EifError as exc:
        print(f"nci audit eif: {path} is not a valid EIF: {exc}", file=err)
        return EXIT_REJECTED
    measurements: dict[str, str] = {"HashAlgorithm": "Sha384 { ... }"}
    for index, value in sorted(image.pcrs.items()):
        measurements[f"PCR{index}"] = value.hex()
    if args.json:
        # nitro-cli prints a BTreeMap with serde_json's pretty printer: sorted keys, two spaces
        document = {"Measurements": measurements} if args.nitro_cli else measurements
        json.dump(document, out, indent=2, sort_keys=True)
        out.write("\n")
    else:
        for key, text in measurements.items():
            out.write(f"{key}: {json.dumps(text)}\n")
    return EXIT_VALID


def _policy_text(args: argparse.Namespace) -> str:
    if args.policy is not None:
        try:
            return _read_small(args.policy, "key policy").decode("utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"key policy {args.policy} is not UTF-8") from None
    try:
        region = args.region or region_of(args.key_id)
        kms = client("kms", endpoint_url=args.endpoint_url, region=region)
        answer = kms.get_key_policy(KeyId=args.key_id, PolicyName="default")
    except (ClientError, BotoCoreError) as exc:
        raise UsageError(f"cannot fetch the policy of {args.key_id}: {exc}") from None
    return str(answer["Policy"])


def _policy(args: argparse.Namespace) -> Policy:
    extra_pins: dict[int, bytes] = {}
    for item in args.pcr:
        index, value = parse_pcr_option(item)
        if index in extra_pins:
            raise UsageError(f"--pcr {index} is given twice")
        extra_pins[index] = value
    sets: list[PcrSet] = load_expectations(args.expect) if args.expect is not None else []
    if sets and extra_pins:
        sets = [PcrSet({**s.values, **extra_pins}) for s in sets]
    elif extra_pins:
        sets = [PcrSet(extra_pins)]
    measurements = ExpectedMeasurements(tuple(sets)) if sets else None
    extra: list[Check] = []
    if args.nonce is not None:
        extra.append(ExpectedNonce(Nonce.from_hex(args.nonce)))
    if args.max_age is not None:
        if not 0 < args.max_age <= _MAX_AGE_LIMIT:
            raise UsageError(
                f"--max-age must be a positive number of seconds, at most {_MAX_AGE_LIMIT:.0f}"
            )
        extra.append(MaxAge(timedelta(seconds=args.max_age)))
    debug = UnsafeAllowDebugMode() if args.allow_debug else RejectDebugMode()
    return Policy(measurements, debug=debug, extra=tuple(extra))


def _read_small(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_INPUT + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > _MAX_INPUT:
        raise UsageError(f"{what} {path} is larger than {_MAX_INPUT} bytes")
    return data


def _read_document(name: str) -> bytes:
    if name == "-":
        data = sys.stdin.buffer.read(_MAX_INPUT + 1)
        if len(data) > _MAX_INPUT:
            raise UsageError(f"standard input is larger than {_MAX_INPUT} bytes")
    else:
        data = _read_small(Path(name), "document")
    return decode_document_text(data)


def decode_document_text(data: bytes) -> bytes:
    """Raw CBOR as is; otherwise hex or base64 text (whitespace ignored), as APIs often ship it."""
    if data[:1] in (b"\x84", b"\xd2"):
        return data
    text = b"".join(data.split())
    if not text:
        raise UsageError("the document is empty")
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        pass
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise UsageError("the document is neither CBOR nor hex nor base64") from None


def _parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--at {text!r} is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise UsageError("--at needs a time zone, e.g. 2024-01-01T00:00:00Z")
    return when


def _printable(text: str) -> str:
    """Escape anything a terminal could interpret: reports quote attacker-chosen text."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def _print_human(report: AuditReport, out: TextIO) -> None:
    width = max(len(c.name) for c in report.checks)
    for outcome in report.checks:
        mark = "ok  " if outcome.ok else "FAIL"
        out.write(f"[{mark}] {outcome.name:<{width}}  {_printable(outcome.detail)}\n")
    if report.module_id is not None:
        stamp = datetime.fromtimestamp((report.timestamp_ms or 0) / 1000, tz=UTC)
        out.write(f"module_id: {_printable(report.module_id)}\n")
        out.write(f"timestamp: {stamp.isoformat()} ({report.timestamp_ms} ms)\n")
        out.write(f"root:      {report.root or 'untrusted'}\n")
        out.write(f"debug:     {'YES' if report.debug else 'no'}\n")
        for index, value in report.pcrs.items():
            out.write(f"PCR{index:<2}     {value}\n")
    for note in report.notes:
        out.write(f"NOTE: {note}\n")
    if report.valid:
        out.write("RESULT: VALID\n")
    elif isinstance(report.error, MeasurementNotPinned) and report.authentic:
        out.write(
            "RESULT: AUTHENTIC, NOT VERIFIED: no measurement pinned (use --expect or --pcr)\n"
        )
    else:
        error = _printable(str(report.error))
        out.write(f"RESULT: REJECTED ({type(report.error).__name__}): {error}\n")
