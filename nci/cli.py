"""``nci``: one command, a subcommand group per role (``audit``, ``demo``; more as roles land).

Every command returns an exit status instead of raising: 0 success (or a valid document), 1 a
rejection, 2 a usage or I/O error. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from nci import audit, consumer, demo, enclave, kms, parent, provider

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nci",
        description="Confidential multimodal inference on AWS Nitro Enclaves.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    audit.add_parser(groups)
    consumer.add_parser(groups)
    demo.add_parser(groups)
    enclave.add_parser(groups)
    kms.add_parser(groups)
    parent.add_parser(groups)
    provider.add_parser(groups)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code) if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=err,
    )
    try:
        status: int = args.handler(args, out, err)
    except BrokenPipeError:  # `nci … | head`: the reader left; not an error of ours
        return 0
    return status
