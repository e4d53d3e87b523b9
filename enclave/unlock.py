"""Unlock a sealed bundle inside the enclave: stream it from the parent, release its data key,
decrypt every chunk in place into preallocated tensor storage.

The procedure (the bundle format is in ``protocol/bundle.py`` and ``docs/formats.md``):

1. ask the parent for the bundle (``BUNDLE_REQUEST``); read the manifest it forwards, which is
   untrusted bytes: parse it strictly and check that it names the model this enclave expects;
2. release the data key through KMS with the manifest's key id, encrypted data key and encryption
   context (``enclave.keyrelease``): KMS refuses it unless this enclave's attestation satisfies
   the key policy; derive the per-bundle chunk key and drop the data key;
3. allocate one byte buffer of the plaintext size, the final home of every tensor; open chunk
   after chunk straight into its slice with ``AESGCM.decrypt_into``. A chunk whose tag fails has
   already written unauthenticated bytes: the whole buffer is wiped and the load abandoned;
4. if the stream breaks, reconnect and resume from the next unverified chunk (the manifest must
   come back byte for byte the same); only verified chunks count;
5. after the final chunk (its associated data carries the final flag, so a truncated stream cannot
   pass as complete) and the parent's ``BUNDLE_END``, hand out tensors as views of the buffer.

Peak memory is the model's size plus the chunk being received. Nothing decrypted touches disk.
"""

from __future__ import annotations

import ctypes
import hmac
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

import torch

from protocol.bundle import (
    Manifest,
    derive_bundle_key,
    open_chunk_into,
)
from protocol.errors import BundleIntegrityError, FrameError, MalformedBundle, TransportError
from protocol.frames import (
    DEFAULT_MAX_PAYLOAD,
    BundleEnd,
    BundleRequest,
    ErrorPayload,
    Frame,
    FrameType,
    recv_frame,
    send_frame,
)
from protocol.transport import Address, connect

__all__ = ["BundleLoadError", "DataKeySource", "UnlockedModel", "Unlocker", "torch_dtype"]

log = logging.getLogger(__name__)
_INDEX = struct.Struct(">Q")  # BundleChunk's index prefix (protocol/frames.py)

_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "I32": torch.int32,
        "I64": torch.int64,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F32": torch.float32,
        "F64": torch.float64,
    }
)


class BundleLoadError(MalformedBundle):
    """The parent refused or broke the stream in a way a retry cannot mend, or the bundle is not
    the model this enclave is configured for."""


class DataKeySource(Protocol):
    """What releases the data key: :class:`enclave.keyrelease.KeyRelease` in production."""

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str],
        key_id: str | None = None,
    ) -> bytes: ...


@dataclass(frozen=True)
class UnlockedModel:
    """The model's state in enclave memory: tensors (views of one buffer) and files."""

    manifest: Manifest
    tensors: Mapping[str, torch.Tensor]
    files: Mapping[str, bytes]

    @property
    def model_id(self) -> str:
        return self.manifest.model_id


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise MalformedBundle(f"dtype {name!r} is not supported") from None


class Unlocker:
    """Load one sealed bundle from the parent's streamer into enclave memory.

    ``parent`` is the streamer's address (``vsock://3:PORT`` on AWS, ``unix://`` locally);
    ``keys`` releases the data key. The pins are this enclave's (measured) configuration, checked
    before any key is asked for: ``expected_model_id`` and ``expected_kms_key_id`` (the provider's
    key ARN: without it the parent could seal a model of its own under a key it controls, and KMS
    would release that key to us), and optionally ``expected_manifest_sha256`` (one exact bundle:
    refuses rollback to an older bundle of the same model). ``max_plaintext_size`` bounds the
    one allocation, which happens only after chunk 0 authenticated the manifest. ``timeout``
    bounds each frame, ``total_timeout`` the whole load.
    """

    def __init__(
        self,
        parent: Address,
        keys: DataKeySource,
        *,
        expected_model_id: str,
        expected_kms_key_id: str,
        expected_manifest_sha256: bytes | None = None,
        max_plaintext_size: int = 64 * 1024**3,
        timeout: float = 30.0,
        total_timeout: float = 3600.0,
        attempts: int = 3,
        backoff: float = 0.5,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        if attempts < 1 or not 0 < timeout <= total_timeout or backoff < 0:
            raise BundleLoadError("attempts ≥ 1, 0 < timeout ≤ total_timeout and backoff ≥ 0")
        if not expected_kms_key_id.startswith("arn:"):
            raise BundleLoadError(
                "expected_kms_key_id must be the key's ARN, as manifests record it"
            )
        if expected_manifest_sha256 is not None and len(expected_manifest_sha256) != 32:
            raise BundleLoadError("expected_manifest_sha256 must be 32 bytes")
        self._parent = parent
        self._keys = keys
        self._expected_model_id = expected_model_id
        self._expected_kms_key_id = expected_kms_key_id
        self._expected_manifest_sha256 = expected_manifest_sha256
        self._max_plaintext_size = max_plaintext_size
        self._timeout = timeout
        self._total_timeout = total_timeout
        self._attempts = attempts
        self._backoff = backoff
        self._max_payload = max_payload
        self._deadline = 0.0

    def load(
        self, bundle: str, *, progress: Callable[[int, int], None] | None = None
    ) -> UnlockedModel:
        """Stream, verify and decrypt ``bundle``; raise a typed error and return nothing on any
        failure (no partial model is ever handed out)."""
        state = _LoadState()
        self._deadline = time.monotonic() + self._total_timeout
        try:
            failures = 0
            while True:
                try:
                    self._stream(bundle, state, progress)
                    break
                except TransportError as exc:
                    # (4) a broken stream: resume from the next unverified chunk, a bounded
                    # number of times; integrity failures are never retried
                    failures += 1
                    if failures >= self._attempts:
                        raise
                    log.warning(
                        "bundle stream broke after %d verified chunks (%s); resuming",
                        state.next_chunk,
                        type(exc).__name__,
                    )
                    time.sleep(min(self._backoff * failures, self._remaining()))
            if state.manifest is None or state.storage is None:  # pragma: no cover (invariant)
                raise BundleLoadError("the stream ended without a manifest")
            state.bundle_key = None
            return _build_model(state.manifest, state.storage)
        except BaseException:
            state.abandon()
            raise

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise BundleLoadError(f"the load did not finish within {self._total_timeout:.0f} s")
        return remaining

    def _stream(
        self, bundle: str, state: _LoadState, progress: Callable[[int, int], None] | None
    ) -> None:
        sock = connect(self._parent, timeout=min(self._timeout, self._remaining()))
        with sock:
            send_frame(sock, BundleRequest(bundle, state.next_chunk).frame(), timeout=self._timeout)
            # (1) the manifest, parsed strictly; identical on every resume
            manifest = self._receive_manifest(sock, state)
            if state.bundle_key is None:
                self._release_key(manifest, state)
            if state.bundle_key is None:  # pragma: no cover (set above)
                raise BundleLoadError("no chunk key after key release")
            # (3) each chunk straight into its place, in order
            while state.next_chunk < manifest.chunk_count:
                frame = self._recv(sock)
                if frame.type != FrameType.BUNDLE_CHUNK:
                    self._unexpected(frame.type, frame.payload, "BUNDLE_CHUNK")
                # the BUNDLE_CHUNK layout (index u64 ‖ sealed), read without copying the chunk
                if len(frame.payload) < _INDEX.size:
                    raise FrameError("BUNDLE_CHUNK payload is shorter than its index")
                (received,) = _INDEX.unpack_from(frame.payload)
                sealed = memoryview(frame.payload)[_INDEX.size :]
                index = state.next_chunk
                if received != index:
                    raise BundleIntegrityError(
                        f"chunk {received} arrived where chunk {index} was due"
                    )
                start, end = manifest.chunk_plain_range(index)
                final = manifest.is_final(index)
                if state.view is None:
                    # chunk 0 first opens into a scratch buffer: it authenticates the manifest
                    # (its digest is in the associated data) before the model-sized allocation
                    scratch = bytearray(end - start)
                    try:
                        open_chunk_into(
                            state.bundle_key, manifest.digest, index, final, sealed,
                            memoryview(scratch),
                        )  # fmt: skip
                        view = state.allocate(manifest.plaintext_size)
                        view[start:end] = scratch
                    finally:
                        scratch[:] = bytes(len(scratch))
                else:
                    open_chunk_into(
                        state.bundle_key, manifest.digest, index, final, sealed,
                        state.view[start:end],
                    )  # fmt: skip
                state.next_chunk += 1
                if progress is not None:
                    progress(state.next_chunk, manifest.chunk_count)
            # (5) the parent's end marker must agree; the final flag already proved completeness
            frame = self._recv(sock)
            if frame.type != FrameType.BUNDLE_END:
                self._unexpected(frame.type, frame.payload, "BUNDLE_END")
            if BundleEnd.decode(frame.payload).chunk_count != manifest.chunk_count:
                raise BundleIntegrityError("BUNDLE_END disagrees with the manifest's chunk count")

    def _receive_manifest(self, sock: socket.socket, state: _LoadState) -> Manifest:
        frame = self._recv(sock)
        if frame.type != FrameType.BUNDLE_MANIFEST:
            self._unexpected(frame.type, frame.payload, "BUNDLE_MANIFEST")
        if state.manifest is not None:
            if not hmac.compare_digest(frame.payload, state.manifest.raw):
                raise BundleIntegrityError("the manifest changed between two parts of the stream")
            return state.manifest
        manifest = Manifest.from_cbor(frame.payload)
        # (1) the pins, before any key is asked for
        if manifest.model_id != self._expected_model_id:
            raise BundleLoadError(
                f"the bundle is for model {manifest.model_id!r}; this enclave serves "
                f"{self._expected_model_id!r}"
            )
        if manifest.kms_key_id != self._expected_kms_key_id:
            raise BundleLoadError(
                "the bundle is sealed under another KMS key than the provider's pinned key"
            )
        pinned = self._expected_manifest_sha256
        if pinned is not None and not hmac.compare_digest(manifest.digest, pinned):
            raise BundleLoadError("the bundle is not the pinned one (manifest SHA-256 differs)")
        if manifest.plaintext_size > self._max_plaintext_size:
            raise BundleLoadError(
                f"the bundle declares {manifest.plaintext_size} bytes; this enclave loads at "
                f"most {self._max_plaintext_size}"
            )
        state.manifest = manifest
        return manifest

    def _release_key(self, manifest: Manifest, state: _LoadState) -> None:
        # (2) KMS checks our attestation against the key policy and the encryption context
        # against the one the provider sealed with; the data key lives only for the derivation
        data_key = bytearray(
            self._keys.decrypt(
                manifest.encrypted_data_key,
                encryption_context=manifest.encryption_context,
                # KMS refuses a ciphertext of any other key (IncorrectKeyException)
                key_id=self._expected_kms_key_id,
            )
        )
        try:
            state.bundle_key = derive_bundle_key(data_key, manifest.bundle_id)
        finally:
            data_key[:] = bytes(len(data_key))

    def _recv(self, sock: socket.socket) -> Frame:
        timeout = min(self._timeout, self._remaining())
        return recv_frame(sock, max_payload=self._max_payload, timeout=timeout)

    @staticmethod
    def _unexpected(frame_type: FrameType, payload: bytes, wanted: str) -> None:
        if frame_type == FrameType.ERROR:
            try:
                error = ErrorPayload.decode(payload)
            except FrameError:
                raise BundleLoadError("the parent answered with a malformed ERROR frame") from None
            raise BundleLoadError(f"the parent refused: {error.code}: {error.message[:200]!r}")
        raise FrameError(f"expected {wanted}, got {frame_type.name}")


class _LoadState:
    """What survives a resume: the manifest, the chunk key, the buffer and the next chunk."""

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self.bundle_key: bytes | None = None
        self.storage: torch.Tensor | None = None
        self.view: memoryview | None = None
        self.next_chunk = 0

    def allocate(self, size: int) -> memoryview:
        try:
            self.storage = torch.empty(size, dtype=torch.uint8)
        except (RuntimeError, MemoryError):
            raise BundleLoadError(f"cannot allocate {size} bytes for the model") from None
        raw = (ctypes.c_char * size).from_address(self.storage.data_ptr())
        self.view = memoryview(raw).cast("B")
        return self.view

    def abandon(self) -> None:
        """Wipe everything decrypted so far and forget the key: nothing partial survives.

        Only the verified prefix holds plaintext (a failing chunk wipes its own slice), so only
        that is zeroed: the rest of the buffer was never written and need not be touched.
        """
        if self.storage is not None and self.manifest is not None:
            end = min(self.next_chunk * self.manifest.chunk_size, self.manifest.plaintext_size)
            self.storage[:end].zero_()
        self.storage = None
        self.view = None
        self.bundle_key = None


def _build_model(manifest: Manifest, storage: torch.Tensor) -> UnlockedModel:
    tensors: dict[str, torch.Tensor] = {}
    for entry in manifest.tensors:
        dtype = torch_dtype(entry.dtype)
        flat = storage[entry.offset : entry.offset + entry.length].view(dtype)
        tensors[entry.name] = flat.reshape(entry.shape)
    files = {e.name: _bytes_of(storage, e.offset, e.length) for e in manifest.files}
    return UnlockedModel(
        manifest=manifest, tensors=MappingProxyType(tensors), files=MappingProxyType(files)
    )


def _bytes_of(storage: torch.Tensor, offset: int, length: int) -> bytes:
    return ctypes.string_at(storage.data_ptr() + offset, length)
