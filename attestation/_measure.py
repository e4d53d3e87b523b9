"""Measurements of the running enclave application, for the NSM emulator's PCR0, PCR1 and PCR2.

On Nitro hardware the PCRs are computed by the hypervisor from the enclave image file (EIF) when the
enclave boots: PCR0 over the whole image, PCR1 over the kernel and boot ramdisk, PCR2 over the
application ramdisk. Each is SHA384(0^48 ‖ SHA384(section data)): the NSM extend rule applied once
to a zeroed register (aws-nitro-enclaves-image-format, src/utils/eif_reader.rs; the extend rule is
aws-nitro-enclaves-nsm-api src/api/mod.rs, ``Request::ExtendPCR``).

The emulator has no image, so it measures what plays the same roles in local mode:

- PCR1 ("kernel and boot"): a stable description of the Python runtime (implementation, version,
  machine architecture). Never the hostname, a user name or a path: the same code on two machines of
  the same kind must measure the same.
- PCR2 ("application"): every ``.py`` file of the enclave-side packages, as a sorted list of
  (path relative to the package's parent, content), each item length-prefixed so that no two
  different trees encode to the same bytes.
- PCR0 ("whole image"): both inputs above, in that order.

Changing one byte of enclave code therefore changes PCR2 and PCR0, which is what a key policy pinned
on PCR0 must notice.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import platform
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from attestation.errors import ConfigError

__all__ = [
    "DEFAULT_PACKAGES",
    "PCR_LENGTH",
    "application_measurements",
    "extend",
    "locate_package",
    "measure_trees",
    "pcr_of",
    "runtime_description",
]

PCR_LENGTH = 48
"""SHA384 PCRs are 48 bytes."""

DEFAULT_PACKAGES: tuple[str, ...] = ("enclave", "attestation", "protocol")
"""The packages that run inside the enclave (ARCHITECTURE.md, "Packages")."""

_ZERO_PCR = bytes(PCR_LENGTH)
_RUNTIME_DOMAIN = b"nci-measure-runtime-v1"
_APPLICATION_DOMAIN = b"nci-measure-application-v1"
_IMAGE_DOMAIN = b"nci-measure-image-v1"


def extend(old: bytes, data: bytes) -> bytes:
    """The NSM ``ExtendPCR`` rule: ``SHA384(old ‖ data)``.

    Source: aws-nitro-enclaves-nsm-api src/api/mod.rs (``Request::ExtendPCR``); the same rule is
    implemented by QEMU's virtio-nsm device (hw/virtio/virtio-nsm.c, ``extend_pcr``).
    """
    if len(old) != PCR_LENGTH:
        raise ValueError(f"old is {len(old)} bytes; SHA384 PCRs are {PCR_LENGTH}")
    return hashlib.sha384(old + data).digest()


def pcr_of(data_hash: bytes) -> bytes:
    """The value of a zeroed PCR extended once with ``data_hash``: ``SHA384(0^48 ‖ data_hash)``.

    The EIF rule for PCR0/1/2 is ``pcr_of(SHA384(section data))``.
    """
    return extend(_ZERO_PCR, data_hash)


def _item(data: bytes) -> bytes:
    """One length-prefixed item: 8-byte big-endian length, then the bytes."""
    return len(data).to_bytes(8, "big") + data


def runtime_description() -> bytes:
    """The stable description of the Python runtime that PCR1 measures.

    Implementation name, full version and machine architecture; nothing that names this host.
    """
    fields = (
        sys.implementation.name,
        ".".join(str(part) for part in sys.version_info[:3]),
        sys.version_info.releaselevel,
        platform.machine(),
    )
    return _RUNTIME_DOMAIN + b"".join(_item(field.encode()) for field in fields)


def _python_files(root: Path) -> list[tuple[str, Path]]:
    """Every ``.py`` file under ``root`` as (POSIX path relative to ``root``'s parent, path).

    Directories are walked without following symbolic links; the result is sorted by relative path
    so that the order does not depend on the file system.
    """
    found: list[tuple[str, Path]] = []
    base = root.parent
    for directory, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(name for name in dirnames if name != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(directory, name)
                found.append((path.relative_to(base).as_posix(), path))
    found.sort(key=lambda entry: entry[0])
    return found


def _application_bytes(roots: Iterable[Path]) -> bytes:
    """The encoding PCR2 measures: every file of every tree, sorted, each field length-prefixed."""
    entries: dict[str, Path] = {}
    for root in roots:
        if not root.is_dir():
            raise ConfigError(f"package directory {root} does not exist; it cannot be measured")
        for relative, path in _python_files(root):
            if relative in entries:
                raise ConfigError(f"{relative} is provided by two measured directories")
            entries[relative] = path
    # (1) a count, then (2) for each file in path order: its relative path and its content.
    chunks = [_APPLICATION_DOMAIN, len(entries).to_bytes(8, "big")]
    for relative in sorted(entries):
        try:
            content = entries[relative].read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {relative} to measure it: {exc.strerror}") from exc
        chunks.append(_item(relative.encode()))
        chunks.append(_item(content))
    return b"".join(chunks)


def measure_trees(roots: Sequence[Path]) -> dict[int, bytes]:
    """PCR0, PCR1 and PCR2 for the package directories ``roots``, without caching.

    Each root is a package directory (``.../attestation``); files are named relative to its parent,
    so the package name is part of what is measured.
    """
    runtime = runtime_description()
    application = _application_bytes(roots)
    # (1) PCR1: the runtime, (2) PCR2: the application, (3) PCR0: both, in that order.
    pcr1 = pcr_of(hashlib.sha384(runtime).digest())
    pcr2 = pcr_of(hashlib.sha384(application).digest())
    image = _IMAGE_DOMAIN + _item(runtime) + _item(application)
    pcr0 = pcr_of(hashlib.sha384(image).digest())
    return {0: pcr0, 1: pcr1, 2: pcr2}


def locate_package(name: str) -> list[Path]:
    """The directories the import system would load package ``name`` from, without importing it.

    A namespace package may have several portions; all are returned, resolved and sorted.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"package {name!r} cannot be located to measure it: {exc}") from exc
    if spec is None or spec.submodule_search_locations is None:
        raise ConfigError(f"{name!r} is not an importable package; it cannot be measured")
    return sorted({Path(location).resolve() for location in spec.submodule_search_locations})


@functools.lru_cache(maxsize=8)
def _cached_measurements(packages: tuple[str, ...]) -> tuple[tuple[int, bytes], ...]:
    roots = [root for name in packages for root in locate_package(name)]
    return tuple(sorted(measure_trees(roots).items()))


def application_measurements(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[int, bytes]:
    """PCR0, PCR1 and PCR2 of the running enclave application, computed once per process.

    ``packages`` are import names located through importlib (see :func:`locate_package`). The
    result is cached: it is read at every attestation and the code does not change under a running
    process. Use :func:`measure_trees` to measure arbitrary directories without the cache.
    """
    return dict(_cached_measurements(tuple(packages)))
