"""The image's network setup (enclave/netif.py): the ``struct ifreq`` bytes of the loopback
ioctls, the flag logic against a recording stand-in for ``fcntl.ioctl``, and the /etc/hosts line
that points the configured KMS host at the loopback forwarder. The real ioctl runs only on Nitro
hardware (marked ``nitro``)."""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import pytest

import enclave.__main__ as entry
from enclave.config import load_config, parse_config
from enclave.netif import (
    IFF_UP,
    IFREQ_SIZE,
    SIOCGIFFLAGS,
    SIOCSIFFLAGS,
    bring_up,
    map_host,
    pack_ifreq,
    prepare_image,
    unpack_ifreq,
)
from tests.enclave.test_config import aws_config

ROOT = Path(__file__).resolve().parents[2]
IFF_LOOPBACK, IFF_RUNNING = 0x8, 0x40


def test_ifreq_is_the_40_byte_struct_with_name_then_native_short_flags() -> None:
    data = pack_ifreq("lo", IFF_UP | IFF_LOOPBACK)
    assert len(data) == IFREQ_SIZE == 40
    assert data[:16] == b"lo" + b"\0" * 14  # ifr_name[IFNAMSIZ], NUL-padded
    assert data[16:18] == struct.pack("=H", 0x9)  # ifr_flags, first member of the union
    assert data[16:18] == (0x9).to_bytes(2, sys.byteorder)
    assert data[18:] == b"\0" * 22
    assert unpack_ifreq(data) == ("lo", 0x9)


def test_ioctl_numbers_are_linuxs() -> None:
    assert (SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP) == (0x8913, 0x8914, 0x1)  # <linux/sockios.h>


@pytest.mark.parametrize("name", ["", "a" * 16, "lo\0", "eth 0", "lö"])
def test_rejects_an_interface_name_that_does_not_fit_ifr_name(name: str) -> None:
    with pytest.raises(ValueError, match="interface name"):
        pack_ifreq(name)


def test_rejects_flags_wider_than_ifr_flags() -> None:
    with pytest.raises(ValueError, match="ifr_flags"):
        pack_ifreq("lo", 0x10000)


def test_rejects_a_truncated_ifreq_from_the_kernel() -> None:
    with pytest.raises(ValueError, match="40 bytes"):
        unpack_ifreq(b"lo" + b"\0" * 20)


class RecordingIoctl:
    """Stands in for ``fcntl.ioctl``: answers SIOCGIFFLAGS with ``flags``, records every call."""

    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.calls: list[tuple[int, bytes]] = []

    def __call__(self, fd: int, request: int, arg: bytes) -> bytes:
        assert fd >= 0
        self.calls.append((request, arg))
        if request == SIOCGIFFLAGS:
            name, _ = unpack_ifreq(arg)
            return pack_ifreq(name, self.flags)
        return arg


def test_bring_up_sets_iff_up_and_keeps_the_other_flags() -> None:
    ioctl = RecordingIoctl(IFF_LOOPBACK)
    assert bring_up("lo", ioctl=ioctl) is True
    assert ioctl.calls == [
        (SIOCGIFFLAGS, pack_ifreq("lo")),
        (SIOCSIFFLAGS, pack_ifreq("lo", IFF_LOOPBACK | IFF_UP)),
    ]


def test_bring_up_leaves_an_interface_that_is_up_alone() -> None:
    ioctl = RecordingIoctl(IFF_LOOPBACK | IFF_UP | IFF_RUNNING)
    assert bring_up("lo", ioctl=ioctl) is False
    assert [request for request, _ in ioctl.calls] == [SIOCGIFFLAGS]


def test_maps_the_kms_host_to_the_loopback_once(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost")  # no final newline
    assert map_host("kms.eu-west-1.amazonaws.com", hosts=hosts) is True
    assert map_host("kms.eu-west-1.amazonaws.com", hosts=hosts) is False
    assert hosts.read_text() == "127.0.0.1 localhost\n127.0.0.1 kms.eu-west-1.amazonaws.com\n"


def test_maps_the_kms_host_without_a_hosts_file(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    assert map_host("kms.eu-west-1.amazonaws.com", hosts=hosts) is True
    assert hosts.read_text() == "127.0.0.1 kms.eu-west-1.amazonaws.com\n"


def test_rejects_a_hosts_file_that_sends_the_kms_host_elsewhere(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("203.0.113.7 kms.eu-west-1.amazonaws.com\n")
    with pytest.raises(ValueError, match=r"203\.0\.113\.7"):
        map_host("kms.eu-west-1.amazonaws.com", hosts=hosts)


def test_rejects_a_host_line_injection(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a DNS name"):
        map_host("kms.example\n203.0.113.7 s3.amazonaws.com", hosts=tmp_path / "hosts")


def test_prepare_image_maps_the_host_of_the_baked_in_configuration(tmp_path: Path) -> None:
    # the KMS host comes from deploy/enclave.json (measured in PCR2), not from a build argument
    config = load_config(ROOT / "deploy" / "enclave.json")
    hosts = tmp_path / "hosts"
    ioctl = RecordingIoctl(IFF_LOOPBACK)
    prepare_image(config, hosts=hosts, ioctl=ioctl)
    assert [request for request, _ in ioctl.calls] == [SIOCGIFFLAGS, SIOCSIFFLAGS]
    assert hosts.read_text() == f"127.0.0.1 {config.kms_host}\n"


def test_prepare_image_maps_the_region_of_the_configuration_outside_us_east_1(
    tmp_path: Path,
) -> None:
    arn = "arn:aws:kms:eu-central-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    config = parse_config(
        aws_config(
            region="eu-central-1",
            kms_key_arn=arn,
            kms_endpoint="https://kms.eu-central-1.amazonaws.com:{port}",
        )
    )
    hosts = tmp_path / "hosts"
    prepare_image(config, hosts=hosts, ioctl=RecordingIoctl(IFF_UP))
    assert hosts.read_text() == "127.0.0.1 kms.eu-central-1.amazonaws.com\n"


def test_entry_point_prepares_the_image_only_when_told(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared: list[str] = []
    monkeypatch.setattr(entry, "prepare_image", lambda config: prepared.append(config.kms_host))
    monkeypatch.setattr(entry, "run", lambda config: 0)
    path = ROOT / "deploy" / "enclave.json"
    assert entry.main(["--config", str(path)]) == 0
    assert prepared == []
    assert entry.main(["--config", str(path), "--inside-image"]) == 0
    assert prepared == ["kms.us-east-1.amazonaws.com"]


def test_entry_point_exits_2_when_the_kernel_refuses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(config: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(entry, "prepare_image", refuse)
    monkeypatch.setattr(entry, "run", lambda config: pytest.fail("ran without a network"))
    path = ROOT / "deploy" / "enclave.json"
    assert entry.main(["--config", str(path), "--inside-image"]) == 2
    assert "network setup failed" in capsys.readouterr().err


@pytest.mark.nitro
@pytest.mark.skipif(os.environ.get("NCI_NITRO") != "1", reason="inside an enclave (NCI_NITRO=1)")
def test_brings_the_real_loopback_up() -> None:
    bring_up("lo")  # as PID 1 of the enclave: root, CAP_NET_ADMIN
    assert bring_up("lo") is False  # the kernel now reports IFF_UP
