"""Transport addresses as URLs, and the sockets behind them, each with a deadline.

One parser turns every address the system uses into an :class:`Address`::

    vsock://CID:PORT          AF_VSOCK; CID and PORT are u32 (decimal). On AWS the enclave's CID
                              is chosen at launch (e.g. 16) and the parent is CID 3.
    unix:///abs/path.sock     AF_UNIX; an absolute path of at most 107 bytes (sun_path is 108
                              bytes including the terminating NUL). Local mode maps vsock to these,
                              the way Firecracker does.
    tcp://HOST:PORT           TCP; HOST is an IPv4 literal, a bracketed IPv6 literal
                              (``tcp://[::1]:8443``) or a DNS hostname; PORT is 1-65535.

Parsing is strict: lowercase scheme, decimal digits without sign, spaces or leading zeros, nothing
after the address (no query, fragment or user info). Anything else raises
:class:`~protocol.errors.ConfigError` naming the rule: addresses are our own configuration.

Every connect and every read made through this module has a deadline; a deadline passing, a refused
connection or a reset raises :class:`~protocol.errors.TransportError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import re
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

from protocol.errors import ConfigError, TransportError

__all__ = [
    "MAX_UNIX_PATH",
    "VMADDR_CID_ANY",
    "Address",
    "AddressKind",
    "ConnectionHandler",
    "connect",
    "listen",
    "open_connection",
    "parse_address",
    "start_server",
]

AddressKind = Literal["vsock", "unix", "tcp"]
ConnectionHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

MAX_UNIX_PATH: Final = 107  # sizeof(sockaddr_un.sun_path) = 108, minus the terminating NUL
U32_MAX: Final = 0xFFFF_FFFF
VMADDR_CID_ANY: Final = U32_MAX  # <linux/vm_sockets.h>: listen on every CID
DEFAULT_UNIX_MODE: Final = 0o660
DEFAULT_BACKLOG: Final = 64

_DECIMAL = re.compile(r"0|[1-9][0-9]{0,9}", re.ASCII)  # at most 10 digits: fits a u32 or less
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
_MAX_HOSTNAME = 253
_SCHEMES: Final = ("vsock", "unix", "tcp")


@dataclass(frozen=True)
class Address:
    """A parsed, valid transport address. Build one with :func:`parse_address` (or the
    constructor, which checks the same rules).

    ``vsock`` uses ``cid`` and ``port``; ``unix`` uses ``path``; ``tcp`` uses ``host`` and ``port``
    (``host`` is the bare IPv6 literal, without brackets).
    """

    kind: AddressKind
    cid: int | None = None
    port: int | None = None
    path: str | None = None
    host: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "vsock":
            _check_int(self.cid, "vsock CID", 0, U32_MAX)
            _check_int(self.port, "vsock port", 0, U32_MAX)
            if self.path is not None or self.host is not None:
                raise ConfigError("a vsock address has a CID and a port only")
        elif self.kind == "unix":
            _check_unix_path(self.path)
            if self.cid is not None or self.port is not None or self.host is not None:
                raise ConfigError("a unix address has a path only")
        elif self.kind == "tcp":
            _check_host(self.host)
            _check_int(self.port, "tcp port", 1, 65535)
            if self.cid is not None or self.path is not None:
                raise ConfigError("a tcp address has a host and a port only")
        else:
            raise ConfigError(f"address kind must be one of {', '.join(_SCHEMES)}")

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        if self.kind == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host is not None and ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``vsock://CID:PORT``, ``unix:///abs/path`` or ``tcp://HOST:PORT``.

    ``text`` is configuration (a flag, a file); raises :class:`ConfigError` naming the broken rule.
    """
    if not isinstance(text, str):
        raise ConfigError(f"an address must be text, not {type(text).__name__}")
    # (1) scheme: exactly one of ours, lowercase, followed by "://"
    scheme, sep, rest = text.partition("://")
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(
            "an address must start with vsock://, unix:// or tcp:// "
            "(e.g. vsock://16:5000, unix:///run/nci/enclave.sock, tcp://127.0.0.1:8443)"
        )
    # (2) nothing that a URL would treat as user info, query or fragment, no whitespace/controls
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in rest):
        raise ConfigError(f"a {scheme} address must not contain whitespace or control characters")
    if scheme == "unix":
        # (3) unix: the authority is empty, so the path starts right after "unix://"
        if not rest.startswith("/"):
            raise ConfigError("a unix address needs an absolute path: unix:///abs/path.sock")
        return Address("unix", path=rest)
    if any(ch in rest for ch in "/?#@"):
        raise ConfigError(f"a {scheme} address has no path, query, fragment or user info")
    host, colon, port_text = rest.rpartition(":")
    if not colon:
        raise ConfigError(f"a {scheme} address needs a port: {scheme}://HOST:PORT")
    if scheme == "vsock":
        # (4) vsock: two decimal u32s
        return Address(
            "vsock",
            cid=_parse_decimal(host, "vsock CID"),
            port=_parse_decimal(port_text, "vsock port"),
        )
    # (5) tcp: IPv4 literal, [IPv6 literal] or hostname; port 1-65535
    if host.startswith("[") and host.endswith("]"):
        literal = host[1:-1]
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            raise ConfigError("a bracketed tcp host must be an IPv6 literal") from None
        host = literal
    elif ":" in host or "[" in host or "]" in host:
        raise ConfigError("an IPv6 tcp host must be in brackets: tcp://[::1]:8443")
    return Address("tcp", host=host, port=_parse_decimal(port_text, "tcp port"))


def _parse_decimal(text: str, what: str) -> int:
    if not _DECIMAL.fullmatch(text):
        raise ConfigError(f"{what} must be a decimal number without sign or leading zeros")
    return int(text)


def _check_int(value: object, what: str, low: int, high: int) -> None:
    if type(value) is not int:
        raise ConfigError(f"{what} must be an integer")
    if not low <= value <= high:
        raise ConfigError(f"{what} must be in {low}..{high}")


def _check_unix_path(path: object) -> None:
    if not isinstance(path, str) or not path.startswith("/"):
        raise ConfigError("a unix socket path must be absolute")
    if "\x00" in path:
        raise ConfigError("a unix socket path must not contain NUL")
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise ConfigError("a unix socket path must be encodable for the file system") from None
    if size > MAX_UNIX_PATH:
        raise ConfigError(f"a unix socket path is at most {MAX_UNIX_PATH} bytes; this is {size}")
    if path.endswith("/"):
        raise ConfigError("a unix socket path must name a file, not a directory")


def _check_host(host: object) -> None:
    if not isinstance(host, str) or not host:
        raise ConfigError("a tcp address needs a host")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    labels = name.split(".")
    if len(host) > _MAX_HOSTNAME or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(
            "a tcp host must be an IPv4 literal, a bracketed IPv6 literal or a DNS hostname "
            "(RFC 1123 labels: letters, digits, inner hyphens, 63 characters each)"
        )
    if labels[-1].isdigit():
        # "256.1.1.1", "1.2.3": looks numeric, is not an IPv4 literal (WHATWG URL, IPv4 parser)
        raise ConfigError("a numeric tcp host must be a valid IPv4 literal")


def _require_vsock() -> int:
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise ConfigError("AF_VSOCK is not available on this platform (Linux only)")
    return int(family)


def check_timeout(timeout: float) -> None:
    """A deadline must be a positive, finite number of seconds (shared with ``frames``)."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise ConfigError("a timeout must be a positive, finite number of seconds")


# -- asyncio -----------------------------------------------------------------------------------


async def open_connection(
    address: Address, *, timeout: float, limit: int = 2**16
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``address`` within ``timeout`` seconds.

    Raises :class:`TransportError` if the peer refuses or the deadline passes.
    """
    check_timeout(timeout)
    try:
        async with asyncio.timeout(timeout):
            if address.kind == "tcp":
                return await asyncio.open_connection(address.host, address.port, limit=limit)
            if address.kind == "unix":
                return await asyncio.open_unix_connection(_unix_path(address), limit=limit)
            sock = socket.socket(_require_vsock(), socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (address.cid, address.port))
                return await asyncio.open_connection(sock=sock, limit=limit)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise TransportError(f"connect to {address}: no answer within {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"connect to {address}: {_os_reason(exc)}") from None


async def start_server(
    address: Address,
    handler: ConnectionHandler,
    *,
    backlog: int = DEFAULT_BACKLOG,
    limit: int = 2**16,
    unix_mode: int = DEFAULT_UNIX_MODE,
) -> asyncio.AbstractServer:
    """Listen on ``address`` and call ``handler(reader, writer)`` for each connection.

    For ``unix`` addresses the socket file gets ``unix_mode`` (default 0660) before anyone can
    connect, and a stale socket file is replaced; any other kind of file at the path is left
    alone (:class:`ConfigError`). The handler owns the deadlines of its own reads.
    """
    if address.kind == "tcp":
        try:
            return await asyncio.start_server(
                handler, address.host, address.port, backlog=backlog, limit=limit
            )
        except OSError as exc:
            raise TransportError(f"listen on {address}: {_os_reason(exc)}") from None
    sock = _bound_socket(address, unix_mode=unix_mode)
    try:
        sock.setblocking(False)
        return await asyncio.start_server(handler, sock=sock, backlog=backlog, limit=limit)
    except BaseException:
        sock.close()
        raise


# -- blocking ----------------------------------------------------------------------------------


def connect(address: Address, *, timeout: float) -> socket.socket:
    """Connect to ``address`` within ``timeout`` seconds; the returned socket keeps ``timeout`` as
    its per-operation timeout, so no later read or write blocks forever.

    Raises :class:`TransportError` if the peer refuses or the deadline passes.
    """
    check_timeout(timeout)
    try:
        if address.kind == "tcp":
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
        else:
            family = socket.AF_UNIX if address.kind == "unix" else _require_vsock()
            target = _unix_path(address) if address.kind == "unix" else (address.cid, address.port)
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(target)
            except BaseException:
                sock.close()
                raise
    except TimeoutError:
        raise TransportError(f"connect to {address}: no answer within {timeout} s") from None
    except OSError as exc:
        raise TransportError(f"connect to {address}: {_os_reason(exc)}") from None
    sock.settimeout(timeout)
    return sock


def listen(
    address: Address, *, backlog: int = DEFAULT_BACKLOG, unix_mode: int = DEFAULT_UNIX_MODE
) -> socket.socket:
    """A blocking listening socket on ``address`` (for the enclave's simple loops).

    Accepted sockets are blocking: give each a timeout (``settimeout``) before reading from it.
    Same unix-socket rules as :func:`start_server`.
    """
    if address.kind == "tcp":
        try:
            sock = socket.create_server(
                (address.host or "", address.port or 0),
                family=socket.AF_INET6 if ":" in (address.host or "") else socket.AF_INET,
                backlog=backlog,
            )
        except OSError as exc:
            raise TransportError(f"listen on {address}: {_os_reason(exc)}") from None
        return sock
    sock = _bound_socket(address, unix_mode=unix_mode)
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise TransportError(f"listen on {address}: {_os_reason(exc)}") from None
    return sock


def _bound_socket(address: Address, *, unix_mode: int) -> socket.socket:
    """A bound, not yet listening, unix or vsock socket. Until ``listen()`` connects are refused,
    so the unix socket file's mode is set before anyone can reach it."""
    if address.kind == "vsock":
        sock = socket.socket(_require_vsock(), socket.SOCK_STREAM)
        try:
            sock.bind((address.cid, address.port))
        except OSError as exc:
            sock.close()
            raise TransportError(f"bind {address}: {_os_reason(exc)}") from None
        return sock
    path = _unix_path(address)
    # (1) a stale socket file from an earlier run is replaced; anything else is not ours to delete
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ConfigError(f"unix socket path {path}: {_os_reason(exc)}") from None
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise ConfigError(f"unix socket path {path} exists and is not a socket; not replacing")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # (2) bind creates the file; (3) chmod before listen(), so nobody connects in between
        sock.bind(path)
        os.chmod(path, unix_mode)
    except OSError as exc:
        sock.close()
        raise TransportError(f"bind {address}: {_os_reason(exc)}") from None
    return sock


def _unix_path(address: Address) -> str:
    if address.path is None:  # unreachable for a checked Address; keeps the types honest
        raise ConfigError(f"{address.kind} address has no unix path")
    return address.path


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__
