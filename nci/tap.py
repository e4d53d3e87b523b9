"""A recording relay: what crosses the parent, captured, so a run can show it was ciphertext.

``nci demo`` and the leak tests put a :class:`Tap` on every connection that crosses the parent
instance (consumer → bridge, parent → enclave control, enclave → bundle streamer, enclave → KMS
relay). Each tap listens on its own address, forwards every connection to the real one, and keeps a
copy of the bytes in both directions. :func:`leaks` then looks for any 8-byte or longer piece of a
secret (a prompt, an image, a completion) in what was captured.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from protocol.transport import Address, open_connection, start_server

__all__ = ["MIN_LEAK", "Tap", "leaks"]

MIN_LEAK = 8
"""A secret counts as leaked if any of its substrings of this many bytes appears in a capture."""

_PIPE_CHUNK = 256 * 1024


@dataclass
class Tap:
    """Relay connections from ``listen`` to ``upstream``, recording every byte both ways."""

    name: str
    listen: Address
    upstream: Address
    max_capture: int = 256 * 1024 * 1024  # past this, the tap fails the connection, not the check
    connect_timeout: float = 10.0
    captured: bytearray = field(default_factory=bytearray, repr=False)
    connections: int = 0
    _server: asyncio.AbstractServer | None = field(default=None, repr=False)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    @property
    def bytes_relayed(self) -> int:
        return len(self.captured)

    async def start(self) -> None:
        self._server = await start_server(self.listen, self._handle)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            up_reader, up_writer = await open_connection(
                self.upstream, timeout=self.connect_timeout
            )
        except Exception:  # noqa: BLE001 (upstream down: the client sees a closed connection)
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_PIPE_CHUNK):
                if len(self.captured) + len(data) > self.max_capture:
                    raise OverflowError(f"tap {self.name}: capture is over {self.max_capture}")
                self.captured += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OverflowError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()


def _windows(data: bytes | bytearray) -> np.ndarray:
    """Every 8-byte window of ``data`` as a uint64 (all offsets), sorted and unique."""
    parts = []
    for k in range(MIN_LEAK):
        usable = (len(data) - k) // MIN_LEAK * MIN_LEAK
        if usable > 0:
            parts.append(np.frombuffer(memoryview(data)[k : k + usable], dtype="<u8"))
    if not parts:
        return np.zeros(0, dtype="<u8")
    return np.unique(np.concatenate(parts))


def leaks(secrets: Iterable[bytes], captures: Iterable[bytes | bytearray]) -> list[int]:
    """Indexes of the ``secrets`` that have a substring of :data:`MIN_LEAK` bytes or more in one
    of the ``captures`` (a substring of 8+ bytes contains an 8-byte window, so windows suffice).
    Secrets shorter than 8 bytes cannot be checked and are refused."""
    secrets = list(secrets)
    for i, secret in enumerate(secrets):
        if len(secret) < MIN_LEAK:
            raise ValueError(f"secret {i} is shorter than {MIN_LEAK} bytes; it cannot be checked")
    wanted = [_windows(s) for s in secrets]
    every = np.unique(np.concatenate(wanted)) if wanted else np.zeros(0, dtype="<u8")
    hits: list[np.ndarray] = []
    for capture in captures:
        for k in range(MIN_LEAK):
            usable = (len(capture) - k) // MIN_LEAK * MIN_LEAK
            if usable > 0:
                seen = np.frombuffer(memoryview(capture)[k : k + usable], dtype="<u8")
                hits.append(seen[np.isin(seen, every)])
                del seen
    matched = np.unique(np.concatenate(hits)) if hits else np.zeros(0, dtype="<u8")
    found = [i for i, windows in enumerate(wanted) if np.isin(windows, matched).any()]
    return sorted(found)
