"""The parent's bundle streamer: sealed chunks from a folder or S3 to the enclave, verbatim.

The bundles here are fake: random "sealed" bytes of the right sizes and a CBOR manifest with the
three layout fields. The streamer never decrypts, so it cannot tell, and must not care.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import cbor2
import pytest
from moto import mock_aws

from parent.bundlesource import (
    BundleLayout,
    BundleSource,
    FolderSource,
    S3Source,
    s3_client_config,
)
from parent.streamer import BundleStreamer
from protocol.errors import ConfigError, MalformedBundle, TransportError
from protocol.frames import (
    BundleChunk,
    BundleEnd,
    BundleRequest,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    encode_frame,
    read_frame,
    write_frame,
)
from protocol.transport import Address, open_connection

TAG = 16


@dataclass(frozen=True)
class FakeBundle:
    path: Path
    manifest: bytes
    sealed: list[bytes]


def make_bundle(
    folder: Path, *, chunk_size: int = 4096, plaintext_size: int = 4096 * 5 + 100
) -> FakeBundle:
    count = max(1, -(-plaintext_size // chunk_size))
    sealed = [
        os.urandom(min(chunk_size, plaintext_size - i * chunk_size) + TAG) for i in range(count)
    ]
    manifest = cbor2.dumps(
        {
            "format": "nci-bundle",
            "version": 1,
            "model_config": {"eps": 1e-5, "layers": [1, 2, {"x": None}]},
            "chunk_size": chunk_size,
            "plaintext_size": plaintext_size,
            "chunk_count": count,
            "tensors": [{"name": "w", "shape": [2, 3]}],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.cbor").write_bytes(manifest)
    (folder / "chunks.bin").write_bytes(b"".join(sealed))
    return FakeBundle(folder, manifest, sealed)


def expected_frames(bundle: FakeBundle, start: int = 0, stream_id: int = 0) -> list[Frame]:
    return [
        Frame(FrameType.BUNDLE_MANIFEST, stream_id, bundle.manifest),
        *(
            BundleChunk(i, bundle.sealed[i]).frame(stream_id)
            for i in range(start, len(bundle.sealed))
        ),
        BundleEnd(len(bundle.sealed)).frame(stream_id),
    ]


async def fetch(
    address: Address, bundle: str, from_chunk: int = 0, *, stream_id: int = 0
) -> list[Frame]:
    """A minimal enclave-side client: one request, frames until BUNDLE_END or ERROR."""
    reader, writer = await open_connection(address, timeout=2.0)
    try:
        await write_frame(writer, BundleRequest(bundle, from_chunk).frame(stream_id), timeout=2.0)
        frames: list[Frame] = []
        while True:
            frame = await read_frame(reader, timeout=2.0)
            frames.append(frame)
            if frame.type in (FrameType.BUNDLE_END, FrameType.ERROR):
                return frames
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_until_end(reader: asyncio.StreamReader) -> list[Frame]:
    frames: list[Frame] = []
    while not frames or frames[-1].type is not FrameType.BUNDLE_END:
        frames.append(await read_frame(reader, timeout=2.0))
    return frames


def error_code(frames: list[Frame]) -> str:
    assert frames[-1].type is FrameType.ERROR
    return ErrorPayload.decode(frames[-1].payload).code


@pytest.fixture
def address(tmp_path: Path) -> Address:
    return Address("unix", path=str(tmp_path / "streamer.sock"))


# -- streaming ---------------------------------------------------------------------------------


def test_streams_manifest_chunks_in_order_and_end(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"model-a": FolderSource(bundle.path)}):
            return await fetch(address, "model-a", stream_id=77)

    frames = asyncio.run(run())
    assert frames == expected_frames(bundle, stream_id=77)
    assert [len(f.payload) for f in frames[1:-1]] == [8 + 4096 + 16] * 5 + [8 + 100 + 16]


@pytest.mark.parametrize("start", [1, 3, 5])
def test_resumes_from_a_later_chunk(tmp_path: Path, address: Address, start: int) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m", start)

    assert asyncio.run(run()) == expected_frames(bundle, start)


def test_resume_at_the_end_sends_manifest_and_end_only(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m", len(bundle.sealed))

    assert asyncio.run(run()) == expected_frames(bundle, len(bundle.sealed))


def test_rejects_from_chunk_beyond_the_end(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m", len(bundle.sealed) + 1)

    frames = asyncio.run(run())
    assert len(frames) == 1
    assert error_code(frames) == "BadRequest"


def test_every_byte_sent_is_the_framed_ciphertext_verbatim(
    tmp_path: Path, address: Address
) -> None:
    bundle = make_bundle(tmp_path / "b", chunk_size=4096, plaintext_size=3 * 4096 + 1)

    async def run() -> bytes:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            reader, writer = await open_connection(address, timeout=2.0)
            try:
                writer.write(encode_frame(BundleRequest("m", 0).frame(5)))
                await writer.drain()
                async with asyncio.timeout(5.0):
                    return await reader.read()  # everything until the server closes
            finally:
                writer.close()
                await writer.wait_closed()

    captured = asyncio.run(run())
    expected = (
        encode_frame(Frame(FrameType.BUNDLE_MANIFEST, 5, bundle.manifest))
        + b"".join(
            encode_frame(Frame(FrameType.BUNDLE_CHUNK, 5, i.to_bytes(8, "big") + sealed))
            for i, sealed in enumerate(bundle.sealed)
        )
        + encode_frame(Frame(FrameType.BUNDLE_END, 5, cbor2.dumps({"chunk_count": 4})))
    )
    assert captured == expected


def test_single_chunk_bundle(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b", chunk_size=4096, plaintext_size=10)

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m")

    assert asyncio.run(run()) == expected_frames(bundle)


# -- refusals ----------------------------------------------------------------------------------


def test_unknown_bundle_gets_an_error_frame(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "other", stream_id=4)

    frames = asyncio.run(run())
    assert len(frames) == 1
    assert frames[0].stream_id == 4
    assert error_code(frames) == "UnknownBundle"


def test_rejects_chunks_bin_whose_size_differs_from_the_manifest(
    tmp_path: Path, address: Address
) -> None:
    bundle = make_bundle(tmp_path / "b")
    with (bundle.path / "chunks.bin").open("ab") as file:
        file.write(b"\x00")  # one byte appended by the untrusted storage

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m")

    frames = asyncio.run(run())
    assert [f.type for f in frames] == [FrameType.ERROR]  # refused before the manifest
    assert error_code(frames) == "MalformedBundle"


@pytest.mark.parametrize(
    "manifest",
    [
        b"\xff",
        cbor2.dumps({"chunk_size": 4096, "plaintext_size": 20580}),
        cbor2.dumps({"chunk_size": 4096, "plaintext_size": 20580, "chunk_count": 5}),
        cbor2.dumps({"chunk_size": 0, "plaintext_size": 20580, "chunk_count": 6}),
        cbor2.dumps({"chunk_size": 4096, "plaintext_size": 20580, "chunk_count": 6}) + b"\x00",
    ],
    ids=["not_cbor", "no_chunk_count", "count_too_small", "zero_chunk_size", "trailing_bytes"],
)
def test_rejects_malformed_manifest(tmp_path: Path, address: Address, manifest: bytes) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle.path / "manifest.cbor").write_bytes(manifest)

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            return await fetch(address, "m")

    assert error_code(asyncio.run(run())) == "MalformedBundle"


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (encode_frame(Frame(FrameType.HEALTH_PING, 0, b"")), "UnexpectedFrame"),
        (encode_frame(Frame(FrameType.BUNDLE_REQUEST, 0, b"\xa0")), "BadRequest"),
        (encode_frame(Frame(FrameType.BUNDLE_REQUEST, 0, b"x" * 5000)), "BadRequest"),
        (b"GET / HTTP/1.1\r\n\r\n", "BadRequest"),
    ],
    ids=["ping_instead_of_request", "request_missing_fields", "oversized_request", "http"],
)
def test_rejects_a_bad_request(address: Address, sent: bytes, code: str) -> None:
    async def run() -> list[Frame]:
        async with BundleStreamer(address, {}):
            reader, writer = await open_connection(address, timeout=2.0)
            try:
                writer.write(sent)
                await writer.drain()
                frame = await read_frame(reader, timeout=2.0)
                with pytest.raises(ConnectionClosed):  # then the server hangs up
                    await read_frame(reader, timeout=2.0)
                return [frame]
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    assert error_code(asyncio.run(run())) == code


def test_silent_client_is_dropped_at_the_request_deadline(address: Address) -> None:
    async def run() -> float:
        async with BundleStreamer(address, {}, request_timeout=0.2):
            reader, writer = await open_connection(address, timeout=2.0)
            try:
                start = time.monotonic()
                with pytest.raises(ConnectionClosed):
                    await read_frame(reader, timeout=2.0)
                return time.monotonic() - start
            finally:
                writer.close()
                await writer.wait_closed()

    assert 0.1 < asyncio.run(run()) < 1.5


# -- robustness --------------------------------------------------------------------------------


class CountingSource:
    """Wraps a source and records every chunk read (a ``BundleSource`` by structure)."""

    def __init__(
        self, inner: BundleSource, *, fail_at: int | None = None, error: Exception | None = None
    ) -> None:
        self.inner = inner
        self.reads: list[int] = []
        self.fail_at = fail_at
        self.error = error or RuntimeError("disk on fire")
        self._lock = threading.Lock()

    def manifest(self) -> bytes:
        return self.inner.manifest()

    def layout(self) -> BundleLayout:
        return self.inner.layout()

    def read_chunk(self, index: int) -> bytes:
        with self._lock:
            self.reads.append(index)
        if index == self.fail_at:
            raise self.error
        return self.inner.read_chunk(index)


def test_slow_reader_gets_backpressure_not_a_buffered_bundle(
    tmp_path: Path, address: Address
) -> None:
    chunk = 64 * 1024
    bundle = make_bundle(tmp_path / "b", chunk_size=chunk, plaintext_size=64 * chunk)
    source = CountingSource(FolderSource(bundle.path))
    streamer = BundleStreamer(address, {"m": source})

    async def run() -> tuple[int, list[Frame]]:
        async with streamer:
            reader, writer = await open_connection(address, timeout=2.0)
            try:
                await write_frame(writer, BundleRequest("m").frame(), timeout=2.0)
                await asyncio.sleep(0.5)  # a slow enclave: reads nothing for a while
                reads_while_stalled = len(source.reads)
                return reads_while_stalled, await read_until_end(reader)
            finally:
                writer.close()
                await writer.wait_closed()

    reads_while_stalled, frames = asyncio.run(run())
    # socket buffers on both sides hold a few chunks; the 4 MiB bundle is not read ahead
    assert reads_while_stalled <= 20
    assert streamer.peak_in_flight <= 2
    assert frames == expected_frames(bundle)
    assert source.reads == list(range(64))


def test_client_that_disconnects_mid_stream_leaves_the_server_healthy(
    tmp_path: Path, address: Address
) -> None:
    chunk = 64 * 1024
    bundle = make_bundle(tmp_path / "b", chunk_size=chunk, plaintext_size=32 * chunk)
    streamer = BundleStreamer(address, {"m": FolderSource(bundle.path)}, write_timeout=2.0)

    async def run() -> list[Frame]:
        async with streamer:
            reader, writer = await open_connection(address, timeout=2.0)
            await write_frame(writer, BundleRequest("m").frame(), timeout=2.0)
            for _ in range(3):
                await read_frame(reader, timeout=2.0)
            writer.transport.abort()  # gone, mid-stream
            for _ in range(100):
                if streamer.active_connections == 0:
                    break
                await asyncio.sleep(0.02)
            assert streamer.active_connections == 0
            return await fetch(address, "m")

    assert asyncio.run(run()) == expected_frames(bundle)
    assert streamer.peak_in_flight <= 2


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("disk on fire"), "SourceError"),
        (OSError(5, "disk on fire"), "SourceError"),
        (TransportError("S3 fire: unreachable"), "SourceError"),
        (MalformedBundle("chunk 3: read 0 of 4112 bytes (fire)"), "MalformedBundle"),
    ],
    ids=["bug", "os_error", "storage_unreachable", "shrunken_file"],
)
def test_source_failure_mid_stream_sends_an_error_and_closes(
    tmp_path: Path, address: Address, error: Exception, code: str
) -> None:
    bundle = make_bundle(tmp_path / "b")
    source = CountingSource(FolderSource(bundle.path), fail_at=3, error=error)
    streamer = BundleStreamer(address, {"m": source, "ok": FolderSource(bundle.path)})

    async def run() -> tuple[list[Frame], list[Frame]]:
        async with streamer:
            return await fetch(address, "m"), await fetch(address, "ok")

    failed, healthy = asyncio.run(run())
    assert failed[:4] == expected_frames(bundle)[:4]  # manifest, chunks 0-2
    assert error_code(failed) == code
    if code == "SourceError":
        assert b"fire" not in failed[-1].payload  # the source's message stays on the parent
    assert healthy == expected_frames(bundle)
    assert streamer.served == 1


def test_refuses_connections_over_the_limit(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b")
    streamer = BundleStreamer(
        address, {"m": FolderSource(bundle.path)}, max_connections=2, request_timeout=5.0
    )

    async def run() -> tuple[list[Frame], list[Frame]]:
        async with streamer:
            idle = [await open_connection(address, timeout=2.0) for _ in range(2)]
            try:
                for _ in range(100):  # both accepted and waiting for their request
                    if streamer.active_connections == 2:
                        break
                    await asyncio.sleep(0.01)
                refused = await fetch(address, "m")
            finally:
                for _reader, writer in idle:
                    writer.close()
                    await writer.wait_closed()
            for _ in range(100):
                if streamer.active_connections == 0:
                    break
                await asyncio.sleep(0.01)
            return refused, await fetch(address, "m")

    refused, served = asyncio.run(run())
    assert error_code(refused) == "Busy"
    assert served == expected_frames(bundle)


def test_close_ends_open_connections(tmp_path: Path, address: Address) -> None:
    chunk = 64 * 1024
    bundle = make_bundle(tmp_path / "b", chunk_size=chunk, plaintext_size=64 * chunk)
    streamer = BundleStreamer(address, {"m": FolderSource(bundle.path)})

    async def run() -> None:
        await streamer.start()
        reader, writer = await open_connection(address, timeout=2.0)
        try:
            await write_frame(writer, BundleRequest("m").frame(), timeout=2.0)
            await read_frame(reader, timeout=2.0)
            await streamer.close()  # while the stream waits on backpressure
            assert streamer.active_connections == 0
            with pytest.raises(TransportError):
                await read_until_end(reader)
        finally:
            writer.close()
            await writer.wait_closed()

    asyncio.run(run())


def test_logs_carry_sizes_not_content(
    tmp_path: Path, address: Address, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = make_bundle(tmp_path / "b")

    async def run() -> None:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            await fetch(address, "m")
            await fetch(address, "secret-looking-name")

    with caplog.at_level(logging.DEBUG, logger="parent.streamer"):
        asyncio.run(run())
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "sent 6 chunks" in text
    assert "secret-looking-name" not in text
    for sealed in bundle.sealed:
        assert sealed[:8].hex() not in text
        assert repr(sealed[:8])[2:-1] not in text


def test_rejects_bad_streamer_configuration(address: Address) -> None:
    with pytest.raises(ConfigError):
        BundleStreamer(address, {}, max_connections=0)
    with pytest.raises(ConfigError):
        BundleStreamer(address, {}, request_timeout=0)
    with pytest.raises(ConfigError):
        BundleStreamer(address, {}, max_payload=10)


def test_rejects_chunks_that_do_not_fit_a_frame(tmp_path: Path, address: Address) -> None:
    bundle = make_bundle(tmp_path / "b", chunk_size=4096, plaintext_size=8192)

    async def run() -> list[Frame]:
        streamer = BundleStreamer(address, {"m": FolderSource(bundle.path)}, max_payload=4096)
        async with streamer:
            return await fetch(address, "m")

    assert error_code(asyncio.run(run())) == "MalformedBundle"


# -- layout and sources ------------------------------------------------------------------------


def test_layout_offsets_and_lengths() -> None:
    layout = BundleLayout(chunk_size=100, plaintext_size=250, chunk_count=3)
    assert [layout.offset(i) for i in range(3)] == [0, 116, 232]
    assert [layout.sealed_length(i) for i in range(3)] == [116, 116, 66]
    assert layout.sealed_size == 250 + 3 * 16
    with pytest.raises(MalformedBundle):
        layout.offset(3)
    with pytest.raises(MalformedBundle):
        layout.sealed_length(-1)


def test_empty_plaintext_is_one_tag_only_chunk() -> None:
    layout = BundleLayout(chunk_size=100, plaintext_size=0, chunk_count=1)
    assert layout.sealed_length(0) == 16
    assert layout.sealed_size == 16


def layout_map(**fields: object) -> bytes:
    return cbor2.dumps({"chunk_size": 10, "plaintext_size": 20, "chunk_count": 2, **fields})


HOSTILE_MANIFESTS = [
    ("not_a_map", cbor2.dumps([1, 2, 3])),
    ("tagged", b"\xc1" + cbor2.dumps({"chunk_size": 1})),
    ("duplicate_key", b"\xa2\x6achunk_size\x01\x6achunk_size\x02"),
    ("negative", cbor2.dumps({"chunk_size": -1, "plaintext_size": 1, "chunk_count": 1})),
    ("bool", cbor2.dumps({"chunk_size": True, "plaintext_size": 1, "chunk_count": 1})),
    ("float", cbor2.dumps({"chunk_size": 4096.0, "plaintext_size": 1, "chunk_count": 1})),
    ("text", cbor2.dumps({"chunk_size": "4096", "plaintext_size": 1, "chunk_count": 1})),
    ("count_too_large", cbor2.dumps({"chunk_size": 10, "plaintext_size": 20, "chunk_count": 3})),
    ("count_zero", cbor2.dumps({"chunk_size": 10, "plaintext_size": 0, "chunk_count": 0})),
    ("deep", b"\x81" * 40 + b"\x01"),
    ("nan", layout_map(x=float("nan"))),
    ("truncated", cbor2.dumps({"chunk_size": 10, "plaintext_size": 20, "chunk_count": 2})[:-1]),
]  # fmt: skip


@pytest.mark.parametrize(
    "manifest", [c[1] for c in HOSTILE_MANIFESTS], ids=[c[0] for c in HOSTILE_MANIFESTS]
)
def test_layout_rejects_hostile_manifest(manifest: bytes) -> None:
    with pytest.raises(MalformedBundle):
        BundleLayout.from_manifest(manifest)


def test_folder_source_reads_chunks(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    source = FolderSource(bundle.path)
    assert source.manifest() == bundle.manifest
    assert source.layout() == BundleLayout(4096, 4096 * 5 + 100, 6)
    assert [source.read_chunk(i) for i in range(6)] == bundle.sealed


def test_folder_source_refuses_missing_or_oversized_parts(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(MalformedBundle, match="over 10 bytes"):
        FolderSource(bundle.path, max_manifest=10).manifest()
    (bundle.path / "chunks.bin").unlink()
    with pytest.raises(MalformedBundle, match=r"chunks\.bin is missing"):
        FolderSource(bundle.path).layout()
    (bundle.path / "chunks.bin").mkdir()
    with pytest.raises(MalformedBundle, match="not a regular file"):
        FolderSource(bundle.path).layout()
    with pytest.raises(MalformedBundle, match=r"manifest\.cbor is missing"):
        FolderSource(tmp_path / "nowhere").manifest()


def test_folder_source_notices_a_shrunken_chunks_file(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    source = FolderSource(bundle.path)
    source.layout()  # checked once
    with (bundle.path / "chunks.bin").open("r+b") as file:
        file.truncate(4096 * 5)
    with pytest.raises(MalformedBundle, match="chunk 5: read"):
        source.read_chunk(5)


# -- S3 (moto, in process) ---------------------------------------------------------------------


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    with mock_aws():
        client = boto3.client("s3", region_name="eu-west-1", config=s3_client_config())
        client.create_bucket(
            Bucket="bundles", CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
        )
        yield client


def put_bundle(client: object, bundle: FakeBundle, prefix: str) -> None:
    for name, body in (("manifest.cbor", bundle.manifest), ("chunks.bin", b"".join(bundle.sealed))):
        client.put_object(Bucket="bundles", Key=f"{prefix}/{name}", Body=body)  # type: ignore[attr-defined]


def test_s3_source_reads_chunks_by_range(tmp_path: Path, s3: object) -> None:
    bundle = make_bundle(tmp_path / "b")
    put_bundle(s3, bundle, "models/m1")
    for prefix in ("models/m1", "models/m1/", "/models/m1"):
        source = S3Source(s3, "bundles", prefix)
        assert source.manifest() == bundle.manifest
        assert source.layout() == BundleLayout(4096, 4096 * 5 + 100, 6)
        assert [source.read_chunk(i) for i in (5, 0, 3)] == [bundle.sealed[i] for i in (5, 0, 3)]


def test_s3_source_refuses_missing_objects_and_size_mismatch(tmp_path: Path, s3: object) -> None:
    bundle = make_bundle(tmp_path / "b")
    with pytest.raises(MalformedBundle, match=r"manifest\.cbor is missing"):
        S3Source(s3, "bundles", "nothing-here").manifest()
    s3.put_object(Bucket="bundles", Key="half/manifest.cbor", Body=bundle.manifest)  # type: ignore[attr-defined]
    with pytest.raises(MalformedBundle, match=r"chunks\.bin is missing"):
        S3Source(s3, "bundles", "half").layout()
    s3.put_object(Bucket="bundles", Key="half/chunks.bin", Body=b"".join(bundle.sealed)[:-1])  # type: ignore[attr-defined]
    with pytest.raises(MalformedBundle, match="bytes; the manifest's layout needs"):
        S3Source(s3, "bundles", "half").layout()
    with pytest.raises(MalformedBundle, match="at most 10"):
        S3Source(s3, "bundles", "half", max_manifest=10).manifest()


def test_s3_source_unreachable_bucket_is_a_transport_error(s3: object) -> None:
    with pytest.raises((TransportError, MalformedBundle)):
        S3Source(s3, "no-such-bucket", "m").manifest()


def test_streams_from_s3(tmp_path: Path, address: Address, s3: object) -> None:
    bundle = make_bundle(tmp_path / "b")
    put_bundle(s3, bundle, "models/m1")

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"m": S3Source(s3, "bundles", "models/m1")}):
            return await fetch(address, "m", 2)

    assert asyncio.run(run()) == expected_frames(bundle, 2)


def test_raw_socket_client_sees_the_same_stream(tmp_path: Path, address: Address) -> None:
    """The enclave's blocking client path: recv_frame/send_frame against the asyncio server."""
    from protocol.frames import recv_frame, send_frame

    bundle = make_bundle(tmp_path / "b")
    got: list[Frame] = []

    def client() -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2.0)
            sock.connect(address.path or "")
            send_frame(sock, BundleRequest("m").frame(1))
            while not got or got[-1].type is not FrameType.BUNDLE_END:
                got.append(recv_frame(sock))

    async def run() -> None:
        async with BundleStreamer(address, {"m": FolderSource(bundle.path)}):
            await asyncio.to_thread(client)

    asyncio.run(run())
    assert got == expected_frames(bundle, stream_id=1)


def test_serves_the_checked_in_bundle_vector_verbatim(address: Address) -> None:
    """A real sealed bundle (tests/assets/bundle, from protocol.bundle's generator): the layout the
    parent computes from three manifest fields cuts chunks.bin exactly."""
    folder = Path(__file__).resolve().parent.parent / "assets" / "bundle"
    if not (folder / "manifest.cbor").is_file():
        pytest.skip("the bundle test vector is not checked in")
    manifest = (folder / "manifest.cbor").read_bytes()
    chunks = (folder / "chunks.bin").read_bytes()

    async def run() -> list[Frame]:
        async with BundleStreamer(address, {"vector": FolderSource(folder)}):
            return await fetch(address, "vector")

    frames = asyncio.run(run())
    assert frames[0] == Frame(FrameType.BUNDLE_MANIFEST, 0, manifest)
    sealed = [BundleChunk.decode(f.payload) for f in frames[1:-1]]
    assert [c.index for c in sealed] == list(range(len(sealed)))
    assert b"".join(c.sealed for c in sealed) == chunks
    assert BundleEnd.decode(frames[-1].payload) == BundleEnd(len(sealed))
