"""Closing a stream within a deadline.

``StreamWriter.close()`` flushes what is still buffered before the socket closes, and
``wait_closed()`` waits for that flush: a peer that stopped reading holds it (and whatever the
caller counts as a connection slot) forever. :func:`close_within` waits a bounded time, then drops
the buffered bytes and closes the socket at once (``transport.abort()``).
"""

from __future__ import annotations

import asyncio

__all__ = ["close_within"]


async def close_within(writer: asyncio.StreamWriter, timeout: float) -> None:
    """Close ``writer``; if the peer has not taken the buffered bytes within ``timeout`` seconds,
    abort the connection. Never raises for the connection's own failures."""
    writer.close()
    try:
        async with asyncio.timeout(timeout):
            await writer.wait_closed()
    except TimeoutError:
        # (the timeout cancelled the close waiter itself: waiting on it again would raise at once)
        writer.transport.abort()  # connection_lost follows on the next loop iteration
        await asyncio.sleep(0)
    except OSError:
        pass
