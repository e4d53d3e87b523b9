"""The sealed-bundle format: a CBOR manifest plus AES-256-GCM chunks of one plaintext stream.

A bundle is two files (``docs/formats.md``, "Sealed bundle", has the tables and test vectors):

``manifest.cbor``
    A CBOR map in core deterministic encoding (RFC 8949 §4.2.1), so one manifest has exactly one
    byte form: format and version, a random 16-byte ``bundle_id``, the model id and its
    non-secret config, the KMS key id, the encrypted data key (``GenerateDataKey`` AES_256), the
    encryption context (always ``nci:model`` and ``nci:bundle``), the chunk size, the plaintext
    size and chunk count, and the index of tensors and files in the plaintext stream (each range
    64-byte aligned, in order, zero padding between).
``chunks.bin``
    The plaintext stream cut into ``chunk_size`` pieces, each sealed with AES-256-GCM
    (NIST SP 800-38D) and stored as ciphertext ‖ 16-byte tag, back to back::

        bundle_key = HKDF-SHA256(ikm=data_key, salt=bundle_id, info="nci-bundle v1 chunk key")
        nonce_i    = 0x00000000 ‖ uint64_be(i)
        aad_i      = SHA-256(manifest) ‖ uint64_be(i) ‖ (0x01 if i is the last chunk else 0x00)

The manifest digest in every chunk's associated data binds the chunks to this exact manifest (an
edited manifest, or a chunk from another bundle of the same model, fails); the index binds order;
the final flag stops truncation and extension; the bundle_id salt gives each bundle its own key, so
nonces never repeat under one key. Chunks open independently, in any order and in place
(:func:`open_chunk_into`).

Everything here is pure: no I/O. The manifest and the sealed chunks come from the untrusted parent
(it streams them from S3); :meth:`Manifest.from_cbor` and :func:`open_chunk` treat them so.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol._cbor import CborRejected, canonical_dumps, strict_loads
from protocol._manifestfields import (
    ALIGNMENT,
    CONTEXT_BUNDLE,
    CONTEXT_MODEL,
    DTYPE_SIZES,
    FileEntry,
    TensorEntry,
    align_up,
    check_context,
    check_json_like,
    check_ranges,
    freeze,
    parse_files,
    parse_tensors,
    thaw,
    uint,
)
from protocol.errors import BundleIntegrityError, ConfigError, MalformedBundle

__all__ = [
    "ALIGNMENT",
    "CONTEXT_BUNDLE",
    "CONTEXT_MODEL",
    "DEFAULT_CHUNK_SIZE",
    "DTYPE_SIZES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MANIFEST_SIZE",
    "TAG_SIZE",
    "BundleLayout",
    "FileEntry",
    "Manifest",
    "TensorEntry",
    "chunk_aad",
    "chunk_nonce",
    "derive_bundle_key",
    "open_chunk",
    "open_chunk_into",
    "seal_chunk",
    "thaw_config",
]

FORMAT_NAME: Final = "nci-bundle"
FORMAT_VERSION: Final = 1
DEFAULT_CHUNK_SIZE: Final = 1024 * 1024
MIN_CHUNK_SIZE: Final = 4096
MAX_CHUNK_SIZE: Final = 16 * 1024 * 1024  # a sealed chunk must fit one frame (frames.py)
TAG_SIZE: Final = 16
KEY_SIZE: Final = 32  # AES-256 (GenerateDataKey KeySpec AES_256)
BUNDLE_ID_SIZE: Final = 16
DIGEST_SIZE: Final = 32  # SHA-256
MAX_MANIFEST_SIZE: Final = 16 * 1024 * 1024
MAX_PLAINTEXT_SIZE: Final = 2**48  # 256 TiB: far above any model, far below GCM's counter space
MAX_KEY_ID: Final = 2048  # KMS KeyId: id, ARN, alias name or alias ARN
MAX_ENCRYPTED_KEY: Final = 6144  # KMS CiphertextBlob maximum
HKDF_INFO: Final = b"nci-bundle v1 chunk key"
_MAX_DEPTH: Final = 32  # manifest > tensors > entry > shape > dim; model_config gets the rest


_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "bundle_id",
        "model_id",
        "model_config",
        "kms_key_id",
        "encrypted_data_key",
        "encryption_context",
        "chunk_size",
        "plaintext_size",
        "chunk_count",
        "tensors",
        "files",
    }
)
_MODEL_ID: Final = re.compile(r"[A-Za-z0-9._:/-]{1,128}")
_KEY_ID: Final = re.compile(r"[\x21-\x7e]{1,2048}")


@dataclass(frozen=True)
class BundleLayout:
    """Where every tensor and file goes in the plaintext stream: tensors in the given order, then
    files, each at the next 64-byte boundary (zero padding between, none after the last)."""

    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...]
    plaintext_size: int

    @classmethod
    def plan(
        cls,
        tensors: Iterable[tuple[str, str, Sequence[int], int]],
        files: Iterable[tuple[str, int]] = (),
    ) -> BundleLayout:
        """Place ``(name, dtype, shape, nbytes)`` tensors, then ``(name, nbytes)`` files.

        Raises :class:`MalformedBundle` for an unknown dtype, a size that is not numel × itemsize,
        a repeated name or a file name that is not a plain relative path.
        """
        position = 0
        placed_tensors: list[TensorEntry] = []
        for name, dtype, shape, nbytes in tensors:
            offset = align_up(position)
            entry = TensorEntry(name, dtype, tuple(shape), offset, nbytes)
            placed_tensors.append(entry)
            position = offset + nbytes
        placed_files: list[FileEntry] = []
        for name, nbytes in files:
            offset = align_up(position)
            placed_files.append(FileEntry(name, offset, nbytes))
            position = offset + nbytes
        layout = cls(tuple(placed_tensors), tuple(placed_files), position)
        check_ranges(layout.tensors, layout.files, layout.plaintext_size)
        return layout


@dataclass(frozen=True, eq=False)
class Manifest:
    """A manifest that follows every rule of the format; ``raw`` is its exact (canonical) bytes.

    Build one with :meth:`create` (sealing) or :meth:`from_cbor` (bytes from the untrusted
    parent). Two manifests are equal when their bytes are.
    """

    raw: bytes
    bundle_id: bytes
    model_id: str
    model_config: Mapping[str, Any]
    kms_key_id: str
    encrypted_data_key: bytes
    encryption_context: Mapping[str, str]
    chunk_size: int
    plaintext_size: int
    chunk_count: int
    tensors: tuple[TensorEntry, ...]
    files: tuple[FileEntry, ...]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def digest(self) -> bytes:
        """SHA-256 of the manifest's exact bytes: bound into every chunk's associated data."""
        return hashlib.sha256(self.raw).digest()

    @property
    def sealed_size(self) -> int:
        """The size of ``chunks.bin``."""
        return self.plaintext_size + TAG_SIZE * self.chunk_count

    def to_cbor(self) -> bytes:
        return self.raw

    def is_final(self, index: int) -> bool:
        """Whether chunk ``index`` is the last one (its associated data carries the final flag)."""
        self._check_index(index)
        return index == self.chunk_count - 1

    def chunk_plain_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of chunk ``index`` in the plaintext stream."""
        self._check_index(index)
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.plaintext_size)

    def sealed_chunk_size(self, index: int) -> int:
        """Bytes of sealed chunk ``index``: its plaintext length plus the 16-byte tag."""
        start, end = self.chunk_plain_range(index)
        return end - start + TAG_SIZE

    def sealed_offset(self, index: int) -> int:
        """Where sealed chunk ``index`` starts in ``chunks.bin``."""
        self._check_index(index)
        return index * (self.chunk_size + TAG_SIZE)

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self.chunk_count:
            raise MalformedBundle(f"chunk index {index!r} is outside 0..{self.chunk_count - 1}")

    @classmethod
    def create(
        cls,
        *,
        bundle_id: bytes,
        model_id: str,
        model_config: Mapping[str, Any],
        kms_key_id: str,
        encrypted_data_key: bytes,
        encryption_context: Mapping[str, str],
        chunk_size: int,
        layout: BundleLayout,
    ) -> Manifest:
        """Encode a manifest (canonically) and parse it back, so it obeys the same rules as one
        read from the parent. Raises :class:`MalformedBundle` naming the field and the rule."""
        value = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "bundle_id": bundle_id,
            "model_id": model_id,
            "model_config": thaw(model_config),
            "kms_key_id": kms_key_id,
            "encrypted_data_key": encrypted_data_key,
            "encryption_context": dict(encryption_context),
            "chunk_size": chunk_size,
            "plaintext_size": layout.plaintext_size,
            "chunk_count": (
                -(-layout.plaintext_size // chunk_size)
                if type(chunk_size) is int and chunk_size > 0
                else 0
            ),
            "tensors": [
                {
                    "name": t.name,
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "offset": t.offset,
                    "length": t.length,
                }
                for t in layout.tensors
            ],
            "files": [
                {"name": f.name, "offset": f.offset, "length": f.length} for f in layout.files
            ],
        }
        try:
            data = canonical_dumps(value)
        except CborRejected as exc:
            raise MalformedBundle(f"manifest cannot be encoded: {exc}") from None
        return cls.from_cbor(data)

    @classmethod
    def from_cbor(cls, data: bytes) -> Manifest:
        """Parse a manifest; ``data`` comes from the untrusted parent (or S3 through it).

        Raises only :class:`MalformedBundle`, naming the field and the rule. Parsing proves the
        manifest well formed, not authentic: chunks authenticate it (their associated data holds
        its digest), and the data key is released only for the encryption context it names.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise MalformedBundle(f"manifest must be bytes, not {type(data).__name__}")
        data = bytes(data)
        # (1) bound the work before decoding anything
        if len(data) > MAX_MANIFEST_SIZE:
            raise MalformedBundle(
                f"manifest is {len(data)} bytes; the maximum is {MAX_MANIFEST_SIZE}"
            )
        # (2) one strict CBOR item (RFC 8949 §5.3): no tags, no duplicate keys, text keys
        try:
            value = strict_loads(data, max_depth=_MAX_DEPTH, floats=True)
        except CborRejected as exc:
            raise MalformedBundle(f"manifest: {exc}") from None
        if not isinstance(value, dict):
            raise MalformedBundle("manifest is not a CBOR map")
        if set(value) != _KEYS:
            missing, unknown = sorted(_KEYS - set(value)), sorted(set(value) - _KEYS)
            raise MalformedBundle(f"manifest keys: missing {missing}, unknown {unknown}")
        # (3) one byte form per manifest: core deterministic encoding (RFC 8949 §4.2.1)
        try:
            canonical = canonical_dumps(value)
        except CborRejected as exc:  # pragma: no cover - decoded plain values always encode
            raise MalformedBundle(f"manifest: {exc}") from None
        if canonical != data:
            raise MalformedBundle(
                "manifest is not in core deterministic encoding (RFC 8949 §4.2.1)"
            )
        # (4) the fields, one rule at a time
        if value["format"] != FORMAT_NAME or type(value["format"]) is not str:
            raise MalformedBundle(f"manifest.format must be {FORMAT_NAME!r}")
        if type(value["version"]) is not int or value["version"] != FORMAT_VERSION:
            raise MalformedBundle(f"manifest.version must be {FORMAT_VERSION}")
        bundle_id = value["bundle_id"]
        if type(bundle_id) is not bytes or len(bundle_id) != BUNDLE_ID_SIZE:
            raise MalformedBundle(f"manifest.bundle_id must be {BUNDLE_ID_SIZE} bytes")
        model_id = value["model_id"]
        if type(model_id) is not str or not _MODEL_ID.fullmatch(model_id):
            raise MalformedBundle("manifest.model_id must be 1..128 characters of [A-Za-z0-9._:/-]")
        if type(value["model_config"]) is not dict or not check_json_like(value["model_config"]):
            raise MalformedBundle(
                "manifest.model_config must be a map of JSON values (text, integer, float, "
                "true/false/null, array, map)"
            )
        key_id = value["kms_key_id"]
        if type(key_id) is not str or not _KEY_ID.fullmatch(key_id):
            raise MalformedBundle(
                f"manifest.kms_key_id must be 1..{MAX_KEY_ID} printable ASCII characters"
            )
        blob = value["encrypted_data_key"]
        if type(blob) is not bytes or not 1 <= len(blob) <= MAX_ENCRYPTED_KEY:
            raise MalformedBundle(
                f"manifest.encrypted_data_key must be 1..{MAX_ENCRYPTED_KEY} bytes"
            )
        context = check_context(value["encryption_context"], model_id, bundle_id)
        chunk_size = uint(value, "chunk_size")
        if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise MalformedBundle(
                f"manifest.chunk_size {chunk_size} is not a power of two in "
                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        size = uint(value, "plaintext_size")
        if not 1 <= size <= MAX_PLAINTEXT_SIZE:
            raise MalformedBundle(
                f"manifest.plaintext_size {size} is outside 1..{MAX_PLAINTEXT_SIZE}"
            )
        count = uint(value, "chunk_count")
        if count != -(-size // chunk_size):
            raise MalformedBundle(
                f"manifest.chunk_count {count} is not ceil(plaintext_size / chunk_size)"
            )
        tensors = parse_tensors(value["tensors"])
        files = parse_files(value["files"])
        # (5) the ranges: aligned, in order, not overlapping, inside the plaintext stream
        check_ranges(tensors, files, size, exact_size=False)
        return cls(
            raw=data,
            bundle_id=bundle_id,
            model_id=model_id,
            model_config=freeze(value["model_config"]),
            kms_key_id=key_id,
            encrypted_data_key=blob,
            encryption_context=MappingProxyType(context),
            chunk_size=chunk_size,
            plaintext_size=size,
            chunk_count=count,
            tensors=tensors,
            files=files,
        )


# -- chunk cryptography -------------------------------------------------------------------------


def derive_bundle_key(data_key: bytes | bytearray, bundle_id: bytes) -> bytes:
    """``HKDF-SHA256(ikm=data_key, salt=bundle_id, info=b"nci-bundle v1 chunk key", L=32)``
    (RFC 5869). ``data_key`` is the 32-byte plaintext data key; it is not kept."""
    if len(data_key) != KEY_SIZE:
        raise MalformedBundle(f"data key is {len(data_key)} bytes; AES_256 data keys are 32")
    if type(bundle_id) is not bytes or len(bundle_id) != BUNDLE_ID_SIZE:
        raise MalformedBundle(f"bundle_id must be {BUNDLE_ID_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=bundle_id, info=HKDF_INFO)
    return hkdf.derive(bytes(data_key))


def chunk_nonce(index: int) -> bytes:
    """The 12-byte GCM nonce of chunk ``index``: four zero bytes ‖ uint64_be(index)."""
    if type(index) is not int or not 0 <= index < 2**64:
        raise MalformedBundle(f"chunk index {index!r} does not fit 64 bits")
    return b"\x00\x00\x00\x00" + index.to_bytes(8, "big")


def chunk_aad(manifest_digest: bytes, index: int, final: bool) -> bytes:
    """The associated data of chunk ``index``: manifest SHA-256 ‖ uint64_be(index) ‖ final flag."""
    if type(manifest_digest) is not bytes or len(manifest_digest) != DIGEST_SIZE:
        raise MalformedBundle(f"manifest digest must be {DIGEST_SIZE} bytes (SHA-256)")
    return manifest_digest + chunk_nonce(index)[4:] + (b"\x01" if final else b"\x00")


def seal_chunk(
    bundle_key: bytes, manifest_digest: bytes, index: int, final: bool, plaintext: bytes
) -> bytes:
    """AES-256-GCM seal of one chunk: ciphertext ‖ 16-byte tag."""
    aad = chunk_aad(manifest_digest, index, final)
    return AESGCM(bundle_key).encrypt(chunk_nonce(index), plaintext, aad)


def open_chunk(
    bundle_key: bytes, manifest_digest: bytes, index: int, final: bool, sealed: bytes
) -> bytes:
    """Open sealed chunk ``index``; ``sealed`` comes from the untrusted parent.

    Raises :class:`BundleIntegrityError` when the tag does not verify: a flipped bit, a chunk of
    another bundle or position, a wrong final flag, another manifest, or the wrong key.
    """
    aad = chunk_aad(manifest_digest, index, final)
    if len(sealed) < TAG_SIZE:
        raise BundleIntegrityError(f"chunk {index}: shorter than its {TAG_SIZE}-byte tag")
    try:
        return AESGCM(bundle_key).decrypt(chunk_nonce(index), sealed, aad)
    except InvalidTag:
        raise BundleIntegrityError(f"chunk {index}: authentication failed") from None


def open_chunk_into(
    bundle_key: bytes,
    manifest_digest: bytes,
    index: int,
    final: bool,
    sealed: bytes | bytearray | memoryview,
    out: memoryview,
) -> None:
    """Open sealed chunk ``index`` straight into ``out`` (exactly ``len(sealed) - 16`` bytes, e.g.
    a slice of a preallocated tensor); ``sealed`` comes from the untrusted parent.

    ``AESGCM.decrypt_into`` writes the plaintext before it checks the tag, so on any failure
    ``out`` is zeroed before :class:`BundleIntegrityError` is raised: unauthenticated bytes never
    stay where a tensor could use them.
    """
    aad = chunk_aad(manifest_digest, index, final)
    if not isinstance(out, memoryview) or out.readonly or not out.c_contiguous:
        raise ConfigError("open_chunk_into needs a writable, contiguous memoryview")
    flat = out.cast("B") if out.format != "B" or out.ndim != 1 else out
    size = sealed.nbytes if isinstance(sealed, memoryview) else len(sealed)
    if size < TAG_SIZE or flat.nbytes != size - TAG_SIZE:
        raise BundleIntegrityError(
            f"chunk {index}: {size} sealed bytes do not fit a {flat.nbytes}-byte buffer"
        )
    try:
        AESGCM(bundle_key).decrypt_into(chunk_nonce(index), sealed, aad, flat)
    except InvalidTag:
        _wipe(flat)
        raise BundleIntegrityError(f"chunk {index}: authentication failed") from None
    except BaseException:
        _wipe(flat)
        raise


def _wipe(buffer: memoryview) -> None:
    buffer[:] = bytes(buffer.nbytes)


def thaw_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``Manifest.model_config`` as plain dicts and lists (for ``json.dumps``)."""
    thawed: dict[str, Any] = thaw(config)
    return thawed
