"""The enclave's loopback forwarder to the parent's KMS relay: bytes verbatim both ways, bounded
connections, idle timeouts and clean closes."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave.errors import ConfigError
from enclave.kmsforward import KmsForwarder
from protocol.transport import Address, parse_address


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nci-fwd-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Relay:
    """The parent's relay, as the forwarder sees it: echoes upper-cased bytes, records EOFs."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.connections = 0
        self.eofs = 0
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> Relay:
        assert self.address.path is not None
        self.server = await asyncio.start_unix_server(self._handle, self.address.path)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        self.eofs += 1
        writer.write(b"BYE")
        writer.close()


async def connect(forwarder: KmsForwarder) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", forwarder.port)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def relay_address(folder: Path) -> Address:
    return parse_address(f"unix://{folder}/kms.sock")


def test_pipes_bytes_both_ways_and_passes_the_end_on(folder: Path) -> None:
    async def scenario() -> tuple[bytes, int, int]:
        async with Relay(relay_address(folder)) as relay, KmsForwarder(relay.address) as fwd:
            assert fwd.port > 0
            reader, writer = await connect(fwd)
            writer.write(b"tls records")
            assert await reader.readexactly(11) == b"TLS RECORDS"
            writer.write_eof()  # half-close: the relay still answers
            rest = await reader.read()
            writer.close()
            return rest, relay.eofs, fwd.stats.accepted

    assert run(scenario()) == (b"BYE", 1, 1)


def test_listens_on_loopback_only(folder: Path) -> None:
    async def scenario() -> str:
        async with KmsForwarder(relay_address(folder)) as fwd:
            assert fwd._server is not None
            return str(fwd._server.sockets[0].getsockname()[0])

    assert run(scenario()) == "127.0.0.1"


def test_closes_the_client_when_the_relay_is_unreachable(folder: Path) -> None:
    async def scenario() -> tuple[bytes, int]:
        async with KmsForwarder(relay_address(folder), connect_timeout=1) as fwd:
            reader, writer = await connect(fwd)
            data = await reader.read()
            writer.close()
            return data, fwd.stats.relay_failures

    assert run(scenario()) == (b"", 1)


def test_refuses_connections_over_the_limit(folder: Path) -> None:
    async def scenario() -> tuple[bytes, bytes, int]:
        async with (
            Relay(relay_address(folder)) as relay,
            KmsForwarder(relay.address, max_connections=1) as fwd,
        ):
            first_reader, first_writer = await connect(fwd)
            first_writer.write(b"a")
            await first_reader.readexactly(1)
            second_reader, second_writer = await connect(fwd)
            refused = await second_reader.read()
            first_writer.write(b"b")
            still = await first_reader.readexactly(1)
            first_writer.close()
            second_writer.close()
            return refused, still, fwd.stats.refused

    assert run(scenario()) == (b"", b"B", 1)


def test_closes_idle_connections(folder: Path) -> None:
    async def scenario() -> tuple[bytes, int]:
        async with (
            Relay(relay_address(folder)) as relay,
            KmsForwarder(relay.address, idle_timeout=0.2) as fwd,
        ):
            reader, writer = await connect(fwd)
            writer.write(b"x")
            await reader.readexactly(1)
            data = await reader.read()  # nothing moves: closed after the idle timeout
            writer.close()
            await asyncio.sleep(0.05)
            return data, fwd.stats.active

    assert run(scenario()) == (b"", 0)


class FloodRelay(Relay):
    """A relay that answers with an endless stream of bytes."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(OSError):
            while True:
                writer.write(bytes(65536))
                await writer.drain()


def test_wedged_client_that_stops_reading_does_not_hold_its_connection(folder: Path) -> None:
    # the reviewer's wedged close: the drain deadline fires and the forwarder closes, but an
    # unbounded wait_closed() waited for the client to take the buffered bytes, forever
    async def scenario() -> tuple[int, int, bytes]:
        async with (
            FloodRelay(relay_address(folder)) as relay,
            KmsForwarder(relay.address, idle_timeout=0.2, close_timeout=0.2) as fwd,
        ):
            _, wedged = await connect(fwd)  # never reads
            for _ in range(100):
                await asyncio.sleep(0.05)
                if relay.connections and not fwd._tasks:
                    break
            open_tasks, active = len(fwd._tasks), fwd.stats.active
            reader, writer = await connect(fwd)  # the next client is served
            first = await reader.readexactly(4)
            writer.close()
            wedged.transport.abort()
            return open_tasks, active, first

    assert run(scenario()) == (0, 0, bytes(4))


def test_close_ends_open_connections(folder: Path) -> None:
    async def scenario() -> bytes:
        async with Relay(relay_address(folder)) as relay:
            fwd = KmsForwarder(relay.address)
            await fwd.start()
            reader, writer = await connect(fwd)
            writer.write(b"x")
            await reader.readexactly(1)
            await fwd.close()
            data = await reader.read()
            writer.close()
            await fwd.close()  # idempotent
            return data

    assert run(scenario()) == b""


def test_listens_on_a_given_address(folder: Path) -> None:
    """The same pipe in the other direction: how the tests stand in for the parent's relay."""

    async def scenario() -> bytes:
        listen = parse_address(f"unix://{folder}/front.sock")
        async with (
            Relay(relay_address(folder)) as relay,
            KmsForwarder(relay.address, listen=listen),
        ):
            assert listen.path is not None
            reader, writer = await asyncio.open_unix_connection(listen.path)
            writer.write(b"abc")
            data = await reader.readexactly(3)
            writer.close()
            return data

    assert run(scenario()) == b"ABC"


@pytest.mark.parametrize(
    "options",
    [
        {"max_connections": 0},
        {"connect_timeout": 0},
        {"idle_timeout": -1},
        {"idle_timeout": True},
        {"close_timeout": 0},
    ],
)
def test_rejects_impossible_limits(folder: Path, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        KmsForwarder(relay_address(folder), **options)
