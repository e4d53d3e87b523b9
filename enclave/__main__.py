"""``python -m enclave --config FILE``: boot the enclave and serve until SIGTERM or SIGINT.

This is the enclave image's entry point (``nci enclave run --config FILE`` does the same from the
``nci`` command). In the image it runs with ``--inside-image`` (enclave/image/entrypoint.sh),
which first brings the loopback interface up and maps the configured KMS host to it
(:func:`enclave.netif.prepare_image`); nowhere else. Exit status: 0 after a clean shutdown, 1 when
the boot failed and the configuration sets ``exit_on_failure``, 2 for an unreadable or invalid
configuration, an address that cannot be listened on, or a network setup the kernel refused.
Without ``exit_on_failure`` a failed enclave stays up answering health with state ``failed``, so
that the parent can report why.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from enclave.boot import run
from enclave.config import load_config
from enclave.errors import EnclaveError
from enclave.netif import prepare_image
from protocol.errors import ProtocolError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m enclave", description="Boot the enclave and serve until SIGTERM or SIGINT."
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="the enclave's JSON configuration"
    )
    parser.add_argument(
        "--inside-image",
        action="store_true",
        help="in the Nitro enclave image only: bring lo up and map the KMS host to 127.0.0.1",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
        if args.inside_image:
            try:
                prepare_image(config)
            except (OSError, ValueError) as exc:  # the kernel refused, or /etc/hosts
                print(f"python -m enclave: network setup failed: {exc}", file=sys.stderr)
                return 2
        return run(config)
    except (EnclaveError, ProtocolError) as exc:
        print(f"python -m enclave: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
