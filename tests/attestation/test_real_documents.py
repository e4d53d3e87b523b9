"""Real documents from Nitro hardware: accepted at their own time, rejected for the right reason."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from attestation.document import AttestationDocument
from attestation.errors import (
    CertificateExpired,
    ConfigError,
    DebugModeDocument,
    MeasurementMismatch,
    NonceMismatch,
    SignatureInvalid,
    StaleDocument,
)
from attestation.policy import (
    ExpectedMeasurements,
    Nonce,
    Policy,
    UnsafeAllowDebugMode,
    UnsafeNoMeasurements,
    UnsafePolicyWarning,
)
from attestation.report import audit
from attestation.roots import AWS_NITRO_ROOT_G1_SHA256, TrustRoot
from attestation.verify import verify
from tests.attestation.helpers import (
    ALL,
    BAD_SIGNATURE,
    DEBUG,
    PRODUCTION,
    doc_time,
    just_after,
    meta,
    pcrs,
    raw,
)

AWS = [TrustRoot.aws_nitro_g1()]
TODAY = datetime(2026, 11, 27, tzinfo=UTC)


def _policy(n: int, **kwargs: object) -> Policy:
    return Policy.expect(pcrs(n, 0, 1, 2), **kwargs)  # type: ignore[arg-type]


def test_assets_are_the_recorded_bytes() -> None:
    for n in ALL:
        assert hashlib.sha256(raw(n)).hexdigest() == meta(n)["sha256"]


def test_packaged_root_matches_pinned_fingerprint() -> None:
    root = TrustRoot.aws_nitro_g1()
    assert hashlib.sha256(root.certificate_der).hexdigest().upper() == AWS_NITRO_ROOT_G1_SHA256
    assert root.is_nitro_hardware


@pytest.mark.parametrize("n", ALL)
def test_parses_every_real_document(n: int) -> None:
    doc = AttestationDocument.from_cbor(raw(n))
    m = meta(n)
    assert doc.module_id == m["module_id"]
    assert doc.timestamp_ms == m["timestamp_ms"]
    assert sorted(doc.pcrs) == list(range(16))
    assert doc.pcrs[0].hex() == m["pcr0"]
    assert doc.is_debug_mode is m["debug_mode_pcrs_zero"]
    for field in ("public_key", "user_data", "nonce"):
        length = m["optional_field_lengths"][field]
        value = getattr(doc, field)
        assert (value is None) if not length else len(value) == length


@pytest.mark.parametrize("n", PRODUCTION)
def test_production_document_verifies_at_its_own_time(n: int) -> None:
    result = verify(raw(n), roots=AWS, now=just_after(n), policy=_policy(n))
    assert result.module_id == meta(n)["module_id"]
    assert result.is_nitro_hardware
    assert [c.name for c in result.checks] == [
        "parse", "chain", "validity", "signature", "debug mode", "measurements",
    ]  # fmt: skip
    assert all(c.ok for c in result.checks)


@pytest.mark.parametrize("n", [*PRODUCTION, *DEBUG, BAD_SIGNATURE])
def test_rejects_real_document_as_expired_today(n: int) -> None:
    with pytest.raises(CertificateExpired):
        verify(raw(n), roots=AWS, now=TODAY, policy=_policy(n))


@pytest.mark.parametrize("n", DEBUG)
def test_rejects_debug_mode_document(n: int) -> None:
    with pytest.raises(DebugModeDocument, match="debug mode"):
        verify(raw(n), roots=AWS, now=just_after(n), policy=_policy(n))


@pytest.mark.parametrize("n", DEBUG)
def test_debug_mode_document_accepted_only_with_unsafe_escape_hatch(n: int) -> None:
    policy = Policy(ExpectedMeasurements.of(pcrs(n, 0, 1, 2, 3)), debug=UnsafeAllowDebugMode())
    with pytest.warns(UnsafePolicyWarning, match="debug-mode"):
        result = verify(raw(n), roots=AWS, now=just_after(n), policy=policy)
    assert result.document.is_debug_mode


def test_rejects_document_with_invalid_signature() -> None:
    policy = Policy(ExpectedMeasurements.of(pcrs(8, 4)), debug=UnsafeAllowDebugMode())
    with pytest.raises(SignatureInvalid):
        verify(raw(BAD_SIGNATURE), roots=AWS, now=just_after(BAD_SIGNATURE), policy=policy)


def test_rejects_wrong_measurements() -> None:
    wrong = {0: bytes(48), 1: pcrs(1, 1)[1], 2: pcrs(1, 2)[2]}
    wrong[0] = bytes([1]) * 48
    with pytest.raises(MeasurementMismatch, match="PCR0"):
        verify(raw(1), roots=AWS, now=just_after(1), policy=Policy.expect(wrong))


def test_accepts_any_of_several_measurement_sets_for_rolling_deploys() -> None:
    policy = Policy.expect(pcrs(3, 0, 1, 2), pcrs(1, 0, 1, 2))
    result = verify(raw(1), roots=AWS, now=just_after(1), policy=policy)
    assert "set 2 of 2" in result.checks[-1].detail


def test_rejects_verification_without_any_expected_measurement() -> None:
    with pytest.raises(ConfigError, match="no measurement"):
        verify(raw(1), roots=AWS, now=just_after(1), policy=Policy(None))


def test_unsafe_no_measurements_warns_on_every_use() -> None:
    policy = Policy(UnsafeNoMeasurements())
    for _ in range(2):
        with pytest.warns(UnsafePolicyWarning):
            verify(raw(1), roots=AWS, now=just_after(1), policy=policy)


def test_nonce_matches_real_document() -> None:
    nonce = Nonce(AttestationDocument.from_cbor(raw(1)).nonce or b"")
    verify(raw(1), roots=AWS, now=just_after(1), policy=_policy(1, nonce=nonce))


def test_rejects_wrong_nonce() -> None:
    with pytest.raises(NonceMismatch):
        verify(raw(1), roots=AWS, now=just_after(1), policy=_policy(1, nonce=Nonce(b"\x01" * 32)))


def test_rejects_absent_nonce_when_one_is_expected() -> None:
    # nitro-doc-6 carries an empty nonce: it answers no challenge
    with pytest.raises(NonceMismatch, match="absent"):
        verify(raw(6), roots=AWS, now=just_after(6), policy=_policy(6, nonce=Nonce.random()))


def test_rejects_stale_document_under_max_age() -> None:
    later = doc_time(1) + timedelta(hours=1)
    policy = _policy(1, max_age=timedelta(minutes=5))
    with pytest.raises(StaleDocument, match="old"):
        verify(raw(1), roots=AWS, now=later, policy=policy)


def test_rejects_document_dated_in_the_future_under_max_age() -> None:
    earlier = doc_time(1) - timedelta(minutes=10)
    policy = _policy(1, max_age=timedelta(minutes=5))
    # the leaf certificate already exists 3 s before the document; move back less than that
    with pytest.raises((StaleDocument, CertificateExpired)):
        verify(raw(1), roots=AWS, now=earlier, policy=policy)


def test_fresh_document_passes_max_age() -> None:
    policy = _policy(1, max_age=timedelta(minutes=5))
    verify(raw(1), roots=AWS, now=just_after(1), policy=policy)


def test_requires_timezone_aware_now() -> None:
    with pytest.raises(ConfigError, match="timezone"):
        verify(raw(1), roots=AWS, now=datetime(2022, 10, 13), policy=_policy(1))


@pytest.mark.parametrize("n", ALL)
def test_audit_report_lists_every_check(n: int) -> None:
    report = audit(raw(n), roots=AWS, now=TODAY, policy=_policy(n), at_document_time=True)
    names = [c.name for c in report.checks]
    assert names == ["parse", "chain", "validity", "signature", "debug mode", "measurements"]
    expected_error = {
        **dict.fromkeys(PRODUCTION, None),
        **dict.fromkeys(DEBUG, DebugModeDocument),
        BAD_SIGNATURE: SignatureInvalid,
    }[n]
    if expected_error is None:
        assert report.valid
    else:
        assert isinstance(report.error, expected_error)
    assert report.to_json()["root"] == "aws-nitro-enclaves-g1"
    assert any("authenticity, not freshness" in note for note in report.notes)


def test_audit_report_keeps_checking_after_a_failure() -> None:
    report = audit(raw(BAD_SIGNATURE), roots=AWS, now=TODAY, policy=_policy(BAD_SIGNATURE))
    outcomes = {c.name: c.ok for c in report.checks}
    assert outcomes == {
        "parse": True,
        "chain": True,
        "validity": False,
        "signature": False,
        "debug mode": False,
        "measurements": True,
    }
    assert isinstance(report.error, CertificateExpired)
