"""``nci kms serve``: the local attestation-aware KMS (moto server + Recipient + key policies)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from types import FrameType
from typing import TextIO

from attestation.errors import AttestationError
from attestation.roots import TrustRoot
from kms_policy.errors import KmsPolicyError
from kms_policy.localkms import LocalKms, LocalKmsConfig, principals_from

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("kms", help="the local attestation-aware KMS")
    commands = group.add_subparsers(dest="kms_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve",
        help="serve KMS (and S3) on loopback until interrupted",
        description="Run moto's KMS and S3 on loopback, with Recipient support and key-policy "
        "enforcement. Callers are identified by their access key id.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=0, help="TCP port (default: any free port)")
    serve.add_argument("--config", type=Path, help="YAML: principals and trusted_roots")
    serve.add_argument(
        "--principal",
        action="append",
        default=[],
        metavar="ACCESS_KEY_ID=ARN",
        help="map an access key id to a principal (repeatable)",
    )
    serve.add_argument(
        "--trust-local-root",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="also accept attestation documents under this local (emulator) root",
    )
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        if args.config is not None:
            config = LocalKmsConfig.from_yaml(args.config)
        else:
            roots = [TrustRoot.aws_nitro_g1()]
            roots += [TrustRoot.local(path.read_bytes()) for path in args.trust_local_root]
            config = LocalKmsConfig(
                principals=principals_from(args.principal), trusted_roots=tuple(roots)
            )
        kms = LocalKms(config, host=args.host, port=args.port).start()
    except (KmsPolicyError, AttestationError, OSError) as exc:
        print(f"nci kms serve: {exc}", file=err)
        return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"local KMS listening on {kms.endpoint_url}", file=out, flush=True)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        kms.stop()
    return 0
