"""HPKE (RFC 9180) base mode: the Appendix A vectors, interop with pyca/cryptography's own HPKE,
and the failures a hostile sender or a wrong key must cause."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hpke as pyca_hpke
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import hpke
from protocol.errors import ConfigError, DecapsulationError, MalformedMessage
from protocol.hpke import AeadId, Suite

VECTORS = json.loads(
    (Path(__file__).resolve().parent.parent / "assets" / "ohttp" / "hpke-rfc9180.json").read_text()
)["vectors"]
H = bytes.fromhex

ALL_AEADS = list(AeadId)
PYCA_AEAD = {
    AeadId.AES_128_GCM: pyca_hpke.AEAD.AES_128_GCM,
    AeadId.AES_256_GCM: pyca_hpke.AEAD.AES_256_GCM,
    AeadId.CHACHA20_POLY1305: pyca_hpke.AEAD.CHACHA20_POLY1305,
}


def suite_of(v: dict[str, Any]) -> Suite:
    return Suite.from_ids(v["kem_id"], v["kdf_id"], v["aead_id"])


def sender(v: dict[str, Any]) -> tuple[bytes, hpke.SenderContext]:
    return hpke.setup_base_sender(
        suite_of(v), H(v["pkRm"]), H(v["info"]), ephemeral_private_key=H(v["skEm"])
    )


# --- RFC 9180 Appendix A -------------------------------------------------------------------------


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["section"])
def test_vector_key_pairs(v: dict[str, Any]) -> None:
    assert hpke.derive_key_pair(H(v["ikmE"])) == (H(v["skEm"]), H(v["pkEm"]))
    if "ikmR" in v:
        assert hpke.derive_key_pair(H(v["ikmR"])) == (H(v["skRm"]), H(v["pkRm"]))
    assert hpke.public_key_of(H(v["skRm"])) == H(v["pkRm"])


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["section"])
def test_vector_key_schedule(v: dict[str, Any]) -> None:
    enc, context = sender(v)
    assert enc == H(v["enc"])
    shared_secret, _ = hpke._encap(H(v["pkRm"]), H(v["skEm"]))
    assert shared_secret == H(v["shared_secret"])
    assert context._key == H(v["key"])
    assert context._base_nonce == H(v["base_nonce"])
    assert context._exporter_secret == H(v["exporter_secret"])
    suite_id = suite_of(v).suite_id
    assert hpke._labeled_extract(suite_id, shared_secret, b"secret", b"") == H(v["secret"])
    if "key_schedule_context" in v:
        ksc = (
            b"\x00"
            + hpke._labeled_extract(suite_id, b"", b"psk_id_hash", b"")
            + hpke._labeled_extract(suite_id, b"", b"info_hash", H(v["info"]))
        )
        assert ksc == H(v["key_schedule_context"])


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["section"])
def test_vector_encryptions_seal_and_open(v: dict[str, Any]) -> None:
    _, context = sender(v)
    recipient = hpke.setup_base_recipient(suite_of(v), H(v["enc"]), H(v["skRm"]), H(v["info"]))
    wanted = {e["sequence_number"]: e for e in v["encryptions"]}
    for seq in range(max(wanted) + 1):
        aad = f"Count-{seq}".encode()
        pt = H(v["encryptions"][0]["pt"])
        assert context._next_nonce() == recipient._next_nonce()
        if seq in wanted:
            assert context._next_nonce() == H(wanted[seq]["nonce"])
            assert aad == H(wanted[seq]["aad"])
        ct = context.seal(aad, pt)
        assert recipient.open(aad, ct) == pt
        if seq in wanted:
            assert ct == H(wanted[seq]["ct"])
    assert context.sequence_number == recipient.sequence_number == max(wanted) + 1


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["section"])
def test_vector_exports(v: dict[str, Any]) -> None:
    _, context = sender(v)
    recipient = hpke.setup_base_recipient(suite_of(v), H(v["enc"]), H(v["skRm"]), H(v["info"]))
    for e in v["exports"]:
        value = H(e["exported_value"])
        assert context.export(H(e["exporter_context"]), e["L"]) == value
        assert recipient.export(H(e["exporter_context"]), e["L"]) == value


# --- Interop with pyca/cryptography's HPKE (single-shot, empty AAD) -------------------------------


@pytest.mark.parametrize("aead", ALL_AEADS, ids=lambda a: a.name)
def test_interop_our_sender_their_recipient(aead: AeadId) -> None:
    sk = X25519PrivateKey.generate()
    suite = Suite.from_ids(0x20, 1, aead)
    enc, context = hpke.setup_base_sender(suite, sk.public_key().public_bytes_raw(), b"info")
    ct = context.seal(b"", b"prompt")
    theirs = pyca_hpke.Suite(pyca_hpke.KEM.X25519, pyca_hpke.KDF.HKDF_SHA256, PYCA_AEAD[aead])
    assert theirs.decrypt(enc + ct, sk, info=b"info") == b"prompt"


@pytest.mark.parametrize("aead", ALL_AEADS, ids=lambda a: a.name)
def test_interop_their_sender_our_recipient(aead: AeadId) -> None:
    sk = X25519PrivateKey.generate()
    theirs = pyca_hpke.Suite(pyca_hpke.KEM.X25519, pyca_hpke.KDF.HKDF_SHA256, PYCA_AEAD[aead])
    message = theirs.encrypt(b"prompt", sk.public_key(), info=b"info")
    suite = Suite.from_ids(0x20, 1, aead)
    recipient = hpke.setup_base_recipient(suite, message[:32], sk.private_bytes_raw(), b"info")
    assert recipient.open(b"", message[32:]) == b"prompt"


# --- Failures -------------------------------------------------------------------------------------


def fresh(aead: AeadId = AeadId.AES_128_GCM) -> tuple[Suite, bytes, bytes, hpke.SenderContext]:
    sk, pk = hpke.generate_key_pair()
    suite = Suite.from_ids(0x20, 1, aead)
    enc, context = hpke.setup_base_sender(suite, pk, b"info")
    return suite, sk, enc, context


def test_rejects_open_with_the_wrong_private_key() -> None:
    suite, _, enc, context = fresh()
    other, _ = hpke.generate_key_pair()
    recipient = hpke.setup_base_recipient(suite, enc, other, b"info")
    with pytest.raises(DecapsulationError, match=r"^decryption failed$"):
        recipient.open(b"", context.seal(b"", b"x"))


def test_rejects_open_with_other_info() -> None:
    suite, sk, enc, context = fresh()
    recipient = hpke.setup_base_recipient(suite, enc, sk, b"other info")
    with pytest.raises(DecapsulationError):
        recipient.open(b"", context.seal(b"", b"x"))


@pytest.mark.parametrize("aead", ALL_AEADS, ids=lambda a: a.name)
def test_rejects_flipped_ciphertext_and_keeps_the_sequence(aead: AeadId) -> None:
    suite, sk, enc, context = fresh(aead)
    ct = context.seal(b"aad", b"hello")
    recipient = hpke.setup_base_recipient(suite, enc, sk, b"info")
    for i in range(len(ct)):
        flipped = bytearray(ct)
        flipped[i] ^= 0x01
        with pytest.raises(DecapsulationError):
            recipient.open(b"aad", bytes(flipped))
    assert recipient.sequence_number == 0
    assert recipient.open(b"aad", ct) == b"hello"


def test_rejects_replayed_ciphertext_at_the_next_sequence_number() -> None:
    suite, sk, enc, context = fresh()
    ct = context.seal(b"", b"one")
    recipient = hpke.setup_base_recipient(suite, enc, sk, b"info")
    recipient.open(b"", ct)
    with pytest.raises(DecapsulationError):
        recipient.open(b"", ct)


def test_rejects_small_order_encapsulated_key() -> None:
    suite, sk, _, _ = fresh()
    with pytest.raises(DecapsulationError, match=r"^decryption failed$"):
        hpke.setup_base_recipient(suite, bytes(32), sk, b"info")


def test_rejects_small_order_recipient_public_key() -> None:
    with pytest.raises(MalformedMessage, match="small-order"):
        hpke.setup_base_sender(Suite.from_ids(0x20, 1, 1), bytes(32), b"info")


@pytest.mark.parametrize("size", [0, 31, 33])
def test_rejects_encapsulated_key_of_the_wrong_size(size: int) -> None:
    suite, sk, _, _ = fresh()
    with pytest.raises(MalformedMessage):
        hpke.setup_base_recipient(suite, b"\x09" * size, sk, b"info")


def test_rejects_unsupported_suites() -> None:
    for ids in [(0x10, 1, 1), (0x20, 2, 1), (0x20, 1, 0xFFFF), (0x20, 1, 0)]:
        with pytest.raises(MalformedMessage, match="not supported"):
            Suite.from_ids(*ids)


def test_rejects_keys_of_the_wrong_size() -> None:
    with pytest.raises(ConfigError):
        hpke.public_key_of(bytes(31))
    with pytest.raises(ConfigError):
        hpke.setup_base_sender(
            Suite.from_ids(0x20, 1, 1), bytes(range(32)), b"", ephemeral_private_key=b"short"
        )
    with pytest.raises(ConfigError):
        hpke.derive_key_pair(bytes(31))


def test_export_length_bounds() -> None:
    _, _, _, context = fresh()
    assert len(context.export(b"", 255 * 32)) == 255 * 32
    for bad in (0, 255 * 32 + 1):
        with pytest.raises(ConfigError):
            context.export(b"", bad)


def test_suite_sizes() -> None:
    assert [(s.nk, s.nn, s.nt) for s in (Suite.from_ids(0x20, 1, a) for a in AeadId)] == [
        (16, 12, 16),
        (32, 12, 16),
        (32, 12, 16),
    ]
    assert Suite.from_ids(0x20, 1, 3).suite_id == b"HPKE\x00\x20\x00\x01\x00\x03"
