"""Faults at boot the enclave survives (issue 7), one level below the whole system: the enclave's
``serve()`` in this process, across its real edges (the local KMS behind a unix-socket relay, the
parent's bundle streamer, the emulated NSM, a control connection), with a fault put between the
enclave and the parent's services:

- KMS unavailable or slow: bounded, capped-exponential retries, health says the step and, once
  the boot gave up, the error code; a boot that gave up stays failed (no crash loop);
- a bundle stream cut in the middle of a chunk: the unlock resumes from the last verified chunk,
  and nothing unverified is ever handed out.

The relays here (:class:`FlakyKms`, :class:`CuttingRelay`) are shared with tests/test_faults.py,
which puts them in front of a whole system's enclave.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from enclave.boot import serve
from enclave.config import EnclaveConfig
from parent.bundlesource import FolderSource
from parent.streamer import BundleStreamer
from protocol.control import Health
from protocol.errors import ProtocolError, TransportError
from protocol.frames import (
    HEADER_SIZE,
    BundleChunk,
    BundleRequest,
    ConnectionClosed,
    FrameType,
    encode_frame,
    read_frame,
    write_frame,
)
from protocol.ohttp import generate_key_config
from protocol.transport import Address, open_connection, parse_address, start_server
from tests.assets import generate_bundle_vectors as tiny
from tests.enclave import test_boot
from tests.enclave.test_boot import PARENT, Booting, Loader, World, _connect, config_for, run
from tests.enclave.test_server import consumer_request, error_of

world = test_boot.world  # the module's own instances of the boot tests' fixtures
sockets = test_boot.sockets

# -- faults between the enclave and the parent's services ---------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        if writer.can_write_eof():
            writer.write_eof()


async def _relay(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, upstream: Address
) -> None:
    try:
        up_reader, up_writer = await open_connection(upstream, timeout=5)
    except TransportError:
        writer.transport.abort()
        return
    try:
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
    finally:
        up_writer.transport.abort()
        writer.transport.abort()


class FlakyKms:
    """The parent's KMS relay with KMS unavailable for its first ``fail`` connections (math.inf:
    all of them): each is closed at once, or with ``hang`` held open unanswered (a slow KMS) until
    the enclave gives up on it; later connections reach ``upstream``. :attr:`connections` counts
    every connection the enclave opened."""

    def __init__(self, upstream: Address, *, fail: float = 0, hang: bool = False) -> None:
        self.upstream = upstream
        self.fail = fail
        self.hang = hang
        self.connections = 0
        self._server: asyncio.AbstractServer | None = None

    async def start(self, listen: Address) -> None:
        self._server = await start_server(listen, self.handle)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.connections > self.fail:
            await _relay(reader, writer, self.upstream)
            return
        if self.hang:  # read (and drop) what the enclave sends until it hangs up
            with contextlib.suppress(OSError):
                while await reader.read(1 << 16):
                    pass
        writer.transport.abort()


class CuttingRelay:
    """A relay in front of the parent's bundle streamer that breaks ``cuts`` connections: the
    first ``cuts`` connections to reach chunk ``cut_at`` get that chunk's frame header and half
    its payload, then the connection is aborted (both ways). With ``tamper``, the first chunk
    after the cuts arrives with one ciphertext bit flipped. Records every connection's
    BUNDLE_REQUEST and, per cut, the chunks it delivered whole."""

    def __init__(
        self, upstream: Address, *, cut_at: int, cuts: float = 1, tamper: bool = False
    ) -> None:
        self.upstream = upstream
        self.cut_at = cut_at
        self.cuts = cuts
        self.tamper = tamper
        self.requests: list[BundleRequest] = []
        self.delivered_before_cut: list[int] = []
        self.tampered = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self, listen: Address) -> None:
        self._server = await start_server(listen, self._handle)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await open_connection(self.upstream, timeout=5)
        except TransportError:
            writer.transport.abort()
            return
        try:
            request = await read_frame(reader, timeout=10)
            self.requests.append(BundleRequest.decode(request.payload))
            await write_frame(up_writer, request, timeout=10)
            await asyncio.gather(_pipe(reader, up_writer), self._down(up_reader, writer))
        except (ProtocolError, OSError):
            pass
        finally:
            up_writer.transport.abort()
            writer.transport.abort()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        whole = 0
        while True:
            try:
                frame = await read_frame(reader, timeout=10)
            except ConnectionClosed:
                return
            if frame.type is FrameType.BUNDLE_CHUNK:
                chunk = BundleChunk.decode(frame.payload)
                if chunk.index == self.cut_at and len(self.delivered_before_cut) < self.cuts:
                    self.delivered_before_cut.append(whole)
                    writer.write(encode_frame(frame)[: HEADER_SIZE + len(frame.payload) // 2])
                    await writer.drain()
                    writer.transport.abort()
                    return
                if self.tamper and self.delivered_before_cut and not self.tampered:
                    self.tampered = True
                    sealed = bytearray(chunk.sealed)
                    sealed[len(sealed) // 2] ^= 0x01
                    frame = BundleChunk(chunk.index, bytes(sealed)).frame()
                whole += 1
            await write_frame(writer, frame, timeout=10)


# -- the enclave booting behind them ------------------------------------------------------------


@contextlib.asynccontextmanager
async def booting_behind(
    world: World,
    config: EnclaveConfig,
    *,
    kms: FlakyKms,
    bundles: CuttingRelay | None = None,
    **boot_options: Any,
) -> AsyncIterator[Booting]:
    """The parent's streamer and KMS relay with the faults in front, the enclave's ``serve()`` as
    a task, and a control connection to it (the credentials sent)."""
    async with contextlib.AsyncExitStack() as stack:
        streamer_at = config.bundle_streamer
        if bundles is not None:
            assert config.bundle_streamer.path is not None
            streamer_at = parse_address(f"unix://{config.bundle_streamer.path}.real")
            await bundles.start(config.bundle_streamer)
            stack.push_async_callback(bundles.close)
        streamer = BundleStreamer(streamer_at, {"tiny": FolderSource(world.bundle)})
        await stack.enter_async_context(streamer)
        await kms.start(config.kms_relay)
        stack.push_async_callback(kms.close)
        stop = asyncio.Event()
        boot_options.setdefault("load_runtime", Loader())
        task = asyncio.create_task(serve(config, stop=stop, **boot_options))
        parent = await _connect(config.control, task)
        try:
            await parent.send(PARENT.frame())
            yield Booting(parent, stop, task)
        finally:
            await parent.close()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)


def kms_of(world: World) -> Address:
    return parse_address(world.kms.endpoint_url.replace("http://", "tcp://"))


def retry_delays(text: str) -> list[float]:
    return [
        float(d) for d in re.findall(r"key release attempt \d+ of \d+ failed .*?(\d+\.\d) s", text)
    ]


# -- KMS unavailable or slow at boot -------------------------------------------------------------


def test_kms_slow_at_boot_is_retried_with_capped_backoff_then_failed_with_a_code(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """KMS accepts and never answers: each attempt ends at its read deadline, the delays between
    attempts double up to their cap, and after the last attempt health says which step failed and
    why. One KMS connection per attempt: bounded, no hammering."""
    kms = FlakyKms(kms_of(world), fail=math.inf, hang=True)
    config = config_for(world, sockets)
    options = {"attempts": 3, "backoff": 0.2, "max_backoff": 0.3, "kms_attempts": 1}

    async def scenario() -> tuple[list[Health], Health, float]:
        async with booting_behind(world, config, kms=kms, kms_timeout=0.3, **options) as enclave:
            started = time.monotonic()
            seen = [await enclave.health()]
            while seen[-1].state == "booting":
                await asyncio.sleep(0.05)
                seen.append(await enclave.health())
            return seen, seen[-1], time.monotonic() - started

    caplog.set_level(logging.INFO)
    seen, final, elapsed = run(scenario())
    # while retrying: booting at step 3, no error yet; then failed with the code
    assert {(h.state, h.step, h.name, h.error) for h in seen[:-1]} <= {
        ("booting", 1, "nsm", ""),
        ("booting", 2, "credentials", ""),
        ("booting", 3, "key release and unlock", ""),
    }
    assert (final.state, final.step, final.name, final.error) == (
        "failed",
        3,
        "key release and unlock",
        "kms_unavailable",
    )
    assert kms.connections == 3
    assert retry_delays(caplog.text) == [0.2, 0.3]  # 0.2 × 2ⁿ, capped at 0.3
    assert 3 * 0.3 + 0.5 <= elapsed < 10  # three read deadlines and the delays, then it stopped
    assert "KeyReleaseTimeout" in caplog.text
    assert "boot step 3 (key release and unlock) failed: kms_unavailable" in caplog.text


def test_kms_back_after_a_few_failures_lets_the_boot_finish(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kms = FlakyKms(kms_of(world), fail=2)
    config = config_for(world, sockets)

    async def scenario() -> Health:
        async with booting_behind(
            world, config, kms=kms, attempts=4, backoff=0.05, kms_attempts=1
        ) as enclave:
            return await enclave.settled()

    caplog.set_level(logging.INFO)
    health = run(scenario())
    assert (health.state, health.error) == ("ready", "")
    assert kms.connections == 3  # two refused, the third released the key
    assert len(retry_delays(caplog.text)) == 2


def test_kms_back_after_the_boot_gave_up_leaves_it_failed_without_a_crash_loop(
    world: World, sockets: Path
) -> None:
    """The boot gave up: it stays failed with its code and stays up answering health (so a
    launcher, which restarts only an enclave that exited, leaves it alone), and it never calls
    KMS again by itself, even once KMS is back."""
    kms = FlakyKms(kms_of(world), fail=2)
    config = config_for(world, sockets)

    async def scenario() -> tuple[Health, Health, int, bool, str]:
        async with booting_behind(
            world, config, kms=kms, attempts=2, backoff=0.05, kms_attempts=1
        ) as enclave:
            failed = await enclave.settled()
            gave_up_after = kms.connections
            kms.fail = 0  # KMS is back
            await asyncio.sleep(0.5)
            _, key_config = generate_key_config(1)
            refused = error_of(await enclave.parent.ask(consumer_request(key_config).frame(2)))
            later = await enclave.health()
            return failed, later, gave_up_after, enclave.task.done(), refused

    failed, later, gave_up_after, exited, refused = run(scenario())
    assert (failed.state, failed.error) == ("failed", "kms_unavailable")
    assert (later.state, later.step, later.error) == ("failed", 3, "kms_unavailable")
    assert gave_up_after == kms.connections == 2
    assert not exited
    assert refused == "not_ready"


# -- the bundle stream interrupted ----------------------------------------------------------------


def tensor_bytes(model: Any) -> dict[str, bytes]:
    return {
        name: tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        for name, tensor in model.tensors.items()
    }


def test_bundle_stream_cut_mid_chunk_resumes_from_the_last_verified_chunk(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream breaks in the middle of chunk 1 (chunk 0 arrived whole and verified): the
    enclave asks again from chunk 1, not from 0, and the model it hands out is the provider's,
    byte for byte."""
    kms = FlakyKms(kms_of(world))
    bundles = CuttingRelay(world_streamer(sockets), cut_at=1)
    config = config_for(world, sockets)
    loader = Loader()

    async def scenario() -> Health:
        async with booting_behind(
            world, config, kms=kms, bundles=bundles, load_runtime=loader, backoff=0.01
        ) as enclave:
            return await enclave.settled()

    caplog.set_level(logging.INFO)
    health = run(scenario())
    assert health.ready
    assert bundles.delivered_before_cut == [1]
    assert [r.from_chunk for r in bundles.requests] == [0, 1]
    assert kms.connections == 1  # the data key was released once, for both parts
    assert "bundle stream broke after 1 verified chunks" in caplog.text
    (model,) = loader.models
    assert tensor_bytes(model) == tiny.tensor_bytes()


def test_resumed_bundle_stream_with_a_tampered_chunk_is_refused_not_retried(
    world: World, sockets: Path
) -> None:
    """After the cut, the resumed stream's first chunk is altered: the boot fails with
    ``bundle_integrity`` at once (no more attempts) and no model is handed out."""
    kms = FlakyKms(kms_of(world))
    bundles = CuttingRelay(world_streamer(sockets), cut_at=1, tamper=True)
    config = config_for(world, sockets)
    loader = Loader()

    async def scenario() -> Health:
        async with booting_behind(
            world, config, kms=kms, bundles=bundles, load_runtime=loader, backoff=0.01
        ) as enclave:
            return await enclave.settled()

    health = run(scenario())
    assert (health.state, health.step, health.error) == ("failed", 3, "bundle_integrity")
    assert bundles.tampered
    assert [r.from_chunk for r in bundles.requests] == [0, 1]
    assert loader.models == []


def test_bundle_stream_cut_every_time_fails_after_bounded_attempts(
    world: World, sockets: Path
) -> None:
    """A streamer that breaks every connection: each boot attempt resumes a bounded number of
    times (the unlock's 3), the boot retries a bounded number of times (2 here), then health
    says ``transport``."""
    kms = FlakyKms(kms_of(world))
    bundles = CuttingRelay(world_streamer(sockets), cut_at=1, cuts=math.inf)
    config = config_for(world, sockets)

    async def scenario() -> Health:
        async with booting_behind(
            world, config, kms=kms, bundles=bundles, attempts=2, backoff=0.01
        ) as enclave:
            return await enclave.settled()

    health = run(scenario())
    assert (health.state, health.step, health.error) == ("failed", 3, "transport")
    assert [r.from_chunk for r in bundles.requests] == [0, 1, 1] * 2
    assert kms.connections == 2  # one key release per boot attempt


def world_streamer(sockets: Path) -> Address:
    """Where :func:`booting_behind` puts the real streamer when a relay stands in front."""
    return parse_address(f"unix://{sockets}/bundles.sock.real")
