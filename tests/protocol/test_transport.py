"""Transport addresses and sockets: one strict URL parser, deadlines on connect and read.

vsock addresses are parsed only: this machine's vsock CID 2 is its real host, so no test creates an
AF_VSOCK socket unless marked ``nitro`` (skipped unless NCI_NITRO=1). Live tests use unix sockets in
tmp_path and loopback TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
from pathlib import Path

import pytest

from protocol.errors import ConfigError, TransportError
from protocol.transport import (
    MAX_UNIX_PATH,
    Address,
    connect,
    listen,
    open_connection,
    parse_address,
    start_server,
)


def vsock(cid: int, port: int) -> Address:
    return Address("vsock", cid=cid, port=port)


def tcp(host: str, port: int) -> Address:
    return Address("tcp", host=host, port=port)


U32 = 2**32 - 1
KMS = "kms.eu-west-1.amazonaws.com"

GOOD = [
    ("vsock_enclave", "vsock://16:5000", Address("vsock", cid=16, port=5000)),
    ("vsock_parent", "vsock://3:8000", Address("vsock", cid=3, port=8000)),
    ("vsock_reserved_cid_0", "vsock://0:1", Address("vsock", cid=0, port=1)),
    ("vsock_reserved_cid_1", "vsock://1:1", Address("vsock", cid=1, port=1)),
    ("vsock_u32_max", "vsock://4294967295:4294967295", vsock(U32, U32)),
    ("vsock_port_0", "vsock://16:0", Address("vsock", cid=16, port=0)),
    ("unix", "unix:///run/nci/enclave.sock", Address("unix", path="/run/nci/enclave.sock")),
    ("unix_max_length", "unix:///" + "a" * 106, Address("unix", path="/" + "a" * 106)),
    ("tcp_ipv4", "tcp://127.0.0.1:8443", Address("tcp", host="127.0.0.1", port=8443)),
    ("tcp_ipv6", "tcp://[::1]:8443", Address("tcp", host="::1", port=8443)),
    ("tcp_ipv6_full", "tcp://[2001:db8::7]:1", Address("tcp", host="2001:db8::7", port=1)),
    ("tcp_hostname", f"tcp://{KMS}:443", tcp(KMS, 443)),
    ("tcp_localhost", "tcp://localhost:65535", Address("tcp", host="localhost", port=65535)),
    ("tcp_trailing_dot", "tcp://example.com.:80", Address("tcp", host="example.com.", port=80)),
]  # fmt: skip

BAD = [
    ("empty", ""),
    ("no_scheme", "16:5000"),
    ("unknown_scheme", "http://127.0.0.1:80"),
    ("uppercase_scheme", "VSOCK://16:5000"),
    ("single_slash", "vsock:/16:5000"),
    ("vsock_no_port", "vsock://16"),
    ("vsock_empty_cid", "vsock://:5000"),
    ("vsock_empty_port", "vsock://16:"),
    ("vsock_negative_cid", "vsock://-1:5000"),
    ("vsock_plus_sign", "vsock://+16:5000"),
    ("vsock_leading_zero", "vsock://016:5000"),
    ("vsock_cid_over_u32", "vsock://4294967296:5000"),
    ("vsock_port_over_u32", "vsock://16:4294967296"),
    ("vsock_huge_number", "vsock://16:" + "9" * 5000),
    ("vsock_hex", "vsock://0x10:5000"),
    ("vsock_unicode_digits", "vsock://١٦:5000"),
    ("vsock_spaces", "vsock:// 16:5000"),
    ("vsock_trailing_newline", "vsock://16:5000\n"),
    ("vsock_three_parts", "vsock://16:5000:1"),
    ("vsock_path", "vsock://16:5000/x"),
    ("vsock_query", "vsock://16:5000?x=1"),
    ("vsock_fragment", "vsock://16:5000#x"),
    ("vsock_userinfo", "vsock://u@16:5000"),
    ("unix_relative", "unix://run/nci.sock"),
    ("unix_empty", "unix://"),
    ("unix_directory", "unix:///run/nci/"),
    ("unix_too_long", "unix:///" + "a" * MAX_UNIX_PATH),
    ("unix_too_long_utf8", "unix:///" + "é" * 54),
    ("unix_nul", "unix:///run/a\x00b.sock"),
    ("unix_newline", "unix:///run/a\nb.sock"),
    ("tcp_port_0", "tcp://127.0.0.1:0"),
    ("tcp_port_over_16_bits", "tcp://127.0.0.1:65536"),
    ("tcp_no_port", "tcp://127.0.0.1"),
    ("tcp_no_host", "tcp://:80"),
    ("tcp_bare_ipv6", "tcp://::1:80"),
    ("tcp_bad_bracketed", "tcp://[not-ipv6]:80"),
    ("tcp_bracketed_ipv4", "tcp://[127.0.0.1]:80"),
    ("tcp_bad_ipv4", "tcp://256.1.1.1:80"),
    ("tcp_short_ipv4", "tcp://1.2.3:80"),
    ("tcp_underscore_host", "tcp://my_host:80"),
    ("tcp_label_hyphen_edge", "tcp://-bad.example:80"),
    ("tcp_empty_label", "tcp://a..b:80"),
    ("tcp_label_too_long", "tcp://" + "a" * 64 + ".example:80"),
    ("tcp_host_too_long", "tcp://" + ".".join(["a" * 60] * 5) + ":80"),
    ("tcp_userinfo", "tcp://user@host:80"),
    ("tcp_path", "tcp://host:80/"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in GOOD], ids=[c[0] for c in GOOD])
def test_parses_good_address(text: str, expected: Address) -> None:
    address = parse_address(text)
    assert address == expected
    assert parse_address(str(address)) == address  # str() is the canonical URL


@pytest.mark.parametrize("text", [c[1] for c in BAD], ids=[c[0] for c in BAD])
def test_rejects_bad_address(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(text)


def test_rejects_non_text_address() -> None:
    with pytest.raises(ConfigError):
        parse_address(b"vsock://16:5000")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "vsock", "cid": 16},
        {"kind": "vsock", "cid": 16, "port": 1, "path": "/x"},
        {"kind": "vsock", "cid": True, "port": 1},
        {"kind": "unix", "path": "relative"},
        {"kind": "unix", "path": "/x", "port": 1},
        {"kind": "tcp", "host": "127.0.0.1", "port": 0},
        {"kind": "tcp", "host": "127.0.0.1", "port": 1, "cid": 3},
        {"kind": "udp", "host": "127.0.0.1", "port": 1},
    ],
    ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()),
)
def test_constructor_checks_the_same_rules(fields: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Address(**fields)  # type: ignore[arg-type]


def test_error_names_the_rule() -> None:
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        parse_address("unix:///" + "a" * 200)
    with pytest.raises(ConfigError, match="IPv6 tcp host must be in brackets"):
        parse_address("tcp://::1:80")


# -- live sockets (unix in tmp_path, loopback TCP) ----------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.readexactly(5))
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _round_trip(address: Address) -> bytes:
    server = await start_server(address, _echo)
    try:
        reader, writer = await open_connection(address, timeout=2.0)
        try:
            writer.write(b"hello")
            await writer.drain()
            return await reader.readexactly(5)
        finally:
            writer.close()
            await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_asyncio_round_trip_over_unix(tmp_path: Path) -> None:
    address = parse_address(f"unix://{tmp_path}/s.sock")
    assert asyncio.run(_round_trip(address)) == b"hello"


def test_asyncio_round_trip_over_loopback_tcp() -> None:
    address = parse_address(f"tcp://127.0.0.1:{_free_tcp_port()}")
    assert asyncio.run(_round_trip(address)) == b"hello"


def test_unix_socket_file_gets_the_requested_mode(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"

    async def run() -> int:
        server = await start_server(parse_address(f"unix://{path}"), _echo, unix_mode=0o600)
        try:
            return os.stat(path).st_mode
        finally:
            server.close()
            await server.wait_closed()

    mode = asyncio.run(run())
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # left behind by a crashed run
    assert asyncio.run(_round_trip(parse_address(f"unix://{path}"))) == b"hello"


@pytest.mark.parametrize("kind", ["regular_file", "symlink_to_socket", "directory"])
def test_refuses_to_replace_what_is_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "s.sock"
    if kind == "regular_file":
        path.write_bytes(b"precious")
    elif kind == "directory":
        path.mkdir()
    else:
        target = tmp_path / "real.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as real:
            real.bind(str(target))
        path.symlink_to(target)

    async def run() -> None:
        await start_server(parse_address(f"unix://{path}"), _echo)

    with pytest.raises(ConfigError, match="not a socket"):
        asyncio.run(run())
    with pytest.raises(ConfigError, match="not a socket"):
        listen(parse_address(f"unix://{path}"))
    assert path.exists() or path.is_symlink()
    if kind == "regular_file":
        assert path.read_bytes() == b"precious"


def test_async_connect_refused_is_a_transport_error(tmp_path: Path) -> None:
    async def run() -> None:
        await open_connection(parse_address(f"unix://{tmp_path}/nobody.sock"), timeout=0.5)

    with pytest.raises(TransportError):
        asyncio.run(run())


def _full_tcp_listener() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener that never accepts, its accept queue filled: Linux then drops further
    SYNs, so a new connect waits (retransmitting) until its deadline."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(listener.getsockname())
        fillers.append(filler)
    return listener, fillers


def test_connect_deadline_is_a_transport_error() -> None:
    listener, fillers = _full_tcp_listener()
    address = Address("tcp", host="127.0.0.1", port=listener.getsockname()[1])

    async def run() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(TransportError, match=r"no answer within 0\.2 s"):
            await open_connection(address, timeout=0.2)
        return loop.time() - start

    try:
        assert asyncio.run(run()) < 1.0
        with pytest.raises(TransportError, match=r"no answer within 0\.2 s"):
            connect(address, timeout=0.2)
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_blocking_connect_sets_the_socket_timeout(tmp_path: Path) -> None:
    address = parse_address(f"unix://{tmp_path}/b.sock")
    with listen(address) as server, connect(address, timeout=0.2) as client:
        assert client.gettimeout() == pytest.approx(0.2)
        accepted, _ = server.accept()
        with accepted, pytest.raises(TimeoutError):
            client.recv(1)  # nothing sent: the read ends at the deadline


def test_blocking_connect_over_loopback_tcp() -> None:
    address = parse_address(f"tcp://127.0.0.1:{_free_tcp_port()}")
    with listen(address) as server, connect(address, timeout=1.0) as client:
        accepted, _ = server.accept()
        with accepted:
            client.sendall(b"x")
            accepted.settimeout(1.0)
            assert accepted.recv(1) == b"x"


def test_blocking_connect_refused_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError):
        connect(parse_address(f"unix://{tmp_path}/nobody.sock"), timeout=0.2)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True])
def test_rejects_a_connect_without_a_real_deadline(tmp_path: Path, timeout: float) -> None:
    with pytest.raises(ConfigError):
        connect(parse_address(f"unix://{tmp_path}/x.sock"), timeout=timeout)


def test_vsock_without_af_vsock_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # No AF_VSOCK socket is created: the platform check comes first.
    monkeypatch.delattr(socket, "AF_VSOCK", raising=False)
    address = parse_address("vsock://16:5000")
    with pytest.raises(ConfigError, match="AF_VSOCK"):
        connect(address, timeout=0.2)
    with pytest.raises(ConfigError, match="AF_VSOCK"):
        listen(address)

    async def run() -> None:
        with pytest.raises(ConfigError, match="AF_VSOCK"):
            await open_connection(address, timeout=0.2)
        with pytest.raises(ConfigError, match="AF_VSOCK"):
            await start_server(address, _echo)

    asyncio.run(run())


@pytest.mark.nitro
@pytest.mark.skipif(os.environ.get("NCI_NITRO") != "1", reason="needs AF_VSOCK (set NCI_NITRO=1)")
def test_vsock_connect_to_the_parent() -> None:  # pragma: no cover - Nitro hardware only
    port = int(os.environ.get("NCI_VSOCK_TEST_PORT", "8000"))
    with connect(Address("vsock", cid=3, port=port), timeout=2.0) as sock:
        assert sock.family == socket.AF_VSOCK
