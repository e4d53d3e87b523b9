"""``nci enclave run --config FILE``: boot the enclave and serve until SIGTERM or SIGINT.

The same as ``python -m enclave --config FILE`` (the enclave image's entry point); locally it runs
the enclave as a plain process on unix sockets with the emulated NSM. Exit status: 0 after a clean
shutdown, 1 when the boot failed and the configuration sets ``exit_on_failure``, 2 for an invalid
configuration or an address that cannot be listened on.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TextIO

from enclave.boot import run
from enclave.config import load_config
from enclave.errors import EnclaveError
from protocol.errors import ProtocolError

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("enclave", help="the enclave application (inside the enclave)")
    commands = group.add_subparsers(dest="enclave_command", metavar="COMMAND", required=True)
    serve = commands.add_parser("run", help="boot and serve until SIGTERM or SIGINT")
    serve.add_argument(
        "--config", required=True, type=Path, help="the enclave's JSON configuration"
    )
    serve.set_defaults(handler=_run)


def _run(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        return run(load_config(args.config))
    except (EnclaveError, ProtocolError) as exc:
        print(f"nci enclave run: {type(exc).__name__}: {exc}", file=err)
        return 2
