"""The parent's configuration: one YAML file for ``nci parent run --config parent.yaml``.

Strict: unknown keys, duplicate keys, wrong types (``true`` where a number goes, a number where
text goes) and unparseable addresses are :class:`~protocol.errors.ConfigError` naming the key path
(``kms_relay.upstream: …``). Relative file paths are relative to the configuration file. Example
with every key (the optional sections may be left out; defaults shown)::

    bridge:
      listen: tcp://0.0.0.0:8443          # consumers' HTTP (tcp://HOST:PORT or unix://PATH)
    enclave:
      control: vsock://16:5000            # the enclave's control address
      health_interval: 5                  # seconds between health polls
      timeouts: {connect: 5, frame: 30, write: 30, health: 2, attestation: 10,
                 first_response: 120, between_chunks: 60}
    kms_relay:                            # optional: no relay when absent
      listen: vsock://3:8000              # where the enclave connects
      upstream: tcp://kms.us-east-1.amazonaws.com:443
      allowlist: null                     # null: KMS endpoints on 443 and loopback
      max_connections: 32
      connect_timeout: 5
      idle_timeout: 60
    bundles:                              # optional: no streamer when absent
      listen: vsock://3:8001
      region: us-east-1
      endpoint_url: null                  # an S3 endpoint (the local moto server), or null
      max_connections: 8
      sources:
        anymal-shapes: {folder: bundles/anymal-shapes}
        big-model: {s3: s3://my-bucket/sealed/big-model}
    credentials:
      source: session                     # session (boto3 chain, IMDS on EC2) | env | none
      refresh_interval: 60
    launcher:                             # optional: the enclave is started elsewhere
      local: {enclave_config: state/enclave.json, grace: 10, backoff_max: 30,
              log: state/enclave.log, verbose: false}   # log: null inherits the parent's stderr
      # or: aws: {eif_path: /opt/nci/enclave.eif, cpu_count: 2, memory_mib: 4096, cid: 16}
    deployment:                           # optional: what `nci parent check` compares against
      key_id: arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab
      expected:                           # the EIF's PCRs (nci audit eif --json); PCR8 optional
        PCR0:
          0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000a0
        PCR1:
          0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000a1
        PCR2:
          0000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000a2
      rollout: []                         # during a rollout: the other image's PCRs, same shape
    limits:                               # the bridge's limits (parent.bridge.BridgeLimits)
      max_body_bytes: 16777216            # request body cap (413)
      max_concurrency: 8                  # inference requests at once, body received (429)
      max_uploads: null                   # bodies being received at once; null: 2 × max_concurrency
      max_attestations: 4                 # attestation requests at once (429)
      client_read_timeout: 30             # each read from a consumer (headers, body pieces)
      body_timeout: 30                    # a whole request body (408)
      request_deadline: 600
      write_timeout: 30
      retry_after: 5
      busy_retry_after: 1
      linger: 1
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import yaml

from parent.bridge import BridgeLimits
from parent.enclave_link import LinkTimeouts
from parent.kms_relay import upstream_allowed
from protocol.errors import ConfigError
from protocol.transport import Address, parse_address

__all__ = [
    "SERVICES",
    "AwsLauncherConfig",
    "BundlesConfig",
    "DeploymentConfig",
    "LocalLauncherConfig",
    "ParentConfig",
    "RelayConfig",
    "load_config",
    "parse_config",
]

MAX_CONFIG_SIZE: Final = 1024 * 1024
CREDENTIAL_SOURCES: Final = ("session", "env", "none")
SERVICES: Final = ("bundles", "kms_relay", "launcher", "bridge")
"""What ``nci parent run --only`` selects; ``bridge`` is the control link, the credentials
forwarder and the HTTP bridge, the others are the sections of the same names."""
PCR_NAMES: Final = {"PCR0": 0, "PCR1": 1, "PCR2": 2, "PCR8": 8}  # PCR8 (signed images) optional
_HEX96: Final = re.compile(r"[0-9a-f]{96}")
# GetKeyPolicy takes a key id or key ARN, not an alias (AWS KMS API Reference, GetKeyPolicy)
_KEY_ID: Final = re.compile(r"(arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:key/)?[A-Za-z0-9-]{1,128}")


@dataclass(frozen=True)
class RelayConfig:
    listen: Address
    upstream: Address
    allowlist: tuple[str, ...] | None = None
    max_connections: int = 32
    connect_timeout: float = 5.0
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class BundleSourceConfig:
    folder: Path | None = None
    s3_bucket: str | None = None
    s3_prefix: str = ""


@dataclass(frozen=True)
class BundlesConfig:
    listen: Address
    sources: Mapping[str, BundleSourceConfig]
    region: str = "us-east-1"
    endpoint_url: str | None = None
    max_connections: int = 8


@dataclass(frozen=True)
class LocalLauncherConfig:
    enclave_config: Path
    grace: float = 10.0
    backoff_max: float = 30.0
    log: Path | None = None  # the enclave's standard error goes here (appended), else inherited
    verbose: bool = False  # run the enclave with -v (INFO logs: step names and counters only)


@dataclass(frozen=True)
class AwsLauncherConfig:
    eif_path: Path
    cpu_count: int
    memory_mib: int
    cid: int
    enclave_name: str = "nci"


@dataclass(frozen=True)
class DeploymentConfig:
    """What ``nci parent check`` compares the deployment with; no service reads it."""

    key_id: str
    expected: Mapping[int, bytes]  # the EIF's PCRs: 0, 1, 2 and optionally 8
    rollout: tuple[Mapping[int, bytes], ...] = ()  # other images the key policy also allows


@dataclass(frozen=True)
class ParentConfig:
    """Everything ``nci parent run`` starts; see the module docstring for the YAML."""

    bridge_listen: Address
    enclave_control: Address
    link_timeouts: LinkTimeouts = field(default_factory=LinkTimeouts)
    health_interval: float = 5.0
    kms_relay: RelayConfig | None = None
    bundles: BundlesConfig | None = None
    credentials_source: str = "session"
    credentials_refresh: float = 60.0
    launcher: LocalLauncherConfig | AwsLauncherConfig | None = None
    limits: BridgeLimits = field(default_factory=BridgeLimits)
    deployment: DeploymentConfig | None = None

    def services(self, only: Sequence[str] | None = None) -> frozenset[str]:
        """The services to run: every configured one, or those of ``only`` (names from
        :data:`SERVICES`), each of which must be configured. Raises :class:`ConfigError`."""
        sections = {"bundles": self.bundles, "kms_relay": self.kms_relay, "launcher": self.launcher}
        configured = {name for name, section in sections.items() if section is not None}
        configured.add("bridge")  # its sections, bridge and enclave, are required
        if only is None:
            return frozenset(configured)
        if not only:
            raise ConfigError(f"no service named; choose from {', '.join(SERVICES)}")
        for name in only:
            if name not in SERVICES:
                raise ConfigError(f"{name!r} is not a service; choose from {', '.join(SERVICES)}")
        for name in only:
            if name not in configured:
                raise ConfigError(f"{name}: the configuration has no {name} section")
        return frozenset(only)


# -- loading -----------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (which it would silently overwrite)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise ConfigError(f"line {key_node.start_mark.line + 1}: keys must be text")
        if key in result:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_config(path: Path) -> ParentConfig:
    """Read and check ``path`` (our own configuration). Raises :class:`ConfigError`."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or type(exc).__name__}") from None
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_SIZE} bytes")
    return parse_config(data.decode("utf-8", errors="strict"), base=path.resolve().parent)


def parse_config(text: str, *, base: Path) -> ParentConfig:
    """Parse the YAML ``text``; relative paths are relative to ``base``."""
    try:
        document = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}not valid YAML") from None
    root = _Section(document, "", base)
    bridge = root.section("bridge")
    enclave = root.section("enclave")
    config = ParentConfig(
        bridge_listen=bridge.address("listen"),
        enclave_control=enclave.address("control"),
        link_timeouts=_timeouts(enclave.optional_section("timeouts")),
        health_interval=enclave.number("health_interval", 5.0),
        kms_relay=_relay(root.optional_section("kms_relay")),
        bundles=_bundles(root.optional_section("bundles")),
        **_credentials(root.optional_section("credentials")),
        launcher=_launcher(root.optional_section("launcher")),
        limits=_limits(root.optional_section("limits")),
        deployment=_deployment(root.optional_section("deployment")),
    )
    for section in (bridge, enclave):
        section.done()
    root.done()
    return config


def _timeouts(section: _Section | None) -> LinkTimeouts:
    if section is None:
        return LinkTimeouts()
    defaults = LinkTimeouts()
    values = {
        f.name: section.number(f.name, getattr(defaults, f.name))
        for f in dataclasses.fields(LinkTimeouts)
    }
    section.done()
    return LinkTimeouts(**values)


def _relay(section: _Section | None) -> RelayConfig | None:
    if section is None:
        return None
    allowlist = section.get("allowlist", None)
    if allowlist is not None and (
        not isinstance(allowlist, list) or not all(isinstance(i, str) for i in allowlist)
    ):
        raise ConfigError(f"{section.path}allowlist must be a list of HOST:PORT texts, or null")
    upstream = section.address("upstream")
    if not upstream_allowed(upstream, allowlist):
        raise ConfigError(f"{section.path}upstream {upstream} is not on the allowlist")
    relay = RelayConfig(
        listen=section.address("listen"),
        upstream=upstream,
        allowlist=tuple(allowlist) if allowlist is not None else None,
        max_connections=section.integer("max_connections", 32),
        connect_timeout=section.number("connect_timeout", 5.0),
        idle_timeout=section.number("idle_timeout", 60.0),
    )
    section.done()
    return relay


def _bundles(section: _Section | None) -> BundlesConfig | None:
    if section is None:
        return None
    sources_section = section.section("sources")
    sources: dict[str, BundleSourceConfig] = {}
    for name in list(sources_section.keys()):
        sources[name] = _source(sources_section.section(name))
    sources_section.done()
    if not sources:
        raise ConfigError(f"{section.path}sources must name at least one bundle")
    endpoint = section.get("endpoint_url", None)
    if endpoint is not None and (
        not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://"))
    ):
        raise ConfigError(f"{section.path}endpoint_url must be an http(s) URL or null")
    bundles = BundlesConfig(
        listen=section.address("listen"),
        sources=sources,
        region=section.text("region", "us-east-1"),
        endpoint_url=endpoint,
        max_connections=section.integer("max_connections", 8),
    )
    section.done()
    return bundles


def _source(section: _Section) -> BundleSourceConfig:
    keys = set(section.keys())
    if len(keys) != 1 or not keys <= {"folder", "s3"}:
        raise ConfigError(
            f"{section.path.rstrip('.')} must be {{folder: PATH}} or {{s3: s3://BUCKET/PREFIX}}"
        )
    if "folder" in keys:
        source = BundleSourceConfig(folder=section.path_value("folder"))
    else:
        url = section.text("s3")
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not url.startswith("s3://") or not bucket:
            raise ConfigError(f"{section.path}s3 must be s3://BUCKET/PREFIX")
        source = BundleSourceConfig(s3_bucket=bucket, s3_prefix=prefix.strip("/"))
    section.done()
    return source


def _credentials(section: _Section | None) -> dict[str, Any]:
    if section is None:
        return {}
    source = section.text("source", "session")
    if source not in CREDENTIAL_SOURCES:
        raise ConfigError(f"{section.path}source must be one of {', '.join(CREDENTIAL_SOURCES)}")
    values = {
        "credentials_source": source,
        "credentials_refresh": section.number("refresh_interval", 60.0),
    }
    section.done()
    return values


def _launcher(section: _Section | None) -> LocalLauncherConfig | AwsLauncherConfig | None:
    if section is None:
        return None
    keys = set(section.keys())
    if len(keys) != 1 or not keys <= {"local", "aws"}:
        raise ConfigError(f"{section.path.rstrip('.')} must have exactly one of local, aws")
    launcher: LocalLauncherConfig | AwsLauncherConfig
    if "local" in keys:
        local = section.section("local")
        launcher = LocalLauncherConfig(
            enclave_config=local.path_value("enclave_config"),
            grace=local.number("grace", 10.0),
            backoff_max=local.number("backoff_max", 30.0),
            log=local.path_value("log") if local.get("log", None) is not None else None,
            verbose=local.flag("verbose", False),
        )
        local.done()
    else:
        aws = section.section("aws")
        launcher = AwsLauncherConfig(
            eif_path=aws.path_value("eif_path"),
            cpu_count=aws.integer("cpu_count"),
            memory_mib=aws.integer("memory_mib"),
            cid=aws.integer("cid"),
            enclave_name=aws.text("enclave_name", "nci"),
        )
        aws.done()
    section.done()
    return launcher


def _limits(section: _Section | None) -> BridgeLimits:
    if section is None:
        return BridgeLimits()
    defaults = BridgeLimits()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(BridgeLimits):
        default = getattr(defaults, f.name)
        if default is None or isinstance(default, int):  # None: an integer, or null for "derived"
            values[f.name] = section.integer(f.name, default)
        else:
            values[f.name] = section.number(f.name, default, zero=f.name == "linger")
    section.done()
    return BridgeLimits(**values)


def _deployment(section: _Section | None) -> DeploymentConfig | None:
    if section is None:
        return None
    key_id = section.text("key_id")
    if not _KEY_ID.fullmatch(key_id):
        raise ConfigError(f"{section.path}key_id must be a KMS key id or key ARN (not an alias)")
    expected = _pcrs(section.section("expected"))
    rollout = section.get("rollout", [])
    if not isinstance(rollout, list):
        raise ConfigError(f"{section.path}rollout must be a list of PCR mappings")
    others = tuple(
        _pcrs(_Section(item, f"{section.path}rollout[{n}].", section.base))
        for n, item in enumerate(rollout)
    )
    section.done()
    return DeploymentConfig(key_id=key_id, expected=expected, rollout=others)


def _pcrs(section: _Section) -> dict[int, bytes]:
    """PCR0, PCR1, PCR2 and optionally PCR8, each 96 lowercase hex characters (SHA-384)."""
    pcrs: dict[int, bytes] = {}
    for name, index in PCR_NAMES.items():
        value = section.get(name, None if index == 8 else _MISSING)
        if value is None:
            continue
        if not isinstance(value, str) or not _HEX96.fullmatch(value):
            raise ConfigError(
                f"{section.path}{name} must be 96 lowercase hex characters (a SHA-384 PCR)"
            )
        if set(value) == {"0"}:
            raise ConfigError(f"{section.path}{name} is all zero: a debug-mode enclave's")
        pcrs[index] = bytes.fromhex(value)
    section.done()
    return pcrs


# -- a mapping that remembers which keys were read ---------------------------------------------

_MISSING: Final = object()


class _Section:
    def __init__(self, value: object, path: str, base: Path) -> None:
        if not isinstance(value, dict):
            raise ConfigError(f"{path.rstrip('.') or 'the configuration'} must be a mapping")
        self._value: dict[str, object] = value
        self._read: set[str] = set()
        self.path = path
        self.base = base

    def keys(self) -> list[str]:
        return list(self._value)

    def get(self, key: str, default: object = _MISSING) -> object:
        self._read.add(key)
        if key in self._value:
            return self._value[key]
        if default is _MISSING:
            raise ConfigError(f"{self.path}{key} is required")
        return default

    def _typed(self, key: str, default: object, check: Callable[[object], bool], rule: str) -> Any:
        value = self.get(key, default)
        if value is not default and not check(value):
            raise ConfigError(f"{self.path}{key} must be {rule}")
        return value

    def section(self, key: str) -> _Section:
        return _Section(self.get(key), f"{self.path}{key}.", self.base)

    def optional_section(self, key: str) -> _Section | None:
        value = self.get(key, None)
        return None if value is None else _Section(value, f"{self.path}{key}.", self.base)

    def address(self, key: str) -> Address:
        text = self._typed(key, _MISSING, lambda v: isinstance(v, str), "an address")
        try:
            return parse_address(text)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}{key}: {exc}") from None

    def text(self, key: str, default: object = _MISSING) -> str:
        value: str = self._typed(key, default, lambda v: isinstance(v, str) and v != "", "text")
        return value

    def integer(self, key: str, default: object = _MISSING) -> int:
        value: int = self._typed(key, default, lambda v: type(v) is int, "an integer")
        return value

    def number(self, key: str, default: object = _MISSING, *, zero: bool = False) -> float:
        def check(v: object) -> bool:
            return type(v) in (int, float) and (v >= 0 if zero else v > 0)  # type: ignore[operator]

        rule = "a number, at least 0" if zero else "a positive number"
        return float(self._typed(key, default, check, rule))

    def flag(self, key: str, default: object = _MISSING) -> bool:
        value: bool = self._typed(key, default, lambda v: type(v) is bool, "true or false")
        return value

    def path_value(self, key: str) -> Path:
        path = Path(self.text(key))
        return path if path.is_absolute() else self.base / path

    def done(self) -> None:
        """Refuse any key nobody asked for."""
        unknown = sorted(set(self._value) - self._read)
        if unknown:
            raise ConfigError(f"unknown key {self.path}{unknown[0]}")
