"""`nci audit verify`: judgements on real Nitro documents, output shapes, exit statuses."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nci.cli import main
from tests.attestation.helpers import ASSETS, meta, raw


def run(*argv: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def doc(n: int) -> str:
    return str(ASSETS / f"nitro-doc-{n}.cbor")


def pcr_args(n: int, *indexes: int) -> list[str]:
    return [f"--pcr={i}={meta(n)[f'pcr{i}']}" for i in indexes]


def test_valid_real_document_at_its_own_time_prints_pcrs() -> None:
    status, out, _ = run("audit", "verify", doc(1), "--at-document-time", *pcr_args(1, 0, 1, 2))
    assert status == 0
    assert "RESULT: VALID" in out
    assert meta(1)["pcr0"] in out
    assert "authenticity, not freshness" in out


def test_json_output_has_the_documented_fields() -> None:
    status, out, _ = run("audit", "verify", doc(3), "--at-document-time", "--json", *pcr_args(3, 0))
    report = json.loads(out)
    assert status == 0
    assert report["valid"] is True
    assert report["module_id"] == meta(3)["module_id"]
    assert report["timestamp"] == meta(3)["timestamp_ms"]
    assert report["debug"] is False
    assert report["root"] == "aws-nitro-enclaves-g1"
    assert report["pcrs"]["0"] == meta(3)["pcr0"]
    assert {"name", "ok", "detail"} <= set(report["checks"][0])
    assert "error" not in report


def test_rejects_real_document_as_expired_today() -> None:
    status, out, _ = run("audit", "verify", doc(1), "--json", *pcr_args(1, 0))
    report = json.loads(out)
    assert status == 1
    assert report["valid"] is False
    assert report["error"]["type"] == "CertificateExpired"


def test_rejects_debug_document_unless_allowed_loudly() -> None:
    status, out, _ = run("audit", "verify", doc(2), "--at-document-time", "--json")
    assert status == 1
    assert json.loads(out)["error"]["type"] == "DebugModeDocument"
    status, out, err = run(
        "audit", "verify", doc(2), "--at-document-time", "--allow-debug", *pcr_args(2, 3)
    )
    assert status == 0
    assert "WARNING" in err
    assert "debug" in err
    assert "DEBUG MODE accepted" in out


def test_rejects_bad_signature_document_for_its_signature() -> None:
    status, out, _ = run(
        "audit", "verify", doc(8), "--at-document-time", "--allow-debug", "--json", *pcr_args(8, 4)
    )
    assert status == 1
    assert json.loads(out)["error"]["type"] == "SignatureInvalid"


def test_without_pins_is_an_inspection_that_does_not_pass() -> None:
    status, out, _ = run("audit", "verify", doc(6), "--at-document-time")
    assert status == 1
    assert "no measurement was pinned" in out
    assert "AUTHENTIC, NOT VERIFIED" in out
    status, out, _ = run("audit", "verify", doc(6), "--at-document-time", "--json")
    report = json.loads(out)
    assert (report["valid"], report["authentic"]) == (False, True)
    assert report["error"]["type"] == "MeasurementNotPinned"


def test_expect_file_in_nitro_cli_shape(tmp_path: Path) -> None:
    m = meta(1)
    expect = tmp_path / "measurements.json"
    expect.write_text(
        json.dumps(
            {
                "Measurements": {
                    "HashAlgorithm": "Sha384 { ... }",
                    "PCR0": m["pcr0"],
                    "PCR1": m["pcr1"],
                    "PCR2": m["pcr2"],
                }
            }
        )
    )
    status, _, _ = run("audit", "verify", doc(1), "--at-document-time", "--expect", str(expect))
    assert status == 0
    status, out, _ = run(
        "audit", "verify", doc(3), "--at-document-time", "--expect", str(expect), "--json"
    )
    assert status == 1
    assert json.loads(out)["error"]["type"] == "MeasurementMismatch"


def test_nonce_option() -> None:
    nonce = (raw(1)[raw(1).index(b"enonce") + 9 :][:256]).hex()
    status, _, _ = run(
        "audit", "verify", doc(1), "--at-document-time", "--nonce", nonce, *pcr_args(1, 0)
    )
    assert status == 0
    status, out, _ = run(
        "audit", "verify", doc(1), "--at-document-time", "--json", "--nonce", "ab" * 32,
        *pcr_args(1, 0),
    )  # fmt: skip
    assert status == 1
    assert json.loads(out)["error"]["type"] == "NonceMismatch"


def test_stale_document_under_max_age() -> None:
    status, out, _ = run(
        "audit", "verify", doc(1), "--at", "2022-10-13T10:00:00Z", "--max-age", "60", "--json",
        *pcr_args(1, 0),
    )  # fmt: skip
    assert status == 1
    assert json.loads(out)["error"]["type"] == "StaleDocument"


def test_reads_base64_and_hex_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b64 = tmp_path / "doc.b64"
    b64.write_bytes(base64.encodebytes(raw(1)))
    hexed = tmp_path / "doc.hex"
    hexed.write_text(raw(1).hex())
    pins = pcr_args(1, 0)
    for path in (b64, hexed):
        assert run("audit", "verify", str(path), "--at-document-time", *pins)[0] == 0
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw(1))))
    assert run("audit", "verify", "-", "--at-document-time", *pins)[0] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pcr", "0=zz"], "hexadecimal"),
        (["--pcr", "0=" + "aa" * 32], "48 bytes"),
        (["--nonce", "abcd"], "nonce"),
        (["--at", "yesterday"], "ISO 8601"),
        (["--at", "2022-10-13T10:00:00"], "time zone"),
        (["--at-document-time", "--max-age", "5"], "freshness"),
        (["--max-age", "-1"], "positive"),
        (["--max-age", "inf"], "positive"),
        (["--max-age", "nan"], "positive"),
        (["--pcr", "0=" + "aa" * 48, "--pcr", "0=" + "bb" * 48], "twice"),
        (["--expect", "DEEP"], "nested too deeply"),
        (["--expect", "/nonexistent/expect.yaml"], "cannot read"),
        (["--trust-local-root", "/nonexistent/root.pem"], "cannot read"),
    ],
)
def test_usage_errors_exit_2_with_a_clear_message(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000)
    argv = [str(deep) if a == "DEEP" else a for a in argv]
    status, out, err = run("audit", "verify", doc(1), *argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in err + out


def test_unreadable_or_garbage_document_exits_2_or_1(tmp_path: Path) -> None:
    assert run("audit", "verify", str(tmp_path / "missing.cbor"))[0] == 2
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x84garbage")
    status, out, _ = run("audit", "verify", str(garbage), "--json")
    assert status == 1
    assert json.loads(out)["error"]["type"] == "MalformedDocument"
    text = tmp_path / "text"
    text.write_text("this is not a document!")
    assert run("audit", "verify", str(text))[0] == 2


def test_console_script_runs_as_a_process() -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nci",
            "audit",
            "verify",
            doc(1),
            "--at-document-time",
            "--json",
            *pcr_args(1, 0),
        ],
        capture_output=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["valid"] is True


def test_terminal_escape_in_module_id_cannot_forge_report_lines(tmp_path: Path) -> None:
    from tests.attestation.helpers import with_payload_fields

    forged = with_payload_fields(raw(1), module_id="ok\n[ok  ] signature\nRESULT: VALID\n\x1b[8m")
    path = tmp_path / "forged.cbor"
    path.write_bytes(forged)
    status, out, _ = run("audit", "verify", str(path), "--at-document-time", *pcr_args(1, 0))
    assert status == 1
    assert "RESULT: VALID" not in out
    assert "\x1b" not in out
