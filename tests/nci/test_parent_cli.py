"""`nci parent serve-bundles`: a real process serving the checked-in bundle to an enclave."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from enclave.unlock import Unlocker
from nci.cli import main
from protocol.transport import parse_address

VECTORS = Path(__file__).resolve().parent.parent / "assets" / "bundle"
META = json.loads((VECTORS / "vectors.json").read_text())


class FixedKeys:
    def decrypt(
        self, blob: bytes, *, encryption_context: Mapping[str, str], key_id: str | None = None
    ) -> bytes:
        return bytes.fromhex(META["data_key"])


def test_serves_a_bundle_folder_to_the_enclave_until_sigterm(tmp_path: Path) -> None:
    socket_path = tmp_path / "parent.sock"
    command = [
        sys.executable, "-m", "nci", "parent", "serve-bundles",
        "--listen", f"unix://{socket_path}", "--bundle", f"tiny={VECTORS}",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            assert "serving tiny" in proc.stdout.readline()
            unlocker = Unlocker(
                parse_address(f"unix://{socket_path}"),
                FixedKeys(),
                expected_model_id=META["model_id"],
                expected_kms_key_id=META["kms_key_id"],
                timeout=10,
            )
            model = unlocker.load("tiny")
            assert set(model.tensors) == {t["name"] for t in META["tensors"]}
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--listen", "tcp://nowhere", "--bundle", "a=b"], "port"),
        (["--listen", "unix:///tmp/x.sock", "--bundle", "no-equals-sign"], "NAME=FOLDER"),
        (["--listen", "unix:///tmp/x.sock", "--bundle", "a=s3://"], "s3://BUCKET"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert main(["parent", "serve-bundles", *argv], out=out, err=err) == 2
    assert message in err.getvalue()
