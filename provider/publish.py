"""Publish a sealed bundle to S3, and summarise one without its secrets.

:func:`publish` checks the bundle first (the manifest parses, ``chunks.bin`` has exactly the size
the manifest promises), then uploads ``chunks.bin`` and, last, ``manifest.cbor`` with multipart
uploads, so a reader that finds the manifest finds complete chunks. Everything uploaded is public
data or authenticated ciphertext (ARCHITECTURE.md, invariant 2).

:func:`inspect` reads a manifest (a bundle folder, a manifest file, or bytes from anywhere, e.g. S3
through the untrusted parent) and returns a JSON-ready summary. The encrypted data key is shown by
length and SHA-256 prefix only.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Final

from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError

from protocol.bundle import MAX_MANIFEST_SIZE, Manifest, thaw_config
from protocol.errors import MalformedBundle
from provider.errors import ConfigError, PublishError
from provider.seal import CHUNKS_NAME, MANIFEST_NAME, Progress

__all__ = ["MIN_PART_SIZE", "inspect", "parse_s3_url", "publish"]

MIN_PART_SIZE: Final = 8 * 1024 * 1024
MAX_PARTS: Final = 10_000  # S3's limit on parts per multipart upload
_BUCKET: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_PREFIX: Final = re.compile(r"[\x20-\x7e]{0,900}")


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` → ``(bucket, prefix)``; the prefix has no leading or trailing '/'."""
    if not url.startswith("s3://"):
        raise ConfigError(f"{url!r}: expected s3://BUCKET/PREFIX")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(f"{url!r}: {bucket!r} is not an S3 bucket name")
    if not _KEY_PREFIX.fullmatch(prefix) or "//" in prefix:
        raise ConfigError(f"{url!r}: the prefix must be printable ASCII without empty parts")
    return bucket, prefix


def publish(
    bundle_dir: Path, url: str, *, s3_client: Any, progress: Progress | None = None
) -> list[str]:
    """Upload ``bundle_dir``'s two files under ``url`` (``s3://BUCKET/PREFIX``) with boto3
    multipart uploads (parts of at least 8 MiB); returns the object keys, manifest first.

    ``progress(done, total)`` counts uploaded bytes (it may be called from upload threads).
    Raises :class:`PublishError` (bundle incomplete, S3 failed) or :class:`ConfigError` (URL).
    """
    bucket, prefix = parse_s3_url(url)
    bundle_dir = Path(bundle_dir)
    # (1) the bundle is whole: a manifest that parses and chunks of the promised size
    try:
        manifest = _load_manifest(bundle_dir / MANIFEST_NAME, PublishError)
    except MalformedBundle as exc:
        raise PublishError(f"{bundle_dir / MANIFEST_NAME}: not a valid manifest: {exc}") from None
    chunks = bundle_dir / CHUNKS_NAME
    try:
        size = chunks.stat().st_size
    except OSError as exc:
        raise PublishError(f"{chunks}: cannot read ({exc.strerror or exc})") from None
    if size != manifest.sealed_size:
        raise PublishError(
            f"{chunks} is {size} bytes; the manifest promises {manifest.sealed_size}"
        )
    # (2) chunks first, the manifest last
    keys = {name: f"{prefix}/{name}" if prefix else name for name in (MANIFEST_NAME, CHUNKS_NAME)}
    total = size + len(manifest.raw)
    counter = _Counter(total, progress)
    part = max(MIN_PART_SIZE, -(-size // MAX_PARTS))
    config = TransferConfig(multipart_threshold=MIN_PART_SIZE, multipart_chunksize=part)
    for name, content_type in (
        (CHUNKS_NAME, "application/octet-stream"),
        (MANIFEST_NAME, "application/cbor"),
    ):
        try:
            s3_client.upload_file(
                str(bundle_dir / name),
                bucket,
                keys[name],
                ExtraArgs={"ContentType": content_type},
                Config=config,
                Callback=counter,
            )
        except (Boto3Error, ClientError, BotoCoreError) as exc:
            raise PublishError(
                f"upload of {name} to s3://{bucket}/{keys[name]} failed: {exc}"
            ) from None
        except OSError as exc:
            raise PublishError(
                f"{bundle_dir / name}: cannot read ({exc.strerror or exc})"
            ) from None
    return [keys[MANIFEST_NAME], keys[CHUNKS_NAME]]


class _Counter:
    """A thread-safe byte counter for boto3's transfer callbacks."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self._total, self._progress = total, progress
        self._done = 0
        self._lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self._lock:
            self._done += count
            if self._progress is not None:
                self._progress(self._done, self._total)


def inspect(source: Path | bytes) -> dict[str, Any]:
    """A JSON-ready summary of a manifest: ``source`` is a bundle folder, a manifest file, or
    manifest bytes (possibly from the untrusted parent: they are parsed strictly).

    Raises :class:`protocol.errors.MalformedBundle` for a bad manifest and :class:`ConfigError`
    when the file cannot be read.
    """
    chunks_size: int | None = None
    if isinstance(source, bytes | bytearray):
        manifest = Manifest.from_cbor(bytes(source))
    else:
        path = Path(source)
        if path.is_dir():
            try:
                chunks_size = (path / CHUNKS_NAME).stat().st_size
            except OSError:
                chunks_size = None
            path = path / MANIFEST_NAME
        manifest = _load_manifest(path, ConfigError)
    by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"count": 0, "bytes": 0})
    for tensor in manifest.tensors:
        by_dtype[tensor.dtype]["count"] += 1
        by_dtype[tensor.dtype]["bytes"] += tensor.length
    summary: dict[str, Any] = {
        "format": "nci-bundle",
        "version": 1,
        "bundle_id": manifest.bundle_id.hex(),
        "model_id": manifest.model_id,
        "manifest_sha256": manifest.digest.hex(),
        "kms_key_id": manifest.kms_key_id,
        "encrypted_data_key": {
            "length": len(manifest.encrypted_data_key),
            "sha256_prefix": hashlib.sha256(manifest.encrypted_data_key).hexdigest()[:16],
        },
        "encryption_context": dict(manifest.encryption_context),
        "chunk_size": manifest.chunk_size,
        "chunk_count": manifest.chunk_count,
        "plaintext_size": manifest.plaintext_size,
        "sealed_size": manifest.sealed_size,
        "tensors": {
            "count": len(manifest.tensors),
            "bytes": sum(t.length for t in manifest.tensors),
            "by_dtype": {dtype: by_dtype[dtype] for dtype in sorted(by_dtype)},
        },
        "files": [{"name": f.name, "length": f.length} for f in manifest.files],
        "model_config": thaw_config(manifest.model_config),
    }
    if chunks_size is not None:
        summary["chunks_bin"] = {
            "size": chunks_size,
            "complete": chunks_size == manifest.sealed_size,
        }
    return summary


def _load_manifest(path: Path, error: type[Exception]) -> Manifest:
    try:
        if path.stat().st_size > MAX_MANIFEST_SIZE:
            raise error(f"{path}: larger than the {MAX_MANIFEST_SIZE}-byte manifest limit")
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    return Manifest.from_cbor(data)
