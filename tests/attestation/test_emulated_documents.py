"""Emulator documents: one verifier serves them and AWS's, each under its own root only."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from attestation import _measure
from attestation.document import AttestationDocument
from attestation.emulator import EmulatedNsm
from attestation.errors import (
    ChainInvalid,
    DebugModeDocument,
    MeasurementMismatch,
    StaleDocument,
)
from attestation.nsm import NsmClient
from attestation.policy import (
    ExpectedMeasurements,
    Nonce,
    Policy,
    UnsafeAllowDebugMode,
    UnsafePolicyWarning,
)
from attestation.roots import TrustRoot
from attestation.verify import authenticate, verify
from nci.cli import main
from tests.assets import generate_synthetic as synthetic

SYNTHETIC = synthetic.HERE
VECTORS = json.loads((SYNTHETIC / "vectors.json").read_text())
LOCAL = TrustRoot.local((SYNTHETIC / "local-root.pem").read_bytes())
AWS = TrustRoot.aws_nitro_g1()
EXPECTED = {int(i): bytes.fromhex(v) for i, v in VECTORS["measurements"].items()}
AT = synthetic.NOW + timedelta(seconds=1)


def vector(name: str) -> bytes:
    return (SYNTHETIC / f"{name}.cbor").read_bytes()


def test_regenerating_synthetic_vectors_changes_nothing(tmp_path: Path) -> None:
    synthetic.write(tmp_path)
    for path in sorted(SYNTHETIC.iterdir()):
        if path.suffix in {".cbor", ".pem", ".json"}:
            assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize(
    "name", ["emulated-definite", "emulated-indefinite", "emulated-max-fields", "emulated-user-pcr"]
)
def test_emulated_vector_verifies_under_the_local_root(name: str) -> None:
    case = VECTORS["cases"][name]
    policy = Policy.expect(EXPECTED, nonce=Nonce(bytes.fromhex(case["nonce"])))
    result = verify(vector(name), roots=[AWS, LOCAL], now=AT, policy=policy)
    assert result.root.name == "local"
    assert not result.is_nitro_hardware


@pytest.mark.parametrize("name", sorted(VECTORS["cases"]))
def test_rejects_emulated_document_under_the_aws_root(name: str) -> None:
    policy = Policy(ExpectedMeasurements.of(EXPECTED), debug=UnsafeAllowDebugMode())
    with pytest.raises(ChainInvalid, match="not a trusted root"):
        verify(vector(name), roots=[AWS], now=AT, policy=policy)


def test_verifies_indefinite_length_payload_map() -> None:
    doc = AttestationDocument.from_cbor(vector("emulated-indefinite"))
    assert doc.payload[:1] == b"\xbf"
    assert doc.payload[-1:] == b"\xff"


def test_verifies_1024_byte_optional_fields() -> None:
    policy = Policy.expect(
        EXPECTED, nonce=Nonce(b"\x03" * 1024), public_key=b"\x01" * 1024, user_data=b"\x02" * 1024
    )
    verify(vector("emulated-max-fields"), roots=[LOCAL], now=AT, policy=policy)


def test_rejects_emulated_debug_document_unless_allowed() -> None:
    with pytest.raises(DebugModeDocument):
        verify(vector("emulated-debug"), roots=[LOCAL], now=AT, policy=Policy.expect(EXPECTED))
    doc = AttestationDocument.from_cbor(vector("emulated-debug"))
    assert doc.pcrs[3] != bytes(48)
    assert doc.pcrs[4] != bytes(48)
    policy = Policy(ExpectedMeasurements.of({3: doc.pcrs[3]}), debug=UnsafeAllowDebugMode())
    with pytest.warns(UnsafePolicyWarning):
        verify(vector("emulated-debug"), roots=[LOCAL], now=AT, policy=policy)


def test_locked_user_pcr_is_attested_with_the_extend_rule() -> None:
    doc = AttestationDocument.from_cbor(vector("emulated-user-pcr"))
    expected = _measure.extend(bytes(48), b"nci synthetic user measurement")
    assert doc.pcrs[16] == expected
    verify(vector("emulated-user-pcr"), roots=[LOCAL], now=AT, policy=Policy.expect({16: expected}))


def test_live_emulator_round_trip_with_fresh_nonce(tmp_path: Path) -> None:
    nsm = EmulatedNsm(state_dir=tmp_path)
    nonce = Nonce.random()
    document = NsmClient(nsm).attestation(nonce=nonce.value, public_key=b"enclave key")
    roots = [AWS, TrustRoot.local(nsm.root_pem)]
    policy = Policy.expect(
        _measure.application_measurements(),
        nonce=nonce,
        max_age=timedelta(minutes=1),
        public_key=b"enclave key",
    )
    result = verify(document, roots=roots, now=datetime.now(UTC), policy=policy)
    assert result.nonce == nonce.value


def test_rejects_document_from_another_local_ca(tmp_path: Path) -> None:
    theirs = EmulatedNsm(state_dir=tmp_path / "theirs")
    ours = EmulatedNsm(state_dir=tmp_path / "ours")
    document = NsmClient(theirs).attestation(nonce=Nonce.random().value)
    with pytest.raises(ChainInvalid):
        verify(
            document,
            roots=[TrustRoot.local(ours.root_pem)],
            now=datetime.now(UTC),
            policy=Policy.expect(_measure.application_measurements()),
        )


def test_changed_enclave_code_fails_the_pinned_measurements(tmp_path: Path) -> None:
    changed = dict(_measure.application_measurements())
    changed[0] = _measure.extend(changed[0], b"one more line of enclave code")
    nsm = EmulatedNsm(state_dir=tmp_path, measurements=changed)
    document = NsmClient(nsm).attestation()
    with pytest.raises(MeasurementMismatch, match="PCR0"):
        verify(
            document,
            roots=[TrustRoot.local(nsm.root_pem)],
            now=datetime.now(UTC),
            policy=Policy.expect(_measure.application_measurements()),
        )


def test_cli_says_no_nitro_hardware_for_emulated_documents(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    status = main(
        [
            "audit", "verify", str(SYNTHETIC / "emulated-definite.cbor"),
            "--trust-local-root", str(SYNTHETIC / "local-root.pem"),
            "--at", AT.isoformat(), "--pcr", f"0={EXPECTED[0].hex()}",
        ],
        out=out,
        err=err,
    )  # fmt: skip
    assert status == 0, err.getvalue()
    assert "not by Nitro hardware" in out.getvalue()
    out = io.StringIO()
    status = main(
        ["audit", "verify", str(SYNTHETIC / "emulated-definite.cbor"), "--at", AT.isoformat(),
         "--json"],
        out=out,
        err=err,
    )  # fmt: skip
    assert status == 1
    assert json.loads(out.getvalue())["error"]["type"] == "ChainInvalid"


def test_authenticate_accepts_debug_documents_and_leaves_measurements_to_the_caller() -> None:
    authentic = authenticate(
        vector("emulated-debug"), roots=[LOCAL], now=AT, max_age=timedelta(minutes=5)
    )
    assert authentic.document.is_debug_mode
    assert authentic.root.name == "local"


def test_authenticate_rejects_stale_and_untrusted_documents() -> None:
    later = AT + timedelta(minutes=10)
    with pytest.raises(StaleDocument):
        authenticate(
            vector("emulated-definite"), roots=[LOCAL], now=later, max_age=timedelta(minutes=5)
        )
    with pytest.raises(ChainInvalid):
        authenticate(vector("emulated-definite"), roots=[AWS], now=AT, max_age=timedelta(minutes=5))
