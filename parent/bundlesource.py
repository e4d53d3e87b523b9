"""Where the parent reads sealed bundles from: a local folder or S3. Ciphertext only.

A sealed bundle is two objects (format: ``protocol.bundle``, which the parent deliberately does not
import: it needs three fields, not the key-handling code)::

    manifest.cbor   public metadata, forwarded verbatim (the enclave authenticates it)
    chunks.bin      sealed chunk 0 ‖ sealed chunk 1 ‖ ... ; sealed chunk i is its plaintext
                    (chunk_size bytes, the last one plaintext_size - (chunk_count-1)*chunk_size)
                    followed by a 16-byte AEAD tag, at offset i*(chunk_size+16)

Only ``chunk_size``, ``plaintext_size`` and ``chunk_count`` are read from the manifest, to cut
chunks.bin at the right offsets and to check its size before serving anything. Integrity is the
enclave's job; the parent cannot check it and does not try to.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from protocol._cbor import CborRejected, strict_loads
from protocol.errors import ConfigError, MalformedBundle, TransportError

__all__ = [
    "CHUNKS_NAME",
    "MANIFEST_NAME",
    "MAX_MANIFEST_SIZE",
    "TAG_SIZE",
    "BundleLayout",
    "BundleSource",
    "FolderSource",
    "S3Source",
    "s3_client_config",
    "s3_keys",
]

MANIFEST_NAME: Final = "manifest.cbor"
CHUNKS_NAME: Final = "chunks.bin"
TAG_SIZE: Final = 16  # AES-256-GCM tag after each chunk's ciphertext
MAX_MANIFEST_SIZE: Final = 16 * 1024 * 1024
_MANIFEST_DEPTH: Final = 32
_READ_PIECE: Final = 1024 * 1024  # S3 bodies are read in pieces of at most this much


# -- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleLayout:
    """Where each sealed chunk lies in chunks.bin, from three manifest fields."""

    chunk_size: int
    plaintext_size: int
    chunk_count: int

    @classmethod
    def from_manifest(cls, manifest: bytes) -> BundleLayout:
        """Read the layout fields of ``manifest`` (untrusted: it comes from disk or S3).

        Decodes strictly (one CBOR item, no tags, no duplicate keys) and checks only what the
        parent needs to cut chunks.bin; the enclave checks the rest. Raises
        :class:`MalformedBundle`.
        """
        # (1) bound, (2) one strict CBOR map, (3) three unsigned integers, (4) consistent counts
        if len(manifest) > MAX_MANIFEST_SIZE:
            raise MalformedBundle(
                f"manifest is {len(manifest)} bytes; the maximum is {MAX_MANIFEST_SIZE}"
            )
        try:
            value = strict_loads(manifest, max_depth=_MANIFEST_DEPTH, floats=True)
        except CborRejected as exc:
            raise MalformedBundle(f"manifest: {exc}") from None
        if not isinstance(value, dict):
            raise MalformedBundle("manifest must be a CBOR map")
        fields: dict[str, int] = {}
        for key in ("chunk_size", "plaintext_size", "chunk_count"):
            field = value.get(key)
            if type(field) is not int or field < 0:
                raise MalformedBundle(f"manifest.{key} must be an unsigned integer")
            fields[key] = field
        return cls(**fields)

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise MalformedBundle("manifest.chunk_size must be at least 1")
        # plaintext_size 0 is one empty chunk (its tag still authenticates the emptiness)
        expected = max(1, -(-self.plaintext_size // self.chunk_size))
        if self.chunk_count != expected:
            raise MalformedBundle(
                f"manifest.chunk_count {self.chunk_count} is not ceil(plaintext_size / chunk_size)"
            )

    @property
    def sealed_size(self) -> int:
        """The size chunks.bin must have."""
        return self.plaintext_size + TAG_SIZE * self.chunk_count

    @property
    def max_sealed_chunk(self) -> int:
        return min(self.chunk_size, self.plaintext_size) + TAG_SIZE

    def offset(self, index: int) -> int:
        """Byte offset of sealed chunk ``index`` in chunks.bin."""
        self._check_index(index)
        return index * (self.chunk_size + TAG_SIZE)

    def sealed_length(self, index: int) -> int:
        """Length of sealed chunk ``index``: its plaintext length plus the tag."""
        self._check_index(index)
        start = index * self.chunk_size
        return min(self.chunk_size, self.plaintext_size - start) + TAG_SIZE

    def _check_index(self, index: int) -> None:
        if type(index) is not int or not 0 <= index < self.chunk_count:
            raise MalformedBundle(f"chunk index {index!r} is outside 0..{self.chunk_count - 1}")


# -- sources -----------------------------------------------------------------------------------


class BundleSource(Protocol):
    """Where a sealed bundle's bytes come from. Methods block (the streamer runs them in threads)
    and raise :class:`MalformedBundle` for a bundle that breaks the layout, or
    :class:`TransportError` when the storage cannot be reached."""

    def manifest(self) -> bytes:
        """manifest.cbor, verbatim."""
        ...

    def layout(self) -> BundleLayout:
        """The manifest's layout, after checking that chunks.bin has exactly its size."""
        ...

    def read_chunk(self, index: int) -> bytes:
        """Sealed chunk ``index``, verbatim: exactly ``layout().sealed_length(index)`` bytes."""
        ...


class _CheckedSource:
    """Shared logic: load and check the manifest once, then cut chunks by the layout.

    A published bundle is immutable (a new version is a new bundle), so the checked manifest and
    layout are kept for the source's lifetime; a chunks.bin that changes afterwards shows up as a
    short read here, or as an authentication failure in the enclave.
    """

    def __init__(self, *, max_manifest: int) -> None:
        if type(max_manifest) is not int or not 1 <= max_manifest <= MAX_MANIFEST_SIZE:
            raise ConfigError(f"max_manifest must be in 1..{MAX_MANIFEST_SIZE}")
        self._max_manifest = max_manifest
        self._lock = threading.Lock()
        self._loaded: tuple[bytes, BundleLayout] | None = None

    def _load(self) -> tuple[bytes, BundleLayout]:
        with self._lock:
            if self._loaded is None:
                manifest = self._read_manifest()
                layout = BundleLayout.from_manifest(manifest)
                size = self._chunks_size()
                if size != layout.sealed_size:
                    raise MalformedBundle(
                        f"{CHUNKS_NAME} is {size} bytes; the manifest's layout needs "
                        f"{layout.sealed_size}"
                    )
                self._loaded = (manifest, layout)
            return self._loaded

    def manifest(self) -> bytes:
        return self._load()[0]

    def layout(self) -> BundleLayout:
        return self._load()[1]

    def read_chunk(self, index: int) -> bytes:
        layout = self.layout()
        length = layout.sealed_length(index)
        data = self._read_range(layout.offset(index), length)
        if len(data) != length:
            raise MalformedBundle(f"chunk {index}: read {len(data)} of {length} bytes")
        return data

    # implemented by each source
    def _read_manifest(self) -> bytes:
        raise NotImplementedError

    def _chunks_size(self) -> int:
        raise NotImplementedError

    def _read_range(self, offset: int, length: int) -> bytes:
        raise NotImplementedError


class FolderSource(_CheckedSource):
    """A bundle in a local folder: ``path/manifest.cbor`` and ``path/chunks.bin``."""

    def __init__(self, path: str | os.PathLike[str], *, max_manifest: int = MAX_MANIFEST_SIZE):
        super().__init__(max_manifest=max_manifest)
        self._path = Path(path)

    def __repr__(self) -> str:
        return f"FolderSource({str(self._path)!r})"

    def _read_manifest(self) -> bytes:
        try:
            with (self._path / MANIFEST_NAME).open("rb") as file:
                data = file.read(self._max_manifest + 1)  # bounded: one byte past the limit
        except FileNotFoundError:
            raise MalformedBundle(f"{MANIFEST_NAME} is missing") from None
        except OSError as exc:
            raise TransportError(f"{MANIFEST_NAME}: {exc.strerror or type(exc).__name__}") from None
        if len(data) > self._max_manifest:
            raise MalformedBundle(f"{MANIFEST_NAME} is over {self._max_manifest} bytes")
        return data

    def _chunks_size(self) -> int:
        try:
            info = os.stat(self._path / CHUNKS_NAME)
        except FileNotFoundError:
            raise MalformedBundle(f"{CHUNKS_NAME} is missing") from None
        except OSError as exc:
            raise TransportError(f"{CHUNKS_NAME}: {exc.strerror or type(exc).__name__}") from None
        if not stat.S_ISREG(info.st_mode):
            raise MalformedBundle(f"{CHUNKS_NAME} is not a regular file")
        return info.st_size

    def _read_range(self, offset: int, length: int) -> bytes:
        try:
            with (self._path / CHUNKS_NAME).open("rb") as file:
                file.seek(offset)
                return file.read(length)  # bounded by the layout: one sealed chunk
        except OSError as exc:
            raise TransportError(f"{CHUNKS_NAME}: {exc.strerror or type(exc).__name__}") from None


def s3_client_config(*, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> Config:
    """A botocore ``Config`` with deadlines for the S3 client given to :class:`S3Source`:
    ``boto3.client("s3", config=s3_client_config())``."""
    return Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": 3, "mode": "standard"},
    )


class S3Source(_CheckedSource):
    """A bundle in S3: ``s3://bucket/prefix/manifest.cbor`` and ``.../chunks.bin``.

    Each chunk is one ranged ``GetObject`` (``Range: bytes=a-b``) whose body is read in bounded
    pieces. Deadlines come from the client's botocore ``Config`` (see :func:`s3_client_config`).
    """

    def __init__(
        self, s3_client: Any, bucket: str, prefix: str, *, max_manifest: int = MAX_MANIFEST_SIZE
    ):
        super().__init__(max_manifest=max_manifest)
        if not isinstance(bucket, str) or not bucket:
            raise ConfigError("S3Source needs a bucket name")
        if not isinstance(prefix, str):
            raise ConfigError("S3Source prefix must be text")
        self._s3 = s3_client
        self._bucket = bucket
        self._manifest_key, self._chunks_key = s3_keys(prefix)

    def __repr__(self) -> str:
        return f"S3Source({self._bucket!r}, {self._chunks_key.rpartition('/')[0]!r})"

    def _read_manifest(self) -> bytes:
        response = self._call("get_object", Bucket=self._bucket, Key=self._manifest_key)
        return _read_body(response, limit=self._max_manifest, exact=None, what=MANIFEST_NAME)

    def _chunks_size(self) -> int:
        response = self._call("head_object", Bucket=self._bucket, Key=self._chunks_key)
        size = response.get("ContentLength")
        if type(size) is not int or size < 0:
            raise TransportError(f"{CHUNKS_NAME}: S3 gave no content length")
        return size

    def _read_range(self, offset: int, length: int) -> bytes:
        response = self._call(
            "get_object",
            Bucket=self._bucket,
            Key=self._chunks_key,
            Range=f"bytes={offset}-{offset + length - 1}",  # RFC 9110 §14.1.2: inclusive end
        )
        return _read_body(response, limit=length, exact=length, what=CHUNKS_NAME)

    def _call(self, operation: str, **kwargs: str) -> dict[str, Any]:
        key = kwargs["Key"].rpartition("/")[2]
        try:
            response: dict[str, Any] = getattr(self._s3, operation)(**kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise MalformedBundle(f"{key} is missing") from None
            raise TransportError(f"{key}: S3 {operation} failed ({code or 'error'})") from None
        except BotoCoreError as exc:
            raise TransportError(f"{key}: S3 {operation} failed ({type(exc).__name__})") from None
        return response


def s3_keys(prefix: str) -> tuple[str, str]:
    """The object keys of the bundle under ``prefix``: the manifest's and the chunks'."""
    base = prefix.strip("/")
    if not base:
        return MANIFEST_NAME, CHUNKS_NAME
    return f"{base}/{MANIFEST_NAME}", f"{base}/{CHUNKS_NAME}"


def _read_body(response: dict[str, Any], *, limit: int, exact: int | None, what: str) -> bytes:
    """Read an S3 ``StreamingBody`` in bounded pieces, never more than ``limit`` bytes (plus one to
    detect an overlong body), then close it."""
    declared = response.get("ContentLength")
    if type(declared) is int and declared > limit:
        raise MalformedBundle(f"{what}: S3 object is {declared} bytes; at most {limit} expected")
    body = response["Body"]
    pieces: list[bytes] = []
    got = 0
    try:
        while got <= limit:
            piece = body.read(min(_READ_PIECE, limit + 1 - got))
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
    except (BotoCoreError, OSError) as exc:
        raise TransportError(f"{what}: S3 read failed ({type(exc).__name__})") from None
    finally:
        body.close()
    if got > limit:
        raise MalformedBundle(f"{what}: S3 body is over {limit} bytes")
    if exact is not None and got != exact:
        raise MalformedBundle(f"{what}: S3 returned {got} of {exact} bytes")
    return b"".join(pieces)
