"""`nci kms serve`, `nci provider create-key`, `nci audit policy`, as users run them."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from moto import mock_aws

from attestation import _measure
from nci.cli import main

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/nci-parent"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:role/nci-provider"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/nci-key-admin"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


@pytest.fixture
def expect_file(tmp_path: Path) -> Path:
    pcrs = _measure.application_measurements()
    path = tmp_path / "measurements.json"
    path.write_text(json.dumps({"Measurements": {f"PCR{i}": v.hex() for i, v in pcrs.items()}}))
    return path


@pytest.fixture
def kms_server(tmp_path: Path) -> Iterator[str]:
    """`nci kms serve` as a real process on loopback; yields its endpoint URL."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [
        sys.executable, "-m", "nci", "kms", "serve",
        "--principal", f"AKIAADMIN={ADMIN}", "--principal", f"AKIAPARENT={ROLE}",
    ]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "listening on http://127.0.0.1:" in line, line
            yield line.rsplit(" ", 1)[1].strip()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def test_create_key_then_audit_its_policy_against_a_served_local_kms(
    kms_server: str, expect_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAADMIN")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    status, out, err = run(
        "provider", "create-key", "--role", ROLE, "--provider", PROVIDER, "--admin", ADMIN,
        "--expect", str(expect_file), "--endpoint-url", kms_server, "--json",
    )  # fmt: skip
    assert status == 0, err
    created = json.loads(out)
    assert created["arn"].endswith(created["key_id"])
    status, out, err = run(
        "audit", "policy", "--key-id", created["key_id"], "--endpoint-url", kms_server,
        "--expect", str(expect_file), "--json",
    )  # fmt: skip
    report = json.loads(out)
    assert status == 0, out + err
    assert report["ok"] is True
    assert report["can_decrypt"]


def test_create_key_for_a_rollout_lets_either_image_decrypt_and_audits_only_with_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the CLI has no built-in region
    images = {
        name: {f"PCR{i}": bytes([seed + i]) * 48 for i in (0, 1, 2)}
        for name, seed in (("old", 0x10), ("new", 0x20))
    }
    files = {}
    for name, pcrs in images.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps({k: v.hex() for k, v in pcrs.items()}))
    both = tmp_path / "both.json"
    both.write_text(json.dumps([{k: v.hex() for k, v in p.items()} for p in images.values()]))
    with mock_aws():
        status, out, err = run(
            "provider", "create-key", "--role", ROLE, "--provider", PROVIDER, "--admin", ADMIN,
            "--expect", str(files["old"]), "--expect", str(files["new"]), "--json",
        )  # fmt: skip
        assert status == 0, err
        created = json.loads(out)
        sids = [s.get("Sid") for s in created["policy"]["Statement"]]
        assert {"EnclaveDecryptsWithAttestation", "EnclaveDecryptsWithAttestation2"} <= set(sids)
        audit = ("audit", "policy", "--key-id", created["key_id"], "--role", ROLE, "--json")
        status, out, _ = run(*audit, "--expect", str(both))
        assert status == 0, out
        status, out, _ = run(*audit, "--expect", str(files["new"]))
        assert status == 1
        assert "KP009" in {f["id"] for f in json.loads(out)["findings"]}


def test_create_key_refuses_one_file_listing_two_images(tmp_path: Path) -> None:
    both = tmp_path / "both.json"
    both.write_text(json.dumps([{"PCR0": "10" * 48}, {"PCR0": "20" * 48}]))
    status, _, err = run(
        "provider", "create-key", "--role", ROLE, "--provider", PROVIDER, "--admin", ADMIN,
        "--expect", str(both),
    )  # fmt: skip
    assert status == 2
    assert "give one file per image" in err


def test_audit_policy_flags_the_aws_default_key_policy(tmp_path: Path) -> None:
    default = {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    path = tmp_path / "default.json"
    path.write_text(json.dumps(default))
    status, out, _ = run("audit", "policy", "--policy", str(path), "--json")
    report = json.loads(out)
    assert status == 1
    assert report["ok"] is False
    assert any(f["severity"] == "error" for f in report["findings"])
    status, out, _ = run("audit", "policy", "--policy", str(path))
    assert status == 1
    assert out.strip()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["audit", "policy", "--policy", "/nonexistent.json"], "cannot read"),
        (["provider", "create-key", "--role", ROLE, "--provider", PROVIDER, "--admin", ADMIN,
          "--expect", "/nonexistent.json"], "cannot read"),
    ],
)  # fmt: skip
def test_usage_errors_exit_2(argv: list[str], message: str) -> None:
    status, out, err = run(*argv)
    assert status == 2
    assert message in err
    assert "Traceback" not in out + err


def test_audit_policy_rejects_malformed_policy_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Maybe"}]}))
    status, _, err = run("audit", "policy", "--policy", str(path))
    assert status == 2
    assert "Effect" in err


def test_kms_serve_refuses_non_loopback_host() -> None:
    status, _, err = run("kms", "serve", "--host", "0.0.0.0", "--principal", f"AKIAX={ROLE}")
    assert status == 2
    assert "loopback" in err


def test_server_stops_promptly_on_sigterm(kms_server: str) -> None:
    start = time.monotonic()
    assert kms_server.startswith("http://127.0.0.1:")
    assert time.monotonic() - start < 5
