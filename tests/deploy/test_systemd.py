"""The systemd units and the parent's example configuration: every unit runs a valid `nci parent
run` on the same parent.yaml, the split units cover each service exactly once, every service is
hardened, and the vsock-proxy alternative reaches the KMS endpoint only."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import yaml

import nci.parent
from parent.config import SERVICES, AwsLauncherConfig, ParentConfig, load_config, parse_config
from protocol.errors import ConfigError

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNITS = DEPLOY / "systemd"
EXAMPLE = DEPLOY / "parent.yaml.example"
CONFIG_PATH = "/etc/nci/parent.yaml"

# unit → what its `--only` selects (None: every configured service)
NCI_UNITS: dict[str, frozenset[str] | None] = {
    "nci-parent.service": None,
    "nci-relay.service": frozenset({"bundles", "kms_relay"}),
    "nci-enclave.service": frozenset({"launcher"}),
    "nci-bridge.service": frozenset({"bridge"}),
    "nci-relay.service.d/bundles-only.conf": frozenset({"bundles"}),
}
SERVICE_FILES = sorted(p.name for p in UNITS.glob("*.service"))
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictRealtime": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "UMask": "0077",
    "DevicePolicy": "closed",
    "User": "nci",
    "Group": "nci",
    "Restart": "always",
}


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file: section → key → every value in order (keys may repeat; an empty
    assignment resets the list, as systemd does for ExecStart=)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate((UNITS / name).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{name}:{number}: {raw!r} is not KEY=VALUE"
        assert current is not None, f"{name}:{number}: outside a section"
        assert key.strip() == key, f"{name}:{number}: space around {key!r}"
        values = current.setdefault(key, [])
        if value:
            values.append(value)
        else:
            values.clear()
            values.append("")  # an explicit empty value (CapabilityBoundingSet=, ExecStart=)
    return sections


def value(sections: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = [v for v in sections[section][key] if v]
    return values[-1] if values else ""


def words(sections: dict[str, dict[str, list[str]]], section: str, key: str) -> set[str]:
    return {word for v in sections.get(section, {}).get(key, []) for word in v.split()}


def example() -> ParentConfig:
    return load_config(EXAMPLE)


def parse_cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nci")
    nci.parent.add_parser(parser.add_subparsers(dest="group", required=True))
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", sorted(NCI_UNITS))
def test_unit_runs_a_valid_parent_run_on_the_shared_config(name: str) -> None:
    argv = shlex.split(value(unit(name), "Service", "ExecStart"))
    assert argv[0] == "/usr/local/bin/nci"
    args = parse_cli(argv[1:])  # argparse exits on an unknown flag or a bad --only
    assert (args.group, args.parent_command) == ("parent", "run")
    assert str(args.config) == CONFIG_PATH
    config = example()
    if name.endswith("bundles-only.conf"):  # the vsock-proxy variant has no kms_relay section
        config = _without_kms_relay()
    selected = config.services(args.only)
    expected = NCI_UNITS[name]
    assert selected == (expected if expected is not None else frozenset(SERVICES))


def test_split_units_run_every_service_exactly_once() -> None:
    split = [NCI_UNITS[f"nci-{n}.service"] for n in ("relay", "enclave", "bridge")]
    names = [service for services in split for service in services or ()]
    assert sorted(names) == sorted(SERVICES)


@pytest.mark.parametrize("name", SERVICE_FILES)
def test_every_service_is_hardened(name: str) -> None:
    sections = unit(name)
    for key, expected in HARDENING.items():
        assert value(sections, "Service", key) == expected, f"{name}: {key}"
    families = words(sections, "Service", "RestrictAddressFamilies")
    assert families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_VSOCK"}
    devices = sections["Service"].get("DeviceAllow", [])
    groups = words(sections, "Service", "SupplementaryGroups")
    if name in ("nci-parent.service", "nci-enclave.service"):  # the launchers
        assert devices == ["/dev/nitro_enclaves rw"]
        assert groups == {"ne"}
    else:
        assert not devices, f"{name} needs no device"
        assert not groups


def test_rejects_running_the_enclave_before_its_relay() -> None:
    enclave, bridge = unit("nci-enclave.service"), unit("nci-bridge.service")
    assert "nci-relay.service" in words(enclave, "Unit", "After")
    assert "nci-relay.service" in words(enclave, "Unit", "Wants")
    assert "nci-enclave.service" in words(bridge, "Unit", "After")
    target = unit("nci.target")
    split = {"nci-relay.service", "nci-enclave.service", "nci-bridge.service"}
    assert words(target, "Unit", "Wants") == split
    assert "nci-parent.service" in words(target, "Unit", "Conflicts")
    for name in [*split, "vsock-proxy.service"]:
        sections = unit(name)
        assert words(sections, "Unit", "PartOf") == {"nci.target"}, name
        assert words(sections, "Install", "WantedBy") == {"nci.target"}, name
    assert words(unit("nci-parent.service"), "Install", "WantedBy") == {"multi-user.target"}


def test_rejects_restarting_the_relay_stopping_the_enclave() -> None:
    # Requires= (or BindsTo=, PartOf= on the relay) would propagate a relay restart or stop to the
    # launcher unit, whose stop terminates the running enclave
    enclave = unit("nci-enclave.service")
    for key in ("Requires", "BindsTo", "PartOf", "Requisite"):
        assert "nci-relay.service" not in words(enclave, "Unit", key), key
        assert "vsock-proxy.service" not in words(enclave, "Unit", key), key
    assert words(enclave, "Unit", "Requires") <= {"nitro-enclaves-allocator.service"}
    for name in ("nci-relay.service", "nci-bridge.service", "vsock-proxy.service"):
        sections = unit(name)
        for key in ("Requires", "BindsTo", "Requisite", "PropagatesStopTo"):
            assert "nci-enclave.service" not in words(sections, "Unit", key), (name, key)
        for key in ("RequiredBy", "UpheldBy"):
            assert "nci-enclave.service" not in words(sections, "Install", key), (name, key)


def test_vsock_proxy_forwards_only_to_the_kms_endpoint() -> None:
    sections = unit("vsock-proxy.service")
    argv = shlex.split(value(sections, "Service", "ExecStart"))
    assert argv[0] == "/usr/bin/vsock-proxy"
    port, host, remote_port = argv[1:4]
    assert argv[4:] == ["--config", "/etc/nitro_enclaves/vsock-proxy.yaml"]
    config = example()
    assert config.kms_relay is not None
    assert config.bundles is not None
    # the port the enclave dials, and the same region as everything else
    assert int(port) == config.kms_relay.listen.port
    assert host == f"kms.{config.bundles.region}.amazonaws.com"
    assert (host, int(remote_port)) == (config.kms_relay.upstream.host, 443)
    allowlist = yaml.safe_load((DEPLOY / "vsock-proxy.yaml").read_text())
    assert allowlist == {"allowlist": [{"address": host, "port": 443}]}
    assert "nitro-enclaves-vsock-proxy.service" in words(sections, "Unit", "Conflicts")


def _without_kms_relay() -> ParentConfig:
    document = yaml.safe_load(EXAMPLE.read_text())
    del document["kms_relay"]
    return parse_config(yaml.safe_dump(document), base=EXAMPLE.parent)


def test_rejects_the_kms_relay_unit_when_vsock_proxy_replaces_it() -> None:
    config = _without_kms_relay()
    assert config.services(["bundles"]) == {"bundles"}
    with pytest.raises(ConfigError, match="kms_relay: the configuration has no kms_relay section"):
        config.services(["bundles", "kms_relay"])


def test_parent_yaml_example_parses() -> None:
    config = example()
    assert isinstance(config.launcher, AwsLauncherConfig)
    assert config.kms_relay is not None
    assert config.kms_relay.upstream.port == 443
    assert config.bundles is not None
    assert all(source.s3_bucket for source in config.bundles.sources.values())
    assert config.enclave_control.kind == "vsock"
    assert config.deployment is not None
    assert sorted(config.deployment.expected) == [0, 1, 2]
    assert config.deployment.key_id.startswith("arn:aws:kms:")
