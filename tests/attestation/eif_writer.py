"""A test-only EIF writer: spec-conformant images, and the knobs to break them.

Layout as aws-nitro-enclaves-image-format's ``EifBuilder`` writes it (src/utils/mod.rs,
``sections_offsets`` and ``compute_crc``): the 548-byte header, then each section (12-byte header
and data) back to back in the order kernel, cmdline, metadata, ramdisks, signature; the CRC32 over
the header without its CRC field and every section in order. nitro-cli always writes the metadata
section; :func:`default_sections` leaves it out unless asked, to keep the images small.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import cbor2

KERNEL, CMDLINE, RAMDISK, SIGNATURE, METADATA = 1, 2, 3, 4, 5
HEADER = struct.Struct(">4sHHQQHH32Q32QII")
SECTION = struct.Struct(">HHQ")


@dataclass(frozen=True)
class Section:
    type: int
    data: bytes


def signature_section(pem: bytes, signature: bytes = b"\xd2cose") -> bytes:
    """A ``Vec<PcrSignature>`` as serde_cbor writes it: byte vectors as arrays of integers."""
    return cbor2.dumps([{"signing_certificate": list(pem), "signature": list(signature)}])


def default_sections(
    *, pem: bytes | None = None, metadata: bool = False, ramdisks: int = 2
) -> list[Section]:
    """Sections in nitro-cli's order: kernel, cmdline, metadata, ramdisks, signature."""
    sections = [
        Section(KERNEL, b"\x7fELF kernel " * 40),
        Section(CMDLINE, b"reboot=k panic=30 pci=off console=ttyS0"),
    ]
    if metadata:
        sections.append(Section(METADATA, b'{"ImageName":"test","ImageVersion":"1.0"}'))
    sections += [Section(RAMDISK, bytes([n]) * (3000 + n)) for n in range(ramdisks)]
    if pem is not None:
        sections.append(Section(SIGNATURE, signature_section(pem)))
    return sections


def build_eif(
    sections: Sequence[Section],
    *,
    magic: bytes = b".eif",
    version: int = 4,
    section_cnt: int | None = None,
    offsets: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
    crc: int | None = None,
) -> bytes:
    """An EIF of ``sections``; every keyword overrides what a conformant writer would put."""
    body = b""
    real_offsets, real_sizes = [], []
    position = HEADER.size
    for section in sections:
        real_offsets.append(position)
        real_sizes.append(len(section.data))
        chunk = SECTION.pack(section.type, 0, len(section.data)) + section.data
        body += chunk
        position += len(chunk)
    table_offsets = list(offsets if offsets is not None else real_offsets)
    table_sizes = list(sizes if sizes is not None else real_sizes)
    table_offsets += [0] * (32 - len(table_offsets))
    table_sizes += [0] * (32 - len(table_sizes))
    count = len(sections) if section_cnt is None else section_cnt
    fields = [magic, version, 0, 512 * 1024 * 1024, 2, 0, count]
    header = HEADER.pack(*fields, *table_offsets[:32], *table_sizes[:32], 0, 0)
    computed = zlib.crc32(body, zlib.crc32(header[:-4]))
    return header[:-4] + struct.pack(">I", computed if crc is None else crc) + body
