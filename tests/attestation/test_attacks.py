"""Named attacks on a real Nitro document, each with the error it must produce."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.document import MAX_DOCUMENT_SIZE, AttestationDocument
from attestation.errors import (
    AttestationError,
    ChainInvalid,
    MalformedDocument,
    SignatureInvalid,
)
from attestation.policy import Policy
from attestation.roots import TrustRoot
from attestation.verify import verify
from tests.attestation.helpers import (
    DELETE,
    indefinite_map,
    just_after,
    payload_map,
    pcrs,
    raw,
    rebuild,
    split,
    with_payload_fields,
)

AWS = [TrustRoot.aws_nitro_g1()]
DOC = raw(1)
OTHER = raw(3)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def _flip_in_payload(marker: bytes, delta: int = 3) -> Callable[[], bytes]:
    def make() -> bytes:
        payload = split(DOC)[2]
        return rebuild(DOC, payload=_flip(payload, payload.index(marker) + delta))

    return make


def _with_cabundle(transform: Callable[[list[bytes]], list[bytes]]) -> Callable[[], bytes]:
    return lambda: with_payload_fields(DOC, cabundle=transform(payload_map(DOC)["cabundle"]))


def _foreign_root(*critical_extensions: x509.ExtensionType) -> bytes:
    """A self-signed P-384 CA that is not AWS's root (optionally with extra critical extensions)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aws.nitro-enclaves")])
    now = datetime(2020, 1, 1, tzinfo=UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=36500))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    for extension in critical_extensions:
        builder = builder.add_extension(extension, critical=True)
    return builder.sign(key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


def _pcrs_with(index: int, value: object) -> dict[object, object]:
    table: dict[object, object] = dict(payload_map(DOC)["pcrs"])
    table[index] = value
    return table


def _duplicate_nonce() -> bytes:
    body = payload_map(DOC)
    encoded = cbor2.dumps(body)
    # a definite map that claims one more entry, then a second "nonce" key
    extra = cbor2.dumps("nonce") + cbor2.dumps(b"\x00" * 32)
    assert encoded[0] == 0xA9
    return rebuild(DOC, payload=b"\xaa" + encoded[1:] + extra)


ATTACKS: dict[str, tuple[Callable[[], bytes], type[AttestationError]]] = {
    # byte flips
    "payload_byte_flip_in_pcr0": (_flip_in_payload(pcrs(1, 0)[0]), SignatureInvalid),
    "payload_byte_flip_in_module_id": (_flip_in_payload(b"i-020b6af9246d90e92-enc", 5), SignatureInvalid),
    "payload_byte_flip_in_map_header": (lambda: rebuild(DOC, payload=_flip(split(DOC)[2], 0)), MalformedDocument),
    "signature_byte_flip": (lambda: rebuild(DOC, signature=_flip(split(DOC)[3], 10)), SignatureInvalid),
    "signature_all_zero": (lambda: rebuild(DOC, signature=bytes(96)), SignatureInvalid),
    "protected_header_byte_flip": (lambda: _flip(DOC, 3), MalformedDocument),
    "protected_header_es256": (lambda: rebuild(DOC, protected=cbor2.dumps({1: -7})), MalformedDocument),
    "protected_header_es512": (lambda: rebuild(DOC, protected=cbor2.dumps({1: -36})), MalformedDocument),
    "protected_header_extra_kid": (lambda: rebuild(DOC, protected=cbor2.dumps({1: -35, 4: b"k"})), MalformedDocument),
    "protected_header_not_canonical": (lambda: rebuild(DOC, protected=bytes.fromhex("a10139 0022".replace(" ", ""))), SignatureInvalid),
    "unprotected_header_smuggles_fields": (lambda: rebuild(DOC, unprotected={4: b"kid"}), MalformedDocument),
    # certificates and chain
    "leaf_certificate_swapped_from_other_document": (lambda: with_payload_fields(DOC, certificate=payload_map(OTHER)["certificate"]), ChainInvalid),
    "whole_chain_swapped_from_other_document": (lambda: with_payload_fields(DOC, certificate=payload_map(OTHER)["certificate"], cabundle=payload_map(OTHER)["cabundle"]), ChainInvalid),
    "cabundle_reordered": (_with_cabundle(lambda b: [b[0], b[2], b[1], b[3]]), ChainInvalid),
    "cabundle_truncated": (_with_cabundle(lambda b: b[:-1]), ChainInvalid),
    "cabundle_without_root": (_with_cabundle(lambda b: b[1:]), ChainInvalid),
    "cabundle_repeats_a_certificate": (_with_cabundle(lambda b: [*b, b[-1]]), ChainInvalid),
    "chain_to_another_root": (_with_cabundle(lambda b: [_foreign_root(), *b[1:]]), ChainInvalid),
    "certificate_not_der": (lambda: with_payload_fields(DOC, certificate=b"\x30\x03junk"), MalformedDocument),
    # field rules (AWS attestation process §3.2)
    "pcr_of_32_bytes": (lambda: with_payload_fields(DOC, pcrs=_pcrs_with(0, b"\x00" * 32)), MalformedDocument),
    "pcr_of_64_bytes": (lambda: with_payload_fields(DOC, pcrs=_pcrs_with(0, b"\x00" * 64)), MalformedDocument),
    "pcr_index_32": (lambda: with_payload_fields(DOC, pcrs=_pcrs_with(32, b"\x00" * 48)), MalformedDocument),
    "pcr_index_negative": (lambda: with_payload_fields(DOC, pcrs=_pcrs_with(-1, b"\x00" * 48)), MalformedDocument),
    "pcr_value_text": (lambda: with_payload_fields(DOC, pcrs=_pcrs_with(0, "00" * 48)), MalformedDocument),
    "pcrs_empty": (lambda: with_payload_fields(DOC, pcrs={}), MalformedDocument),
    "digest_sha256": (lambda: with_payload_fields(DOC, digest="SHA256"), MalformedDocument),
    "timestamp_zero": (lambda: with_payload_fields(DOC, timestamp=0), MalformedDocument),
    "timestamp_past_year_9999": (lambda: with_payload_fields(DOC, timestamp=2**63), MalformedDocument),
    "timestamp_text": (lambda: with_payload_fields(DOC, timestamp="1665651482136"), MalformedDocument),
    "module_id_empty": (lambda: with_payload_fields(DOC, module_id=""), MalformedDocument),
    "module_id_with_terminal_escape": (lambda: with_payload_fields(DOC, module_id="i-0\n\x1b[8m"), MalformedDocument),
    "module_id_missing": (lambda: with_payload_fields(DOC, module_id=DELETE), MalformedDocument),
    "unknown_payload_field": (lambda: with_payload_fields(DOC, debug=False), MalformedDocument),
    "oversize_user_data": (lambda: with_payload_fields(DOC, user_data=b"\x00" * 1025), MalformedDocument),
    "oversize_nonce": (lambda: with_payload_fields(DOC, nonce=b"\x00" * 1025), MalformedDocument),
    "oversize_public_key": (lambda: with_payload_fields(DOC, public_key=b"\x00" * 1025), MalformedDocument),
    "oversize_certificate": (lambda: with_payload_fields(DOC, certificate=b"\x30" * 1025), MalformedDocument),
    "empty_cabundle": (lambda: with_payload_fields(DOC, cabundle=[]), MalformedDocument),
    "duplicate_payload_key": (_duplicate_nonce, MalformedDocument),
    # framing
    "trailing_bytes_after_document": (lambda: DOC + b"\x00", MalformedDocument),
    "trailing_bytes_inside_payload": (lambda: rebuild(DOC, payload=split(DOC)[2] + b"\xf6"), MalformedDocument),
    "cose_mac0_tag": (lambda: cbor2.dumps(cbor2.CBORTag(17, cbor2.loads(DOC))), MalformedDocument),
    "three_element_array": (lambda: cbor2.dumps(cbor2.loads(DOC)[:3]), MalformedDocument),
    "map_instead_of_array": (lambda: cbor2.dumps({"payload": split(DOC)[2]}), MalformedDocument),
    "signature_of_64_bytes": (lambda: rebuild(DOC, signature=bytes(64)), MalformedDocument),
    "document_over_size_cap": (lambda: DOC + b"\x00" * MAX_DOCUMENT_SIZE, MalformedDocument),
    "empty_input": (lambda: b"", MalformedDocument),
    "indefinite_payload_re_encoded": (lambda: rebuild(DOC, payload=indefinite_map(payload_map(DOC))), SignatureInvalid),
}  # fmt: skip


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_rejects_attack(attack: str) -> None:
    make, expected = ATTACKS[attack]
    tampered = make()
    assert tampered != DOC
    with pytest.raises(expected) as caught:
        verify(tampered, roots=AWS, now=just_after(1), policy=Policy.expect(pcrs(1, 0, 1, 2)))
    # the error names a rule, not an internal failure
    assert str(caught.value)


def test_untampered_document_passes_the_same_verification() -> None:
    verify(DOC, roots=AWS, now=just_after(1), policy=Policy.expect(pcrs(1, 0, 1, 2)))


def test_accepts_cbor_tag_18() -> None:
    tagged = cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(DOC)))
    verify(tagged, roots=AWS, now=just_after(1), policy=Policy.expect(pcrs(1, 0, 1, 2)))


def test_parses_indefinite_length_payload_map() -> None:
    body = payload_map(DOC)
    doc = AttestationDocument.from_cbor(rebuild(DOC, payload=indefinite_map(body)))
    assert doc.module_id == body["module_id"]
    assert doc.payload[:1] == b"\xbf"


def test_parses_1024_byte_optional_fields() -> None:
    tampered = with_payload_fields(
        DOC, public_key=b"\x01" * 1024, user_data=b"\x02" * 1024, nonce=b"\x03" * 1024
    )
    doc = AttestationDocument.from_cbor(tampered)
    assert (len(doc.public_key or b""), len(doc.user_data or b""), len(doc.nonce or b"")) == (
        1024,
        1024,
        1024,
    )


def test_absent_and_null_and_empty_optional_fields_all_mean_absent() -> None:
    for value in (DELETE, None, b""):
        doc = AttestationDocument.from_cbor(with_payload_fields(DOC, user_data=value))
        assert doc.user_data is None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=2048))
def test_parser_raises_only_its_own_error_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(MalformedDocument):
        AttestationDocument.from_cbor(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, len(DOC) - 1), st.integers(1, 255)),
        min_size=1,
        max_size=4,
        unique_by=lambda flip: flip[0],
    )
)
def test_mutated_real_document_raises_only_attestation_errors(flips: list[tuple[int, int]]) -> None:
    data = bytearray(DOC)
    for offset, mask in flips:
        data[offset] ^= mask
    with pytest.raises(AttestationError):
        verify(bytes(data), roots=AWS, now=just_after(1), policy=Policy.expect(pcrs(1, 0, 1, 2)))


def test_rejects_certificate_with_unknown_critical_extension() -> None:
    from cryptography.x509.oid import ObjectIdentifier

    unknown = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00")
    der = _foreign_root(unknown)
    tampered = with_payload_fields(DOC, cabundle=[der, *payload_map(DOC)["cabundle"][1:]])
    with pytest.raises(ChainInvalid, match="critical extension"):
        verify(tampered, roots=[*AWS, TrustRoot("local", der)], now=just_after(1),
               policy=Policy.expect(pcrs(1, 0)))  # fmt: skip
