"""Inside the enclave image: the loopback interface up, and the KMS host name pointed at it.

An enclave has no network device but ``lo``, which the Nitro init leaves down. Before anything
listens on 127.0.0.1 (the KMS forwarder, :mod:`enclave.kmsforward`), the image's entry point
(``python -m enclave --inside-image``) calls :func:`prepare_image`:

1. bring ``lo`` up, as ``ip link set dev lo up`` does, with two ioctls on a datagram socket
   (netdevice(7): ``SIOCGIFFLAGS``, then ``SIOCSIFFLAGS`` with ``IFF_UP`` added), so the image
   needs no iproute2 package;
2. resolve the KMS endpoint's host, taken from the measured configuration (``kms_endpoint``,
   which :mod:`enclave.config` checks is the KMS of ``region``), to 127.0.0.1 in ``/etc/hosts``:
   boto3 then talks TLS to ``kms.REGION.amazonaws.com`` through the loopback forwarder, and TLS
   ends inside the enclave.

``struct ifreq`` (``<net/if.h>``, 40 bytes on 64-bit Linux): ``char ifr_name[IFNAMSIZ]`` (16 bytes,
NUL-terminated), then a 24-byte union whose first member is ``short ifr_flags``, native byte
order. Only PID 1 of the enclave (root, ``CAP_NET_ADMIN``) can set the flags; elsewhere the second
ioctl fails with ``EPERM``.
"""

from __future__ import annotations

import fcntl
import ipaddress
import re
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Final

from enclave.config import EnclaveConfig

__all__ = [
    "IFF_UP",
    "IFREQ_SIZE",
    "SIOCGIFFLAGS",
    "SIOCSIFFLAGS",
    "bring_up",
    "map_host",
    "pack_ifreq",
    "prepare_image",
    "unpack_ifreq",
]

SIOCGIFFLAGS: Final = 0x8913  # <linux/sockios.h>
SIOCSIFFLAGS: Final = 0x8914
IFF_UP: Final = 0x1  # <linux/if.h>
IFNAMSIZ: Final = 16
LOOPBACK: Final = "lo"
HOSTS: Final = Path("/etc/hosts")

_IFREQ: Final = struct.Struct("=16sH22x")  # ifr_name, ifr_flags, the rest of the union
IFREQ_SIZE: Final = _IFREQ.size  # 40
_IFNAME: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{IFNAMSIZ - 1}}}", re.ASCII)
_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", re.ASCII)

Ioctl = Callable[[int, int, bytes], bytes]
"""``fcntl.ioctl(fd, request, buffer)`` with a bytes buffer: returns the kernel's copy."""


def pack_ifreq(name: str, flags: int = 0) -> bytes:
    """A ``struct ifreq`` naming interface ``name``, with ``ifr_flags`` = ``flags``."""
    # the name and its terminating NUL fit in ifr_name
    if not _IFNAME.fullmatch(name):
        raise ValueError(f"interface name {name!r}: 1..{IFNAMSIZ - 1} characters of [A-Za-z0-9._-]")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"ifr_flags {flags:#x}: a 16-bit value")
    return _IFREQ.pack(name.encode("ascii"), flags)  # "16s" pads the name with NULs


def unpack_ifreq(data: bytes) -> tuple[str, int]:
    """The interface name and ``ifr_flags`` of a ``struct ifreq`` the kernel returned."""
    if len(data) != IFREQ_SIZE:
        raise ValueError(f"struct ifreq is {IFREQ_SIZE} bytes, not {len(data)}")
    name, flags = _IFREQ.unpack(data)
    return name.split(b"\0", 1)[0].decode("ascii", errors="replace"), flags


def bring_up(name: str = LOOPBACK, *, ioctl: Ioctl | None = None) -> bool:
    """Set ``IFF_UP`` on interface ``name``, keeping its other flags; ``False`` if it was up
    already. Raises :class:`OSError` when the kernel refuses (no such interface, not root)."""
    call: Ioctl = ioctl if ioctl is not None else fcntl.ioctl
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        # (1) read the flags (netdevice(7) SIOCGIFFLAGS)
        _, flags = unpack_ifreq(call(sock.fileno(), SIOCGIFFLAGS, pack_ifreq(name)))
        if flags & IFF_UP:
            return False
        # (2) write them back with IFF_UP (SIOCSIFFLAGS)
        call(sock.fileno(), SIOCSIFFLAGS, pack_ifreq(name, flags | IFF_UP))
    return True


def map_host(host: str, *, hosts: Path = HOSTS) -> bool:
    """Resolve ``host`` to 127.0.0.1 through ``hosts``: append ``127.0.0.1 HOST`` unless a line
    says so already (``False`` then). A line mapping ``host`` to another address is a
    :class:`ValueError`: the first match wins, and it would not be the loopback forwarder."""
    if not _HOST.fullmatch(host):
        raise ValueError(f"host {host!r} is not a DNS name")
    try:
        existing = hosts.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        existing = ""
    for line in existing.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or host.lower() not in (f.lower() for f in fields[1:]):
            continue
        if fields[0] == "127.0.0.1":
            return False
        raise ValueError(f"{hosts} maps {host} to {fields[0]}, not to the loopback forwarder")
    with hosts.open("a", encoding="ascii") as handle:
        if existing and not existing.endswith("\n"):
            handle.write("\n")
        handle.write(f"127.0.0.1 {host}\n")
    return True


def prepare_image(
    config: EnclaveConfig, *, hosts: Path = HOSTS, ioctl: Ioctl | None = None
) -> None:
    """Steps (1) and (2) of the module docstring, for the enclave image's entry point only."""
    bring_up(LOOPBACK, ioctl=ioctl)
    host = config.kms_host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        map_host(host, hosts=hosts)
