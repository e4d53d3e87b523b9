"""Faults at the consumer-facing bridge (issue 7), against the fake enclave: slow and vanishing
consumers, malformed and oversized floods, and a mixed burst in which every request must end in
exactly one outcome. The same faults across real processes are in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

import aiohttp
import pytest

from parent.bridge import BridgeLimits
from parent.enclave_link import LinkTimeouts
from protocol.control import InferRequest
from protocol.frames import ErrorPayload, Frame, FrameType
from tests.parent.fakeenclave import FakeEnclave, Send, echo
from tests.parent.test_bridge import (
    CHUNKED_REQ,
    REQ,
    SECRET,
    Env,
    bridge_gauge,
    bridged,
    infer_requests,
    raw_exchange,
    until,
)


async def metrics(env: Env) -> str:
    """The bridge's ``/metrics`` text."""
    async with env.http.get(f"{env.url}/metrics") as response:
        return await response.text()


def cancels(enclave: FakeEnclave) -> list[Frame]:
    return [
        f
        for f in enclave.received
        if f.type is FrameType.ERROR and ErrorPayload.decode(f.payload).code == "cancelled"
    ]


def status_of(answer: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", answer)
    return int(match.group(1)) if match else 0


async def endless(request: InferRequest, stream_id: int, send: Send) -> None:
    """A long answer: a 64 KiB chunk every 2 ms (the fake enclave ignores cancels)."""
    for _ in range(2000):
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"z" * 65536))
        await asyncio.sleep(0.002)
    await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))


# -- slow clients -------------------------------------------------------------------------------


def test_slowloris_header_trickle_is_cut_off_at_the_read_deadline(tmp_path: Path) -> None:
    """Each header byte arrives well within any per-read deadline; the headers as a whole do not
    arrive within ``client_read_timeout`` of the connection's start, and the connection is cut
    without an answer (aiohttp's keep-alive deadline is not pushed back by arriving bytes)."""
    limits = BridgeLimits(client_read_timeout=0.4, linger=0.1)
    headers = b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200

    async def run() -> tuple[bytes, float, int, list[Frame]]:
        async with bridged(tmp_path, limits=limits) as env:
            reader, writer = await asyncio.open_connection(env.host, env.port)
            started = time.monotonic()
            sent = 0
            try:
                answer = asyncio.ensure_future(reader.read())
                for byte in headers:
                    done, _ = await asyncio.wait([answer], timeout=0.05)
                    if done:
                        break
                    with contextlib.suppress(ConnectionError):
                        writer.write(bytes([byte]))
                        sent += 1
                data = await asyncio.wait_for(answer, 5)
                return data, time.monotonic() - started, sent, infer_requests(env.enclave)
            finally:
                writer.transport.abort()

    answer, elapsed, sent, requests = asyncio.run(run())
    assert answer == b""
    assert 0.3 < elapsed < 2.0
    assert sent < len(headers)  # cut off while still trickling
    assert requests == []


# -- consumers that stop reading or leave ---------------------------------------------------------


def test_consumer_that_stops_reading_mid_stream_is_cut_off_and_its_stream_cancelled(
    tmp_path: Path,
) -> None:
    """The consumer takes the response's head and then reads nothing: the bridge's writes stop
    draining, the response is aborted at the write deadline (or the link's per-stream buffer
    overflows first), its slot is freed and the enclave is told to stop."""
    limits = BridgeLimits(write_timeout=0.3, linger=0.1)

    async def run() -> tuple[float, str, int, list[Frame], list[Frame]]:
        async with bridged(tmp_path, infer=endless, limits=limits) as env:
            reader, writer = await asyncio.open_connection(env.host, env.port)
            try:
                writer.write(
                    b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: message/ohttp-chunked-req\r\n"
                    + f"Content-Length: {len(SECRET)}\r\n\r\n".encode()
                    + SECRET
                )
                head = await asyncio.wait_for(reader.readline(), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                started = time.monotonic()  # from now on the consumer reads nothing
                await until(lambda: bool(cancels(env.enclave)), timeout=15)
                text = await metrics(env)
                while bridge_gauge(text, "nci_bridge_inference_in_flight"):  # the slot, freed
                    await asyncio.sleep(0.05)
                    text = await metrics(env)
                took = time.monotonic() - started
                return (
                    took,
                    text,
                    env.link.open_streams,
                    infer_requests(env.enclave),
                    cancels(env.enclave),
                )
            finally:
                writer.transport.abort()

    took, text, open_streams, requests, cancelled = asyncio.run(run())
    assert took < 10
    assert [c.stream_id for c in cancelled] == [r.stream_id for r in requests]
    assert open_streams == 0
    assert bridge_gauge(text, "nci_bridge_inference_in_flight") == 0
    aborted = re.findall(r'nci_bridge_aborted_streams_total\{reason="consumer"\} (\d+)', text)
    assert aborted == ["1"]


def test_consumer_vanishing_mid_stream_frees_its_slot_and_cancels_the_stream(
    tmp_path: Path,
) -> None:
    async def slow_pieces(request: InferRequest, stream_id: int, send: Send) -> None:
        for i in range(100):
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"piece %03d;" % i))
            await asyncio.sleep(0.05)
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    async def run() -> tuple[bytes, float, str, int, list[Frame], list[Frame]]:
        async with bridged(tmp_path, infer=slow_pieces) as env:
            url = f"{env.url}/v1/infer"
            response = await env.http.post(url, data=SECRET, headers=CHUNKED_REQ)
            first = await response.content.readexactly(20)
            response.close()  # the consumer leaves, its connection with it
            left = time.monotonic()
            await until(lambda: bool(cancels(env.enclave)))
            took = time.monotonic() - left
            return (
                first,
                took,
                await metrics(env),
                env.link.open_streams,
                infer_requests(env.enclave),
                cancels(env.enclave),
            )

    first, took, text, open_streams, requests, cancelled = asyncio.run(run())
    assert first == b"piece 000;piece 001;"
    assert took < 1.0  # not the 5 s the answer would have taken
    assert [c.stream_id for c in cancelled] == [r.stream_id for r in requests]
    assert open_streams == 0
    assert bridge_gauge(text, "nci_bridge_inference_in_flight") == 0


# -- malformed and oversized floods -------------------------------------------------------------

MALFORMED = {
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    "negative length": b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "two lengths": (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    ),
    "length and chunked (smuggling)": (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "header line over 8 KiB": b"POST /v1/infer HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_http_gets_400_at_once_and_reaches_no_enclave(
    tmp_path: Path, data: bytes
) -> None:
    async def run() -> tuple[bytes, float, list[Frame]]:
        async with bridged(tmp_path) as env:
            answer, elapsed = await raw_exchange(env, data)
            return answer, elapsed, infer_requests(env.enclave)

    answer, elapsed, requests = asyncio.run(run())
    assert status_of(answer) == 400, answer[:80]
    assert elapsed < 1.0
    assert requests == []


def test_flood_of_oversized_bodies_reads_no_more_than_the_upload_budget(tmp_path: Path) -> None:
    """Twelve consumers at once stream bodies four times the cap: as many as the upload budget
    are read up to the cap and refused 413, the others are refused 429 without being read; what
    the bridge read (and so held) is bounded by the budget, whatever the flood sends."""
    cap = 64 * 1024
    limits = BridgeLimits(max_body_bytes=cap, max_concurrency=1, max_uploads=2, linger=0.1)
    piece = b"%x\r\n%s\r\n" % (8192, b"y" * 8192)

    async def flood_one(env: Env, go: asyncio.Event) -> int:
        reader, writer = await asyncio.open_connection(env.host, env.port)
        try:
            writer.write(
                b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            await go.wait()
            answer = asyncio.ensure_future(reader.readline())
            for _ in range(4 * cap // 8192):
                if answer.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(piece)
                    await writer.drain()
                await asyncio.sleep(0.002)
            return status_of(await asyncio.wait_for(answer, 5) + b" ")
        finally:
            writer.transport.abort()

    async def run() -> tuple[list[int], str, list[Frame]]:
        async with bridged(tmp_path, limits=limits) as env:
            go = asyncio.Event()
            flood = [asyncio.create_task(flood_one(env, go)) for _ in range(12)]
            await asyncio.sleep(0.2)  # every head is in: the upload budget is taken
            go.set()
            statuses = await asyncio.gather(*flood)
            return list(statuses), await metrics(env), infer_requests(env.enclave)

    statuses, text, requests = asyncio.run(run())
    assert sorted(statuses) == [413] * 2 + [429] * 10
    read = float(text.split('\nnci_bridge_request_bytes_total{route="infer"} ')[1].split()[0])
    assert read <= 2 * (cap + 2 * 65536)  # each refused body: the cap and at most a buffer more
    assert bridge_gauge(text, "nci_bridge_uploads_in_flight") == 0
    assert requests == []


# -- exactly one outcome per request --------------------------------------------------------------


def test_mixed_burst_gets_exactly_one_outcome_per_request(tmp_path: Path) -> None:
    """Requests the enclave answers, streams, refuses, is too slow for, or dies in the middle
    of, sent at once with oversized and mistyped ones: each gets exactly one outcome (a
    complete answer, an error status, or an aborted response where a stream had started), the
    bridge counts each once, and every slot and stream is given back."""
    box: list[FakeEnclave] = []

    async def script(request: InferRequest, stream_id: int, send: Send) -> None:
        kind = request.message.split(b":", 1)[0]
        if kind == b"ok":
            await echo(request, stream_id, send)
        elif kind == b"refuse":
            await send(ErrorPayload("busy", "full").frame(stream_id))
        elif kind == b"slow":
            await asyncio.sleep(3)  # past the first-response deadline
        elif kind == b"die":
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"partial"))
            await asyncio.sleep(0.8)  # after the slow ones' deadline
            box[0].kill_connections()  # the enclave crashes: every stream on it is lost

    timeouts = LinkTimeouts(connect=1, first_response=0.5)
    limits = BridgeLimits(max_body_bytes=64 * 1024, max_concurrency=16, linger=0.1)
    plan = ["ok", "refuse", "slow", "die", "ok", "oversized", "mistyped", "ok"] * 3

    async def one(env: Env, index: int, kind: str) -> tuple[str, str]:
        await asyncio.sleep(0.01 * index)
        body = f"{kind}:{index}:".encode() + SECRET
        headers = CHUNKED_REQ if kind in ("ok", "die") else REQ
        if kind == "oversized":
            body = b"x" * (limits.max_body_bytes + 1)
        if kind == "mistyped":
            headers = {"Content-Type": "text/plain"}
        try:
            async with env.http.post(f"{env.url}/v1/infer", data=body, headers=headers) as r:
                data = await r.read()
                if r.status == 200:
                    assert data == body, "a 200 whose body is not the whole answer"
                    return kind, "complete"
                return kind, str(r.status)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            return kind, "aborted"

    async def run() -> tuple[list[tuple[str, str]], str, int]:
        async with bridged(tmp_path, infer=script, limits=limits, timeouts=timeouts) as env:
            box.append(env.enclave)
            async with asyncio.timeout(20):  # never a hang
                outcomes = await asyncio.gather(*(one(env, i, k) for i, k in enumerate(plan)))
            await env.link.wait_connected(3)
            await until(lambda: env.link.open_streams == 0)
            return list(outcomes), await metrics(env), env.link.open_streams

    outcomes, text, open_streams = asyncio.run(run())
    allowed = {
        "ok": {"complete", "aborted", "503"},  # lost with the crashed connection, or while down
        "refuse": {"429", "503"},
        "slow": {"504", "503"},  # 503: the crash came first and took its stream
        "die": {"aborted", "503"},
        "oversized": {"413"},
        "mistyped": {"415"},
    }
    for kind, outcome in outcomes:
        assert outcome in allowed[kind], (kind, outcome)
    seen = {o for _, o in outcomes}
    assert {"complete", "aborted", "429", "504", "413", "415"} <= seen
    answered = re.findall(r'nci_bridge_requests_total\{route="infer",status="\d+"\} (\d+)', text)
    assert sum(int(n) for n in answered) == len(plan)  # each request counted exactly once
    assert open_streams == 0
    assert bridge_gauge(text, "nci_bridge_inference_in_flight") == 0
    assert bridge_gauge(text, "nci_bridge_uploads_in_flight") == 0
