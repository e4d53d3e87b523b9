"""Verifying an attestation for a consumer: the document, user_data, and the key binding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest

from attestation import EmulatedNsm, ExpectedMeasurements, Nonce, NsmClient, PcrSet, TrustRoot
from consumer.attest import (
    load_measurements,
    load_roots,
    parse_user_data,
    verify_attestation,
)
from consumer.errors import AttestationFailed, ConfigError
from protocol.ohttp import KeyConfig, generate_key_config
from tests.consumer.fakeserver import MANIFEST_SHA256, MEASUREMENTS, MODEL_ID, expect_yaml

NONCE = Nonce(b"\x07" * 32)
_, KEY_CONFIG = generate_key_config(3)
PUBLIC_KEY = KeyConfig.from_bytes(KEY_CONFIG).public_key
GOOD = {
    "v": 1,
    "ohttp_key_config": KEY_CONFIG,
    "model_id": MODEL_ID,
    "manifest_sha256": MANIFEST_SHA256,
}


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> EmulatedNsm:
    return EmulatedNsm(state_dir=tmp_path_factory.mktemp("state"), measurements=MEASUREMENTS)


def document(
    nsm: EmulatedNsm,
    *,
    user_data: bytes | None = None,
    public_key: bytes | None = PUBLIC_KEY,
    nonce: bytes = NONCE.value,
) -> bytes:
    data = cbor2.dumps(GOOD, canonical=True) if user_data is None else user_data
    return NsmClient(nsm).attestation(nonce=nonce, public_key=public_key, user_data=data)


def check(nsm: EmulatedNsm, raw: bytes, **kwargs: object):  # type: ignore[no-untyped-def]
    options: dict[str, object] = {
        "nonce": NONCE,
        "measurements": ExpectedMeasurements.of(MEASUREMENTS),
        "roots": [TrustRoot.local(nsm.root_pem)],
        "now": datetime.now(UTC),
    }
    options.update(kwargs)
    return verify_attestation(raw, **options)  # type: ignore[arg-type]


def test_a_genuine_attestation_binds_key_model_and_bundle(nsm: EmulatedNsm) -> None:
    attestation = check(nsm, document(nsm))
    assert attestation.key_config == KEY_CONFIG
    assert attestation.key_id == 3
    assert attestation.model_id == MODEL_ID
    assert attestation.manifest_sha256 == MANIFEST_SHA256
    assert attestation.nonce == NONCE.value
    assert not attestation.is_nitro_hardware
    names = [name for name, _ in attestation.checks()]
    assert names == [
        "parse",
        "chain",
        "validity",
        "signature",
        "debug mode",
        "measurements",
        "nonce",
        "freshness",
        "user data",
        "key binding",
    ]
    text = "\n".join(attestation.describe())
    assert "PCR0, PCR1, PCR2 match" in text
    assert MANIFEST_SHA256.hex() in text
    assert "NOT Nitro hardware" in text
    summary = attestation.to_json()
    assert summary["model_id"] == MODEL_ID
    assert summary["nitro_hardware"] is False
    assert not attestation.expired(attestation.verified_at + timedelta(minutes=4))
    assert attestation.expired(attestation.verified_at + timedelta(minutes=6))


def _cbor_map_with_duplicate_key() -> bytes:
    good = cbor2.dumps(GOOD, canonical=True)
    return bytes([0xA5]) + good[1:] + cbor2.dumps("v") + cbor2.dumps(1)


HOSTILE_USER_DATA: dict[str, bytes] = {
    "not CBOR": b"\xff\xff",
    "trailing bytes": cbor2.dumps(GOOD, canonical=True) + b"\x00",
    "not a map": cbor2.dumps([1, 2]),
    "missing key": cbor2.dumps({k: v for k, v in GOOD.items() if k != "model_id"}),
    "unknown key": cbor2.dumps({**GOOD, "extra": 1}),
    "duplicate key": _cbor_map_with_duplicate_key(),
    "version 2": cbor2.dumps({**GOOD, "v": 2}),
    "version as text": cbor2.dumps({**GOOD, "v": "1"}),
    "version as bool": cbor2.dumps({**GOOD, "v": True}),
    "key config as text": cbor2.dumps({**GOOD, "ohttp_key_config": "abc"}),
    "key config malformed": cbor2.dumps({**GOOD, "ohttp_key_config": b"\x01\x00\x10" + bytes(40)}),
    "key config trailing bytes": cbor2.dumps({**GOOD, "ohttp_key_config": KEY_CONFIG + b"\x00"}),
    "key config without a supported suite": cbor2.dumps(
        {**GOOD, "ohttp_key_config": KEY_CONFIG[:35] + b"\x00\x04\x00\x09\x00\x09"}
    ),
    "model id empty": cbor2.dumps({**GOOD, "model_id": ""}),
    "model id with a newline": cbor2.dumps({**GOOD, "model_id": "a\nb"}),
    "model id too long": cbor2.dumps({**GOOD, "model_id": "m" * 257}),
    "digest short": cbor2.dumps({**GOOD, "manifest_sha256": bytes(31)}),
    "digest as text": cbor2.dumps({**GOOD, "manifest_sha256": "00" * 32}),
    "tagged": cbor2.dumps(cbor2.CBORTag(24, cbor2.dumps(GOOD))),
}


@pytest.mark.parametrize("data", HOSTILE_USER_DATA.values(), ids=HOSTILE_USER_DATA.keys())
def test_rejects_hostile_user_data(nsm: EmulatedNsm, data: bytes) -> None:
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, document(nsm, user_data=data))
    assert caught.value.reason == "UserDataInvalid"


def test_parse_user_data_reads_the_contract() -> None:
    assert parse_user_data(cbor2.dumps(GOOD, canonical=True)) == (
        KEY_CONFIG,
        MODEL_ID,
        MANIFEST_SHA256,
    )


def test_rejects_a_document_without_user_data(nsm: EmulatedNsm) -> None:
    raw = NsmClient(nsm).attestation(nonce=NONCE.value, public_key=PUBLIC_KEY)
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw)
    assert caught.value.reason == "UserDataInvalid"


@pytest.mark.parametrize(
    "public_key", [None, bytes(32), PUBLIC_KEY[:-1]], ids=["absent", "other", "short"]
)
def test_rejects_a_key_config_whose_key_is_not_the_documents(
    nsm: EmulatedNsm, public_key: bytes | None
) -> None:
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, document(nsm, public_key=public_key))
    assert caught.value.reason == "KeyBindingMismatch"


def test_rejects_another_nonce_and_an_old_document(nsm: EmulatedNsm) -> None:
    raw = document(nsm)
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, nonce=Nonce(b"\x08" * 32))
    assert caught.value.reason == "NonceMismatch"
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, now=datetime.now(UTC) + timedelta(minutes=6))
    assert caught.value.reason == "StaleDocument"
    assert check(
        nsm, raw, max_age=timedelta(minutes=10), now=datetime.now(UTC) + timedelta(minutes=6)
    )


def test_rejects_other_measurements_and_foreign_roots(nsm: EmulatedNsm) -> None:
    raw = document(nsm)
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, measurements=ExpectedMeasurements.of({0: b"\x00" * 47 + b"\x01"}))
    assert caught.value.reason == "MeasurementMismatch"
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, roots=[TrustRoot.aws_nitro_g1()])
    assert caught.value.reason == "ChainInvalid"


def test_load_measurements_accepts_the_usual_forms(tmp_path: Path) -> None:
    path = tmp_path / "expect.yaml"
    path.write_text(expect_yaml(MEASUREMENTS))
    expected = ExpectedMeasurements.of(MEASUREMENTS)
    assert load_measurements(path) == expected
    assert load_measurements(str(path)) == expected
    assert load_measurements(MEASUREMENTS) == expected
    assert load_measurements(PcrSet(MEASUREMENTS)) == expected
    assert load_measurements(expected) is expected


@pytest.mark.parametrize(
    "expect",
    [None, 42, {}, {0: b"short"}, "/nonexistent/expect.yaml"],
    ids=["none", "int", "empty", "short pcr", "missing file"],
)
def test_load_measurements_refuses_anything_else(expect: object) -> None:
    with pytest.raises(ConfigError):
        load_measurements(expect)  # type: ignore[arg-type]


# Accepted PCR sets that any enclave image matches (/tmp/review/pcr_partial.py): PCR1 is the kernel
# of every EIF one nitro-cli builds; PCR2 the application alone; PCR3/PCR4 the parent's role and
# instance.
SET_PINS_NO_IMAGE: dict[str, dict[int, bytes]] = {
    "kernel only": {1: MEASUREMENTS[1]},
    "application only": {2: MEASUREMENTS[2]},
    "kernel and application": {1: MEASUREMENTS[1], 2: MEASUREMENTS[2]},
    "parent role only": {3: b"\x33" * 48},
    "parent instance only": {4: b"\x44" * 48},
    "role and instance": {3: b"\x33" * 48, 4: b"\x44" * 48},
}


@pytest.mark.parametrize("pcrs", SET_PINS_NO_IMAGE.values(), ids=SET_PINS_NO_IMAGE.keys())
def test_rejects_expectations_that_do_not_pin_the_image(
    nsm: EmulatedNsm, tmp_path: Path, pcrs: dict[int, bytes]
) -> None:
    path = tmp_path / "expect.yaml"
    path.write_text(expect_yaml(pcrs))
    for expect in (path, pcrs, PcrSet(pcrs), ExpectedMeasurements.of(pcrs)):
        with pytest.raises(ConfigError, match=r"must include PCR0 .* or PCR8"):
            load_measurements(expect)  # type: ignore[arg-type]
    # a set is matched alone: one such set among good ones still accepts any image
    with pytest.raises(ConfigError, match="accepted PCR set 2 of 2"):
        load_measurements(ExpectedMeasurements.of(MEASUREMENTS, pcrs))
    # and verify_attestation refuses it before looking at the document
    with pytest.raises(ConfigError):
        check(nsm, document(nsm), measurements=ExpectedMeasurements.of(pcrs))


@pytest.mark.parametrize("index", [0, 8], ids=["image PCR0", "signing certificate PCR8"])
def test_accepts_expectations_pinning_the_image_or_its_signer(index: int) -> None:
    pcrs = {index: b"\x55" * 48, 1: MEASUREMENTS[1]}
    assert load_measurements(pcrs) == ExpectedMeasurements.of(pcrs)


def test_rejects_a_document_for_another_model_or_bundle(nsm: EmulatedNsm) -> None:
    raw = document(nsm)
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, model_id="another-model")
    assert caught.value.reason == "ModelMismatch"
    assert "user_data.model_id" in str(caught.value)
    with pytest.raises(AttestationFailed) as caught:
        check(nsm, raw, manifest_sha256=bytes(32))
    assert caught.value.reason == "ManifestMismatch"
    assert "user_data.manifest_sha256" in str(caught.value)
    pinned = check(nsm, raw, model_id=MODEL_ID, manifest_sha256=MANIFEST_SHA256.hex())
    assert (pinned.model_pinned, pinned.manifest_pinned) == (True, True)
    assert ("pinned model", "model id and manifest equal the expected ones") in pinned.checks()
    assert "(equals the pinned value)" in "\n".join(pinned.describe())


@pytest.mark.parametrize(
    "options",
    [
        {"model_id": ""},
        {"model_id": 7},
        {"model_id": "a\nb"},
        {"manifest_sha256": bytes(31)},
        {"manifest_sha256": "zz" * 32},
        {"manifest_sha256": 0},
    ],
    ids=["empty model", "model not text", "model unprintable", "short digest", "not hex", "int"],
)
def test_refuses_an_unusable_model_or_manifest_pin(
    nsm: EmulatedNsm, options: dict[str, object]
) -> None:
    with pytest.raises(ConfigError):
        check(nsm, document(nsm), **options)


def test_load_roots_trusts_a_local_root_only_when_named(nsm: EmulatedNsm, tmp_path: Path) -> None:
    assert [r.name for r in load_roots()] == ["aws-nitro-enclaves-g1"]
    pem = tmp_path / "root.pem"
    pem.write_bytes(nsm.root_pem)
    assert [r.name for r in load_roots(trust_local_root=pem)] == ["aws-nitro-enclaves-g1", "local"]
    assert [r.name for r in load_roots(trust_local_root=nsm.root_pem)][-1] == "local"
    with pytest.raises(ConfigError):
        load_roots(trust_local_root=tmp_path / "missing.pem")
    with pytest.raises(ConfigError):
        load_roots(trust_local_root=b"not a pem")
    with pytest.raises(ConfigError):
        load_roots(roots=[])
