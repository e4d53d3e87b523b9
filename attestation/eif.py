"""Enclave image files (EIF): strict reading and the PCRs Nitro measures at boot.

Layout (aws-nitro-enclaves-image-format src/defs/mod.rs; QEMU hw/core/eif.c), all big-endian::

    header   magic ".eif", version u16, flags u16, default_memory u64, default_cpus u64,
             reserved u16, section_cnt u16, section_offsets [u64; 32], section_sizes [u64; 32],
             unused u32, eif_crc32 u32                                        (548 bytes)
    section  section_type u16, flags u16, section_size u64, then section_size bytes of data

Measurements (src/utils/eif_reader.rs ``EifReader::from_eif``, ``get_pcrs``): the hashers are
``EifHasher::new_without_cache(Sha384)``, a plain streaming SHA384, finalised with
``tpm_extend_finalize_reset``: ``SHA384(0^48 ‖ SHA384(data))``
(:func:`attestation._measure.pcr_of`).

- PCR0: kernel, cmdline and every ramdisk, in file order;
- PCR1: kernel, cmdline and the first ramdisk;
- PCR2: the other ramdisks;
- PCR8 (signed images): the DER of the first ``signing_certificate`` (PEM) of the signature section,
  a CBOR array of ``{signing_certificate: [u8], signature: [u8]}``.

Metadata and signature sections are in no PCR. The CRC32 (IEEE, as zlib) runs over the header
without its last four bytes, then over every section header and its data in order.

The reader is stricter than both references so that they cannot disagree about an image: sections
must be listed in file order, start right after the header, follow each other without gaps or
overlap and end exactly at the end of the file (the AWS reader walks the file sequentially, QEMU
seeks to the listed offsets). Data is hashed in chunks of at most :data:`CHUNK_SIZE` bytes, so an
image of up to :data:`MAX_EIF_SIZE` is measured in bounded memory.
"""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attestation._measure import pcr_of
from attestation._strictcbor import CborRejected, strict_loads
from attestation.errors import AttestationError

__all__ = [
    "CHUNK_SIZE",
    "HEADER_SIZE",
    "MAX_EIF_SIZE",
    "MAX_SECTIONS",
    "SECTION_HEADER_SIZE",
    "Eif",
    "EifError",
    "EifSection",
    "SectionType",
    "measure_eif",
    "read_eif",
]

MAGIC = b".eif"
SUPPORTED_VERSIONS = frozenset({4})
"""EIF versions read; 4 is what nitro-cli writes (and the oldest QEMU boots)."""
MAX_SECTIONS = 32
MAX_EIF_SIZE = 8 * 1024**3
"""Images larger than 8 GiB are refused."""
CHUNK_SIZE = 1024 * 1024
"""Bytes read and hashed at a time."""
MAX_SIGNATURE_SECTION = 1024 * 1024
"""The signature section is decoded in memory; a certificate and a COSE_Sign1 are a few KiB."""

_HEADER = struct.Struct(">4sHHQQHH32Q32QII")
_SECTION_HEADER = struct.Struct(">HHQ")
HEADER_SIZE = _HEADER.size  # 548
SECTION_HEADER_SIZE = _SECTION_HEADER.size  # 12
_KNOWN_FLAGS = 0x1  # EIF_HDR_ARCH_ARM64 (QEMU hw/core/eif.h); 0 is x86_64


class EifError(AttestationError):
    """The bytes are not a well-formed enclave image file; ``rule`` names the rule broken."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule


class SectionType(IntEnum):
    """``EifSectionType`` (src/defs/mod.rs)."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


@dataclass(frozen=True, slots=True)
class EifSection:
    """One section: its type, the file offset of its 12-byte header, and its data size."""

    type: SectionType
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class Eif:
    """A well-formed EIF: header fields, its sections in file order, and its PCRs."""

    version: int
    flags: int
    default_memory: int
    default_cpus: int
    crc32: int
    sections: tuple[EifSection, ...]
    pcrs: dict[int, bytes]

    @property
    def signed(self) -> bool:
        return 8 in self.pcrs


def read_eif(source: bytes | BinaryIO) -> Eif:
    """Parse and measure an EIF, checking every rule; raise :class:`EifError` on the first broken.

    ``source`` is the image's bytes or a seekable binary file; it is untrusted (anyone can hand
    an auditor an image). A file is read in chunks and never loaded whole.
    """
    stream: BinaryIO = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    return _Reader(stream).read()


def measure_eif(source: bytes | BinaryIO) -> dict[int, bytes]:
    """PCR0, PCR1, PCR2 (and PCR8 for a signed image) of an EIF; see :func:`read_eif`."""
    return read_eif(source).pcrs


class _Reader:
    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._crc = 0

    def _read(self, size: int, what: str) -> bytes:
        data = self._stream.read(size)
        if len(data) != size:
            raise EifError("truncated", f"{what} ends after {len(data)} of {size} bytes")
        return data

    def read(self) -> Eif:
        # (1) the file size bounds every offset.
        stream = self._stream
        file_size = stream.seek(0, io.SEEK_END)
        stream.seek(0)
        if file_size > MAX_EIF_SIZE:
            raise EifError("file size", f"the image is {file_size} bytes; at most {MAX_EIF_SIZE}")
        # (2) the header.
        if file_size < HEADER_SIZE:
            raise EifError("truncated", f"the header is {HEADER_SIZE} bytes; the file {file_size}")
        raw = self._read(HEADER_SIZE, "the header")
        fields = _HEADER.unpack(raw)
        magic, version, flags, memory, cpus, _reserved, count = fields[:7]
        offsets, sizes = fields[7:39], fields[39:71]
        expected_crc = fields[72]
        if magic != MAGIC:
            raise EifError("magic", f"the file starts with {magic.hex()}; an EIF with 2e656966")
        if version not in SUPPORTED_VERSIONS:
            raise EifError("version", f"EIF version {version} is not supported (only 4)")
        if flags & ~_KNOWN_FLAGS:
            raise EifError("header flags", f"unknown flags {flags:#06x}")
        if count > MAX_SECTIONS:
            raise EifError("section count", f"section_cnt is {count}; at most {MAX_SECTIONS}")
        if any(offsets[count:]) or any(sizes[count:]):
            raise EifError("section table", f"entries after the first {count} must be zero")
        self._crc = zlib.crc32(raw[:-4])
        # (3) the section table: in file order, contiguous, within the file.
        position = HEADER_SIZE
        for index in range(count):
            offset, size = offsets[index], sizes[index]
            if offset < position:
                raise EifError(
                    "overlapping sections",
                    f"section {index} starts at {offset}, before the end of the previous one "
                    f"({position})",
                )
            if offset > position:
                raise EifError("section gap", f"section {index} starts at {offset}, not {position}")
            end = offset + SECTION_HEADER_SIZE + size
            if end > file_size:
                raise EifError(
                    "section bounds", f"section {index} ends at {end}, past the end ({file_size})"
                )
            position = end
        if position != file_size:
            raise EifError(
                "trailing bytes", f"the last section ends at {position}; the file at {file_size}"
            )
        # (4) each section: header, type, data into the CRC and the hashers.
        image, boot, app = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
        cert_der: bytes | None = None
        seen: set[SectionType] = set()
        ramdisks = 0
        sections: list[EifSection] = []
        for index in range(count):
            header = self._read(SECTION_HEADER_SIZE, f"section {index} header")
            self._crc = zlib.crc32(header, self._crc)
            type_code, section_flags, size = _SECTION_HEADER.unpack(header)
            if size != sizes[index]:
                raise EifError(
                    "section size",
                    f"section {index} header says {size} bytes; the table {sizes[index]}",
                )
            if section_flags != 0:
                raise EifError("section flags", f"section {index} has flags {section_flags:#06x}")
            try:
                kind = SectionType(type_code)
            except ValueError:
                kind = SectionType.INVALID
            if kind is SectionType.INVALID:
                raise EifError("section type", f"section {index} has type {type_code}")
            if kind in seen and kind is not SectionType.RAMDISK:
                raise EifError("duplicate section", f"more than one {kind.name.lower()} section")
            seen.add(kind)
            if kind is SectionType.SIGNATURE:
                if size > MAX_SIGNATURE_SECTION:
                    raise EifError(
                        "signature section", f"{size} bytes; at most {MAX_SIGNATURE_SECTION}"
                    )
                data = self._read(size, f"section {index}")
                self._crc = zlib.crc32(data, self._crc)
                cert_der = _signing_certificate(data)
            else:
                targets: list[hashlib._Hash] = []
                if kind in (SectionType.KERNEL, SectionType.CMDLINE):
                    targets = [image, boot]
                elif kind is SectionType.RAMDISK:
                    targets = [image, boot if ramdisks == 0 else app]
                    ramdisks += 1
                self._stream_section(size, index, targets)
            sections.append(EifSection(kind, offsets[index], size))
        # (5) the required sections, then the CRC.
        for required in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK):
            if required not in seen:
                raise EifError("missing section", f"the image has no {required.name.lower()}")
        if self._crc != expected_crc:
            raise EifError(
                "crc32", f"the header says {expected_crc:08x}; the image hashes to {self._crc:08x}"
            )
        pcrs = {0: pcr_of(image.digest()), 1: pcr_of(boot.digest()), 2: pcr_of(app.digest())}
        if cert_der is not None:
            pcrs[8] = pcr_of(hashlib.sha384(cert_der).digest())
        return Eif(version, flags, memory, cpus, expected_crc, tuple(sections), pcrs)

    def _stream_section(self, size: int, index: int, targets: list[hashlib._Hash]) -> None:
        remaining = size
        while remaining:
            chunk = self._read(min(remaining, CHUNK_SIZE), f"section {index}")
            self._crc = zlib.crc32(chunk, self._crc)
            for hasher in targets:
                hasher.update(chunk)
            remaining -= len(chunk)


def _byte_array(value: object, field: str) -> bytes:
    """serde_cbor encodes a Rust ``Vec<u8>`` as an array of small unsigned integers."""
    if not isinstance(value, list) or not value:
        raise EifError("signature section", f"{field} is not a non-empty array of bytes")
    if not all(type(b) is int and 0 <= b <= 255 for b in value):
        raise EifError("signature section", f"{field} holds a value that is not a byte")
    return bytes(value)


def _signing_certificate(data: bytes) -> bytes:
    """The DER of the first signing certificate: what PCR8 measures (eif_reader.rs)."""
    try:
        decoded = strict_loads(data, max_depth=4)
    except CborRejected as exc:
        raise EifError("signature section", f"not strict CBOR: {exc}") from None
    if not isinstance(decoded, list) or not decoded:
        raise EifError("signature section", "expected a non-empty array of PCR signatures")
    first = decoded[0]
    if not isinstance(first, dict) or set(first) != {"signing_certificate", "signature"}:
        raise EifError("signature section", "expected a map of signing_certificate and signature")
    pem = _byte_array(first["signing_certificate"], "signing_certificate")
    _byte_array(first["signature"], "signature")
    try:
        certificate = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise EifError(
            "signature section", "signing_certificate is not a PEM certificate"
        ) from None
    return certificate.public_bytes(serialization.Encoding.DER)
