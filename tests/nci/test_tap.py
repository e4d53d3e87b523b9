"""The recording relay and the leak finder used by the demo and the leak tests."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from nci.tap import MIN_LEAK, Tap, leaks
from protocol.transport import open_connection, parse_address, start_server


def test_leak_of_an_eight_byte_substring_anywhere_is_found() -> None:
    secret = os.urandom(300)
    for start in (0, 1, 7, 8, 100, 292):
        capture = os.urandom(1000) + secret[start : start + MIN_LEAK] + os.urandom(5)
        assert leaks([secret], [capture]) == [0]


def test_seven_bytes_of_a_secret_are_not_a_leak() -> None:
    secret = b"the prompt nobody may read"
    assert leaks([secret], [b"xx" + secret[3:10] + b"yy"]) == []


def test_only_the_leaked_secrets_are_named() -> None:
    a, b, c = b"first: a prompt", b"second: an image", b"third: the completion"
    assert leaks([a, b, c], [b"...", b"zz" + c[6:16]]) == [2]


def test_a_secret_too_short_to_check_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 8"):
        leaks([b"short"], [b"anything"])


def test_empty_and_tiny_captures_hold_no_leak() -> None:
    assert leaks([b"0123456789"], [b"", b"0123456"]) == []


def test_tap_relays_both_ways_and_records_everything(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while data := await reader.read(1024):
                writer.write(data[::-1])
                await writer.drain()
            writer.close()

        upstream = parse_address(f"unix://{tmp_path}/up.sock")
        server = await start_server(upstream, echo)
        tap = Tap("test", parse_address(f"unix://{tmp_path}/tap.sock"), upstream)
        await tap.start()
        reader, writer = await open_connection(tap.listen, timeout=5)
        writer.write(b"ciphertext-ish")
        await writer.drain()
        answer = await asyncio.wait_for(reader.readexactly(14), 5)
        writer.close()
        await tap.close()
        server.close()
        assert tap.connections == 1
        return answer + b"|" + bytes(tap.captured)

    out = asyncio.run(scenario())
    assert out == b"hsi-txetrehpic|ciphertext-ishhsi-txetrehpic"


def test_tap_with_upstream_down_closes_the_client(tmp_path: Path) -> None:
    async def scenario() -> bytes:
        tap = Tap(
            "down",
            parse_address(f"unix://{tmp_path}/tap.sock"),
            parse_address(f"unix://{tmp_path}/nothing.sock"),
        )
        await tap.start()
        reader, writer = await open_connection(tap.listen, timeout=5)
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        await tap.close()
        return data

    assert asyncio.run(scenario()) == b""
