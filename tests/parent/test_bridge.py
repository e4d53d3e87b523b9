"""The consumer-facing HTTP bridge against a fake enclave: passthrough, errors, limits, metrics.

The bridge is untrusted and sees only ciphertext: the bodies here are opaque bytes (the enclave
is :class:`~tests.parent.fakeenclave.FakeEnclave`, which echoes them), and the tests check
that they pass byte-exact and never reach logs or metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from parent.bridge import OHTTP_KEY_PROBLEM, BridgeLimits, create_app, start_bridge
from parent.enclave_link import EnclaveLink, LinkTimeouts
from protocol.control import InferMode, InferRequest
from protocol.errors import ConfigError
from protocol.frames import ErrorPayload, Frame, FrameType
from protocol.transport import Address
from tests.parent.fakeenclave import BOOTING, FakeEnclave, InferScript, Send, echo, refuse

NONCE = bytes(range(32))
SECRET = b"RECOGNISABLE-CIPHERTEXT-7f3a9c"  # stands in for an encapsulated prompt
REQ = {"Content-Type": "message/ohttp-req"}
CHUNKED_REQ = {"Content-Type": "message/ohttp-chunked-req"}


@dataclass
class Env:
    enclave: FakeEnclave
    link: EnclaveLink
    url: str
    host: str
    port: int
    http: aiohttp.ClientSession


@contextlib.asynccontextmanager
async def bridged(
    tmp_path: Path,
    *,
    infer: InferScript = echo,
    limits: BridgeLimits | None = None,
    start_enclave: bool = True,
    timeouts: LinkTimeouts | None = None,
) -> AsyncIterator[Env]:
    """A fake enclave, a link to it and a bridge on 127.0.0.1 (a free port)."""
    limits = limits or BridgeLimits(linger=0.1)
    address = Address("unix", path=str(tmp_path / "enclave.sock"))
    enclave = FakeEnclave(address, infer=infer)
    if start_enclave:
        await enclave.start()
    timeouts = timeouts or LinkTimeouts(connect=1, first_response=2)
    try:
        async with EnclaveLink(address, timeouts=timeouts, backoff_max=0.1) as link:
            if start_enclave:
                await link.wait_connected(2)
            server = await start_bridge(create_app(link, limits), ("127.0.0.1", 0), limits=limits)
            async with server, aiohttp.ClientSession() as http:
                host, port = server.address.host, server.address.port
                assert host is not None
                assert port is not None
                yield Env(enclave, link, f"http://{host}:{port}", host, port, http)
    finally:
        await enclave.stop()


def infer_requests(enclave: FakeEnclave) -> list[Frame]:
    return [f for f in enclave.received if f.type is FrameType.INFER_REQUEST]


async def raw_exchange(env: Env, data: bytes, *, wait: float = 3.0) -> tuple[bytes, float]:
    """Send ``data`` on a raw connection; return everything the bridge answers until it closes,
    and how long the first byte of the answer took."""
    reader, writer = await asyncio.open_connection(env.host, env.port)
    started = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(wait):
            first = await reader.read(1)
            elapsed = time.monotonic() - started
            rest = await reader.read()  # until the bridge closes the connection
        return first + rest, elapsed
    finally:
        writer.transport.abort()


# -- attestation -------------------------------------------------------------------------------


def test_attestation_passes_the_document_through(tmp_path: Path) -> None:
    async def run() -> tuple[int, str, bytes, str]:
        async with bridged(tmp_path) as env:
            url = f"{env.url}/v1/attestation?nonce={NONCE.hex()}"
            async with env.http.get(url) as response:
                cache = response.headers.get("Cache-Control", "")
                return response.status, response.content_type, await response.read(), cache

    status, content_type, body, cache = asyncio.run(run())
    assert (status, content_type) == (200, "application/cbor")
    assert body == b"DOC:" + NONCE
    assert cache == "no-store"


def test_attestation_flood_gets_429_and_leaves_the_enclave_to_inference(tmp_path: Path) -> None:
    """An attestation flood (/tmp/review/attest_backlog.py) waits in no queue: past
    ``max_attestations`` it is refused at the bridge, and inference goes on."""
    limits = BridgeLimits(max_attestations=2, linger=0.1)

    async def run() -> tuple[list[int], str | None, int, int, int]:
        async with bridged(tmp_path, limits=limits) as env:
            env.enclave.attest_delay = 0.5
            url = f"{env.url}/v1/attestation?nonce={NONCE.hex()}"

            async def attest() -> tuple[int, str | None]:
                async with env.http.get(url) as response:
                    await response.read()
                    return response.status, response.headers.get("Retry-After")

            flood = [asyncio.create_task(attest()) for _ in range(10)]
            await asyncio.sleep(0.2)
            async with env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ) as response:
                await response.read()
                inference = response.status
            answers = await asyncio.gather(*flood)
            retry = next(r for s, r in answers if s == 429)
            return (
                [s for s, _ in answers],
                retry,
                inference,
                env.enclave.peak_attestations,
                (await attest())[0],
            )

    statuses, retry_after, inference, peak, after = asyncio.run(run())
    assert sorted(statuses) == [200] * 2 + [429] * 8
    assert retry_after == "1"
    assert inference == 200
    assert peak == 2
    assert after == 200  # the budget is given back


@pytest.mark.parametrize(
    "query",
    [
        "",
        "nonce=",
        f"nonce={bytes(15).hex()}",  # 15 bytes: too short
        f"nonce={bytes(65).hex()}",  # 65 bytes: too long
        "nonce=" + "zz" * 32,  # not hex
        "nonce=" + "0" * 33,  # odd length
        f"nonce={NONCE.hex()}&nonce={NONCE.hex()}",  # two nonces
        "nonce=" + "%20" + NONCE.hex(),  # whitespace that bytes.fromhex would accept
    ],
)
def test_rejects_a_bad_nonce_with_400_without_asking_the_enclave(
    tmp_path: Path, query: str
) -> None:
    async def run() -> tuple[int, str, list[Frame]]:
        async with bridged(tmp_path) as env:
            response = await env.http.get(f"{env.url}/v1/attestation?{query}")
            await response.read()
            return response.status, response.content_type, env.enclave.received

    status, content_type, received = asyncio.run(run())
    assert (status, content_type) == (400, "application/problem+json")
    assert not [f for f in received if f.type is FrameType.ATTESTATION_REQUEST]


@pytest.mark.parametrize("route", ["attestation", "infer"])
def test_enclave_not_ready_gets_503_with_retry_after(tmp_path: Path, route: str) -> None:
    async def run() -> tuple[int, str | None, dict[str, object]]:
        async with bridged(tmp_path) as env:
            env.enclave.health = BOOTING
            if route == "attestation":
                call = env.http.get(f"{env.url}/v1/attestation?nonce={NONCE.hex()}")
            else:
                call = env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ)
            async with call as response:
                return (
                    response.status,
                    response.headers.get("Retry-After"),
                    await response.json(content_type="application/problem+json"),
                )

    status, retry_after, problem = asyncio.run(run())
    assert status == 503
    assert retry_after == "5"
    assert problem["code"] == "not_ready"


def test_unreachable_enclave_gets_503_with_retry_after(tmp_path: Path) -> None:
    async def run() -> tuple[int, str | None, int, dict[str, object]]:
        async with bridged(tmp_path, start_enclave=False) as env:
            async with env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ) as response:
                retry = response.headers.get("Retry-After")
                status = response.status
            async with env.http.get(f"{env.url}/healthz") as health:
                return status, retry, health.status, await health.json()

    status, retry_after, health_status, health = asyncio.run(run())
    assert (status, retry_after) == (503, "5")
    assert (health_status, health["status"]) == (503, "unreachable")


# -- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(InferMode))
def test_infer_passes_both_modes_through_byte_exact(tmp_path: Path, mode: InferMode) -> None:
    body = bytes(range(256)) * 41 + SECRET

    async def run() -> tuple[int, str, bytes, list[Frame]]:
        async with bridged(tmp_path) as env:
            headers = {"Content-Type": mode.request_media_type}
            async with env.http.post(f"{env.url}/v1/infer", data=body, headers=headers) as response:
                return (
                    response.status,
                    response.content_type,
                    await response.read(),
                    infer_requests(env.enclave),
                )

    status, content_type, answer, requests = asyncio.run(run())
    assert status == 200
    assert content_type == mode.response_media_type
    assert answer == body
    assert [InferRequest.decode(f.payload) for f in requests] == [InferRequest(mode, body)]


def test_streamed_chunks_reach_the_consumer_as_they_come(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def two_parts(request: InferRequest, stream_id: int, send: Send) -> None:
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"first"))
        await release.wait()
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"second"))
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    async def run() -> tuple[bytes, bytes]:
        async with bridged(tmp_path, infer=two_parts) as env:
            url = f"{env.url}/v1/infer"
            async with env.http.post(url, data=b"q", headers=CHUNKED_REQ) as response:
                first = await response.content.readexactly(5)  # before the enclave sent more
                release.set()
                return first, await response.read()

    assert asyncio.run(run()) == (b"first", b"second")


def test_unknown_key_gets_422_with_the_ohttp_key_problem_type(tmp_path: Path) -> None:
    async def run() -> tuple[int, str, dict[str, object]]:
        async with bridged(tmp_path, infer=refuse("unknown_key", "key id 3 is not current")) as env:
            response = await env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ)
            return (
                response.status,
                response.content_type,
                await response.json(content_type="application/problem+json"),
            )

    status, content_type, problem = asyncio.run(run())
    assert (status, content_type) == (422, "application/problem+json")
    assert problem["type"] == OHTTP_KEY_PROBLEM
    assert problem["status"] == 422


@pytest.mark.parametrize(
    ("code", "status", "retry_after"),
    [
        ("malformed", 400, None),
        ("busy", 429, "1"),
        ("too_large", 413, None),
        ("internal", 500, None),
    ],
)
def test_enclave_error_codes_map_to_their_statuses(
    tmp_path: Path, code: str, status: int, retry_after: str | None
) -> None:
    async def run() -> tuple[int, str | None, dict[str, object]]:
        async with bridged(tmp_path, infer=refuse(code)) as env:
            response = await env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ)
            return (
                response.status,
                response.headers.get("Retry-After"),
                await response.json(content_type="application/problem+json"),
            )

    got_status, got_retry, problem = asyncio.run(run())
    assert (got_status, got_retry) == (status, retry_after)
    assert (problem["type"], problem["code"]) == ("about:blank", code)


def test_rejects_other_media_types_with_415(tmp_path: Path) -> None:
    async def run() -> tuple[int, list[Frame]]:
        async with bridged(tmp_path) as env:
            headers = {"Content-Type": "application/json"}
            async with env.http.post(f"{env.url}/v1/infer", data=b"{}", headers=headers) as r:
                return r.status, infer_requests(env.enclave)

    assert asyncio.run(run()) == (415, [])


@pytest.mark.parametrize("failure", ["enclave dies", "enclave error"])
def test_enclave_failing_mid_stream_aborts_the_client_connection(
    tmp_path: Path, failure: str
) -> None:
    box: list[FakeEnclave] = []

    async def fail_after_a_chunk(request: InferRequest, stream_id: int, send: Send) -> None:
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"partial"))
        await asyncio.sleep(0.05)
        if failure == "enclave dies":
            box[0].kill_connections()
        else:
            await send(ErrorPayload("internal", "model failed").frame(stream_id))

    async def run() -> tuple[int, bytes]:
        async with bridged(tmp_path, infer=fail_after_a_chunk) as env:
            box.append(env.enclave)
            url = f"{env.url}/v1/infer"
            async with env.http.post(url, data=SECRET, headers=CHUNKED_REQ) as response:
                first = await response.content.readexactly(7)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()  # no clean end: the final chunk never comes
                return response.status, first

    assert asyncio.run(run()) == (200, b"partial")


def test_consumer_leaving_cancels_its_stream_in_the_enclave(tmp_path: Path) -> None:
    async def think(request: InferRequest, stream_id: int, send: Send) -> None:
        await asyncio.sleep(30)  # the model is slow; the consumer gives up first

    async def run() -> tuple[list[Frame], int, float]:
        async with bridged(tmp_path, infer=think) as env:
            url = f"{env.url}/v1/infer"
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await env.http.post(url, data=SECRET, headers=REQ)
            for _ in range(100):
                cancels = [f for f in env.enclave.received if f.type is FrameType.ERROR]
                if cancels:
                    break
                await asyncio.sleep(0.01)
            requests = infer_requests(env.enclave)
            async with env.http.get(f"{env.url}/metrics") as response:
                text = await response.text()
            in_flight = float(text.split("\nnci_bridge_inference_in_flight ")[1].split()[0])
            return [*requests, *cancels], env.link.open_streams, in_flight

    frames, open_streams, in_flight = asyncio.run(run())
    request, cancel = frames
    assert cancel.stream_id == request.stream_id
    assert ErrorPayload.decode(cancel.payload).code == "cancelled"
    assert (open_streams, in_flight) == (0, 0)


def test_request_deadline_aborts_a_started_stream(tmp_path: Path) -> None:
    async def dawdle(request: InferRequest, stream_id: int, send: Send) -> None:
        for _ in range(100):
            await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, b"."))
            await asyncio.sleep(0.05)
        await send(Frame(FrameType.INFER_RESPONSE_END, stream_id, b""))

    limits = BridgeLimits(request_deadline=0.3)

    async def run() -> float:
        async with bridged(tmp_path, infer=dawdle, limits=limits) as env:
            started = time.monotonic()
            url = f"{env.url}/v1/infer"
            async with env.http.post(url, data=SECRET, headers=CHUNKED_REQ) as response:
                assert response.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            return time.monotonic() - started

    assert asyncio.run(run()) < 2


def test_link_reconnects_after_an_enclave_restart(tmp_path: Path) -> None:
    async def run() -> list[int]:
        statuses: list[int] = []
        async with bridged(tmp_path) as env:
            for step in ("before", "down", "after"):
                if step == "down":
                    await env.enclave.stop()
                    await asyncio.sleep(0.2)
                if step == "after":
                    await env.enclave.start()
                    await env.link.wait_connected(3)
                url = f"{env.url}/v1/infer"
                async with env.http.post(url, data=SECRET, headers=REQ) as response:
                    await response.read()
                    statuses.append(response.status)
        return statuses

    assert asyncio.run(run()) == [200, 503, 200]


# -- limits ------------------------------------------------------------------------------------


def test_oversized_body_gets_413_from_its_declared_length_before_it_is_read(
    tmp_path: Path,
) -> None:
    head = (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
        b"Content-Length: 104857600\r\n\r\n" + b"x" * 1000  # 100 MiB declared, 1000 B sent
    )

    async def run() -> tuple[bytes, float, list[Frame]]:
        async with bridged(tmp_path) as env:
            answer, elapsed = await raw_exchange(env, head)
            return answer, elapsed, infer_requests(env.enclave)

    answer, elapsed, requests = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert elapsed < 1
    assert requests == []


def test_oversized_chunked_body_is_counted_and_cut_off_at_the_cap(tmp_path: Path) -> None:
    limits = BridgeLimits(max_body_bytes=64 * 1024, linger=0.1)

    async def run() -> tuple[bytes, list[Frame]]:
        async with bridged(tmp_path, limits=limits) as env:
            reader, writer = await asyncio.open_connection(env.host, env.port)
            try:
                writer.write(
                    b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                )
                piece = b"%x\r\n%s\r\n" % (16 * 1024, b"y" * 16 * 1024)
                with contextlib.suppress(ConnectionError):
                    for _ in range(64):  # up to 1 MiB; the bridge stops reading at 64 KiB
                        writer.write(piece)
                        await writer.drain()
                async with asyncio.timeout(3):
                    answer = await reader.read()
            finally:
                writer.transport.abort()
            return answer, infer_requests(env.enclave)

    answer, requests = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert requests == []


def test_concurrency_over_the_limit_gets_429_instead_of_a_queue(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def hold(request: InferRequest, stream_id: int, send: Send) -> None:
        await release.wait()
        await echo(request, stream_id, send)

    limits = BridgeLimits(max_concurrency=2)

    async def run() -> tuple[list[int], int, str | None]:
        async with bridged(tmp_path, infer=hold, limits=limits) as env:
            url = f"{env.url}/v1/infer"

            async def one() -> int:
                async with env.http.post(url, data=SECRET, headers=REQ) as response:
                    await response.read()
                    return response.status

            held = [asyncio.create_task(one()) for _ in range(2)]
            while len(infer_requests(env.enclave)) < 2:
                await asyncio.sleep(0.01)
            async with env.http.post(url, data=SECRET, headers=REQ) as response:
                refused = response.status
                retry_after = response.headers.get("Retry-After")
            release.set()
            return list(await asyncio.gather(*held)), refused, retry_after

    held, refused, retry_after = asyncio.run(run())
    assert held == [200, 200]
    assert (refused, retry_after) == (429, "1")


def test_slowloris_body_times_out(tmp_path: Path) -> None:
    limits = BridgeLimits(client_read_timeout=0.3, linger=0.1)
    head = (
        b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
        b"Content-Length: 1000\r\n\r\n" + b"x" * 10  # then nothing
    )

    async def run() -> tuple[bytes, float, list[Frame]]:
        async with bridged(tmp_path, limits=limits) as env:
            answer, elapsed = await raw_exchange(env, head)
            return answer, elapsed, infer_requests(env.enclave)

    answer, elapsed, requests = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.2 < elapsed < 2
    assert requests == []


async def trickle(env: Env, *, declared: int = 1_000_000, every: float = 0.05) -> bytes:
    """A slow uploader: headers at once, then one body byte every ``every`` seconds until the
    bridge answers; returns the answer's status line."""
    reader, writer = await asyncio.open_connection(env.host, env.port)
    try:
        writer.write(
            b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
        )
        answer = asyncio.ensure_future(reader.readline())
        for _ in range(declared):
            done, _ = await asyncio.wait([answer], timeout=every)
            if done:
                return answer.result()
            with contextlib.suppress(ConnectionError):
                writer.write(b"A")
        return await answer
    finally:
        writer.transport.abort()


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def bridge_gauge(text: str, name: str) -> float:
    return float(text.split(f"\n{name} ")[1].split()[0])


def test_slow_uploaders_cannot_hold_the_inference_slots(tmp_path: Path) -> None:
    """Slowloris on the body (/tmp/review/bridge_slowloris.py): as many slow uploads as there
    are inference slots hold upload slots only, and a normal request is still served."""
    limits = BridgeLimits(max_concurrency=2, linger=0.1)  # 4 upload slots

    async def run() -> tuple[int, str]:
        async with bridged(tmp_path, limits=limits) as env:
            slow = [asyncio.create_task(trickle(env)) for _ in range(limits.max_concurrency)]
            try:
                await asyncio.sleep(0.3)  # they are uploading, a byte at a time
                async with env.http.get(f"{env.url}/metrics") as response:
                    text = await response.text()
                url = f"{env.url}/v1/infer"
                async with env.http.post(url, data=SECRET, headers=REQ) as response:
                    await response.read()
                    return response.status, text
            finally:
                for task in slow:
                    task.cancel()
                await asyncio.gather(*slow, return_exceptions=True)

    status, metrics = asyncio.run(run())
    assert status == 200  # was 429: the slow uploads held every inference slot
    assert bridge_gauge(metrics, "nci_bridge_uploads_in_flight") == 2
    assert bridge_gauge(metrics, "nci_bridge_inference_in_flight") == 0


def test_slow_uploaders_over_the_upload_budget_get_429_with_retry_after(tmp_path: Path) -> None:
    limits = BridgeLimits(max_concurrency=1, max_uploads=2, linger=0.1)

    async def run() -> bytes:
        async with bridged(tmp_path, limits=limits) as env:
            slow = [asyncio.create_task(trickle(env)) for _ in range(2)]
            try:
                await until(lambda: env.enclave.connections > 0)
                await asyncio.sleep(0.3)
                head = (
                    b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Type: message/ohttp-req\r\n"
                    + f"Content-Length: {len(SECRET)}\r\n\r\n".encode()
                    + SECRET
                )
                answer, _ = await raw_exchange(env, head)
                return answer
            finally:
                for task in slow:
                    task.cancel()
                await asyncio.gather(*slow, return_exceptions=True)

    answer = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 429 ")
    assert b"\r\nRetry-After: 1\r\n" in answer


def test_body_trickling_past_the_body_deadline_gets_408(tmp_path: Path) -> None:
    """Each byte arrives well within the per-read deadline, the whole body does not."""
    limits = BridgeLimits(client_read_timeout=5, body_timeout=0.5, linger=0.1)

    async def run() -> tuple[bytes, float, list[Frame], str]:
        async with bridged(tmp_path, limits=limits) as env:
            started = time.monotonic()
            answer = await trickle(env, declared=1000, every=0.05)
            elapsed = time.monotonic() - started
            async with env.http.get(f"{env.url}/metrics") as response:
                text = await response.text()
            return answer, elapsed, infer_requests(env.enclave), text

    answer, elapsed, requests, text = asyncio.run(run())
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 2.5
    assert requests == []
    assert bridge_gauge(text, "nci_bridge_uploads_in_flight") == 0


def test_body_completed_while_every_inference_slot_is_taken_gets_429(tmp_path: Path) -> None:
    release = asyncio.Event()

    async def hold(request: InferRequest, stream_id: int, send: Send) -> None:
        await release.wait()
        await echo(request, stream_id, send)

    limits = BridgeLimits(max_concurrency=1, linger=0.1)

    async def run() -> tuple[bytes, int]:
        async with bridged(tmp_path, infer=hold, limits=limits) as env:
            # admitted while the slot is free; its body completes only once it is taken
            late = asyncio.create_task(trickle(env, declared=10, every=0.05))
            await asyncio.sleep(0.1)

            async def first() -> int:
                async with env.http.post(f"{env.url}/v1/infer", data=SECRET, headers=REQ) as r:
                    await r.read()
                    return r.status

            held = asyncio.create_task(first())
            await until(lambda: len(infer_requests(env.enclave)) == 1)
            answer = await late
            release.set()
            return answer, await held

    answer, first = asyncio.run(run())
    assert first == 200
    assert answer.startswith(b"HTTP/1.1 429 ")


def test_slowloris_headers_are_cut_off(tmp_path: Path) -> None:
    limits = BridgeLimits(client_read_timeout=0.3, linger=0.1)

    async def run() -> tuple[bytes, float]:
        async with bridged(tmp_path, limits=limits) as env:
            return await raw_exchange(env, b"POST /v1/infer HTTP/1.1\r\nHost: x\r\n")

    answer, elapsed = asyncio.run(run())
    assert answer == b""
    assert elapsed < 2.5


# -- health and metrics ------------------------------------------------------------------------


def test_healthz_reports_the_enclave_state(tmp_path: Path) -> None:
    async def run() -> list[tuple[int, str]]:
        seen: list[tuple[int, str]] = []
        async with bridged(tmp_path) as env:
            for health in (BOOTING, env.enclave.health):
                env.enclave.health = health
                async with env.http.get(f"{env.url}/healthz") as response:
                    seen.append((response.status, (await response.json())["status"]))
        return seen

    assert asyncio.run(run()) == [(503, "booting"), (200, "ready")]


def test_metrics_count_requests_but_never_carry_content(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def fail_late(request: InferRequest, stream_id: int, send: Send) -> None:
        await send(Frame(FrameType.INFER_RESPONSE_CHUNK, stream_id, request.message))
        await send(ErrorPayload("internal", "model failed").frame(stream_id))

    async def run() -> str:
        async with bridged(tmp_path) as env:
            url = f"{env.url}/v1/infer"
            for _ in range(2):
                async with env.http.post(url, data=SECRET, headers=REQ) as response:
                    assert await response.read() == SECRET
            env.enclave.infer = refuse("malformed")
            async with env.http.post(url, data=SECRET, headers=CHUNKED_REQ) as response:
                assert response.status == 400
            env.enclave.infer = fail_late
            async with env.http.post(url, data=SECRET, headers=CHUNKED_REQ) as response:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
            async with env.http.get(f"{env.url}/metrics") as response:
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                return await response.text()

    text = asyncio.run(run())
    assert 'nci_bridge_requests_total{route="infer",status="200"} 3' in text
    assert 'nci_bridge_requests_total{route="infer",status="400"} 1' in text
    assert f'nci_bridge_request_bytes_total{{route="infer"}} {4 * len(SECRET)}' in text
    assert f'nci_bridge_response_bytes_total{{route="infer"}} {3 * len(SECRET)}' in text
    assert 'nci_bridge_aborted_streams_total{reason="enclave"} 1' in text
    assert 'nci_bridge_request_duration_seconds_count{route="infer"} 4' in text
    assert 'nci_enclave_state{state="ready"} 1' in text
    assert SECRET.decode() not in text
    assert SECRET.hex() not in text
    logged = "\n".join(record.getMessage() for record in caplog.records) + caplog.text
    assert SECRET.decode() not in logged
    assert SECRET.hex() not in logged


@pytest.mark.parametrize(
    "bad",
    [
        {"max_body_bytes": 0},
        {"max_body_bytes": 17 * 1024 * 1024},  # over the contract's 16 MiB
        {"max_concurrency": 0},
        {"client_read_timeout": 0},
        {"request_deadline": True},
        {"linger": -1},
    ],
)
def test_rejects_impossible_limits(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        BridgeLimits(**bad)
