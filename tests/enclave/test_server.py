"""The enclave's control server over a real unix socket, with an emulated NSM and stand-in runtimes.

The test plays the parent: it connects to the control address, sends frames and reads answers, and
plays the consumer too: it encapsulates requests with OHTTP and decrypts the responses. Everything
the enclave writes to the socket must be ciphertext, public data or a fixed error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest

from attestation import _measure
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient
from attestation.policy import Nonce, Policy
from attestation.roots import TrustRoot
from attestation.verify import verify
from enclave.errors import ConfigError, EnclaveError
from enclave.server import (
    MAX_DISCARD,
    EchoRuntime,
    EnclaveServer,
    OhttpKey,
    Ready,
    attestation_user_data,
)
from protocol.control import MAX_INFER_REQUEST, Credentials, Health, InferMode, InferRequest
from protocol.errors import TransportError
from protocol.frames import (
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    encode_frame,
    read_frame,
    write_frame,
)
from protocol.inference import (
    Image,
    InferenceRequest,
    InferenceResponse,
    Params,
    StreamDelta,
    StreamEnd,
    decode_stream_piece,
    http_request,
    parse_http_response,
)
from protocol.ohttp import (
    ClientContext,
    KeyConfig,
    encapsulate_chunked_request,
    encapsulate_request,
    generate_key_config,
)
from protocol.transport import Address, open_connection, parse_address

MODEL_ID = "nci-test/echo:1"
MANIFEST_SHA256 = bytes(range(32))
PROMPT = "SECRET-PROMPT-7f3a what shape is left of the red circle ?"
ENDS = (FrameType.INFER_RESPONSE_END, FrameType.ERROR)


# --- The parent's and the consumer's sides ------------------------------------------------------


class Parent:
    """The parent's end of one control connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received: list[Frame] = []

    @classmethod
    async def connect(cls, address: Address) -> Parent:
        return cls(*await open_connection(address, timeout=5))

    async def send(self, frame: Frame) -> None:
        await write_frame(self.writer, frame, timeout=5)

    async def recv(self, timeout: float = 5) -> Frame:
        frame = await read_frame(self.reader, timeout=timeout)
        self.received.append(frame)
        return frame

    async def until_end(self, stream_id: int) -> list[Frame]:
        """Frames of ``stream_id`` up to its INFER_RESPONSE_END or ERROR (others are dropped)."""
        frames: list[Frame] = []
        while not frames or frames[-1].type not in ENDS:
            frame = await self.recv()
            if frame.stream_id == stream_id:
                frames.append(frame)
        return frames

    async def ask(self, frame: Frame) -> Frame:
        """Send a request with one answer and return it."""
        await self.send(frame)
        return await self.recv()

    async def health(self) -> Health:
        answer = await self.ask(Frame(FrameType.HEALTH_PING, 1, b""))
        assert answer.type == FrameType.HEALTH_PONG
        return Health.decode(answer.payload)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def error_of(frame: Frame) -> str:
    assert frame.type == FrameType.ERROR, frame.type
    return ErrorPayload.decode(frame.payload).code


@dataclass
class Consumer:
    """A consumer's request: the INFER_REQUEST payload and what decrypts its answer."""

    mode: InferMode
    payload: bytes
    context: ClientContext

    def frame(self, stream_id: int) -> Frame:
        return Frame(FrameType.INFER_REQUEST, stream_id, self.payload)


def consumer_request(
    key_config: bytes,
    *,
    mode: InferMode = InferMode.SINGLE,
    prompt: str = PROMPT,
    stream: bool | None = None,
    max_tokens: int = 256,
    images: tuple[Image, ...] = (),
    split: bool = True,
) -> Consumer:
    params = Params(
        max_tokens=max_tokens, stream=mode is InferMode.CHUNKED if stream is None else stream
    )
    message = http_request(InferenceRequest(prompt, images, params))
    if mode is InferMode.SINGLE:
        encapsulated, context = encapsulate_request(key_config, message)
    else:
        writer, context = encapsulate_chunked_request(key_config)
        cut = len(message) // 2 if split else 0
        encapsulated = (writer.chunk(message[:cut]) if cut else b"") + writer.final(message[cut:])
    return Consumer(mode, InferRequest(mode, encapsulated).encode(), context)


def single_response(consumer: Consumer, frames: Sequence[Frame]) -> InferenceResponse:
    assert [f.type for f in frames] == [
        FrameType.INFER_RESPONSE_CHUNK,
        FrameType.INFER_RESPONSE_END,
    ]
    return parse_http_response(consumer.context.decapsulate_response(frames[0].payload))


def streamed_pieces(consumer: Consumer, frames: Sequence[Frame]) -> list[StreamDelta | StreamEnd]:
    assert frames[-1].type == FrameType.INFER_RESPONSE_END
    reader = consumer.context.chunked_response_reader()
    plaintexts: list[bytes] = []
    for frame in frames[:-1]:
        assert frame.type == FrameType.INFER_RESPONSE_CHUNK
        plaintexts += reader.feed(frame.payload)
    plaintexts.append(reader.close())
    return [decode_stream_piece(p) for p in plaintexts]


# --- Stand-in runtimes ------------------------------------------------------------------------


class RefusingRuntime:
    """Refuses every request, as a model refuses an input it cannot take."""

    class Refused(EnclaveError):
        pass

    def generate(
        self, prompt: str, images: Sequence[Image], params: Params, *, seed: int | None = None
    ) -> Any:
        raise self.Refused("images: this model takes exactly 1 image")


@dataclass
class EndlessGeneration:
    """Pieces until closed, each after ``gate`` opens (or at once when it is None)."""

    gate: threading.Event | None = None
    fail_after: int | None = None
    produced: int = 0
    closed: threading.Event = field(default_factory=threading.Event)
    finish_reason: str | None = None
    prompt_tokens: int = 1
    completion_tokens: int = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.fail_after is not None and self.produced >= self.fail_after:
            raise RuntimeError("SECRET-COMPLETION the model broke")
        if self.gate is not None and not self.gate.wait(5):
            raise RuntimeError("gate never opened")
        self.produced += 1
        return "SECRET-COMPLETION "

    def close(self) -> None:
        self.closed.set()


@dataclass
class EndlessRuntime:
    gate: threading.Event | None = None
    fail_after: int | None = None
    generations: list[EndlessGeneration] = field(default_factory=list)
    started: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def generate(
        self, prompt: str, images: Sequence[Image], params: Params, *, seed: int | None = None
    ) -> EndlessGeneration:
        generation = EndlessGeneration(self.gate, self.fail_after)
        self.generations.append(generation)
        self.started.release()
        return generation


# --- Fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nsm(tmp_path_factory: pytest.TempPathFactory) -> EmulatedNsm:
    return EmulatedNsm(state_dir=tmp_path_factory.mktemp("nsm"))


@pytest.fixture
def address() -> Iterator[Address]:
    folder = Path(tempfile.mkdtemp(prefix="nci-srv-"))  # unix socket paths are short
    yield parse_address(f"unix://{folder}/enclave.sock")
    shutil.rmtree(folder, ignore_errors=True)


def make_ready(nsm: EmulatedNsm, runtime: Any = None) -> Ready:
    runtime = EchoRuntime() if runtime is None else runtime
    return Ready(NsmClient(nsm), runtime, OhttpKey.generate(), MODEL_ID, MANIFEST_SHA256)


@contextlib.asynccontextmanager
async def enclave(
    address: Address, ready: Ready | None, **options: Any
) -> AsyncIterator[tuple[EnclaveServer, Parent]]:
    server = EnclaveServer(address, **options)
    await server.start()
    if ready is not None:
        server.set_ready(ready)
    parent = await Parent.connect(address)
    try:
        yield server, parent
    finally:
        await parent.close()
        await server.close()


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 20))


# --- Health and credentials ---------------------------------------------------------------------


def test_health_reports_each_boot_step_then_ready(nsm: EmulatedNsm, address: Address) -> None:
    async def scenario() -> list[Health]:
        async with enclave(address, None) as (server, parent):
            seen = [await parent.health()]
            server.health.begin(3)
            seen.append(await parent.health())
            ready = make_ready(nsm)
            server.set_ready(ready)
            seen.append(await parent.health())
            consumer = consumer_request(ready.key.key_config)
            await parent.send(consumer.frame(2))
            await parent.until_end(2)
            seen.append(await parent.health())
            return seen

    booting, unlocking, ready, served = run(scenario())
    assert (booting.state, booting.step, booting.steps, booting.name) == ("booting", 1, 6, "nsm")
    assert booting.key_id == 0
    assert (unlocking.step, unlocking.name) == (3, "key release and unlock")
    assert (ready.state, ready.step, ready.name, ready.error) == ("ready", 6, "ready", "")
    assert (served.served, served.active) == (1, 0)
    assert served.key_id == ready.key_id


def test_failed_boot_answers_health_failed_and_refuses_consumers(
    nsm: EmulatedNsm, address: Address
) -> None:
    async def scenario() -> tuple[Health, str, str]:
        async with enclave(address, None) as (server, parent):
            server.health.begin(3)
            server.health.fail("kms_unavailable")
            _, config = generate_key_config(1)
            infer = await parent.ask(consumer_request(config).frame(2))
            attest = await parent.ask(Frame(FrameType.ATTESTATION_REQUEST, 3, bytes(32)))
            return await parent.health(), error_of(infer), error_of(attest)

    health, infer, attest = run(scenario())
    assert (health.state, health.step, health.error) == ("failed", 3, "kms_unavailable")
    assert infer == attest == "not_ready"


def test_keeps_the_latest_credentials_and_answers_nothing(
    nsm: EmulatedNsm, address: Address, caplog: pytest.LogCaptureFixture
) -> None:
    first = Credentials("AKIAPARENT", "first-secret-value")
    latest = Credentials("AKIAPARENT", "latest-secret-value", "token-value", "2030-01-01T00:00:00Z")

    async def scenario() -> tuple[Credentials | None, Credentials, list[Frame]]:
        async with enclave(address, None) as (server, parent):
            waiting = asyncio.create_task(server.wait_credentials())
            await parent.send(first.frame())
            got = await waiting
            assert got == first
            await parent.send(latest.frame())
            # refused: not on stream 0, and a malformed payload
            await parent.send(Frame(FrameType.CREDENTIALS, 4, first.encode()))
            await parent.send(Frame(FrameType.CREDENTIALS, 0, b"\xa1\x61x\x00"))
            await parent.health()  # every earlier frame has been handled
            return server.credentials, got, parent.received

    caplog.set_level(logging.DEBUG)
    stored, _, frames = run(scenario())
    assert stored == latest
    assert [f.type for f in frames] == [FrameType.HEALTH_PONG]  # no answer to credentials
    assert "secret-value" not in caplog.text


# --- Attestation ------------------------------------------------------------------------------


def test_attestation_binds_nonce_ohttp_key_and_user_data(
    nsm: EmulatedNsm, address: Address
) -> None:
    ready = make_ready(nsm)
    nonce = Nonce.random()

    async def scenario() -> Frame:
        async with enclave(address, ready) as (_, parent):
            return await parent.ask(Frame(FrameType.ATTESTATION_REQUEST, 8, nonce.value))

    answer = run(scenario())
    assert (answer.type, answer.stream_id) == (FrameType.ATTESTATION_RESPONSE, 8)
    user_data = attestation_user_data(ready.key.key_config, MODEL_ID, MANIFEST_SHA256)
    policy = Policy.expect(
        _measure.application_measurements(),
        nonce=nonce,
        max_age=timedelta(minutes=1),
        public_key=ready.key.public_key,
        user_data=user_data,
    )
    verified = verify(
        answer.payload, roots=[TrustRoot.local(nsm.root_pem)], now=datetime.now(UTC), policy=policy
    )
    assert not verified.is_nitro_hardware
    fields = cbor2.loads(verified.user_data)
    assert fields == {
        "v": 1,
        "ohttp_key_config": ready.key.key_config,
        "model_id": MODEL_ID,
        "manifest_sha256": MANIFEST_SHA256,
    }
    # what a consumer checks before encrypting: the configuration's key is the attested one
    assert KeyConfig.from_bytes(fields["ohttp_key_config"]).public_key == verified.public_key
    assert len(verified.public_key or b"") == 32


@pytest.mark.parametrize("size", [0, 15, 65])
def test_rejects_attestation_nonce_of_wrong_size(
    nsm: EmulatedNsm, address: Address, size: int
) -> None:
    async def scenario() -> Frame:
        async with enclave(address, make_ready(nsm)) as (_, parent):
            return await parent.ask(Frame(FrameType.ATTESTATION_REQUEST, 2, bytes(size)))

    assert error_of(run(scenario())) == "malformed"


def test_refuses_attestation_before_ready(nsm: EmulatedNsm, address: Address) -> None:
    async def scenario() -> Frame:
        async with enclave(address, None) as (_, parent):
            return await parent.ask(Frame(FrameType.ATTESTATION_REQUEST, 2, bytes(32)))

    assert error_of(run(scenario())) == "not_ready"


# --- Inference --------------------------------------------------------------------------------


def test_single_request_round_trip(nsm: EmulatedNsm, address: Address) -> None:
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(3))
            return await parent.until_end(3)

    response = single_response(consumer, run(scenario()))
    assert response.text == PROMPT
    assert response.finish_reason == "stop"
    assert response.usage.completion_tokens == len(PROMPT.split())


@pytest.mark.parametrize("split", [True, False], ids=["two_chunks", "final_chunk_only"])
def test_streamed_request_round_trip_one_chunk_per_piece(
    nsm: EmulatedNsm, address: Address, split: bool
) -> None:
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED, split=split)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(5))
            return await parent.until_end(5)

    frames = run(scenario())
    pieces = streamed_pieces(consumer, frames)
    words = len(PROMPT.split())
    assert len(frames) == words + 2  # a chunk per piece, the final chunk, the end
    assert all(isinstance(p, StreamDelta) for p in pieces[:-1])
    assert "".join(p.text for p in pieces if isinstance(p, StreamDelta)) == PROMPT
    end = pieces[-1]
    assert isinstance(end, StreamEnd)
    assert (end.finish_reason, end.usage.completion_tokens) == ("stop", words)


def test_max_tokens_ends_the_stream_with_length(nsm: EmulatedNsm, address: Address) -> None:
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED, max_tokens=3)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(5))
            return await parent.until_end(5)

    pieces = streamed_pieces(consumer, run(scenario()))
    assert len(pieces) == 4
    end = pieces[-1]
    assert isinstance(end, StreamEnd)
    assert (end.finish_reason, end.usage.completion_tokens) == ("length", 3)


def test_rejects_request_for_another_key_id_as_unknown_key(
    nsm: EmulatedNsm, address: Address
) -> None:
    ready = make_ready(nsm)
    _, stale = generate_key_config((ready.key.key_id + 1) % 256)

    async def scenario() -> list[str]:
        async with enclave(address, ready) as (_, parent):
            codes = []
            for stream, mode in ((2, InferMode.SINGLE), (4, InferMode.CHUNKED)):
                answer = await parent.ask(consumer_request(stale, mode=mode).frame(stream))
                codes.append(error_of(answer))
            return codes

    assert run(scenario()) == ["unknown_key", "unknown_key"]


def _tampered(consumer: Consumer) -> bytes:
    payload = bytearray(consumer.payload)
    payload[-1] ^= 0x01
    return bytes(payload)


def _truncated(consumer: Consumer) -> bytes:
    return consumer.payload[:-20]


@pytest.mark.parametrize("mode", list(InferMode))
@pytest.mark.parametrize("attack", [_tampered, _truncated], ids=["bit_flip", "truncated"])
def test_rejects_tampered_ciphertext_as_malformed(
    nsm: EmulatedNsm, address: Address, mode: InferMode, attack: Any
) -> None:
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config, mode=mode)

    async def scenario() -> Frame:
        async with enclave(address, ready) as (_, parent):
            return await parent.ask(Frame(FrameType.INFER_REQUEST, 6, attack(consumer)))

    assert error_of(run(scenario())) == "malformed"


def test_rejects_request_sealed_to_an_impostor_key_with_our_key_id(
    nsm: EmulatedNsm, address: Address
) -> None:
    ready = make_ready(nsm)
    _, impostor = generate_key_config(ready.key.key_id)

    async def scenario() -> Frame:
        async with enclave(address, ready) as (_, parent):
            return await parent.ask(consumer_request(impostor).frame(6))

    assert error_of(run(scenario())) == "malformed"


@pytest.mark.parametrize(("mode", "stream"), [(InferMode.SINGLE, True), (InferMode.CHUNKED, False)])
def test_rejects_stream_flag_disagreeing_with_the_mode(
    nsm: EmulatedNsm, address: Address, mode: InferMode, stream: bool
) -> None:
    ready = make_ready(nsm)

    async def scenario() -> Frame:
        async with enclave(address, ready) as (_, parent):
            request = consumer_request(ready.key.key_config, mode=mode, stream=stream)
            return await parent.ask(request.frame(2))

    assert error_of(run(scenario())) == "malformed"


def test_rejects_input_the_runtime_refuses_as_malformed(nsm: EmulatedNsm, address: Address) -> None:
    ready = make_ready(nsm, RefusingRuntime())

    async def scenario() -> Frame:
        async with enclave(address, ready) as (_, parent):
            return await parent.ask(consumer_request(ready.key.key_config).frame(2))

    assert error_of(run(scenario())) == "malformed"


def test_refuses_inference_before_ready(nsm: EmulatedNsm, address: Address) -> None:
    _, config = generate_key_config(3)

    async def scenario() -> Frame:
        async with enclave(address, None) as (_, parent):
            return await parent.ask(consumer_request(config).frame(2))

    assert error_of(run(scenario())) == "not_ready"


@pytest.mark.parametrize(
    "payload", [b"\x02" + bytes(40), b"\x00"], ids=["unknown_mode", "mode_without_request"]
)
def test_rejects_malformed_infer_request_frame(
    nsm: EmulatedNsm, address: Address, payload: bytes
) -> None:
    async def scenario() -> Frame:
        async with enclave(address, make_ready(nsm)) as (_, parent):
            return await parent.ask(Frame(FrameType.INFER_REQUEST, 2, payload))

    assert error_of(run(scenario())) == "malformed"


def test_refuses_request_over_the_concurrency_limit_as_busy(
    nsm: EmulatedNsm, address: Address
) -> None:
    gate = threading.Event()
    runtime = EndlessRuntime(gate=gate)
    ready = make_ready(nsm, runtime)
    config = ready.key.key_config

    async def scenario() -> tuple[str, Health, list[Frame]]:
        async with enclave(address, ready, max_concurrency=1) as (_, parent):
            await parent.send(consumer_request(config, mode=InferMode.CHUNKED).frame(2))
            await asyncio.to_thread(runtime.started.acquire, timeout=5)
            busy = error_of(await parent.ask(consumer_request(config).frame(4)))
            health = await parent.health()
            runtime.generations[0].fail_after = 2  # let it end (with an error) after two pieces
            gate.set()
            return busy, health, await parent.until_end(2)

    busy, health, frames = run(scenario())
    assert busy == "busy"
    assert health.active == 1
    assert error_of(frames[-1]) == "internal"


def test_answers_oversized_request_too_large_and_keeps_the_connection(
    nsm: EmulatedNsm, address: Address
) -> None:
    async def scenario() -> tuple[Frame, Health]:
        async with enclave(address, make_ready(nsm)) as (_, parent):
            payload = b"\x00" + bytes(MAX_INFER_REQUEST + 1)
            parent.writer.write(
                encode_frame(Frame(FrameType.INFER_REQUEST, 7, payload), max_payload=len(payload))
            )
            answer = await parent.recv()
            return answer, await parent.health()

    answer, health = run(scenario())
    assert answer.stream_id == 7
    assert error_of(answer) == "too_large"
    assert health.ready


def test_closes_connection_on_frame_beyond_the_discard_limit(
    nsm: EmulatedNsm, address: Address
) -> None:
    async def scenario() -> None:
        async with enclave(address, make_ready(nsm)) as (_, parent):
            header = b"NF\x01\x20" + (7).to_bytes(4, "big") + (MAX_DISCARD + 1).to_bytes(4, "big")
            parent.writer.write(header)
            with pytest.raises(ConnectionClosed):
                await parent.recv()

    run(scenario())


def test_closes_connection_that_trickles_a_frame(nsm: EmulatedNsm, address: Address) -> None:
    async def scenario() -> None:
        async with enclave(address, make_ready(nsm), frame_timeout=0.2) as (_, parent):
            parent.writer.write(b"NF\x01")
            with pytest.raises(ConnectionClosed):
                await parent.recv()

    run(scenario())


def test_serves_concurrent_streams_interleaved(nsm: EmulatedNsm, address: Address) -> None:
    ready = make_ready(nsm, EchoRuntime(delay=0.005))
    consumers = {
        2: consumer_request(ready.key.key_config, mode=InferMode.CHUNKED),
        4: consumer_request(ready.key.key_config, mode=InferMode.CHUNKED, prompt="other " * 20),
        6: consumer_request(ready.key.key_config),
    }

    async def scenario() -> list[Frame]:
        async with enclave(address, ready, max_concurrency=3) as (_, parent):
            for stream, consumer in consumers.items():
                await parent.send(consumer.frame(stream))
            ended: set[int] = set()
            while len(ended) < len(consumers):
                frame = await parent.recv()
                if frame.type in ENDS:
                    ended.add(frame.stream_id)
            return parent.received

    frames = run(scenario())
    by_stream = {s: [f for f in frames if f.stream_id == s] for s in consumers}
    assert (
        "".join(
            p.text
            for p in streamed_pieces(consumers[2], by_stream[2])
            if isinstance(p, StreamDelta)
        )
        == PROMPT
    )
    assert len(streamed_pieces(consumers[4], by_stream[4])) == 21
    assert single_response(consumers[6], by_stream[6]).text == PROMPT
    order = [f.stream_id for f in frames]
    first_end = min(frames.index(by_stream[s][-1]) for s in (2, 4))
    assert {2, 4} <= set(order[:first_end])  # both streams were producing at the same time


def test_dropped_connection_stops_generation(nsm: EmulatedNsm, address: Address) -> None:
    runtime = EndlessRuntime()
    ready = make_ready(nsm, runtime)

    async def scenario() -> None:
        async with enclave(address, ready) as (server, parent):
            await parent.send(
                consumer_request(ready.key.key_config, mode=InferMode.CHUNKED).frame(2)
            )
            first = await parent.recv()
            assert first.type == FrameType.INFER_RESPONSE_CHUNK
            await parent.close()
            generation = runtime.generations[0]
            assert await asyncio.to_thread(generation.closed.wait, 5)
            for _ in range(100):
                if server.stats.active == 0:
                    break
                await asyncio.sleep(0.01)
            assert server.stats.active == 0
            produced = generation.produced
            await asyncio.sleep(0.05)
            assert generation.produced == produced  # nothing after the close

    run(scenario())


def test_parent_error_frame_cancels_its_stream(nsm: EmulatedNsm, address: Address) -> None:
    runtime = EndlessRuntime()
    ready = make_ready(nsm, runtime)

    async def scenario() -> Health:
        async with enclave(address, ready) as (_, parent):
            await parent.send(
                consumer_request(ready.key.key_config, mode=InferMode.CHUNKED).frame(2)
            )
            await parent.recv()
            await parent.send(ErrorPayload("cancelled", "the consumer left").frame(2))
            assert await asyncio.to_thread(runtime.generations[0].closed.wait, 5)
            while True:  # drain what was in flight, then the connection answers health
                frame = await parent.ask(Frame(FrameType.HEALTH_PING, 9, b""))
                if frame.type == FrameType.HEALTH_PONG:
                    return Health.decode(frame.payload)

    health = run(scenario())
    assert health.ready


def test_second_request_on_an_open_stream_ends_it_as_malformed(
    nsm: EmulatedNsm, address: Address
) -> None:
    runtime = EndlessRuntime()
    ready = make_ready(nsm, runtime)
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(2))
            await parent.recv()
            await parent.send(consumer.frame(2))
            frames = await parent.until_end(2)
            assert await asyncio.to_thread(runtime.generations[0].closed.wait, 5)
            return frames

    frames = run(scenario())
    assert error_of(frames[-1]) == "malformed"
    assert len(runtime.generations) == 1  # the second request was not run


@pytest.mark.parametrize(
    "frame",
    [
        Frame(FrameType.INFER_REQUEST, 0, b"\x00" + bytes(40)),
        Frame(FrameType.BUNDLE_REQUEST, 3, b""),
        Frame(FrameType.INFER_RESPONSE_CHUNK, 3, b"x"),
        Frame(FrameType.HEALTH_PING, 3, b"x"),
    ],
    ids=["request_on_stream_zero", "bundle_request", "response_from_parent", "ping_with_payload"],
)
def test_answers_frames_that_break_the_protocol_as_malformed(
    nsm: EmulatedNsm, address: Address, frame: Frame
) -> None:
    async def scenario() -> Frame:
        async with enclave(address, make_ready(nsm)) as (_, parent):
            return await parent.ask(frame)

    answer = run(scenario())
    assert (answer.stream_id, error_of(answer)) == (frame.stream_id, "malformed")


def test_runtime_failure_mid_stream_is_internal_and_logged_by_type_only(
    nsm: EmulatedNsm, address: Address, caplog: pytest.LogCaptureFixture
) -> None:
    ready = make_ready(nsm, EndlessRuntime(fail_after=2))
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(2))
            return await parent.until_end(2)

    caplog.set_level(logging.DEBUG)
    frames = run(scenario())
    assert [f.type for f in frames[:2]] == [FrameType.INFER_RESPONSE_CHUNK] * 2
    assert error_of(frames[-1]) == "internal"
    assert "RuntimeError" in caplog.text
    assert "SECRET-COMPLETION" not in caplog.text


def test_limits_connections(nsm: EmulatedNsm, address: Address) -> None:
    async def scenario() -> None:
        async with enclave(address, make_ready(nsm), max_connections=1) as (_, parent):
            extra = await Parent.connect(address)
            with pytest.raises((ConnectionClosed, TransportError)):
                await extra.ask(Frame(FrameType.HEALTH_PING, 1, b""))
            await extra.close()
            assert (await parent.health()).ready

    run(scenario())


def test_no_plaintext_leaves_the_enclave_or_reaches_its_logs(
    nsm: EmulatedNsm, address: Address, caplog: pytest.LogCaptureFixture
) -> None:
    ready = make_ready(nsm, EchoRuntime())
    config = ready.key.key_config
    good = [
        consumer_request(config),
        consumer_request(config, mode=InferMode.CHUNKED),
    ]
    bad = [
        consumer_request(config, stream=True),  # mode mismatch: decrypted, then refused
        consumer_request(generate_key_config((ready.key.key_id + 1) % 256)[1]),
    ]

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            for stream, consumer in enumerate(good + bad, start=1):
                await parent.send(consumer.frame(stream))
                await parent.until_end(stream)
            await parent.send(Frame(FrameType.INFER_REQUEST, 9, _tampered(good[0])))
            await parent.until_end(9)
            return parent.received

    caplog.set_level(logging.DEBUG)
    frames = run(scenario())
    secret = PROMPT.split()[0].encode()
    for frame in frames:
        assert secret not in frame.payload
        if frame.type == FrameType.ERROR:
            assert "SECRET" not in ErrorPayload.decode(frame.payload).message
    assert "SECRET" not in caplog.text
    assert sum(f.type == FrameType.ERROR for f in frames) == 3


# --- The echo runtime ---------------------------------------------------------------------------


def test_echo_runtime_echoes_words_up_to_max_tokens() -> None:
    runtime = EchoRuntime()
    whole = runtime.generate("a bb  ccc", (), Params())
    assert list(whole) == ["a ", "bb  ", "ccc"]
    assert (whole.finish_reason, whole.prompt_tokens, whole.completion_tokens) == ("stop", 3, 3)
    cut = runtime.generate("a bb ccc", (), Params(max_tokens=2))
    assert "".join(cut) == "a bb "
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 2)


# --- Length side channels, replays and key rotation ----------------------------------------------


def test_single_answers_yes_and_no_seal_to_the_same_length(
    nsm: EmulatedNsm, address: Address
) -> None:
    # the reviewer's table: "no" was 157 bytes on the wire, "yes" 158, "triangle" 163
    ready = make_ready(nsm)
    answers = ("no", "yes", "triangle", "purple square")
    consumers = [consumer_request(ready.key.key_config, prompt=a) for a in answers]

    async def scenario() -> list[list[Frame]]:
        async with enclave(address, ready) as (_, parent):
            out = []
            for stream, consumer in enumerate(consumers, start=1):
                await parent.send(consumer.frame(stream))
                out.append(await parent.until_end(stream))
            return out

    answered = run(scenario())
    assert len({len(frames[0].payload) for frames in answered}) == 1
    for answer, consumer, frames in zip(answers, consumers, answered, strict=True):
        assert single_response(consumer, frames).text == answer


def test_streamed_token_lengths_do_not_show_in_chunk_sizes(
    nsm: EmulatedNsm, address: Address
) -> None:
    # the reviewer's length_leak.py read every word's length off the chunk sizes
    secret = "my diagnosis is pancreatic adenocarcinoma stage two"
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED, prompt=secret)

    async def scenario() -> list[Frame]:
        async with enclave(address, ready) as (_, parent):
            await parent.send(consumer.frame(1))
            return await parent.until_end(1)

    frames = run(scenario())
    sizes = [len(f.payload) for f in frames[:-2]]  # the deltas: not the final chunk, not the end
    sizes[0] -= 32  # the first chunk carries the response nonce
    assert len(sizes) == len(secret.split())
    assert set(sizes) == {2 + 64 + 16}  # varint, a 64-byte padded piece, the AEAD tag
    pieces = streamed_pieces(consumer, frames)
    assert "".join(p.text for p in pieces if isinstance(p, StreamDelta)) == secret


@pytest.mark.parametrize("mode", list(InferMode))
def test_rejects_replayed_request(nsm: EmulatedNsm, address: Address, mode: InferMode) -> None:
    # the parent sends a consumer's ciphertext again to sample the answer's length and timing
    ready = make_ready(nsm)
    consumer = consumer_request(ready.key.key_config, mode=mode)

    async def scenario() -> tuple[list[Frame], list[Frame], list[Frame], int]:
        async with enclave(address, ready) as (server, parent):
            await parent.send(consumer.frame(1))
            first = await parent.until_end(1)
            await parent.send(consumer.frame(3))
            again = await parent.until_end(3)
            other = await Parent.connect(address)  # the record is the key's, not a connection's
            await other.send(consumer.frame(5))
            elsewhere = await other.until_end(5)
            await other.close()
            return first, again, elsewhere, server.stats.replays

    first, again, elsewhere, replays = run(scenario())
    assert first[-1].type == FrameType.INFER_RESPONSE_END
    assert [error_of(again[-1]), error_of(elsewhere[-1])] == ["malformed", "malformed"]
    assert len(again) == len(elsewhere) == 1  # nothing of the answer before the refusal
    assert replays == 2


def test_concurrent_replays_are_answered_once(nsm: EmulatedNsm, address: Address) -> None:
    ready = make_ready(nsm, EchoRuntime(delay=0.01))
    consumer = consumer_request(ready.key.key_config, mode=InferMode.CHUNKED)

    async def scenario() -> list[FrameType]:
        async with enclave(address, ready, max_concurrency=4) as (_, parent):
            for stream in (1, 3, 5, 7):
                await parent.send(consumer.frame(stream))
            ends: dict[int, FrameType] = {}
            while len(ends) < 4:
                frame = await parent.recv()
                if frame.type in ENDS:
                    ends[frame.stream_id] = frame.type
            return sorted(ends.values())

    ends = run(scenario())
    assert ends.count(FrameType.INFER_RESPONSE_END) == 1
    assert ends.count(FrameType.ERROR) == 3


def test_full_replay_record_rotates_the_key_and_old_requests_get_unknown_key(
    nsm: EmulatedNsm, address: Address
) -> None:
    ready = make_ready(nsm)
    old = ready.key

    async def scenario() -> tuple[list[str], Health, Frame, str, int]:
        async with enclave(address, ready, replay_capacity=2) as (server, parent):
            codes = []
            for stream in (1, 3, 5):  # two fill the record (and are served); the third is late
                request = consumer_request(old.key_config)
                await parent.send(request.frame(stream))
                last = (await parent.until_end(stream))[-1]
                codes.append("ok" if last.type == FrameType.INFER_RESPONSE_END else error_of(last))
            health = await parent.health()
            document = await parent.ask(Frame(FrameType.ATTESTATION_REQUEST, 7, bytes(32)))
            current = server.ready_state
            assert current is not None
            fresh = consumer_request(current.key.key_config)
            await parent.send(fresh.frame(9))
            last = (await parent.until_end(9))[-1]
            answered = "ok" if last.type == FrameType.INFER_RESPONSE_END else error_of(last)
            return codes, health, document, answered, server.stats.key_rotations

    codes, health, document, answered, rotations = run(scenario())
    assert codes == ["ok", "ok", "unknown_key"]
    assert health.key_id != old.key_id
    assert rotations == 1
    assert document.type == FrameType.ATTESTATION_RESPONSE
    assert old.public_key not in document.payload  # the document binds the new key
    assert answered == "ok"


def test_rotated_key_id_never_equals_the_previous_one() -> None:
    # a restarted or rotated key that drew the old id would make stale requests fail to decrypt
    # ("malformed") instead of telling the consumer to re-attest ("unknown_key")
    for key_id in range(256):
        assert OhttpKey.generate(exclude=key_id).key_id != key_id
    with pytest.raises(ConfigError):
        OhttpKey.generate(exclude=256)


def test_rotate_key_is_refused_before_ready(address: Address) -> None:
    with pytest.raises(ConfigError):
        EnclaveServer(address).rotate_key()


# --- Connection slots and stream budgets ---------------------------------------------------------


@dataclass
class GatedNsm:
    """An NSM whose documents wait for ``gate`` (a busy or slow NSM)."""

    gate: threading.Event = field(default_factory=threading.Event)

    def attestation(self, *, nonce: bytes, public_key: bytes, user_data: bytes) -> bytes:
        self.gate.wait(5)
        return b"document"


def test_attestation_flood_does_not_make_inference_busy(nsm: EmulatedNsm, address: Address) -> None:
    # the reviewer's attest_backlog.py: attestations the parent gave up on (and never cancelled)
    # filled the connection's stream table and inference was refused "busy"
    slow = GatedNsm()
    ready = dataclasses.replace(make_ready(nsm), nsm=slow)  # type: ignore[arg-type]

    async def scenario() -> tuple[list[str], list[FrameType]]:
        async with enclave(address, ready, max_attestation_streams=4, max_streams=4) as (
            _,
            parent,
        ):
            for stream in range(1, 21, 2):  # 10 attestations; the NSM answers none yet
                await parent.send(Frame(FrameType.ATTESTATION_REQUEST, stream, bytes(16)))
            busy = [error_of(await parent.recv()) for _ in range(6)]
            ends = []
            for stream in (100, 102):
                await parent.send(consumer_request(ready.key.key_config).frame(stream))
                ends.append((await parent.until_end(stream))[-1].type)
            slow.gate.set()
            return busy, ends

    busy, ends = run(scenario())
    assert busy == ["busy"] * 6  # attestations over their own budget
    assert ends == [FrameType.INFER_RESPONSE_END] * 2  # inference is not affected


def test_wedged_parent_that_stops_reading_does_not_hold_a_connection_slot(
    nsm: EmulatedNsm, address: Address
) -> None:
    # the reviewer's wedged_close.py: the write deadline fired, but the close waited forever for
    # the parent to take the buffered answers, so the slot was never released
    async def scenario() -> tuple[int, Health]:
        async with enclave(address, make_ready(nsm), max_connections=1, write_timeout=0.3) as (
            server,
            wedged,
        ):
            wedged.writer.write(encode_frame(Frame(FrameType.HEALTH_PING, 1, b"")) * 20_000)
            await wedged.writer.drain()  # ask for 20000 answers and read none
            for _ in range(100):
                await asyncio.sleep(0.05)
                if not server._connections:
                    break
            left = len(server._connections)
            fresh = await Parent.connect(address)
            try:
                return left, await fresh.health()
            finally:
                await fresh.close()

    left, health = run(scenario())
    assert left == 0
    assert health.ready
