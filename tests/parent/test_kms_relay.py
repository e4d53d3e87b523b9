"""The blind KMS relay: bytes verbatim both ways to ONE upstream, bounded, never inspected."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from parent.kms_relay import KmsRelay, upstream_allowed
from protocol.errors import ConfigError
from protocol.transport import Address, open_connection, parse_address


@contextlib.asynccontextmanager
async def echo_upstream() -> AsyncIterator[Address]:
    """A TCP server on 127.0.0.1 that echoes every byte, half-closing when its client does."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        yield Address("tcp", host="127.0.0.1", port=port)
    finally:
        server.close()
        await server.wait_closed()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def listen_address(tmp_path: Path) -> Address:
    return Address("unix", path=str(tmp_path / "kms.sock"))


def test_relay_pipes_bytes_both_ways_verbatim(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)  # opaque bytes (TLS records, on AWS)

    async def run() -> tuple[bytes, KmsRelay]:
        async with (
            echo_upstream() as upstream,
            KmsRelay(listen_address(tmp_path), upstream) as relay,
        ):
            reader, writer = await open_connection(relay.listen, timeout=2)

            async def send() -> None:
                writer.write(payload)
                await writer.drain()
                writer.write_eof()  # the half-close reaches the upstream, which then ends

            sender = asyncio.create_task(send())
            async with asyncio.timeout(5):
                echoed = await reader.read(-1)
            await sender
            writer.close()
            await asyncio.sleep(0.05)
            return echoed, relay

    echoed, relay = asyncio.run(run())
    assert echoed == payload
    assert (relay.bytes_up, relay.bytes_down) == (len(payload), len(payload))
    assert (relay.connections, relay.active, relay.refused) == (1, 0, 0)


def test_relay_refuses_when_the_upstream_is_down(tmp_path: Path) -> None:
    upstream = Address("tcp", host="127.0.0.1", port=closed_port())

    async def run() -> tuple[bytes, float, KmsRelay]:
        async with KmsRelay(listen_address(tmp_path), upstream, connect_timeout=1) as relay:
            reader, writer = await open_connection(relay.listen, timeout=2)
            started = time.monotonic()
            writer.write(b"\x16\x03\x01 client hello")
            async with asyncio.timeout(3):
                answer = await reader.read(-1)
            writer.close()
            return answer, time.monotonic() - started, relay

    answer, elapsed, relay = asyncio.run(run())
    assert answer == b""  # closed without a byte
    assert elapsed < 1.5
    assert (relay.upstream_failures, relay.refused, relay.bytes_up) == (1, 1, 0)


def test_relay_refuses_connections_over_the_limit(tmp_path: Path) -> None:
    async def run() -> tuple[bytes, bytes, KmsRelay]:
        async with (
            echo_upstream() as upstream,
            KmsRelay(listen_address(tmp_path), upstream, max_connections=1) as relay,
        ):
            first_reader, first_writer = await open_connection(relay.listen, timeout=2)
            first_writer.write(b"one")
            first = await first_reader.readexactly(3)  # the first connection is open and relaying
            second_reader, second_writer = await open_connection(relay.listen, timeout=2)
            async with asyncio.timeout(2):
                second = await second_reader.read(-1)
            for writer in (first_writer, second_writer):
                writer.close()
            return first, second, relay

    first, second, relay = asyncio.run(run())
    assert (first, second) == (b"one", b"")
    assert relay.refused == 1


def test_idle_connection_is_closed(tmp_path: Path) -> None:
    async def run() -> float:
        async with (
            echo_upstream() as upstream,
            KmsRelay(listen_address(tmp_path), upstream, idle_timeout=0.2) as relay,
        ):
            reader, writer = await open_connection(relay.listen, timeout=2)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            started = time.monotonic()
            async with asyncio.timeout(3):
                rest = await reader.read(-1)
            writer.close()
            assert rest == b""
            return time.monotonic() - started

    assert 0.15 < asyncio.run(run()) < 1.5


@pytest.mark.parametrize(
    ("upstream", "allowed"),
    [
        ("tcp://kms.us-east-1.amazonaws.com:443", True),
        ("tcp://kms-fips.us-gov-west-1.amazonaws.com:443", True),
        ("tcp://127.0.0.1:4566", True),
        ("tcp://[::1]:4566", True),
        ("tcp://localhost:5000", True),
        ("tcp://kms.us-east-1.amazonaws.com:80", False),
        ("tcp://s3.us-east-1.amazonaws.com:443", False),
        ("tcp://kms.us-east-1.amazonaws.com.evil.example:443", False),
        ("tcp://evil.example:443", False),
        ("tcp://169.254.169.254:80", False),  # IMDS: the enclave must not reach the role's keys
        ("tcp://10.0.0.5:443", False),
    ],
)
def test_upstream_must_be_on_the_default_allowlist(upstream: str, allowed: bool) -> None:
    assert upstream_allowed(parse_address(upstream)) is allowed


def test_explicit_allowlist_replaces_the_default(tmp_path: Path) -> None:
    listen = listen_address(tmp_path)
    kms = parse_address("tcp://kms.eu-west-1.amazonaws.com:443")
    with pytest.raises(ConfigError, match="allowlist"):
        KmsRelay(listen, kms, allowlist=["kms.us-east-1.amazonaws.com:443"])
    KmsRelay(listen, kms, allowlist=["kms.eu-west-1.amazonaws.com:443"])
    with pytest.raises(ConfigError, match="tcp"):
        KmsRelay(listen, Address("unix", path="/tmp/x.sock"))


def test_relay_never_logs_content(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    marker = b"KMS-REQUEST-BODY-5d1e"

    async def run() -> None:
        async with (
            echo_upstream() as upstream,
            KmsRelay(listen_address(tmp_path), upstream) as relay,
        ):
            reader, writer = await open_connection(relay.listen, timeout=2)
            writer.write(marker)
            await reader.readexactly(len(marker))
            writer.close()

    asyncio.run(run())
    assert marker.decode() not in caplog.text
