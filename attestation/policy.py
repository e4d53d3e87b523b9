"""Verification policies: what an authentic document must also show to be accepted.

A :class:`Policy` is built from small checks, each one a rule with a name:

- :class:`ExpectedMeasurements`: one or several accepted PCR sets (several for rolling deploys). A
  policy without one cannot verify; the escape hatch is :class:`UnsafeNoMeasurements`, which warns
  on every use.
- :class:`RejectDebugMode` (the default): PCR0, 1, 2 and 8 all zero means a debug-mode enclave,
  whose memory the host can read. :class:`UnsafeAllowDebugMode` lifts it, warning on every use.
- :class:`ExpectedNonce`, :class:`MaxAge`, :class:`ExpectedPublicKey`, :class:`ExpectedUserData`.

Each check's ``check(document, now)`` returns a one-line detail or raises a
:class:`~attestation.errors.PolicyViolation` subclass. Checks never see unauthenticated documents
through :func:`attestation.verify.verify`: it runs them only after chain and signature pass.
"""

from __future__ import annotations

import hmac
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from attestation.document import PCR_INDEXES, PCR_LENGTH, AttestationDocument
from attestation.errors import (
    ConfigError,
    DebugModeDocument,
    MeasurementMismatch,
    MeasurementNotPinned,
    NonceMismatch,
    PublicKeyMismatch,
    StaleDocument,
    UserDataMismatch,
)

__all__ = [
    "Check",
    "ExpectedMeasurements",
    "ExpectedNonce",
    "ExpectedPublicKey",
    "ExpectedUserData",
    "MaxAge",
    "Nonce",
    "PcrSet",
    "Policy",
    "RejectDebugMode",
    "UnsafeAllowDebugMode",
    "UnsafeNoMeasurements",
    "UnsafePolicyWarning",
]


class UnsafePolicyWarning(UserWarning):
    """Emitted on every use of an ``Unsafe…`` escape hatch."""


@runtime_checkable
class Check(Protocol):
    """One named rule over an authentic document."""

    @property
    def name(self) -> str: ...

    def check(self, document: AttestationDocument, now: datetime) -> str:
        """Return a one-line detail when the rule holds; raise a PolicyViolation otherwise."""
        ...


@dataclass(frozen=True)
class Nonce:
    """A verifier's challenge, echoed by the NSM in the document.

    Our own challenges are :data:`SIZE` (32) random bytes from :meth:`random`. To check documents
    that others challenged, any value of 16 to 1024 bytes is accepted: a shorter one is guessable.
    """

    value: bytes
    SIZE = 32
    MIN_SIZE = 16
    MAX_SIZE = 1024

    def __post_init__(self) -> None:
        if not isinstance(self.value, bytes):
            raise ConfigError(f"nonce must be bytes, not {type(self.value).__name__}")
        if not self.MIN_SIZE <= len(self.value) <= self.MAX_SIZE:
            raise ConfigError(
                f"nonce is {len(self.value)} bytes; allowed {self.MIN_SIZE} to {self.MAX_SIZE}"
            )

    @classmethod
    def random(cls) -> Nonce:
        """A fresh 32-byte nonce from the OS's CSPRNG."""
        return cls(os.urandom(cls.SIZE))

    @classmethod
    def from_hex(cls, text: str) -> Nonce:
        try:
            return cls(bytes.fromhex(text))
        except ValueError:
            raise ConfigError("nonce must be hexadecimal") from None

    def hex(self) -> str:
        return self.value.hex()


@dataclass(frozen=True)
class PcrSet:
    """Expected values for some PCRs: every listed index must match; others are not constrained."""

    values: Mapping[int, bytes]

    def __post_init__(self) -> None:
        if not self.values:
            raise ConfigError("a PCR set must name at least one PCR")
        for index, value in self.values.items():
            if isinstance(index, bool) or not isinstance(index, int) or index not in PCR_INDEXES:
                raise ConfigError(f"PCR index {index!r} is not in 0 to 31")
            if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
                length = len(value) if isinstance(value, bytes) else type(value).__name__
                raise ConfigError(f"expected pcr{index} is {length}; SHA384 PCRs are 48 bytes")
        object.__setattr__(self, "values", MappingProxyType(dict(sorted(self.values.items()))))

    @classmethod
    def from_hex(cls, values: Mapping[int, str]) -> PcrSet:
        parsed: dict[int, bytes] = {}
        for index, text in values.items():
            try:
                parsed[index] = bytes.fromhex(text)
            except (ValueError, TypeError):
                raise ConfigError(f"expected pcr{index} is not hexadecimal") from None
        return cls(parsed)

    def mismatches(self, pcrs: Mapping[int, bytes]) -> list[int]:
        """Indexes whose value differs (or is absent) in ``pcrs``; empty when the set matches."""
        return [i for i, v in self.values.items() if not hmac.compare_digest(pcrs.get(i, b""), v)]

    def describe(self) -> str:
        return ", ".join(f"PCR{i}={v.hex()[:16]}…" for i, v in self.values.items())


@dataclass(frozen=True)
class ExpectedMeasurements:
    """Accept a document whose PCRs match at least one of ``sets``."""

    sets: tuple[PcrSet, ...]
    name: str = field(default="measurements", init=False)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ConfigError("expected measurements need at least one PCR set")
        if not all(isinstance(s, PcrSet) for s in self.sets):
            raise ConfigError("expected measurements take PcrSet values")

    @classmethod
    def of(cls, *sets: Mapping[int, bytes] | PcrSet) -> ExpectedMeasurements:
        return cls(tuple(s if isinstance(s, PcrSet) else PcrSet(s) for s in sets))

    def check(self, document: AttestationDocument, now: datetime) -> str:
        for number, pcr_set in enumerate(self.sets, start=1):
            if not pcr_set.mismatches(document.pcrs):
                indexes = ", ".join(f"PCR{i}" for i in pcr_set.values)
                return f"{indexes} match accepted set {number} of {len(self.sets)}"
        closest = min(self.sets, key=lambda s: len(s.mismatches(document.pcrs)))
        differing = ", ".join(f"PCR{i}" for i in closest.mismatches(document.pcrs))
        raise MeasurementMismatch(
            f"PCRs match none of the {len(self.sets)} accepted set(s); "
            f"the closest differs in {differing}"
        )


@dataclass(frozen=True)
class _NotPinned:
    """What an inspection without expected measurements reports: a refusal, said plainly."""

    name: str = field(default="measurements", init=False)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        raise MeasurementNotPinned(
            "no expected measurement was pinned: the document may be authentic, "
            "but it is not verified to come from any particular enclave image"
        )


@dataclass(frozen=True)
class UnsafeNoMeasurements:
    """Accept any measurements. Any enclave image then passes: for experiments only."""

    name: str = field(default="measurements", init=False)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        warnings.warn(
            "UnsafeNoMeasurements: accepting a document without checking which code it attests",
            UnsafePolicyWarning,
            stacklevel=2,
        )
        return "NOT CHECKED (UnsafeNoMeasurements): any enclave image is accepted"


@dataclass(frozen=True)
class RejectDebugMode:
    """Refuse documents of debug-mode enclaves (PCR0, 1, 2 and 8 all zero). On by default."""

    name: str = field(default="debug mode", init=False)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        if document.is_debug_mode:
            raise DebugModeDocument(
                "PCR0, PCR1, PCR2 and PCR8 are all zero: the enclave runs in debug mode, "
                "where the parent can read its memory and console"
            )
        return "production mode (PCR0, 1, 2 and 8 not all zero)"


@dataclass(frozen=True)
class UnsafeAllowDebugMode:
    """Accept debug-mode documents. Their enclaves are open to the parent: for development only."""

    name: str = field(default="debug mode", init=False)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        warnings.warn(
            "UnsafeAllowDebugMode: debug-mode enclaves are accepted; their memory is not private",
            UnsafePolicyWarning,
            stacklevel=2,
        )
        if document.is_debug_mode:
            return "DEBUG MODE accepted (UnsafeAllowDebugMode): the enclave's memory is not private"
        return "production mode (debug mode would have been accepted)"


def _require_bytes(name: str, value: object) -> None:
    if not isinstance(value, bytes) or not value:
        raise ConfigError(f"expected {name} must be non-empty bytes (empty means absent)")


def _compare(name: str, expected: bytes, actual: bytes | None, error: type[Exception]) -> str:
    if actual is None:
        raise error(f"{name} is absent; expected {len(expected)} bytes")
    if not hmac.compare_digest(expected, actual):
        raise error(f"{name} differs from the expected value ({len(actual)} bytes)")
    return f"{name} matches ({len(actual)} bytes)"


@dataclass(frozen=True)
class ExpectedNonce:
    """The document must echo this nonce (proves it was made after the challenge)."""

    nonce: Nonce
    name: str = field(default="nonce", init=False)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        return _compare("nonce", self.nonce.value, document.nonce, NonceMismatch)


@dataclass(frozen=True)
class ExpectedPublicKey:
    """The document's public_key must equal this one (binds the enclave's key to the document)."""

    public_key: bytes
    name: str = field(default="public key", init=False)

    def __post_init__(self) -> None:
        _require_bytes("public_key", self.public_key)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        return _compare("public_key", self.public_key, document.public_key, PublicKeyMismatch)


@dataclass(frozen=True)
class ExpectedUserData:
    """The document's user_data must equal these bytes."""

    user_data: bytes
    name: str = field(default="user data", init=False)

    def __post_init__(self) -> None:
        _require_bytes("user_data", self.user_data)

    def check(self, document: AttestationDocument, now: datetime) -> str:
        return _compare("user_data", self.user_data, document.user_data, UserDataMismatch)


@dataclass(frozen=True)
class MaxAge:
    """The document must be at most ``max_age`` old at ``now``, and not dated after it.

    ``clock_skew`` tolerates a verifier clock slightly behind the NSM's.
    """

    max_age: timedelta
    clock_skew: timedelta = timedelta(seconds=60)
    name: str = field(default="freshness", init=False)

    def __post_init__(self) -> None:
        if self.max_age <= timedelta(0):
            raise ConfigError("max age must be positive")
        if self.clock_skew < timedelta(0):
            raise ConfigError("clock skew must not be negative")

    def check(self, document: AttestationDocument, now: datetime) -> str:
        age = now - document.timestamp
        if age < -self.clock_skew:
            raise StaleDocument(
                f"document is dated {-age.total_seconds():.0f} s after the verification time"
            )
        if age > self.max_age:
            raise StaleDocument(
                f"document is {age.total_seconds():.0f} s old; "
                f"the maximum age is {self.max_age.total_seconds():.0f} s"
            )
        seconds = max(age.total_seconds(), 0.0)
        return f"{seconds:.0f} s old (maximum {self.max_age.total_seconds():.0f} s)"


@dataclass(frozen=True)
class Policy:
    """Everything an authentic document must show. ``measurements`` has no default on purpose.

    ``measurements=None`` is allowed only for the auditor's report (an inspection that says no
    measurement was pinned); :func:`attestation.verify.verify` refuses it.
    """

    measurements: ExpectedMeasurements | UnsafeNoMeasurements | None
    debug: RejectDebugMode | UnsafeAllowDebugMode = RejectDebugMode()
    extra: tuple[Check, ...] = ()

    def __post_init__(self) -> None:
        allowed = (ExpectedMeasurements, UnsafeNoMeasurements, type(None))
        if not isinstance(self.measurements, allowed):
            raise ConfigError("measurements must be ExpectedMeasurements or UnsafeNoMeasurements")
        if not isinstance(self.debug, RejectDebugMode | UnsafeAllowDebugMode):
            raise ConfigError("debug must be RejectDebugMode or UnsafeAllowDebugMode")
        if not all(isinstance(c, Check) for c in self.extra):
            raise ConfigError("extra checks must implement Check")

    @classmethod
    def expect(
        cls,
        *pcr_sets: Mapping[int, bytes] | PcrSet,
        nonce: Nonce | None = None,
        max_age: timedelta | None = None,
        public_key: bytes | None = None,
        user_data: bytes | None = None,
    ) -> Policy:
        """The common case: accepted PCR sets plus optional nonce, age, key and data pins."""
        extra: list[Check] = []
        if nonce is not None:
            extra.append(ExpectedNonce(nonce))
        if max_age is not None:
            extra.append(MaxAge(max_age))
        if public_key is not None:
            extra.append(ExpectedPublicKey(public_key))
        if user_data is not None:
            extra.append(ExpectedUserData(user_data))
        return cls(ExpectedMeasurements.of(*pcr_sets), extra=tuple(extra))

    def checks(self) -> Iterable[Check]:
        """Every check in evaluation order: debug mode, measurements, then the extras."""
        yield self.debug
        yield self.measurements if self.measurements is not None else _NotPinned()
        yield from self.extra
