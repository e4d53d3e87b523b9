"""``nci parent …``: the parent instance's services (untrusted: they move ciphertext only).

``nci parent serve-bundles --listen ADDRESS --bundle NAME=SOURCE …`` serves sealed bundles to the
enclave: SOURCE is a bundle folder or ``s3://BUCKET/PREFIX``. It runs until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from pathlib import Path
from typing import TextIO

from botocore.exceptions import BotoCoreError

from parent.bundlesource import BundleSource, FolderSource, S3Source, s3_client_config
from parent.streamer import BundleStreamer
from protocol.errors import ProtocolError
from protocol.transport import Address, parse_address

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("parent", help="the parent instance's services (operators)")
    commands = group.add_subparsers(dest="parent_command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve-bundles",
        help="serve sealed bundles to the enclave (ciphertext only) until interrupted",
    )
    serve.add_argument(
        "--listen",
        required=True,
        metavar="ADDRESS",
        help="enclave-facing address: vsock://CID:PORT on AWS, unix:///path locally",
    )
    serve.add_argument(
        "--bundle",
        action="append",
        required=True,
        metavar="NAME=SOURCE",
        help="a bundle folder or s3://BUCKET/PREFIX, under the name the enclave asks for",
    )
    serve.add_argument("--endpoint-url", help="S3 endpoint (the local moto server, for example)")
    serve.add_argument("--region", default="us-east-1", help="AWS region (default: us-east-1)")
    serve.set_defaults(handler=_serve_bundles)


def _serve_bundles(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        address = parse_address(args.listen)
        sources = {name: _source(spec, args) for name, spec in map(_pair, args.bundle)}
    except (ProtocolError, ValueError, OSError, BotoCoreError) as exc:
        print(f"nci parent serve-bundles: {exc}", file=err)
        return 2
    try:
        asyncio.run(_run(address, sources, out))
    except ProtocolError as exc:
        print(f"nci parent serve-bundles: {exc}", file=err)
        return 2
    return 0


async def _run(address: Address, sources: dict[str, BundleSource], out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with BundleStreamer(address, sources):
        print(f"serving {', '.join(sorted(sources))} on {address}", file=out, flush=True)
        await stop.wait()


def _pair(item: str) -> tuple[str, str]:
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--bundle {item!r}: expected NAME=FOLDER or NAME=s3://BUCKET/PREFIX")
    return name, spec


def _source(spec: str, args: argparse.Namespace) -> BundleSource:
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{spec!r}: expected s3://BUCKET/PREFIX")
        import boto3

        s3 = boto3.session.Session().client(
            "s3", endpoint_url=args.endpoint_url, region_name=args.region, config=s3_client_config()
        )
        return S3Source(s3, bucket, prefix.strip("/"))
    return FolderSource(Path(spec))
