"""A blind TCP relay from the enclave to KMS, like AWS's ``vsock-proxy``.

The enclave has no network; its boto3 talks TLS to KMS through this relay, and TLS ends inside the
enclave, so the parent sees ciphertext only. The relay listens on an address (``vsock://3:8000`` on
AWS, ``unix://…`` locally) and, for each connection, opens a TCP connection to its ONE configured
upstream and copies bytes both ways. The enclave cannot choose where it goes: there is no request
header, no SNI routing, nothing in the byte stream the relay reads. It never inspects, logs or
keeps content; it counts connections and bytes.

Limits: ``max_connections`` at once (more are closed at once), a connect deadline to the upstream
(a connection whose upstream is down is closed without a byte), an idle deadline (no byte either
way for ``idle_timeout`` seconds ends the connection), half-close passed through (the TLS
close_notify, then FIN).

The upstream must be on the allowlist: by default AWS KMS regional endpoints on port 443
(``kms.REGION.amazonaws.com``, ``kms-fips.REGION.amazonaws.com``) and loopback (the local KMS);
an explicit ``allowlist`` replaces that. A misconfiguration fails at start, not at first use.

On AWS the same job can be done by the Nitro Enclaves CLI's own proxy; the equivalent of
``KmsRelay(vsock://ANY:8000 → tcp://kms.us-east-1.amazonaws.com:443)`` is::

    vsock-proxy 8000 kms.us-east-1.amazonaws.com 443 \\
        --config /etc/nitro_enclaves/vsock-proxy.yaml

with the allowlist file ``/etc/nitro_enclaves/vsock-proxy.yaml``::

    allowlist:
    - {address: kms.us-east-1.amazonaws.com, port: 443}

(``vsock-proxy`` also refuses an upstream that is not on its allowlist.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Collection
from typing import Any, Final

from protocol.errors import ConfigError
from protocol.transport import Address, check_timeout, start_server

__all__ = ["KmsRelay", "upstream_allowed"]

logger = logging.getLogger(__name__)

_PIECE: Final = 64 * 1024
_AWS_KMS = re.compile(r"kms(?:-fips)?\.[a-z]{2}(?:-[a-z]+)+-\d\.amazonaws\.com(?:\.cn)?", re.ASCII)


def upstream_allowed(upstream: Address, allowlist: Collection[str] | None = None) -> bool:
    """Whether ``upstream`` (``tcp://HOST:PORT``) may be relayed to.

    With ``allowlist`` (``"HOST:PORT"`` entries), exactly those; without, AWS KMS regional
    endpoints on 443 and loopback hosts on any port (the local KMS)."""
    if upstream.kind != "tcp" or upstream.host is None:
        return False
    if allowlist is not None:
        return f"{upstream.host}:{upstream.port}" in allowlist
    if upstream.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(upstream.host).is_loopback
    except ValueError:
        return upstream.port == 443 and bool(_AWS_KMS.fullmatch(upstream.host))


class KmsRelay:
    """Relays each connection on ``listen`` to ``upstream``, bytes verbatim, both ways.

    Use ``async with KmsRelay(listen, upstream) as relay:`` (or :meth:`start` / :meth:`close`).
    Counters (for metrics): :attr:`connections`, :attr:`refused`, :attr:`upstream_failures`,
    :attr:`bytes_up` (enclave → upstream), :attr:`bytes_down`, :attr:`active`.
    """

    def __init__(
        self,
        listen: Address,
        upstream: Address,
        *,
        allowlist: Collection[str] | None = None,
        max_connections: int = 32,
        connect_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        unix_mode: int = 0o660,
    ) -> None:
        if upstream.kind != "tcp":
            raise ConfigError("the KMS relay's upstream is a tcp://HOST:PORT address")
        if not upstream_allowed(upstream, allowlist):
            raise ConfigError(f"the KMS relay's upstream {upstream} is not on the allowlist")
        if type(max_connections) is not int or max_connections < 1:
            raise ConfigError("kms_relay.max_connections must be at least 1")
        check_timeout(connect_timeout)
        check_timeout(idle_timeout)
        self.listen = listen
        self.upstream = upstream
        self._max_connections = max_connections
        self._connect_timeout = float(connect_timeout)
        self._idle_timeout = float(idle_timeout)
        self._unix_mode = unix_mode
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.active = 0
        self.connections = 0
        self.refused = 0
        self.upstream_failures = 0
        self.bytes_up = 0
        self.bytes_down = 0

    async def start(self) -> None:
        if self._server is not None:
            raise ConfigError("the KMS relay is already started")
        self._server = await start_server(self.listen, self._handle, unix_mode=self._unix_mode)
        logger.info("KMS relay listening on %s for %s", self.listen, self.upstream)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> KmsRelay:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection from the enclave side; its bytes are opaque (TLS) and not looked at."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if self.active >= self._max_connections:
                self.refused += 1
                logger.warning("KMS relay: refused a connection (%d open)", self.active)
                return
            self.active += 1
            self.connections += 1
            try:
                await self._relay(reader, writer)
            finally:
                self.active -= 1
        finally:
            if task is not None:
                self._tasks.discard(task)
            await _close(writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # (1) the one upstream, within the connect deadline
        try:
            async with asyncio.timeout(self._connect_timeout):
                up_reader, up_writer = await asyncio.open_connection(
                    self.upstream.host, self.upstream.port
                )
        except (OSError, TimeoutError) as exc:
            self.upstream_failures += 1
            self.refused += 1
            reason = "timeout" if isinstance(exc, TimeoutError) else exc.strerror or "error"
            logger.warning("KMS relay: upstream %s unavailable (%s)", self.upstream, reason)
            return
        # (2) both directions until both have ended, or the connection goes idle
        last_activity = [time.monotonic()]
        up = asyncio.create_task(self._pump(reader, up_writer, "up", last_activity))
        down = asyncio.create_task(self._pump(up_reader, writer, "down", last_activity))
        try:
            await asyncio.gather(up, down)
        except (OSError, TimeoutError):
            # a reset or an idle connection: drop both sides, unflushed bytes included
            writer.transport.abort()
            up_writer.transport.abort()
        finally:
            up.cancel()
            down.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            await _close(up_writer)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        direction: str,
        last_activity: list[float],
    ) -> None:
        """Copy ``source`` to ``sink`` until EOF, then half-close ``sink``. Raises TimeoutError
        when neither direction has moved a byte for the idle timeout."""
        while True:
            idle = time.monotonic() - last_activity[0]
            try:
                async with asyncio.timeout(max(self._idle_timeout - idle, 0.001)):
                    data = await source.read(_PIECE)
            except TimeoutError:
                if time.monotonic() - last_activity[0] >= self._idle_timeout:
                    logger.info("KMS relay: connection idle for %s s; closing", self._idle_timeout)
                    raise
                continue  # the other direction was busy
            if not data:
                break
            last_activity[0] = time.monotonic()
            if direction == "up":
                self.bytes_up += len(data)
            else:
                self.bytes_down += len(data)
            sink.write(data)
            async with asyncio.timeout(self._idle_timeout):
                await sink.drain()  # backpressure: a slow side slows the other down
        if sink.can_write_eof():
            with contextlib.suppress(OSError):
                sink.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close after flushing what is buffered; a peer that does not take it within a second is
    dropped."""
    writer.close()
    try:
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass
