"""Read expected measurements from the files people already have.

Accepted shapes (YAML or JSON; JSON is YAML):

- the object ``nitro-cli build-enclave`` / ``describe-eif`` prints::

      {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": "…", "PCR1": "…", "PCR2": "…"}}

  or its inner ``Measurements`` object alone;
- one PCR set as a mapping: keys ``PCR0``, ``pcr0`` or ``0``, values 96 hex characters;
- several accepted sets (rolling deploys): a list of such mappings, or ``{"accept": [ … ]}``.

Anything else, including unknown keys, is a :class:`~attestation.errors.ConfigError`: a typo
must not silently drop a pin.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from attestation.errors import ConfigError
from attestation.policy import PcrSet

__all__ = ["MAX_EXPECTATION_FILE", "load_expectations", "parse_expectations", "parse_pcr_option"]

MAX_EXPECTATION_FILE = 64 * 1024
_MAX_SETS = 64
_PCR_KEY = re.compile(r"^(?:pcr)?(\d{1,2})$", re.IGNORECASE)


def load_expectations(path: Path) -> list[PcrSet]:
    """Read ``path`` (bounded in size) and parse it with :func:`parse_expectations`."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_EXPECTATION_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read expectation file {path}: {exc.strerror}") from None
    if len(data) > MAX_EXPECTATION_FILE:
        raise ConfigError(f"expectation file {path} exceeds {MAX_EXPECTATION_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"expectation file {path} is not UTF-8 text") from None
    return parse_expectations(text, source=str(path))


def parse_expectations(text: str, *, source: str = "expectations") -> list[PcrSet]:
    """Parse YAML/JSON ``text`` into one or more accepted PCR sets."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML or JSON: {_first_line(exc)}") from None
    except (RecursionError, MemoryError):
        raise ConfigError(f"{source} is nested too deeply") from None
    if isinstance(doc, dict) and set(doc) == {"accept"}:
        doc = doc["accept"]
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise ConfigError(f"{source} lists no PCR set")
    if len(items) > _MAX_SETS:
        raise ConfigError(f"{source} lists {len(items)} PCR sets; at most {_MAX_SETS}")
    return [_parse_set(item, f"{source} set {n}") for n, item in enumerate(items, start=1)]


def parse_pcr_option(value: str) -> tuple[int, bytes]:
    """Parse ``INDEX=HEX`` (``--pcr``)."""
    index_text, sep, hex_text = value.partition("=")
    match = _PCR_KEY.match(index_text.strip())
    if not sep or match is None:
        raise ConfigError(f"--pcr {value!r}: expected INDEX=HEX, e.g. 0=<96 hex characters>")
    try:
        return int(match.group(1)), bytes.fromhex(hex_text.strip())
    except ValueError:
        raise ConfigError(f"--pcr {index_text}: value is not hexadecimal") from None


def _parse_set(item: Any, where: str) -> PcrSet:
    if isinstance(item, dict) and set(item) == {"Measurements"}:
        item = item["Measurements"]
    if not isinstance(item, dict) or not item:
        raise ConfigError(f"{where}: expected a mapping of PCR index to hex value")
    values: dict[int, str] = {}
    for key, value in item.items():
        if key == "HashAlgorithm":
            if not isinstance(value, str) or not value.lower().startswith("sha384"):
                raise ConfigError(f"{where}: HashAlgorithm {value!r}; only Sha384 is supported")
            continue
        match = _PCR_KEY.match(str(key))
        if match is None:
            raise ConfigError(f"{where}: unknown key {key!r} (expected PCR0…PCR31)")
        index = int(match.group(1))
        if index in values:
            raise ConfigError(f"{where}: PCR{index} is given twice")
        if isinstance(value, int | float):
            raise ConfigError(f"{where}: PCR{index} was read as a number; quote the hex value")
        if not isinstance(value, str):
            raise ConfigError(f"{where}: PCR{index} must be a hex string")
        values[index] = value.strip()
    return PcrSet.from_hex(values)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
