"""EIF reading and measurement: independent PCR computation, hostile images, `nci audit eif`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

import attestation.eif as eif_module
from attestation.eif import EifError, SectionType, measure_eif, read_eif
from attestation.expectations import load_expectations, parse_expectations
from nci.cli import main
from tests.attestation.eif_writer import (
    CMDLINE,
    KERNEL,
    RAMDISK,
    SIGNATURE,
    Section,
    build_eif,
    default_sections,
)


def _pcr(data: bytes) -> bytes:
    """SHA384(0^48 ‖ SHA384(data)), written out independently of attestation._measure."""
    return hashlib.sha384(b"\x00" * 48 + hashlib.sha384(data).digest()).digest()


def _certificate() -> x509.Certificate:
    key = ec.derive_private_key(7, ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eif signer")])
    start = datetime(2024, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=365))
        .sign(key, hashes.SHA384())
    )


CERT = _certificate()
PEM = CERT.public_bytes(serialization.Encoding.PEM)


def _expected(sections: list[Section]) -> dict[int, bytes]:
    kernel = next(s.data for s in sections if s.type == KERNEL)
    cmdline = next(s.data for s in sections if s.type == CMDLINE)
    ramdisks = [s.data for s in sections if s.type == RAMDISK]
    return {
        0: _pcr(kernel + cmdline + b"".join(ramdisks)),
        1: _pcr(kernel + cmdline + ramdisks[0]),
        2: _pcr(b"".join(ramdisks[1:])),
    }


def test_measurements_equal_an_independent_computation() -> None:
    sections = default_sections()
    image = read_eif(build_eif(sections))
    assert image.pcrs == _expected(sections)
    assert not image.signed
    assert [s.type for s in image.sections] == [
        SectionType.KERNEL,
        SectionType.CMDLINE,
        SectionType.RAMDISK,
        SectionType.RAMDISK,
    ]


def test_reads_sections_in_the_order_nitro_cli_writes_them() -> None:
    # EifBuilder (aws-nitro-enclaves-image-format src/utils/mod.rs): kernel, cmdline, metadata,
    # ramdisks, signature
    image = read_eif(build_eif(default_sections(pem=PEM, metadata=True)))
    assert [s.type for s in image.sections] == [
        SectionType.KERNEL,
        SectionType.CMDLINE,
        SectionType.METADATA,
        SectionType.RAMDISK,
        SectionType.RAMDISK,
        SectionType.SIGNATURE,
    ]


def test_signed_image_measures_the_certificate_der_in_pcr8() -> None:
    sections = default_sections(pem=PEM, metadata=True)
    pcrs = measure_eif(build_eif(sections))
    der = CERT.public_bytes(serialization.Encoding.DER)
    assert pcrs == {**_expected(sections), 8: _pcr(der)}


def test_metadata_and_signature_are_in_no_pcr_0_1_2() -> None:
    plain = measure_eif(build_eif(default_sections()))
    extra = measure_eif(build_eif(default_sections(pem=PEM, metadata=True)))
    assert {i: extra[i] for i in (0, 1, 2)} == plain


def test_single_ramdisk_leaves_pcr2_the_hash_of_nothing() -> None:
    assert measure_eif(build_eif(default_sections(ramdisks=1)))[2] == _pcr(b"")


def test_file_is_read_in_chunks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = build_eif(default_sections(pem=PEM))
    monkeypatch.setattr(eif_module, "CHUNK_SIZE", 7)
    path = tmp_path / "image.eif"
    path.write_bytes(data)
    with path.open("rb") as fh:
        assert measure_eif(fh) == measure_eif(data)


def _sections() -> list[Section]:
    return default_sections()


def _offsets() -> list[int]:
    image = read_eif(build_eif(_sections()))
    return [s.offset for s in image.sections]


def _sizes() -> list[int]:
    return [len(s.data) for s in _sections()]


def _truncated_header() -> bytes:
    return build_eif(_sections())[:300]


def _cut_last_section() -> bytes:
    return build_eif(_sections())[:-10]


def _flip_kernel_byte() -> bytes:
    data = bytearray(build_eif(_sections()))
    data[548 + 12 + 5] ^= 1
    return bytes(data)


def _overlapping() -> bytes:
    offsets = _offsets()
    offsets[2] -= 8
    return build_eif(_sections(), offsets=offsets)


def _past_the_end() -> bytes:
    sizes = _sizes()
    sizes[-1] += 4096
    return build_eif(_sections(), sizes=sizes)


def _header_table_mismatch() -> bytes:
    """The table is consistent; the cmdline's own section header claims one byte less."""
    data = bytearray(build_eif(_sections()))
    at = _offsets()[1] + 4
    size = int.from_bytes(data[at : at + 8], "big")
    data[at : at + 8] = (size - 1).to_bytes(8, "big")
    return bytes(data)


def _unknown_type() -> bytes:
    return build_eif([*_sections(), Section(9, b"x")])


def _invalid_type() -> bytes:
    return build_eif([*_sections(), Section(0, b"x")])


def _no_kernel() -> bytes:
    return build_eif([s for s in _sections() if s.type != KERNEL])


def _no_ramdisk() -> bytes:
    return build_eif([s for s in _sections() if s.type != RAMDISK])


def _two_kernels() -> bytes:
    return build_eif([_sections()[0], *_sections()])


def _trailing() -> bytes:
    data = build_eif(_sections())
    return data + b"\x00" * 12


def _bad_signature() -> bytes:
    return build_eif([*_sections(), Section(SIGNATURE, b"\xa1\x01\x02")])


def _signature_not_pem() -> bytes:
    from tests.attestation.eif_writer import signature_section

    return build_eif([*_sections(), Section(SIGNATURE, signature_section(b"not a certificate"))])


def _table_garbage() -> bytes:
    offsets = [*_offsets(), 0, 99]
    sizes = [*_sizes(), 0, 1]
    return build_eif(_sections(), offsets=offsets, sizes=sizes)


HOSTILE = {
    "bad_magic": (lambda: build_eif(_sections(), magic=b"ELF\x7f"), "magic"),
    "unsupported_version": (lambda: build_eif(_sections(), version=5), "version"),
    "truncated_header": (_truncated_header, "truncated"),
    "too_many_sections": (lambda: build_eif(_sections(), section_cnt=33), "section count"),
    "overlapping_sections": (_overlapping, "overlapping sections"),
    "sizes_past_the_end": (_past_the_end, "section bounds"),
    "cut_last_section": (_cut_last_section, "section bounds"),
    "crc_mismatch": (_flip_kernel_byte, "crc32"),
    "wrong_crc_field": (lambda: build_eif(_sections(), crc=1), "crc32"),
    "section_header_size_differs_from_table": (_header_table_mismatch, "section size"),
    "unknown_section_type": (_unknown_type, "section type"),
    "invalid_section_type": (_invalid_type, "section type"),
    "missing_kernel": (_no_kernel, "missing section"),
    "missing_ramdisk": (_no_ramdisk, "missing section"),
    "duplicate_kernel": (_two_kernels, "duplicate section"),
    "trailing_bytes": (_trailing, "trailing bytes"),
    "signature_not_cbor_array": (_bad_signature, "signature section"),
    "signature_certificate_not_pem": (_signature_not_pem, "signature section"),
    "unused_table_entries_set": (_table_garbage, "section table"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_rejects_hostile_image(name: str) -> None:
    make, rule = HOSTILE[name]
    with pytest.raises(EifError) as caught:
        read_eif(make())
    assert caught.value.rule == rule


def test_rejects_image_over_the_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eif_module, "MAX_EIF_SIZE", 1000)
    with pytest.raises(EifError, match="file size"):
        read_eif(build_eif(_sections()))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_raise_only_eif_error(data: bytes) -> None:
    with pytest.raises(EifError):
        read_eif(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=255))
def test_corrupted_valid_image_raises_only_eif_error(position: int, value: int) -> None:
    data = bytearray(build_eif(_sections()))
    data[position % len(data)] = value
    with contextlib.suppress(EifError):
        read_eif(bytes(data))


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_cli_json_is_loaded_by_expectations(tmp_path: Path) -> None:
    sections = default_sections(pem=PEM)
    path = tmp_path / "image.eif"
    path.write_bytes(build_eif(sections))
    status, out, _ = run("audit", "eif", str(path), "--json")
    assert status == 0
    document = json.loads(out)
    assert document["HashAlgorithm"] == "Sha384 { ... }"
    assert set(document) == {"HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"}
    expect = tmp_path / "expect.json"
    expect.write_text(out)
    [pcr_set] = load_expectations(expect)
    assert pcr_set.values == measure_eif(path.read_bytes())


def test_cli_nitro_cli_shape_diffs_clean_against_nitro_clis_output(tmp_path: Path) -> None:
    path = tmp_path / "image.eif"
    path.write_bytes(build_eif(default_sections(pem=PEM, metadata=True)))
    pcrs = measure_eif(path.read_bytes())
    # what `nitro-cli build-enclave` prints: serde_json's pretty printer over a BTreeMap
    nitro_cli = json.dumps(
        {"Measurements": {"HashAlgorithm": "Sha384 { ... }"}
         | {f"PCR{i}": v.hex() for i, v in pcrs.items()}},
        indent=2,
        sort_keys=True,
    )  # fmt: skip
    status, out, _ = run("audit", "eif", str(path), "--json", "--nitro-cli")
    assert status == 0
    assert out == nitro_cli + "\n"
    expect = tmp_path / "measurements.json"
    expect.write_text(out)
    [pcr_set] = load_expectations(expect)  # --expect takes it as is
    assert pcr_set.values == pcrs


def test_cli_nitro_cli_shape_needs_json(tmp_path: Path) -> None:
    path = tmp_path / "image.eif"
    path.write_bytes(build_eif(default_sections()))
    status, out, err = run("audit", "eif", str(path), "--nitro-cli")
    assert (status, out) == (2, "")
    assert "--json" in err


def test_cli_human_output_is_also_an_expectation(tmp_path: Path) -> None:
    path = tmp_path / "image.eif"
    path.write_bytes(build_eif(default_sections()))
    status, out, _ = run("audit", "eif", str(path))
    assert status == 0
    [pcr_set] = parse_expectations(out)
    assert pcr_set.values == measure_eif(path.read_bytes())


def test_cli_malformed_image_exits_1_naming_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "bad.eif"
    path.write_bytes(_flip_kernel_byte())
    status, out, err = run("audit", "eif", str(path))
    assert status == 1
    assert out == ""
    assert len(err.splitlines()) == 1
    assert "crc32" in err


def test_cli_unreadable_file_exits_2(tmp_path: Path) -> None:
    status, _, err = run("audit", "eif", str(tmp_path / "missing.eif"))
    assert status == 2
    assert "cannot read" in err
    status, _, _ = run("audit", "eif", str(tmp_path))
    assert status == 2


def test_writer_crc_field_is_big_endian_crc32() -> None:
    data = build_eif(_sections())
    (crc,) = struct.unpack(">I", data[544:548])
    assert read_eif(data).crc32 == crc
