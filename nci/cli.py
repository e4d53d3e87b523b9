"""``nci``: one command, a subcommand group per role (``audit``, ``demo``; more as roles land).

Every command returns an exit status instead of raising: 0 success (or a valid document), 1 a
rejection, 2 a usage or I/O error. No traceback reaches the user for bad input.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import Final, TextIO

__all__ = ["main"]

# Each group's module is imported only when that group runs (or for --help): the roles' imports
# differ a lot (the parent never needs torch, whose import alone takes seconds).
_GROUPS: Final = ("audit", "consumer", "demo", "enclave", "kms", "parent", "provider")


def _chosen_group(argv: Sequence[str]) -> str | None:
    """The group named by the first non-option argument, if it is one."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in _GROUPS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nci",
        description="Confidential multimodal inference on AWS Nitro Enclaves.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for name in _GROUPS:
        if only is None or name == only:
            importlib.import_module(f"nci.{name}").add_parser(groups)
    return parser


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_chosen_group(argv))
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
