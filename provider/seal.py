"""Seal a model into a bundle: one data key from KMS, a canonical manifest, AES-256-GCM chunks.

:func:`seal` follows the sealed-bundle format of :mod:`protocol.bundle` (``docs/formats.md``):

1. plan: read and check every safetensors header (no tensor is loaded), list the other files,
   place tensors then files in the plaintext stream (64-byte aligned);
2. ``GenerateDataKey`` (AES_256) once, with the encryption context ``nci:model``, ``nci:bundle``
   and the provider's extras;
3. write ``manifest.cbor``: its bytes are fixed before any chunk is sealed, since every chunk's
   associated data holds their SHA-256;
4. stream the plaintext (tensor bytes straight from the source files, zero padding, then the
   files) once, sealing chunk by chunk into ``chunks.bin``; two chunk buffers, whatever the size;
5. overwrite the plaintext data key as soon as the chunk key is derived, and move the finished
   bundle into place with one rename, so a crash never leaves half a bundle under the real name.

The model folder is the provider's, but its files may come from anywhere: pickles are refused
(weights only through safetensors), symlinks may not leave the folder, every header is checked.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO, Final

from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from protocol.bundle import (
    CONTEXT_BUNDLE,
    CONTEXT_MODEL,
    DEFAULT_CHUNK_SIZE,
    TAG_SIZE,
    Manifest,
    chunk_aad,
    chunk_nonce,
    derive_bundle_key,
)
from protocol.errors import MalformedBundle
from provider._modelfiles import PICKLE_SUFFIXES, Plan, Source, plan_model
from provider.errors import ConfigError, InvalidModel, KmsError

__all__ = ["CHUNKS_NAME", "MANIFEST_NAME", "PICKLE_SUFFIXES", "seal", "seal_with_data_key"]

log = logging.getLogger(__name__)

MANIFEST_NAME: Final = "manifest.cbor"
CHUNKS_NAME: Final = "chunks.bin"
_READ_BLOCK: Final = 8 * 1024 * 1024
# manifest fields that come from the command line, not from the model
_OUR_FIELDS: Final = tuple(
    f"manifest.{f}" for f in ("chunk_size", "model_id", "kms_key_id", "encryption_context")
)

Progress = Callable[[int, int], None]


def seal(
    model: Path,
    *,
    kms_client: Any,
    kms_key_id: str,
    model_id: str,
    out: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Seal ``model`` (a ``.safetensors`` file or a Hugging Face-style folder) into the bundle
    folder ``out`` under a fresh data key from ``kms_client`` (boto3; its config sets the
    timeouts). ``progress(done, total)`` is called after each chunk with plaintext byte counts.

    Raises :class:`InvalidModel`, :class:`KmsError` or :class:`ConfigError`.
    """
    # (1) plan, and check every input, before KMS is asked for anything
    plan = plan_model(Path(model))
    bundle_id = secrets.token_bytes(16)
    context = _context(model_id, bundle_id, extra_context)
    _draft(plan, bundle_id, model_id, kms_key_id, context, chunk_size)
    _check_out(Path(out))
    # (2) one data key for the bundle
    data_key, blob, key_arn = _generate_data_key(kms_client, kms_key_id, context)
    try:
        return _seal(
            plan,
            data_key,
            blob,
            bundle_id,
            key_arn,
            model_id,
            Path(out),
            chunk_size,
            context,
            progress,
        )
    finally:
        data_key[:] = bytes(len(data_key))


def seal_with_data_key(
    model: Path,
    *,
    data_key: bytes | bytearray,
    encrypted_data_key: bytes,
    bundle_id: bytes,
    kms_key_id: str,
    model_id: str,
    out: Path,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    extra_context: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Steps 1 and 3–5 of :func:`seal` with a given data key and bundle id: for the checked-in
    test vectors (fixed key and id). Never use a fixed or reused data key for a real model."""
    plan = plan_model(Path(model))
    context = _context(model_id, bundle_id, extra_context)
    _draft(plan, bundle_id, model_id, kms_key_id, context, chunk_size)
    _check_out(Path(out))
    return _seal(
        plan,
        bytearray(data_key),
        encrypted_data_key,
        bundle_id,
        kms_key_id,
        model_id,
        Path(out),
        chunk_size,
        context,
        progress,
    )


def _context(model_id: str, bundle_id: bytes, extra: Mapping[str, str] | None) -> dict[str, str]:
    context = {CONTEXT_MODEL: model_id, CONTEXT_BUNDLE: bundle_id.hex()}
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key or not isinstance(value, str):
            raise ConfigError(f"encryption context {key!r}: keys and values are non-empty text")
        if key.startswith("nci:"):
            raise ConfigError(f"encryption context {key!r}: the 'nci:' prefix is reserved")
        context[key] = value
    return context


def _draft(
    plan: Plan,
    bundle_id: bytes,
    model_id: str,
    kms_key_id: str,
    context: dict[str, str],
    chunk_size: int,
) -> None:
    """Build the manifest with a placeholder data key, so every rule is checked before KMS."""
    try:
        _manifest(plan, bundle_id, model_id, kms_key_id, b"\x00", context, chunk_size)
    except MalformedBundle as exc:
        if str(exc).startswith(_OUR_FIELDS):
            raise ConfigError(str(exc)) from None
        raise InvalidModel(f"the model does not fit the bundle format: {exc}") from None


def _manifest(
    plan: Plan,
    bundle_id: bytes,
    model_id: str,
    kms_key_id: str,
    blob: bytes,
    context: dict[str, str],
    chunk_size: int,
) -> Manifest:
    return Manifest.create(
        bundle_id=bundle_id,
        model_id=model_id,
        model_config=plan.model_config,
        kms_key_id=kms_key_id,
        encrypted_data_key=blob,
        encryption_context=context,
        chunk_size=chunk_size,
        layout=plan.layout,
    )


def _check_out(out: Path) -> None:
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: the output's parent folder does not exist")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out}: already exists (choose a new bundle folder)")


# -- (2) the data key -----------------------------------------------------------------------------


def _generate_data_key(
    kms: Any, key_id: str, context: dict[str, str]
) -> tuple[bytearray, bytes, str]:
    try:
        answer = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise KmsError(
            f"GenerateDataKey under {key_id} refused: {error.get('Code', '?')}: "
            f"{str(error.get('Message', ''))[:300]}"
        ) from None
    except BotoCoreError as exc:
        raise KmsError(f"GenerateDataKey under {key_id}: KMS unreachable ({exc})") from None
    plaintext, blob, arn = (
        answer.get("Plaintext"),
        answer.get("CiphertextBlob"),
        answer.get("KeyId"),
    )
    answer.clear()
    if not isinstance(plaintext, bytes) or len(plaintext) != 32:
        raise KmsError("GenerateDataKey did not answer a 32-byte AES_256 data key")
    if not isinstance(blob, bytes) or not blob:
        raise KmsError("GenerateDataKey answered no CiphertextBlob")
    key = bytearray(plaintext)
    del plaintext  # the bytes object cannot be overwritten; keep no reference to it
    return key, blob, arn if isinstance(arn, str) and arn else key_id


# -- (3) to (5): manifest, chunks, rename ---------------------------------------------------------


def _seal(
    plan: Plan,
    data_key: bytearray,
    blob: bytes,
    bundle_id: bytes,
    key_id: str,
    model_id: str,
    out: Path,
    chunk_size: int,
    context: dict[str, str],
    progress: Progress | None,
) -> Manifest:
    manifest = _manifest(plan, bundle_id, model_id, key_id, blob, context, chunk_size)
    try:
        aead = AESGCM(derive_bundle_key(data_key, bundle_id))
    finally:
        data_key[:] = bytes(len(data_key))
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(6)}"
    try:
        partial.mkdir()
        _write(partial / MANIFEST_NAME, manifest.raw)
        with (partial / CHUNKS_NAME).open("wb") as sink:
            _stream(plan, manifest, aead, sink, progress)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(partial, out)  # an empty folder at ``out`` is replaced (rename(2))
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise ConfigError(f"{out}: cannot write the bundle ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info(
        "sealed %s: %d tensors, %d files, %d bytes in %d chunks",
        model_id,
        len(manifest.tensors),
        len(manifest.files),
        manifest.plaintext_size,
        manifest.chunk_count,
    )
    return manifest


def _write(path: Path, data: bytes) -> None:
    with path.open("wb") as sink:
        sink.write(data)
        sink.flush()
        os.fsync(sink.fileno())


class _Sealer:
    """Fills one chunk buffer from the plaintext stream and seals it when full."""

    def __init__(
        self, manifest: Manifest, aead: AESGCM, sink: BinaryIO, progress: Progress | None
    ) -> None:
        self.manifest, self.aead, self.sink, self.progress = manifest, aead, sink, progress
        self.digest = manifest.digest
        self.plain = bytearray(manifest.chunk_size)
        self.view = memoryview(self.plain)
        self.sealed = memoryview(bytearray(manifest.chunk_size + TAG_SIZE))
        self.fill = 0
        self.index = 0
        self.done = 0

    def room(self) -> memoryview:
        return self.view[self.fill :]

    def advance(self, count: int) -> None:
        self.fill += count
        if self.fill == len(self.plain) or self.done + self.fill == self.manifest.plaintext_size:
            self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        final = self.index == self.manifest.chunk_count - 1
        out = self.sealed[: self.fill + TAG_SIZE]
        aad = chunk_aad(self.digest, self.index, final)
        self.aead.encrypt_into(chunk_nonce(self.index), self.view[: self.fill], aad, out)
        self.sink.write(out)
        self.done += self.fill
        self.index += 1
        self.fill = 0
        if self.progress is not None:
            self.progress(self.done, self.manifest.plaintext_size)

    def zeros(self, count: int) -> None:
        while count:
            room = self.room()
            step = min(count, len(room))
            room[:step] = bytes(step)
            count -= step
            self.advance(step)

    def copy(self, source: Source) -> None:
        remaining = source.length
        try:
            with source.path.open("rb") as handle:
                handle.seek(source.start)
                while remaining:
                    room = self.room()
                    step = min(remaining, len(room), _READ_BLOCK)
                    got = handle.readinto(room[:step])
                    if not got:
                        raise InvalidModel(f"{source.path.name}: changed while sealing (shorter)")
                    remaining -= got
                    self.advance(got)
        except OSError as exc:
            raise InvalidModel(f"{source.path.name}: cannot read ({exc.strerror or exc})") from None

    def wipe(self) -> None:
        self.view[:] = bytes(len(self.plain))


def _stream(
    plan: Plan, manifest: Manifest, aead: AESGCM, sink: BinaryIO, progress: Progress | None
) -> None:
    """(4) the plaintext stream, sealed chunk by chunk; entries in manifest order."""
    sealer = _Sealer(manifest, aead, sink, progress)
    offsets = [t.offset for t in manifest.tensors] + [f.offset for f in manifest.files]
    position = 0
    try:
        for offset, source in zip(offsets, plan.sources, strict=True):
            sealer.zeros(offset - position)
            sealer.copy(source)
            position = offset + source.length
        sealer.zeros(manifest.plaintext_size - position)
        if sealer.index != manifest.chunk_count:  # pragma: no cover - the layout's own sum
            raise InvalidModel("the plaintext stream does not match the manifest")
    finally:
        sealer.wipe()
