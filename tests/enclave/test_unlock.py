"""The enclave's unlock: the real parent streamer over a unix socket, the checked-in vectors.

Every tampering the parent (or anyone on the way) can do is refused with a typed error, and no
tensor is handed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from enclave.unlock import BundleLoadError, Unlocker
from parent.bundlesource import FolderSource
from parent.streamer import BundleStreamer
from protocol.bundle import TAG_SIZE, Manifest
from protocol.errors import BundleIntegrityError, MalformedBundle, ProtocolError, TransportError
from protocol.frames import (
    BundleChunk,
    BundleEnd,
    ErrorPayload,
    Frame,
    FrameType,
    recv_frame,
    send_frame,
)
from protocol.transport import Address, listen, parse_address
from provider.seal import seal_with_data_key
from tests.assets import generate_bundle_vectors as vectors

VECTORS = Path(__file__).resolve().parent.parent / "assets" / "bundle"
META = json.loads((VECTORS / "vectors.json").read_text())
DATA_KEY = bytes.fromhex(META["data_key"])
MODEL_ID = META["model_id"]


class FixedKeys:
    """Stands in for KMS: returns the vectors' data key, checking what the enclave asked for."""

    def __init__(self, key: bytes = DATA_KEY) -> None:
        self.key = key
        self.calls: list[Mapping[str, str]] = []

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str],
        key_id: str | None = None,
    ) -> bytes:
        assert ciphertext_blob == bytes.fromhex(META["encrypted_data_key"])
        assert key_id == META["kms_key_id"]
        self.calls.append(dict(encryption_context))
        return self.key


class Parent:
    """A real BundleStreamer on a unix socket, in a background event loop."""

    def __init__(self, folders: Mapping[str, Path], socket_path: Path) -> None:
        self.address = parse_address(f"unix://{socket_path}")
        self._loop = asyncio.new_event_loop()
        sources = {name: FolderSource(path) for name, path in folders.items()}
        self._streamer = BundleStreamer(self.address, sources)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._streamer.start(), self._loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._streamer.close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    folder = tmp_path / "bundle"
    folder.mkdir()
    for name in ("manifest.cbor", "chunks.bin"):
        shutil.copy(VECTORS / name, folder / name)
    return folder


@pytest.fixture
def parent(bundle: Path, tmp_path: Path) -> Iterator[Parent]:
    other = tmp_path / "other"
    other.mkdir()
    server = Parent({"tiny": bundle, "other": other}, tmp_path / "parent.sock")
    yield server
    server.close()


def unlocker(address: Address, keys: FixedKeys | None = None, **options: object) -> Unlocker:
    return Unlocker(
        address,
        keys or FixedKeys(),
        expected_model_id=MODEL_ID,
        expected_kms_key_id=META["kms_key_id"],
        timeout=5,
        backoff=0,
        **options,  # type: ignore[arg-type]
    )


def test_unlocks_every_tensor_and_file_exactly(parent: Parent) -> None:
    keys = FixedKeys()
    model = unlocker(parent.address, keys).load("tiny")
    for entry in META["tensors"]:
        tensor = model.tensors[entry["name"]]
        assert list(tensor.shape) == entry["shape"]
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert set(model.files) == {f["name"] for f in META["files"]}
    manifest = Manifest.from_cbor((VECTORS / "manifest.cbor").read_bytes())
    assert keys.calls == [dict(manifest.encryption_context)]


def _tamper(folder: Path, name: str, offset: int) -> None:
    data = bytearray((folder / name).read_bytes())
    data[offset] ^= 0x01
    (folder / name).write_bytes(bytes(data))


def _chunks(folder: Path) -> list[bytes]:
    manifest = Manifest.from_cbor((folder / "manifest.cbor").read_bytes())
    blob = (folder / "chunks.bin").read_bytes()
    return [
        blob[manifest.sealed_offset(i) : manifest.sealed_offset(i) + manifest.sealed_chunk_size(i)]
        for i in range(manifest.chunk_count)
    ]


def _write_chunks(folder: Path, chunks: list[bytes]) -> None:
    (folder / "chunks.bin").write_bytes(b"".join(chunks))


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        ("bit_flip_in_first_chunk", BundleIntegrityError),
        ("bit_flip_in_last_chunk", BundleIntegrityError),
        ("bit_flip_in_tag", BundleIntegrityError),
        ("chunks_reordered", BundleIntegrityError),
        ("manifest_bit_flip", ProtocolError),
    ],
)
def test_rejects_tampered_bundle_and_returns_no_tensor(
    parent: Parent, bundle: Path, attack: str, expected: type[Exception]
) -> None:
    size = len((bundle / "chunks.bin").read_bytes())
    if attack == "bit_flip_in_first_chunk":
        _tamper(bundle, "chunks.bin", 10)
    elif attack == "bit_flip_in_last_chunk":
        _tamper(bundle, "chunks.bin", size - TAG_SIZE - 5)
    elif attack == "bit_flip_in_tag":
        _tamper(bundle, "chunks.bin", size - 3)
    elif attack == "chunks_reordered":
        chunks = _chunks(bundle)
        chunks[0], chunks[1] = chunks[1], chunks[0]
        _write_chunks(bundle, chunks)
    elif attack == "manifest_bit_flip":
        _tamper(bundle, "manifest.cbor", 40)
    with pytest.raises(expected):
        unlocker(parent.address).load("tiny")


def test_rejects_wrong_data_key(parent: Parent) -> None:
    with pytest.raises(BundleIntegrityError, match="chunk 0"):
        unlocker(parent.address, FixedKeys(bytes(32))).load("tiny")


def test_rejects_bundle_of_another_model_before_asking_for_its_key(parent: Parent) -> None:
    keys = FixedKeys()
    with pytest.raises(BundleLoadError, match="this enclave serves"):
        Unlocker(
            parent.address,
            keys,
            expected_model_id="someone/else:1",
            expected_kms_key_id=META["kms_key_id"],
            timeout=5,
        ).load("tiny")
    assert keys.calls == []


def test_unknown_bundle_is_a_typed_refusal(parent: Parent) -> None:
    with pytest.raises(BundleLoadError, match="UnknownBundle"):
        unlocker(parent.address).load("nope")


def test_missing_parent_is_a_transport_error_after_bounded_attempts(tmp_path: Path) -> None:
    address = parse_address(f"unix://{tmp_path}/absent.sock")
    with pytest.raises(TransportError):
        unlocker(address, attempts=2).load("tiny")


def test_truncated_stream_is_never_taken_as_complete(tmp_path: Path, bundle: Path) -> None:
    # drop the last chunk and rewrite the manifest's count: the manifest no longer parses as
    # the one the chunks were sealed against, or the now-last chunk lacks the final flag
    chunks = _chunks(bundle)
    _write_chunks(bundle, chunks[:-1])
    server = Parent({"tiny": bundle}, tmp_path / "p.sock")
    try:
        with pytest.raises((ProtocolError, MalformedBundle)):
            unlocker(server.address).load("tiny")
    finally:
        server.close()


class HostileParent:
    """A parent that plays a scripted sequence of frames to every connection."""

    def __init__(self, socket_path: Path, script: list[list[Frame]]) -> None:
        self.address = parse_address(f"unix://{socket_path}")
        self._listener = listen(self.address)
        self._script = list(script)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        for frames in self._script:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn, contextlib.suppress(TransportError):  # the enclave may hang up first
                conn.settimeout(5)
                recv_frame(conn)  # the BUNDLE_REQUEST
                for frame in frames:
                    send_frame(conn, frame)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def _frames(folder: Path = VECTORS) -> tuple[Frame, list[Frame], Frame]:
    manifest = (folder / "manifest.cbor").read_bytes()
    chunks = [BundleChunk(i, c).frame() for i, c in enumerate(_chunks(folder))]
    end = BundleEnd(len(chunks)).frame()
    return Frame(FrameType.BUNDLE_MANIFEST, 0, manifest), chunks, end


def _reseal(tmp_path: Path) -> Path:
    """The same model sealed again under the same data key: only the bundle id differs."""
    model = vectors.write_model(tmp_path / "model")
    out = tmp_path / "other"
    seal_with_data_key(
        model,
        data_key=DATA_KEY,
        encrypted_data_key=bytes.fromhex(META["encrypted_data_key"]),
        bundle_id=bytes(range(16)),
        kms_key_id=META["kms_key_id"],
        model_id=MODEL_ID,
        out=out,
        chunk_size=META["chunk_size"],
    )
    return out


def _hostile(tmp_path: Path, script: list[list[Frame]]) -> type[Exception] | None:
    server = HostileParent(tmp_path / "hostile.sock", script)
    try:
        unlocker(server.address, attempts=len(script)).load("tiny")
    except ProtocolError as exc:
        return type(exc)
    finally:
        server.close()
    return None


def test_rejects_truncated_stream_ended_early_by_the_parent(tmp_path: Path) -> None:
    manifest, chunks, _ = _frames()
    assert _hostile(tmp_path, [[manifest, *chunks[:-1], BundleEnd(len(chunks) - 1).frame()]])


def test_rejects_chunk_sent_under_another_index(tmp_path: Path) -> None:
    manifest, chunks, end = _frames()
    relabelled = BundleChunk(1, BundleChunk.decode(chunks[0].payload).sealed).frame()
    assert _hostile(tmp_path, [[manifest, chunks[0], relabelled, *chunks[2:], end]]) is (
        BundleIntegrityError
    )


def test_rejects_extra_chunk_after_the_final_one(tmp_path: Path) -> None:
    manifest, chunks, end = _frames()
    extra = BundleChunk(len(chunks), b"\x00" * 64).frame()
    assert _hostile(tmp_path, [[manifest, *chunks, extra, end]]) is not None


def test_rejects_chunk_swapped_from_another_bundle_of_the_same_model(tmp_path: Path) -> None:
    # the same model and key, sealed again: a new bundle id, so a new chunk key and manifest
    other = _reseal(tmp_path)
    manifest, chunks, end = _frames()
    _, theirs, _ = _frames(other)
    assert _hostile(tmp_path, [[manifest, theirs[0], *chunks[1:], end]]) is BundleIntegrityError


def test_resume_after_a_broken_stream_gets_the_same_model(tmp_path: Path) -> None:
    manifest, chunks, end = _frames()
    assert _hostile(tmp_path, [[manifest, chunks[0]], [manifest, *chunks[1:], end]]) is None


def test_rejects_resume_with_a_different_manifest(tmp_path: Path) -> None:
    other = _reseal(tmp_path)
    manifest, chunks, _ = _frames()
    their_manifest, theirs, their_end = _frames(other)
    script = [[manifest, chunks[0]], [their_manifest, *theirs[1:], their_end]]
    assert _hostile(tmp_path, script) is BundleIntegrityError


def test_parent_error_frame_is_a_typed_refusal(tmp_path: Path) -> None:
    refusal = ErrorPayload("Busy", "too many connections").frame()
    assert _hostile(tmp_path, [[refusal]]) is BundleLoadError


def test_rejects_bundle_sealed_under_another_kms_key_before_asking_for_it(parent: Parent) -> None:
    # a parent could seal a model of its own under a key it controls: the key pin refuses it
    keys = FixedKeys()
    with pytest.raises(BundleLoadError, match="another KMS key"):
        Unlocker(
            parent.address,
            keys,
            expected_model_id=MODEL_ID,
            expected_kms_key_id="arn:aws:kms:us-east-1:999999999999:key/attacker",
            timeout=5,
        ).load("tiny")
    assert keys.calls == []


def test_rejects_rollback_to_another_bundle_when_the_manifest_is_pinned(parent: Parent) -> None:
    with pytest.raises(BundleLoadError, match="pinned"):
        unlocker(parent.address, expected_manifest_sha256=bytes(32)).load("tiny")
    pinned = bytes.fromhex(META["manifest_sha256"])
    assert unlocker(parent.address, expected_manifest_sha256=pinned).load("tiny").tensors


def test_oversized_plaintext_is_refused_before_key_release(parent: Parent) -> None:
    keys = FixedKeys()
    with pytest.raises(BundleLoadError, match="at most"):
        unlocker(parent.address, keys, max_plaintext_size=1024).load("tiny")
    assert keys.calls == []


def test_inflated_plaintext_size_is_caught_before_the_model_sized_allocation(
    tmp_path: Path,
) -> None:
    # the parent edits plaintext_size (KMS still releases the key: the context is unchanged);
    # chunk 0 then fails in a scratch buffer, before any large allocation
    manifest = Manifest.from_cbor((VECTORS / "manifest.cbor").read_bytes())
    import cbor2

    fields = cbor2.loads(manifest.raw)
    fields["plaintext_size"] = 3 * 1024**3
    fields["chunk_count"] = -(-fields["plaintext_size"] // fields["chunk_size"])
    inflated = Frame(FrameType.BUNDLE_MANIFEST, 0, cbor2.dumps(fields, canonical=True))
    _, chunks, end = _frames()
    server = HostileParent(tmp_path / "inflate.sock", [[inflated, *chunks, end]])
    try:
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        with pytest.raises(BundleIntegrityError, match="chunk 0"):
            unlocker(server.address, max_plaintext_size=4 * 1024**3).load("tiny")
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown_kib < 512 * 1024  # far below the 3 GiB the manifest declared
    finally:
        server.close()


def test_whole_load_has_a_deadline(tmp_path: Path) -> None:
    manifest, chunks, end = _frames()
    server = HostileParent(tmp_path / "slow.sock", [[manifest, *chunks, end]])
    try:
        with pytest.raises(BundleLoadError, match="did not finish"):
            Unlocker(
                server.address,
                FixedKeys(),
                expected_model_id=MODEL_ID,
                expected_kms_key_id=META["kms_key_id"],
                timeout=1e-9,
                total_timeout=1e-9,
            ).load("tiny")
    finally:
        server.close()
