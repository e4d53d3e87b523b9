"""What does one hop through the parent's control link cost?

``python -m benchmarks.hop [--round-trips N] [--bulk-mb M] [--repeats R] [--json]``

An in-process echo enclave (an asyncio Protocol speaking the control frames) listens on a unix
socket; a real :class:`parent.enclave_link.EnclaveLink` connects to it, on the same event loop.
Each figure is measured on uvloop (the parent's loop) and on asyncio's default loop; medians of
``repeats`` passes, interleaved (link, baseline, health, bulk, link, …) so that load from elsewhere
on the machine hits every figure alike.

``link_round_trip_us``
    One inference request through the link: ``InferRequest`` (64-byte message) → INFER_REQUEST
    frame → the echo enclave answers one INFER_RESPONSE_CHUNK and INFER_RESPONSE_END → the async
    iterator ends. Sequential, so this is latency, both sides' CPU time included.
``health_round_trip_us``
    ``link.health()``: HEALTH_PING → HEALTH_PONG, decoded.
``baseline_ping_pong_us``
    The floor: the same unix socket, the same loop, a bare Protocol writing 64 bytes and waiting
    for the 64-byte echo, no frames. ``link_overhead_us`` = link − baseline: what framing, stream
    multiplexing, deadlines and the iterator add per request, on both sides (the echo enclave
    parses and writes frames too, on the same CPU).
``echo_enclave_frames_us``
    The echo enclave alone: a pre-encoded INFER_REQUEST written raw, its CHUNK and END read back
    as raw bytes. ``link_own_cost_us`` = link − this: the parent side's share.
``bulk_mb_per_s``
    One inference stream answered with ``bulk_mb`` MiB in 1 MiB INFER_RESPONSE_CHUNKs, consumed
    through the iterator (MB = 10⁶ bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from parent.enclave_link import EnclaveLink, LinkTimeouts
from protocol.control import Health, InferMode, InferRequest
from protocol.frames import HEADER_SIZE, Frame, FrameType, decode_header, encode_frame
from protocol.transport import Address

MESSAGE = bytes(64)
BULK_PIECE = 1024 * 1024
READY = Health("ready", 6, 6, "ready", key_id=1)


class _EchoEnclave(asyncio.Protocol):
    """The enclave's side, minimal: echo INFER_REQUEST, answer HEALTH_PING; a message starting
    with ``b"bulk"`` gets ``bulk_mb`` MiB back."""

    def __init__(self, bulk_mb: int) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._bulk = bulk_mb
        self._pong = READY.encode()
        self._writable = asyncio.Event()
        self._writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= HEADER_SIZE:
            kind, stream_id, length = decode_header(bytes(buffer[:HEADER_SIZE]))
            if len(buffer) < HEADER_SIZE + length:
                return
            payload = bytes(buffer[HEADER_SIZE : HEADER_SIZE + length])
            del buffer[: HEADER_SIZE + length]
            self._answer(kind, stream_id, payload)

    def _answer(self, kind: FrameType, stream_id: int, payload: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        if kind is FrameType.HEALTH_PING:
            transport.write(encode_frame(Frame(FrameType.HEALTH_PONG, stream_id, self._pong)))
        elif kind is FrameType.INFER_REQUEST and payload[1:5] == b"bulk":
            asyncio.get_running_loop().create_task(self._flood(stream_id))
        elif kind is FrameType.INFER_REQUEST:
            transport.write(
                encode_frame(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, payload[1:]))
                + encode_frame(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))
            )

    async def _flood(self, stream_id: int) -> None:
        transport = self._transport
        assert transport is not None
        piece = encode_frame(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, bytes(BULK_PIECE)))
        for _ in range(self._bulk):
            transport.write(piece)
            await self._writable.wait()  # the transport's flow control
        transport.write(encode_frame(Frame(FrameType.INFER_RESPONSE_END, stream_id, b"")))


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._transport.write(data)


class _PingClient(asyncio.Protocol):
    """Writes, then waits for ``expect`` bytes back (no parsing)."""

    def __init__(self, expect: int) -> None:
        self.waiter: asyncio.Future[None] | None = None
        self.got = 0
        self.expect = expect

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.expect and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


async def _measure(folder: Path, round_trips: int, bulk_mb: int, repeats: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    enclave_path = str(folder / "enclave.sock")
    echo_path = str(folder / "echo.sock")
    enclave = await loop.create_unix_server(lambda: _EchoEnclave(bulk_mb), enclave_path)
    echo = await loop.create_unix_server(_Echo, echo_path)
    timeouts = LinkTimeouts(first_response=60, between_chunks=60)
    link = EnclaveLink(Address("unix", path=enclave_path), timeouts=timeouts, health_interval=None)
    try:
        async with link:
            await link.wait_connected(5)
            request = InferRequest(InferMode.SINGLE, MESSAGE)

            async def link_pass() -> float:
                started = time.perf_counter()
                for _ in range(round_trips):
                    async with link.infer(request) as stream:
                        async for _chunk in stream:
                            pass
                return (time.perf_counter() - started) / round_trips

            async def health_pass() -> float:
                started = time.perf_counter()
                for _ in range(round_trips):
                    await link.health()
                return (time.perf_counter() - started) / round_trips

            async def raw_client(path: str, expect: int) -> tuple[asyncio.Transport, _PingClient]:
                transport, client = await loop.create_unix_connection(
                    lambda: _PingClient(expect), path
                )
                return transport, client

            def ping_pass_of(
                transport: asyncio.Transport, client: _PingClient, message: bytes
            ) -> Callable[[], Coroutine[Any, Any, float]]:
                async def ping_pass() -> float:
                    started = time.perf_counter()
                    for _ in range(round_trips):
                        client.got = 0
                        client.waiter = loop.create_future()
                        transport.write(message)
                        await client.waiter
                    return (time.perf_counter() - started) / round_trips

                return ping_pass

            echo_transport, echo_client = await raw_client(echo_path, len(MESSAGE))
            ping_pass = ping_pass_of(echo_transport, echo_client, MESSAGE)
            # the echo enclave answering a pre-encoded INFER_REQUEST, read as raw bytes: its share
            request_bytes = encode_frame(request.frame(0xFFFF))
            answer_size = 2 * HEADER_SIZE + len(MESSAGE)
            frames_transport, frames_client = await raw_client(enclave_path, answer_size)
            frames_pass = ping_pass_of(frames_transport, frames_client, request_bytes)

            bulk_request = InferRequest(InferMode.CHUNKED, b"bulk")

            async def bulk_pass() -> float:
                received = 0
                started = time.perf_counter()
                async with link.infer(bulk_request) as stream:
                    async for chunk in stream:
                        received += len(chunk)
                elapsed = time.perf_counter() - started
                if received != bulk_mb * BULK_PIECE:
                    raise RuntimeError("the bulk stream lost bytes")
                return received / elapsed / 1e6

            runs = {
                "link": link_pass,
                "ping": ping_pass,
                "frames": frames_pass,
                "health": health_pass,
                "bulk": bulk_pass,
            }
            await link_pass()  # warm up
            await ping_pass()
            passes: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(repeats):  # interleaved, so that a busy moment hits every figure
                for name, one_pass in runs.items():
                    passes[name].append(await one_pass())
            echo_transport.close()
            frames_transport.close()
            link_s, baseline_s, frames_s, health_s, bulk = (
                statistics.median(passes[name]) for name in runs
            )
    finally:
        enclave.close()
        echo.close()
        await enclave.wait_closed()
        await echo.wait_closed()
    return {
        "link_round_trip_us": round(link_s * 1e6, 2),
        "health_round_trip_us": round(health_s * 1e6, 2),
        "baseline_ping_pong_us": round(baseline_s * 1e6, 2),
        "link_overhead_us": round((link_s - baseline_s) * 1e6, 2),
        "echo_enclave_frames_us": round(frames_s * 1e6, 2),
        "link_own_cost_us": round((link_s - frames_s) * 1e6, 2),
        "bulk_mb_per_s": round(bulk, 1),
    }


def _on_loop(loop_factory: Callable[[], asyncio.AbstractEventLoop] | None, **kwargs: Any) -> Any:
    with (
        tempfile.TemporaryDirectory(prefix="nci-hop-") as scratch,
        asyncio.Runner(loop_factory=loop_factory) as runner,
    ):
        return runner.run(_measure(Path(scratch), **kwargs))


def run(round_trips: int = 5000, bulk_mb: int = 256, repeats: int = 5) -> dict[str, Any]:
    if round_trips < 1 or bulk_mb < 1 or repeats < 1:
        raise ValueError("round_trips, bulk_mb and repeats must be at least 1")
    settings = {"round_trips": round_trips, "bulk_mb": bulk_mb, "repeats": repeats}
    figures: dict[str, Any] = {**settings, "message_bytes": len(MESSAGE)}
    try:
        import uvloop

        loops: dict[str, Any] = {"uvloop": uvloop.new_event_loop, "asyncio": None}
    except ImportError:  # pragma: no cover
        loops = {"asyncio": None}
    for name, factory in loops.items():
        for key, value in _on_loop(factory, **settings).items():
            figures[f"{name}_{key}"] = value
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hop", description=__doc__)
    parser.add_argument("--round-trips", type=int, default=5000, help="per pass (5000)")
    parser.add_argument("--bulk-mb", type=int, default=256, help="MiB streamed per pass (256)")
    parser.add_argument("--repeats", type=int, default=5, help="passes; the median is kept (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = run(args.round_trips, args.bulk_mb, args.repeats)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"  {key:<36} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
