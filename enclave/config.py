"""The enclave's configuration: one JSON file, strictly parsed (docs/request-path.md).

On AWS the file is baked into the enclave image, so it is measured (PCR2) and the parent cannot
change it; locally it sits in the state folder. Keys::

    control          the control address the enclave listens on: vsock://ANY:5000 on AWS
                     (ANY = VMADDR_CID_ANY), unix:///STATE/enclave.sock locally
    bundle_streamer  the parent's sealed-bundle streamer (vsock://3:PORT, unix://…)
    kms_relay        the parent's blind TCP relay to KMS (vsock://3:PORT, unix://…)
    kms_endpoint     the URL boto3 uses, with "{port}" where the loopback forwarder's port goes:
                     https://kms.REGION.amazonaws.com:{port} on AWS (the name resolves to
                     127.0.0.1 in the image's /etc/hosts, so TLS ends inside the enclave),
                     http://127.0.0.1:{port} for the local KMS; with "nsm": "device" it must
                     be https (over plain http the parent could answer Decrypt itself, with a
                     data key of its choosing wrapped to the enclave's attested RSA key), and
                     its host kms.REGION.amazonaws.com or kms-fips.REGION.amazonaws.com for
                     the configured region (the image's entry point maps that host to the
                     loopback forwarder: enclave/netif.py)
    region           the AWS region of the KMS key
    bundle           the bundle name the streamer serves
    model_id         the model the bundle must hold (pinned)
    kms_key_arn      the provider's KMS key ARN the bundle must be sealed under (pinned)
    manifest_sha256  null, or 64 hex digits pinning one exact bundle (refuses rollback)
    nsm              "device" (/dev/nsm) or "emulated:/abs/state/folder" (local mode)
    max_concurrency  inference requests served at once (1..64)
    threads          CPU threads of the model runtime (1..256), or null for its default
    exit_on_failure  optional, default false: exit with status 1 when boot fails, instead of
                     staying up and answering health with state "failed"
    runtime          optional, default "model": serve the unlocked model; "echo" serves an
                     echo of the prompt instead (after the same boot), to measure the request
                     path's own cost; being in the measured configuration, it is attested
    echo_delay       optional, default 0: seconds per echoed piece (0..10), with "echo"

Every key but ``exit_on_failure``, ``runtime`` and ``echo_delay`` is required; an unknown key, a
duplicate key, a value of the wrong type or an unparseable address is an :class:`InvalidConfig`
naming the key. The file is at most 64 KiB.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enclave.errors import ConfigError
from protocol.errors import ConfigError as AddressError
from protocol.transport import VMADDR_CID_ANY, Address, parse_address

__all__ = [
    "MAX_CONFIG_SIZE",
    "EnclaveConfig",
    "InvalidConfig",
    "kms_hosts",
    "load_config",
    "parse_config",
]

MAX_CONFIG_SIZE: Final = 64 * 1024
MAX_CONCURRENCY: Final = 64
MAX_THREADS: Final = 256

_REQUIRED: Final = frozenset(
    {
        "control",
        "bundle_streamer",
        "kms_relay",
        "kms_endpoint",
        "region",
        "bundle",
        "model_id",
        "kms_key_arn",
        "manifest_sha256",
        "nsm",
        "max_concurrency",
        "threads",
    }
)
_OPTIONAL: Final = frozenset({"exit_on_failure", "runtime", "echo_delay"})
RUNTIMES: Final = ("model", "echo")

_REGION = re.compile(r"[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2}", re.ASCII)
_BUNDLE = re.compile(r"[\x21-\x7e]{1,256}", re.ASCII)  # as BUNDLE_REQUEST allows
_MODEL_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}", re.ASCII)  # as the manifest allows
_KEY_ARN = re.compile(
    r"arn:aws[a-z-]*:kms:(?P<region>[a-z0-9-]+):[0-9]{12}:key/[A-Za-z0-9-]{1,128}", re.ASCII
)
_SHA256_HEX = re.compile(r"[0-9a-f]{64}", re.ASCII)
_ENDPOINT = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?):\{port\}",
    re.ASCII,
)
_ANY_CID = re.compile(r"vsock://ANY:", re.ASCII)


class InvalidConfig(ConfigError):
    """The configuration file breaks a rule; ``key`` names the offending key ("" for the file)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config key {key!r}: {message}" if key else f"config: {message}")
        self.key = key


@dataclass(frozen=True)
class EnclaveConfig:
    """A checked configuration (build it with :func:`parse_config` or :func:`load_config`)."""

    control: Address
    bundle_streamer: Address
    kms_relay: Address
    kms_endpoint: str  # with "{port}" still in it: see :meth:`kms_endpoint_url`
    region: str
    bundle: str
    model_id: str
    kms_key_arn: str
    manifest_sha256: bytes | None
    nsm: str  # "device", or the emulator's state folder (an absolute path)
    max_concurrency: int
    threads: int | None
    exit_on_failure: bool = False
    runtime: str = "model"  # one of RUNTIMES
    echo_delay: float = 0.0

    @property
    def emulated_nsm_state(self) -> Path | None:
        """The emulator's state folder, or ``None`` for the real device."""
        return None if self.nsm == "device" else Path(self.nsm)

    @property
    def kms_host(self) -> str:
        """The host name of ``kms_endpoint`` (``kms.REGION.amazonaws.com`` on AWS)."""
        return _host(self.kms_endpoint)

    def kms_endpoint_url(self, port: int) -> str:
        """``kms_endpoint`` with the loopback forwarder's ``port`` filled in."""
        return self.kms_endpoint.replace("{port}", str(port))


def load_config(path: Path) -> EnclaveConfig:
    """Read and check the configuration file at ``path`` (at most 64 KiB)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise InvalidConfig(
            "", f"cannot read {path}: {exc.strerror or type(exc).__name__}"
        ) from None
    return parse_config(data)


def parse_config(data: bytes) -> EnclaveConfig:
    """Check the JSON configuration ``data``; raise :class:`InvalidConfig` naming the key."""
    if type(data) is not bytes:
        raise InvalidConfig("", "the configuration must be bytes")
    if len(data) > MAX_CONFIG_SIZE:
        raise InvalidConfig("", f"the file is larger than {MAX_CONFIG_SIZE} bytes")
    # (1) JSON, strictly: UTF-8, one object, no duplicate keys, no NaN/Infinity
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError:
        raise InvalidConfig("", "the file is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidConfig("", f"not JSON (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise InvalidConfig("", "nested too deeply") from None
    if type(value) is not dict:
        raise InvalidConfig("", "the file must hold one JSON object")
    # (2) exactly the known keys
    missing = sorted(_REQUIRED - value.keys())
    if missing:
        raise InvalidConfig(missing[0], "is required")
    unknown = sorted(value.keys() - _REQUIRED - _OPTIONAL)
    if unknown:
        raise InvalidConfig(unknown[0][:64], "is not a known key")
    # (3) each value by its rule
    region = _match(value, "region", _REGION, "an AWS region such as us-east-1")
    arn = _match(
        value, "kms_key_arn", _KEY_ARN, "a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID)"
    )
    arn_match = _KEY_ARN.fullmatch(arn)
    if arn_match is None or arn_match["region"] != region:
        raise InvalidConfig("kms_key_arn", "names another region than 'region'")
    nsm = _nsm(value)
    endpoint = _endpoint(value)
    if nsm == "device" and not endpoint.startswith("https://"):
        # (4) on real hardware only TLS (ending inside the enclave) keeps the parent out of the
        # KMS conversation: over http it could forge the Decrypt answer and choose the data key
        raise InvalidConfig("kms_endpoint", 'must be https:// when "nsm" is "device"')
    if nsm == "device" and _host(endpoint) not in kms_hosts(region):
        # (5) and TLS to the KMS of the key's region: the image's entry point resolves this host
        # to the loopback forwarder (enclave/netif.py), and the certificate must be KMS's
        allowed = " or ".join(kms_hosts(region))
        raise InvalidConfig(
            "kms_endpoint",
            f'with "nsm": "device" the host must be {allowed} (the KMS of region {region!r}), '
            f"not {_host(endpoint)!r}",
        )
    return EnclaveConfig(
        control=_address(value, "control", allow_any_cid=True),
        bundle_streamer=_address(value, "bundle_streamer"),
        kms_relay=_address(value, "kms_relay"),
        kms_endpoint=endpoint,
        region=region,
        bundle=_match(value, "bundle", _BUNDLE, "1..256 printable ASCII characters, no space"),
        model_id=_match(value, "model_id", _MODEL_ID, "1..128 characters of [A-Za-z0-9._:/-]"),
        kms_key_arn=arn,
        manifest_sha256=_digest(value),
        nsm=nsm,
        max_concurrency=_int(value, "max_concurrency", 1, MAX_CONCURRENCY),
        threads=None if value["threads"] is None else _int(value, "threads", 1, MAX_THREADS),
        exit_on_failure=_bool(value, "exit_on_failure", default=False),
        runtime=_runtime(value),
        echo_delay=_echo_delay(value),
    )


def _runtime(value: dict[str, object]) -> str:
    item = value.get("runtime", "model")
    if type(item) is not str or item not in RUNTIMES:
        raise InvalidConfig("runtime", f"must be one of {', '.join(RUNTIMES)}")
    return item


def _echo_delay(value: dict[str, object]) -> float:
    item = value.get("echo_delay", 0)
    if type(item) not in (int, float) or not 0 <= item <= 10:  # type: ignore[operator]
        raise InvalidConfig("echo_delay", "must be a number of seconds in 0..10")
    if value.get("runtime", "model") != "echo" and item:
        raise InvalidConfig("echo_delay", 'applies only to "runtime": "echo"')
    return float(item)  # type: ignore[arg-type]


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, item in pairs:
        if key in result:
            raise InvalidConfig(key, "appears twice")
        result[key] = item
    return result


def _no_constant(name: str) -> object:
    raise InvalidConfig("", f"{name} is not a JSON number")


def _text(value: dict[str, object], key: str) -> str:
    item = value[key]
    if type(item) is not str:
        raise InvalidConfig(key, "must be a string")
    return item


def _match(value: dict[str, object], key: str, pattern: re.Pattern[str], rule: str) -> str:
    item = _text(value, key)
    if not pattern.fullmatch(item):
        raise InvalidConfig(key, f"must be {rule}")
    return item


def _int(value: dict[str, object], key: str, low: int, high: int) -> int:
    item = value[key]
    if type(item) is not int or not low <= item <= high:
        raise InvalidConfig(key, f"must be an integer in {low}..{high}")
    return item


def _bool(value: dict[str, object], key: str, *, default: bool) -> bool:
    item = value.get(key, default)
    if type(item) is not bool:
        raise InvalidConfig(key, "must be true or false")
    return item


def _address(value: dict[str, object], key: str, *, allow_any_cid: bool = False) -> Address:
    text = _text(value, key)
    if allow_any_cid:
        text = _ANY_CID.sub(f"vsock://{VMADDR_CID_ANY}:", text, count=1)
    try:
        return parse_address(text)
    except AddressError as exc:
        raise InvalidConfig(key, str(exc)) from None


def _endpoint(value: dict[str, object]) -> str:
    item = _text(value, "kms_endpoint")
    if not _ENDPOINT.fullmatch(item):
        raise InvalidConfig(
            "kms_endpoint",
            "must be http(s)://HOST:{port}, with {port} where the forwarder's port goes",
        )
    return item


def _host(endpoint: str) -> str:
    match = _ENDPOINT.fullmatch(endpoint)
    return match["host"] if match is not None else ""


def kms_hosts(region: str) -> tuple[str, ...]:
    """KMS's endpoint host names in ``region``: standard and FIPS (AWS General Reference, "AWS
    Key Management Service endpoints"); the China regions are under amazonaws.com.cn."""
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return (f"kms.{region}.{suffix}", f"kms-fips.{region}.{suffix}")


def _digest(value: dict[str, object]) -> bytes | None:
    item = value["manifest_sha256"]
    if item is None:
        return None
    if type(item) is not str or not _SHA256_HEX.fullmatch(item):
        raise InvalidConfig("manifest_sha256", "must be null or 64 lowercase hex digits")
    return bytes.fromhex(item)


def _nsm(value: dict[str, object]) -> str:
    item = _text(value, "nsm")
    if item == "device":
        return item
    prefix, sep, path = item.partition(":")
    if prefix != "emulated" or not sep or not path.startswith("/") or "\x00" in path:
        raise InvalidConfig("nsm", 'must be "device" or "emulated:/absolute/state/folder"')
    return path
