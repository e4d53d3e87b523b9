"""Key release: unwrapping KMS's CiphertextForRecipient, and the KMS flow around it.

Envelopes come from three independent writers: ``openssl cms -encrypt`` (DER and streamed BER),
our KMS side (:func:`kms_policy.recipient.envelope_for_recipient`, streamed BER), and an
asn1crypto builder below (definite-length DER) that can also make every hostile variant. KMS is a
real boto3 client, stubbed with ``botocore.stub.Stubber`` or pointed at a loopback socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from asn1crypto import cms
from botocore.stub import Stubber
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation import AttestationDocument
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient
from enclave.errors import (
    ConfigError,
    EnclaveError,
    KeyReleaseDenied,
    KeyReleaseTimeout,
    KeyReleaseUnavailable,
    MalformedEnvelope,
)
from enclave.keyrelease import (
    MAX_ENVELOPE_SIZE,
    KeyRelease,
    generate_recipient_key,
    kms_client_config,
    public_key_der,
    unwrap_ciphertext_for_recipient,
)
from kms_policy.recipient import envelope_for_recipient
from tests.x509util import self_signed

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl is not on PATH")
DATA_KEY = bytes(range(100, 132))  # a stand-in 32-byte data key
KEY_ARN = "arn:aws:kms:us-east-1:000000000000:key/11111111-2222-3333-4444-555555555555"
CONTEXT = {"model": "tiny", "bundle": "b-1"}

# hypothesis runs many examples per test and takes no fixtures: one key and envelope, made once.
_HYPOTHESIS_KEY = generate_recipient_key()
_HYPOTHESIS_ENVELOPE = envelope_for_recipient(DATA_KEY, public_key_der(_HYPOTHESIS_KEY))


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return generate_recipient_key()


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return generate_recipient_key()


@pytest.fixture(scope="module")
def envelope(key: rsa.RSAPrivateKey) -> bytes:
    return envelope_for_recipient(DATA_KEY, public_key_der(key))


# -- helpers: openssl ---------------------------------------------------------------------------


def openssl_encrypt(
    private: rsa.RSAPrivateKey, folder: Path, plaintext: bytes, *options: str
) -> bytes:
    """``openssl cms -encrypt`` of ``plaintext`` for a self-signed certificate of ``private``."""
    assert OPENSSL is not None
    cert_path = folder / "cert.pem"
    cert_path.write_bytes(
        self_signed(private, "nci test enclave").public_bytes(serialization.Encoding.PEM)
    )
    done = subprocess.run(
        # -keyid must come before -recip, -keyopt after it (it applies to the last recipient)
        [
            OPENSSL,
            "cms",
            "-encrypt",
            "-binary",
            *options[:1],
            "-recip",
            str(cert_path),
            *options[1:],
            "-outform",
            "DER",
        ],
        input=plaintext,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


KMS_LIKE = (
    "-aes256",
    "-keyid",
    "-keyopt",
    "rsa_padding_mode:oaep",
    "-keyopt",
    "rsa_oaep_md:sha256",
    "-keyopt",
    "rsa_mgf1_md:sha256",
)


# -- helpers: an asn1crypto builder for hostile variants (definite-length DER) -----------------

OAEP_SHA256 = {
    "algorithm": "rsaes_oaep",
    "parameters": {
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
    },
}
OAEP_SHA1_EXPLICIT = {
    "algorithm": "rsaes_oaep",
    "parameters": {
        "hash_algorithm": {"algorithm": "sha1"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
    },
}
OAEP_SHA256_MGF1_SHA1 = {
    "algorithm": "rsaes_oaep",
    "parameters": {
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha1"}},
    },
}
OAEP_SHA256_LABEL = {
    "algorithm": "rsaes_oaep",
    "parameters": {
        **OAEP_SHA256["parameters"],  # type: ignore[dict-item]
        "p_source_algorithm": {"algorithm": "p_specified", "parameters": b"label"},
    },
}
# id-RSAES-OAEP with the parameters absent, and with an empty RSAES-OAEP-params SEQUENCE: both
# mean SHA-1 and MGF1-SHA-1 (RFC 4055 §4.1); asn1crypto will not build these, so they are bytes.
OAEP_PARAMS_ABSENT = bytes.fromhex("300b06092a864886f70d010107")
OAEP_PARAMS_EMPTY = bytes.fromhex("300d06092a864886f70d0101073000")
PKCS1_V15 = {"algorithm": "rsaes_pkcs1v15"}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One envelope; every field can be made wrong."""

    plaintext: bytes = DATA_KEY
    cek_size: int = 32
    transport: str = "oaep-sha256"  # how the CEK is really encrypted
    key_algorithm: dict[str, Any] | bytes = dataclasses.field(default_factory=lambda: OAEP_SHA256)
    content_algorithm: str = "aes256_cbc"
    iv_size: int = 16
    rid: str = "ski"  # or "issuer_serial"
    ktri_version: str = "v2"
    envelope_version: str = "v2"
    recipients: int = 1
    other_recipient_type: bool = False  # a KEKRecipientInfo instead of a ktri
    recipient_key: rsa.RSAPrivateKey | None = None  # default: the test's key
    rid_key: rsa.RSAPrivateKey | None = None  # whose SKI goes in rid (default: recipient_key)
    content_type: str = "enveloped_data"
    inner_content_type: str = "data"
    omit_content: bool = False
    extra_ciphertext: bytes = b""
    pad: bool = True
    originator_info: bool = False
    unprotected_attrs: bool = False


def _ski(private: rsa.RSAPrivateKey) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(private.public_key()).digest


def build(recipe: Recipe, key: rsa.RSAPrivateKey) -> bytes:
    recipient_key = recipe.recipient_key or key
    rid_key = recipe.rid_key or recipient_key
    cek = os.urandom(recipe.cek_size)
    iv = os.urandom(recipe.iv_size)
    # the CEK under the recipient's key
    if recipe.transport == "oaep-sha256":
        transport: asym_padding.AsymmetricPadding = asym_padding.OAEP(
            asym_padding.MGF1(hashes.SHA256()), hashes.SHA256(), None
        )
    elif recipe.transport == "oaep-sha1":
        transport = asym_padding.OAEP(asym_padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)
    else:
        transport = asym_padding.PKCS1v15()
    encrypted_key = recipient_key.public_key().encrypt(cek, transport)
    # the content
    data = recipe.plaintext
    if recipe.pad:
        padder = sym_padding.PKCS7(128).padder()
        data = padder.update(data) + padder.finalize()
    cipher_iv = iv if len(iv) == 16 else iv.ljust(16, b"\x00")[:16]
    encryptor = Cipher(algorithms.AES(cek), modes.CBC(cipher_iv)).encryptor()
    ciphertext = encryptor.update(data) + encryptor.finalize() + recipe.extra_ciphertext
    if isinstance(recipe.key_algorithm, bytes):
        key_algorithm = cms.KeyEncryptionAlgorithm.load(recipe.key_algorithm)
    else:
        key_algorithm = cms.KeyEncryptionAlgorithm(recipe.key_algorithm)
    if recipe.rid == "ski":
        rid = cms.RecipientIdentifier({"subject_key_identifier": _ski(rid_key)})
    else:
        certificate = cms.Certificate.load(
            self_signed(rid_key).public_bytes(serialization.Encoding.DER)
        )
        rid = cms.RecipientIdentifier(
            {
                "issuer_and_serial_number": {
                    "issuer": certificate.issuer,
                    "serial_number": certificate.serial_number,
                }
            }
        )
    ktri = cms.RecipientInfo(
        {
            "ktri": {
                "version": recipe.ktri_version,
                "rid": rid,
                "key_encryption_algorithm": key_algorithm,
                "encrypted_key": encrypted_key,
            }
        }
    )
    infos = [ktri] * recipe.recipients
    if recipe.other_recipient_type:
        infos = [
            cms.RecipientInfo(
                {
                    "kekri": {
                        "version": "v4",
                        "kekid": {"key_identifier": b"kek"},
                        "key_encryption_algorithm": {"algorithm": "aes256_wrap"},
                        "encrypted_key": b"\x00" * 40,
                    }
                }
            )
        ]
    content_info: dict[str, Any] = {
        "content_type": recipe.inner_content_type,
        "content_encryption_algorithm": {
            "algorithm": recipe.content_algorithm,
            "parameters": iv,
        },
    }
    if not recipe.omit_content:
        content_info["encrypted_content"] = ciphertext
    enveloped: dict[str, Any] = {
        "version": recipe.envelope_version,
        "recipient_infos": infos,
        "encrypted_content_info": content_info,
    }
    if recipe.originator_info:
        enveloped["originator_info"] = {"certs": []}
    if recipe.unprotected_attrs:
        enveloped["unprotected_attrs"] = [
            {
                "type": "signing_time",
                "values": [cms.Time({"utc_time": datetime(2026, 1, 1, tzinfo=UTC)})],
            }
        ]
    if recipe.content_type == "enveloped_data":
        info = cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped})
    else:
        info = cms.ContentInfo({"content_type": "data", "content": b"hello"})
    der: bytes = info.dump()
    return der


def flip(blob: bytes, index: int, bit: int = 0x01) -> bytes:
    changed = bytearray(blob)
    changed[index] ^= bit
    return bytes(changed)


def encrypted_key_offset(blob: bytes) -> int:
    """Where the 256-byte encryptedKey value starts (an OCTET STRING with length 0x0100)."""
    return blob.index(b"\x04\x82\x01\x00") + 4


# -- unwrap: what KMS (and openssl) produce ----------------------------------------------------


def test_unwraps_the_kms_writer(key: rsa.RSAPrivateKey, envelope: bytes) -> None:
    assert unwrap_ciphertext_for_recipient(envelope, key) == DATA_KEY


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 32, 64, 1024, 4096])
def test_round_trip_through_the_kms_writer(key: rsa.RSAPrivateKey, size: int) -> None:
    plaintext = os.urandom(size)
    blob = envelope_for_recipient(plaintext, public_key_der(key))
    assert blob[:2] == b"\x30\x80"  # BER, indefinite length, as KMS sends it
    assert unwrap_ciphertext_for_recipient(blob, key) == plaintext


@pytest.mark.parametrize("bits", [3072, 4096])
def test_round_trip_with_larger_keys(bits: int) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    blob = envelope_for_recipient(DATA_KEY, public_key_der(private))
    assert unwrap_ciphertext_for_recipient(blob, private) == DATA_KEY


def test_unwraps_definite_length_der_with_null_hash_parameters(key: rsa.RSAPrivateKey) -> None:
    # asn1crypto writes DER and gives sha256 NULL parameters: RFC 4055 §2.1 says to accept both.
    blob = build(Recipe(), key)
    assert blob[1] != 0x80
    assert bytes.fromhex("06096086480165030402010500") in blob
    assert unwrap_ciphertext_for_recipient(blob, key) == DATA_KEY


@needs_openssl
@pytest.mark.parametrize("form", ["der", "stream"])
@pytest.mark.parametrize("size", [1, 32, 1000, 4096])
def test_unwraps_openssl_envelopes(
    key: rsa.RSAPrivateKey, tmp_path: Path, form: str, size: int
) -> None:
    plaintext = os.urandom(size)
    options = (*KMS_LIKE, "-stream") if form == "stream" else KMS_LIKE
    blob = openssl_encrypt(key, tmp_path, plaintext, *options)
    if form == "stream":
        # BER with indefinite lengths (0x80 after the tag) and content in a constructed
        # [0] OCTET STRING: the forms this test claims to cover.
        assert blob[:2] == b"\x30\x80"
        assert b"\xa0\x80\x30\x80" in blob  # [0] { EnvelopedData } both indefinite
        assert b"\xa0\x80\x04" in blob  # encryptedContent: constructed, chunked
    else:
        assert blob[:2] == b"\x30\x82"  # DER: definite lengths only
        assert b"\xa0\x80" not in blob[:32]
    assert unwrap_ciphertext_for_recipient(blob, key) == plaintext


@needs_openssl
@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        (
            "pkcs1_v15_transport",
            ("-aes256", "-keyid"),
            "keyEncryptionAlgorithm is 'rsaes_pkcs1v15'",
        ),
        (
            "oaep_sha1_defaults",
            ("-aes256", "-keyid", "-keyopt", "rsa_padding_mode:oaep"),
            "parameters are absent|hashAlgorithm",
        ),
        ("aes128_content", ("-aes128", *KMS_LIKE[1:]), "contentEncryptionAlgorithm"),
        ("issuer_and_serial_rid", ("-aes256", *KMS_LIKE[2:]), "rid is issuer_and_serial_number"),
    ],
)
def test_rejects_openssl_envelopes_kms_would_not_send(
    key: rsa.RSAPrivateKey, tmp_path: Path, name: str, options: tuple[str, ...], match: str
) -> None:
    blob = openssl_encrypt(key, tmp_path, DATA_KEY, *options)
    with pytest.raises(MalformedEnvelope, match=match):
        unwrap_ciphertext_for_recipient(blob, key)


# -- unwrap: hostile input, one table, one exception type ---------------------------------------

Case = Callable[[rsa.RSAPrivateKey, rsa.RSAPrivateKey, bytes], bytes]


def recipe(**changes: Any) -> Case:
    return lambda key, other, envelope: build(dataclasses.replace(Recipe(), **changes), key)


HOSTILE: list[tuple[str, Case, str]] = [
    # who the envelope is for
    (
        "wrong_recipient_key",
        lambda k, o, e: envelope_for_recipient(DATA_KEY, public_key_der(o)),
        "does not decrypt under this enclave's key",
    ),
    (
        "other_key_behind_our_rid",
        lambda k, o, e: build(Recipe(recipient_key=o, rid_key=k), k),
        "does not decrypt under this enclave's key",
    ),
    (
        "issuer_and_serial_rid",
        recipe(rid="issuer_serial", ktri_version="v0"),
        "rid is issuer_and_serial_number",
    ),
    ("ski_rid_with_version_0", recipe(ktri_version="v0"), "KeyTransRecipientInfo version"),
    ("two_recipients", recipe(recipients=2), "recipientInfos has 2 entries"),
    ("no_recipient", recipe(recipients=0), "recipientInfos has 0 entries"),
    ("kek_recipient_info", recipe(other_recipient_type=True), "recipientInfos\\[0\\] is kekri"),
    # key transport (RFC 4055 §4.1)
    (
        "oaep_sha1_explicit_params",
        recipe(transport="oaep-sha1", key_algorithm=OAEP_SHA1_EXPLICIT),
        "hashAlgorithm",
    ),
    (
        "oaep_params_absent_means_sha1",
        recipe(transport="oaep-sha1", key_algorithm=OAEP_PARAMS_ABSENT),
        "parameters are absent",
    ),
    (
        "oaep_params_empty_means_sha1",
        recipe(transport="oaep-sha1", key_algorithm=OAEP_PARAMS_EMPTY),
        "hashAlgorithm",
    ),
    ("oaep_sha256_with_mgf1_sha1", recipe(key_algorithm=OAEP_SHA256_MGF1_SHA1), "maskGenAlgorithm"),
    ("oaep_with_a_label", recipe(key_algorithm=OAEP_SHA256_LABEL), "pSourceAlgorithm"),
    (
        "pkcs1_v15_key_transport",
        recipe(transport="pkcs1v15", key_algorithm=PKCS1_V15),
        "keyEncryptionAlgorithm is 'rsaes_pkcs1v15'",
    ),
    ("pkcs1_v15_key_under_an_oaep_identifier", recipe(transport="pkcs1v15"), "does not decrypt"),
    (
        "bit_flip_in_encrypted_key",
        lambda k, o, e: flip(e, encrypted_key_offset(e) + 100),
        "does not decrypt",
    ),
    # content encryption (RFC 3565 §4.1, RFC 5652 §6.3)
    (
        "aes128_cbc_content",
        recipe(cek_size=16, content_algorithm="aes128_cbc"),
        "contentEncryptionAlgorithm is 'aes128_cbc'",
    ),
    # no padding oracle: a wrong CEK size and bad padding read exactly like an OAEP failure
    (
        "cek_of_16_bytes",
        recipe(cek_size=16),
        "^the envelope does not decrypt under this enclave's key$",
    ),
    ("iv_of_8_bytes", recipe(iv_size=8), "16-byte AES-CBC IV"),
    (
        "ciphertext_not_whole_blocks",
        recipe(extra_ciphertext=b"\x00" * 3),
        "encryptedContent is 51 bytes",
    ),
    ("encrypted_content_absent", recipe(omit_content=True), "encryptedContent is absent"),
    (
        "invalid_pkcs7_padding",
        recipe(plaintext=b"\x00" * 32, pad=False),
        "^the envelope does not decrypt under this enclave's key$",
    ),
    (
        "bit_flip_in_padding_block",
        lambda k, o, e: flip(e, len(e) - 10 - 16 - 1 - 16),
        "^the envelope does not decrypt under this enclave's key$",
    ),
    # structure (RFC 5652 §3, §6.1)
    (
        "content_type_data",
        recipe(content_type="data"),
        "contentType is 'data'; expected id-envelopedData",
    ),
    (
        "inner_content_type_signed_data",
        recipe(inner_content_type="signed_data"),
        "encryptedContentInfo contentType",
    ),
    ("enveloped_data_version_0", recipe(envelope_version="v0"), "EnvelopedData version"),
    ("originator_info", recipe(originator_info=True), "originatorInfo"),
    ("unprotected_attributes", recipe(unprotected_attrs=True), "unprotectedAttrs"),
    # bytes
    ("empty", lambda k, o, e: b"", "not a well-formed BER CMS ContentInfo"),
    ("truncated_in_the_content", lambda k, o, e: e[:-20], "not a well-formed"),
    ("truncated_in_the_header", lambda k, o, e: e[:40], "not a well-formed"),
    ("truncated_der", lambda k, o, e: build(Recipe(), k)[:-1], "not a well-formed"),
    ("trailing_byte_after_ber", lambda k, o, e: e + b"\x00", "not a well-formed"),
    ("trailing_contentinfo", lambda k, o, e: e + e, "not a well-formed"),
    ("trailing_byte_after_der", lambda k, o, e: build(Recipe(), k) + b"\x05", "not a well-formed"),
    ("oversize", lambda k, o, e: e + b"\x00" * MAX_ENVELOPE_SIZE, "at most 65536"),
    ("deep_indefinite_nesting", lambda k, o, e: b"\x30\x80" * 30_000, "not a well-formed"),
    ("not_a_sequence", lambda k, o, e: b"\x04\x03abc", "not a well-formed"),
]


@pytest.mark.parametrize(("name", "make", "match"), HOSTILE, ids=[name for name, _, _ in HOSTILE])
def test_rejects_hostile_envelope(
    key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    envelope: bytes,
    name: str,
    make: Case,
    match: str,
) -> None:
    blob = make(key, other_key, envelope)
    with pytest.raises(MalformedEnvelope, match=match) as raised:
        unwrap_ciphertext_for_recipient(blob, key)
    assert DATA_KEY.hex() not in str(raised.value)
    assert DATA_KEY not in str(raised.value).encode()


def test_rejects_input_that_is_not_bytes(key: rsa.RSAPrivateKey) -> None:
    with pytest.raises(MalformedEnvelope, match="is a str, not bytes"):
        unwrap_ciphertext_for_recipient("0\x80", key)  # type: ignore[arg-type]


def test_rsa_failure_reveals_nothing(key: rsa.RSAPrivateKey, envelope: bytes) -> None:
    # No cause chained, one message for every OAEP failure: no decryption oracle.
    offset = encrypted_key_offset(envelope)
    messages = set()
    for position in (offset, offset + 1, offset + 128, offset + 255):
        with pytest.raises(MalformedEnvelope) as raised:
            unwrap_ciphertext_for_recipient(flip(envelope, position), key)
        assert raised.value.__cause__ is None
        assert raised.value.__suppress_context__
        messages.add(str(raised.value))
    assert len(messages) == 1


def test_cbc_content_has_no_integrity_of_its_own(key: rsa.RSAPrivateKey, envelope: bytes) -> None:
    """CMS AES-CBC is not authenticated (RFC 5652 §6.3 gives it no MAC). A flipped bit in the
    first ciphertext block garbles that block and flips the same bit of the next; the padding
    block is untouched, so the envelope opens to other bytes. Released data keys are checked by the
    sealed bundle's AEAD (and KMS traffic is TLS inside the enclave); a flipped encryptedKey or
    padding block is refused (table above)."""
    # layout of our 48-byte ciphertext: [0]{ 04 20 c0 c1  04 10 c2 } then five end-of-contents.
    first_block = len(envelope) - 10 - 16 - 2 - 32
    garbled = unwrap_ciphertext_for_recipient(flip(envelope, first_block), key)
    assert garbled != DATA_KEY
    assert len(garbled) == len(DATA_KEY)
    assert garbled[:16] != DATA_KEY[:16]
    assert garbled[16:] == flip(DATA_KEY, 16)[16:]
    # the IV is not authenticated either: a flipped IV bit flips the same plaintext bit
    iv_offset = envelope.index(bytes.fromhex("060960864801650304012a0410")) + 13
    assert unwrap_ciphertext_for_recipient(flip(envelope, iv_offset), key) == flip(DATA_KEY, 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_malformed_envelope(data: bytes) -> None:
    with pytest.raises(MalformedEnvelope):
        unwrap_ciphertext_for_recipient(data, _HYPOTHESIS_KEY)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048).map(lambda tail: b"\x30\x80" + tail))
def test_arbitrary_ber_sequences_raise_only_malformed_envelope(data: bytes) -> None:
    with pytest.raises(MalformedEnvelope):
        unwrap_ciphertext_for_recipient(data, _HYPOTHESIS_KEY)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_envelopes_open_or_raise_only_malformed_envelope(data: st.DataObject) -> None:
    blob = bytearray(_HYPOTHESIS_ENVELOPE)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        index = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[index] ^= data.draw(st.integers(1, 255))
        elif kind == "delete":
            del blob[index]
        elif kind == "insert":
            blob.insert(index, data.draw(st.integers(0, 255)))
        else:
            del blob[index:]
        if not blob:
            break
    with contextlib.suppress(MalformedEnvelope):
        unwrap_ciphertext_for_recipient(bytes(blob), _HYPOTHESIS_KEY)


# -- keys and configuration ---------------------------------------------------------------------


def test_generated_recipient_key_is_rsa_2048_f4() -> None:
    private = generate_recipient_key()
    assert private.key_size == 2048
    assert private.public_key().public_numbers().e == 65537
    der = public_key_der(private)
    loaded = serialization.load_der_public_key(der)
    assert isinstance(loaded, rsa.RSAPublicKey)
    assert loaded.public_numbers() == private.public_key().public_numbers()


def test_kms_client_config_bounds_time_and_attempts() -> None:
    config = kms_client_config(2.5, 2)
    assert config.connect_timeout == 2.5
    assert config.read_timeout == 2.5
    assert config.retries == {"mode": "standard", "total_max_attempts": 2}
    assert kms_client_config().read_timeout == 10


@pytest.mark.parametrize(("timeout", "attempts"), [(0, 3), (-1, 3), (1, 0)])
def test_kms_client_config_rejects_unbounded_values(timeout: float, attempts: int) -> None:
    with pytest.raises(ConfigError):
        kms_client_config(timeout, attempts)


def test_key_release_rejects_a_weak_or_foreign_key(nsm: NsmClient) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ConfigError, match="1024 bits"):
        KeyRelease(nsm, object(), private_key=weak)
    with pytest.raises(ConfigError, match="RSA is needed"):
        KeyRelease(nsm, object(), private_key=ec.generate_private_key(ec.SECP384R1()))  # type: ignore[arg-type]


def test_errors_share_the_package_base() -> None:
    for error in (
        KeyReleaseDenied,
        KeyReleaseTimeout,
        KeyReleaseUnavailable,
        MalformedEnvelope,
        ConfigError,
    ):
        assert issubclass(error, EnclaveError)


# -- KeyRelease against a stubbed boto3 KMS client -------------------------------------------


class CountingNsm:
    """The emulator, counting the requests it answers."""

    def __init__(self, inner: EmulatedNsm) -> None:
        self.inner = inner
        self.requests = 0

    def process(self, request: bytes) -> bytes:
        self.requests += 1
        return self.inner.process(request)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> EmulatedNsm:
    return EmulatedNsm(state_dir=tmp_path_factory.mktemp("nsm"))


@pytest.fixture
def counting(emulator: EmulatedNsm) -> CountingNsm:
    return CountingNsm(emulator)


@pytest.fixture
def nsm(counting: CountingNsm) -> NsmClient:
    return NsmClient(counting)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)


def kms_client(endpoint_url: str | None = None, config: Any = None) -> Any:
    return boto3.client(
        "kms",
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # a dummy for request signing
        endpoint_url=endpoint_url,
        config=config,
    )


@pytest.fixture
def kms() -> Iterator[tuple[Any, Stubber]]:
    client = kms_client()
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()
    client.close()


class Capture:
    """An expected parameter that matches anything and keeps what it was compared with."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __eq__(self, other: object) -> bool:
        self.values.append(other)
        return True

    __hash__ = None  # type: ignore[assignment]


def check_recipient(recipient: Any, key: rsa.RSAPrivateKey) -> None:
    assert set(recipient) == {"KeyEncryptionAlgorithm", "AttestationDocument"}
    assert recipient["KeyEncryptionAlgorithm"] == "RSAES_OAEP_SHA_256"
    document = AttestationDocument.from_cbor(recipient["AttestationDocument"])
    assert document.public_key == public_key_der(key)


def test_decrypt_releases_the_key_through_recipient(
    key: rsa.RSAPrivateKey,
    nsm: NsmClient,
    counting: CountingNsm,
    kms: tuple[Any, Stubber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, stubber = kms
    recipient = Capture()
    for _ in range(2):
        stubber.add_response(
            "decrypt",
            {
                "KeyId": KEY_ARN,
                "CiphertextForRecipient": envelope_for_recipient(DATA_KEY, public_key_der(key)),
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
            },
            expected_params={
                "CiphertextBlob": b"sealed data key",
                "EncryptionContext": CONTEXT,
                "KeyId": KEY_ARN,
                "Recipient": recipient,
            },
        )
    release = KeyRelease(nsm, client, private_key=key)
    assert release.public_key_der == public_key_der(key)
    caplog.set_level(logging.DEBUG)
    for _ in range(2):
        got = release.decrypt(b"sealed data key", encryption_context=CONTEXT, key_id=KEY_ARN)
        assert got == DATA_KEY
    # one fresh attestation document per call, each binding our public key
    assert counting.requests == 2
    assert len(recipient.values) == 2
    for sent in recipient.values:
        check_recipient(sent, key)
    logged = caplog.text
    assert DATA_KEY.hex() not in logged
    assert repr(DATA_KEY) not in logged
    assert "released a 32-byte key" in logged


def test_decrypt_without_key_id_sends_none(
    key: rsa.RSAPrivateKey, nsm: NsmClient, kms: tuple[Any, Stubber]
) -> None:
    client, stubber = kms
    stubber.add_response(
        "decrypt",
        {
            "KeyId": KEY_ARN,
            "CiphertextForRecipient": envelope_for_recipient(DATA_KEY, public_key_der(key)),
        },
        expected_params={"CiphertextBlob": b"c", "EncryptionContext": {}, "Recipient": Capture()},
    )
    release = KeyRelease(nsm, client, private_key=key)
    assert release.decrypt(b"c", encryption_context={}) == DATA_KEY


def test_generate_random_through_recipient(nsm: NsmClient, kms: tuple[Any, Stubber]) -> None:
    client, stubber = kms
    release = KeyRelease(nsm, client)  # its own fresh key
    random = os.urandom(48)
    recipient = Capture()
    stubber.add_response(
        "generate_random",
        {"CiphertextForRecipient": envelope_for_recipient(random, release.public_key_der)},
        expected_params={"NumberOfBytes": 48, "Recipient": recipient},
    )
    assert release.generate_random(48) == random
    document = AttestationDocument.from_cbor(recipient.values[0]["AttestationDocument"])
    assert document.public_key == release.public_key_der


def test_generate_random_checks_the_length(
    key: rsa.RSAPrivateKey, nsm: NsmClient, kms: tuple[Any, Stubber]
) -> None:
    client, stubber = kms
    stubber.add_response(
        "generate_random",
        {"CiphertextForRecipient": envelope_for_recipient(b"x" * 16, public_key_der(key))},
        expected_params={"NumberOfBytes": 32, "Recipient": Capture()},
    )
    with pytest.raises(MalformedEnvelope, match="returned 16 bytes; asked 32"):
        KeyRelease(nsm, client, private_key=key).generate_random(32)


@pytest.mark.parametrize("n", [0, -1, 1025])
def test_generate_random_rejects_sizes_kms_refuses(nsm: NsmClient, n: int) -> None:
    with pytest.raises(ConfigError, match="1 to 1024"):
        KeyRelease(nsm, object(), private_key=_HYPOTHESIS_KEY).generate_random(n)


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("AccessDeniedException", 400, KeyReleaseDenied),
        ("KMSInvalidStateException", 400, KeyReleaseDenied),
        ("InvalidCiphertextException", 400, KeyReleaseDenied),
        ("DisabledException", 400, KeyReleaseDenied),
        ("NotFoundException", 400, KeyReleaseDenied),
        ("ThrottlingException", 400, KeyReleaseUnavailable),
        ("KMSInternalException", 500, KeyReleaseUnavailable),
        ("DependencyTimeoutException", 503, KeyReleaseUnavailable),
    ],
)
def test_kms_errors_map_to_enclave_errors(
    key: rsa.RSAPrivateKey,
    nsm: NsmClient,
    kms: tuple[Any, Stubber],
    code: str,
    status: int,
    expected: type[EnclaveError],
) -> None:
    client, stubber = kms
    stubber.add_client_error(
        "decrypt",
        service_error_code=code,
        service_message="The ciphertext refers to a key the caller may not use",
        http_status_code=status,
    )
    with pytest.raises(expected, match=code) as raised:
        KeyRelease(nsm, client, private_key=key).decrypt(b"c", encryption_context=CONTEXT)
    assert "may not use" in str(raised.value)
    assert raised.value.code == code  # type: ignore[attr-defined]


def test_refuses_a_response_that_carries_plaintext(
    key: rsa.RSAPrivateKey,
    nsm: NsmClient,
    kms: tuple[Any, Stubber],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A proxy on the parent that strips the Recipient gets (and could keep) the plaintext key;
    # the enclave must not accept the key that way, even when an envelope is present too.
    client, stubber = kms
    stubber.add_response(
        "decrypt",
        {
            "KeyId": KEY_ARN,
            "Plaintext": DATA_KEY,
            "CiphertextForRecipient": envelope_for_recipient(DATA_KEY, public_key_der(key)),
        },
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MalformedEnvelope, match="carries Plaintext") as raised:
        KeyRelease(nsm, client, private_key=key).decrypt(b"c", encryption_context=CONTEXT)
    assert DATA_KEY.hex() not in str(raised.value)
    assert DATA_KEY.hex() not in caplog.text
    assert repr(DATA_KEY) not in caplog.text


def test_refuses_a_response_without_envelope(
    key: rsa.RSAPrivateKey, nsm: NsmClient, kms: tuple[Any, Stubber]
) -> None:
    client, stubber = kms
    stubber.add_response("decrypt", {"KeyId": KEY_ARN})
    with pytest.raises(MalformedEnvelope, match="no CiphertextForRecipient"):
        KeyRelease(nsm, client, private_key=key).decrypt(b"c", encryption_context=CONTEXT)


def test_refuses_a_malformed_envelope(
    key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    nsm: NsmClient,
    kms: tuple[Any, Stubber],
) -> None:
    client, stubber = kms
    stubber.add_response("decrypt", {"KeyId": KEY_ARN, "CiphertextForRecipient": b"\x30\x80junk"})
    stubber.add_response(
        "decrypt",
        {
            "KeyId": KEY_ARN,
            "CiphertextForRecipient": envelope_for_recipient(DATA_KEY, public_key_der(other_key)),
        },
    )
    release = KeyRelease(nsm, client, private_key=key)
    with pytest.raises(MalformedEnvelope, match="not a well-formed"):
        release.decrypt(b"c", encryption_context=CONTEXT)
    with pytest.raises(MalformedEnvelope, match="does not decrypt under this enclave's key"):
        release.decrypt(b"c", encryption_context=CONTEXT)


# -- KeyRelease against loopback sockets (never vsock, never another host) ----------------------


def test_a_silent_kms_times_out(key: rsa.RSAPrivateKey, nsm: NsmClient, no_proxy: None) -> None:
    # A listening socket that is never accepted: the kernel completes the TCP handshake and
    # buffers the request, and nothing ever answers.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        client = kms_client(f"http://127.0.0.1:{port}", kms_client_config(0.2, 1))
        try:
            release = KeyRelease(nsm, client, private_key=key)
            started = time.monotonic()
            with pytest.raises(KeyReleaseTimeout, match="timed out"):
                release.decrypt(b"c", encryption_context=CONTEXT)
            assert time.monotonic() - started < 5
        finally:
            client.close()


def test_a_refused_connection_is_unavailable(
    key: rsa.RSAPrivateKey, nsm: NsmClient, no_proxy: None
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed when the block ends: nothing listens there
    client = kms_client(f"http://127.0.0.1:{port}", kms_client_config(0.5, 1))
    try:
        with pytest.raises(KeyReleaseUnavailable, match="EndpointConnectionError"):
            KeyRelease(nsm, client, private_key=key).decrypt(b"c", encryption_context=CONTEXT)
    finally:
        client.close()
