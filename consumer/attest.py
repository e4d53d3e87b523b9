"""Verify an enclave's attestation for a consumer, and bind its request-encryption key to it.

Pure apart from reading expectation and root files: the transport (``consumer.client``) fetches the
document for a fresh nonce, and :func:`verify_attestation` decides, at a given ``now``:

1. the document verifies (:func:`attestation.verify`): parse, chain to a trusted root, validity at
   ``now``, ES384 signature, debug mode refused, the PCRs match an expected set, the nonce is ours,
   the document is at most ``max_age`` old (AWS attestation process §3; docs/attestation.md);
   every accepted PCR set must pin the image (PCR0, or PCR8 for a signed image), else it is
   refused as our own configuration before anything is fetched;
2. ``user_data`` is exactly the CBOR map ``{"v": 1, "ohttp_key_config": bytes, "model_id": text,
   "manifest_sha256": bytes(32)}`` (docs/request-path.md, "Attestation for consumers"), decoded
   strictly: one item, no trailing bytes, no duplicate or unknown keys, no tags; its model id and
   bundle digest equal the pinned ones, when the consumer pinned them;
3. the key configuration is one RFC 9458 §3.1 configuration with a suite we implement, and its
   X25519 public key equals the document's ``public_key``: only then does encrypting to it mean
   encrypting to the measured enclave.

Every failure is :class:`~consumer.errors.AttestationFailed` naming the rule.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from attestation import ExpectedMeasurements, Nonce, PcrSet, Policy, TrustRoot, verify
from attestation.errors import AttestationError
from attestation.errors import ConfigError as AttestationConfigError
from attestation.expectations import load_expectations
from attestation.policy import ExpectedNonce, MaxAge
from attestation.verify import VerifiedAttestation
from consumer.errors import AttestationFailed, ConfigError
from protocol.control import USER_DATA_VERSION, UserData
from protocol.errors import FrameError, MalformedMessage
from protocol.ohttp import KeyConfig

__all__ = [
    "DEFAULT_MAX_AGE",
    "IMAGE_PCRS",
    "USER_DATA_VERSION",
    "Attestation",
    "Expectation",
    "RootSource",
    "check_manifest_sha256",
    "check_model_id",
    "load_measurements",
    "load_roots",
    "parse_user_data",
    "require_image_pinned",
    "verify_attestation",
]

DEFAULT_MAX_AGE: Final = timedelta(minutes=5)
IMAGE_PCRS: Final = (0, 8)  # PCR0: the whole enclave image; PCR8: its signing certificate
_MAX_ROOT_PEM: Final = 16 * 1024
_MAX_MODEL_ID: Final = 256

Expectation = ExpectedMeasurements | PcrSet | Mapping[int, bytes] | str | os.PathLike[str]
"""Expected measurements: the type itself, one PCR set, or the path of an ``--expect`` file."""

RootSource = bytes | str | os.PathLike[str]
"""A local root: its PEM bytes, or the path of its PEM file."""


@dataclass(frozen=True)
class Attestation:
    """A verified attestation and what it binds: the enclave's OHTTP key, model and bundle.

    Only :func:`verify_attestation` makes these; requests are encrypted to nothing else.
    """

    verified: VerifiedAttestation
    key_config: bytes  # the RFC 9458 key configuration, as attested
    key_id: int
    model_id: str
    manifest_sha256: bytes
    nonce: bytes
    max_age: timedelta
    model_pinned: bool = False  # the model id was compared with the consumer's pinned one
    manifest_pinned: bool = False  # so was the bundle's manifest digest

    @property
    def module_id(self) -> str:
        return self.verified.module_id

    @property
    def timestamp(self) -> datetime:
        return self.verified.timestamp

    @property
    def verified_at(self) -> datetime:
        return self.verified.verified_at

    @property
    def age(self) -> timedelta:
        """How old the document was when it was verified (never negative)."""
        return max(self.verified_at - self.timestamp, timedelta(0))

    @property
    def pcrs(self) -> Mapping[int, bytes]:
        return self.verified.pcrs

    @property
    def root(self) -> str:
        return self.verified.root.name

    @property
    def is_nitro_hardware(self) -> bool:
        """False when the document chains to a local (emulator) root: no Nitro hardware."""
        return self.verified.is_nitro_hardware

    def expired(self, now: datetime) -> bool:
        """Whether the document is older than ``max_age`` at ``now``: then attest again."""
        return now - self.timestamp > self.max_age

    def checks(self) -> list[tuple[str, str]]:
        """Every check that held, as ``(name, detail)``, in the order they ran."""
        out = [(c.name, c.detail) for c in self.verified.checks]
        out.append(
            (
                "user data",
                f"v{USER_DATA_VERSION}: model {_printable(self.model_id)}, "
                f"manifest sha256 {self.manifest_sha256.hex()}",
            )
        )
        pinned = [
            name
            for name, on in (("model id", self.model_pinned), ("manifest", self.manifest_pinned))
            if on
        ]
        if pinned:
            out.append(("pinned model", f"{' and '.join(pinned)} equal the expected ones"))
        out.append(
            (
                "key binding",
                f"OHTTP key id {self.key_id}: its X25519 key is the document's public_key",
            )
        )
        return out

    def describe(self) -> list[str]:
        """A few lines for a person: what was verified, and what that means."""
        checks = dict(self.checks())
        lines = [
            f"measurements: {checks.get('measurements', 'checked')}",
            f"module:       {_printable(self.module_id)}",
            f"document:     {self.age.total_seconds():.0f} s old at verification "
            f"(maximum {self.max_age.total_seconds():.0f} s), fresh nonce echoed",
            f"OHTTP key:    id {self.key_id}, bound to the document's public_key",
            f"model:        {_printable(self.model_id)}{_pinned(self.model_pinned)}",
            f"manifest:     sha256 {self.manifest_sha256.hex()}{_pinned(self.manifest_pinned)}",
        ]
        if self.is_nitro_hardware:
            lines.append("root:         AWS Nitro Enclaves root G1 (Nitro hardware)")
        else:
            lines.append(
                f"root:         {self.root}: NOT Nitro hardware (a local emulator's document; "
                "it proves nothing about an AWS enclave)"
            )
        return lines

    def to_json(self) -> dict[str, object]:
        return {
            "valid": True,
            "module_id": self.module_id,
            "timestamp": self.verified.document.timestamp_ms,
            "age_seconds": round(self.age.total_seconds(), 3),
            "max_age_seconds": self.max_age.total_seconds(),
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "root": self.root,
            "nitro_hardware": self.is_nitro_hardware,
            "verified_at": self.verified_at.isoformat(),
            "nonce": self.nonce.hex(),
            "key_id": self.key_id,
            "model_id": self.model_id,
            "manifest_sha256": self.manifest_sha256.hex(),
            "checks": [{"name": n, "ok": True, "detail": d} for n, d in self.checks()],
        }


def verify_attestation(
    raw: bytes,
    *,
    nonce: Nonce,
    measurements: ExpectedMeasurements,
    roots: Sequence[TrustRoot],
    now: datetime,
    max_age: timedelta = DEFAULT_MAX_AGE,
    model_id: str | None = None,
    manifest_sha256: bytes | str | None = None,
) -> Attestation:
    """Verify ``raw`` (untrusted: it comes through the parent) as the answer to ``nonce``.

    ``model_id`` and ``manifest_sha256`` (32 bytes or 64 hex digits), when given, must equal the
    ones in the document's ``user_data``. Raises :class:`AttestationFailed` for any refused rule,
    :class:`ConfigError` for our own configuration (no root, an impossible ``max_age``, a PCR set
    that does not pin the image).
    """
    if not isinstance(measurements, ExpectedMeasurements):
        raise ConfigError("measurements must be ExpectedMeasurements")
    require_image_pinned(measurements)
    expected_model = None if model_id is None else check_model_id(model_id)
    expected_manifest = None if manifest_sha256 is None else check_manifest_sha256(manifest_sha256)
    # (1) the document: chain, validity, signature, debug mode, PCRs, nonce, age
    try:
        policy = Policy(measurements, extra=(ExpectedNonce(nonce), MaxAge(max_age)))
        verified = verify(raw, roots=roots, now=now, policy=policy)
    except AttestationConfigError as exc:
        raise ConfigError(str(exc)) from None
    except AttestationError as exc:
        raise AttestationFailed(f"attestation refused: {exc}", reason=type(exc).__name__) from exc
    # (2) user_data: the enclave's key configuration, model and bundle, strictly decoded
    if verified.user_data is None:
        raise AttestationFailed("the document carries no user_data", reason="UserDataInvalid")
    key_config, attested_model, attested_manifest = parse_user_data(verified.user_data)
    if expected_model is not None and not hmac.compare_digest(
        attested_model.encode(), expected_model.encode()
    ):
        raise AttestationFailed(
            f"user_data.model_id is {_printable(attested_model)!r}; "
            f"the pinned model id is {expected_model!r}",
            reason="ModelMismatch",
        )
    if expected_manifest is not None and not hmac.compare_digest(
        attested_manifest, expected_manifest
    ):
        raise AttestationFailed(
            f"user_data.manifest_sha256 is {attested_manifest.hex()}; "
            f"the pinned digest is {expected_manifest.hex()}",
            reason="ManifestMismatch",
        )
    # (3) the key configuration's public key is the document's public_key
    try:
        config = KeyConfig.from_bytes(key_config)
        config.suite()
    except MalformedMessage as exc:
        raise AttestationFailed(
            f"user_data.ohttp_key_config: {exc}", reason="UserDataInvalid"
        ) from None
    public_key = verified.public_key
    if public_key is None or not hmac.compare_digest(config.public_key, public_key):
        raise AttestationFailed(
            "the OHTTP key configuration's public key differs from the document's public_key: "
            "the key is not bound to this enclave",
            reason="KeyBindingMismatch",
        )
    return Attestation(
        verified=verified,
        key_config=key_config,
        key_id=config.key_id,
        model_id=attested_model,
        manifest_sha256=attested_manifest,
        nonce=nonce.value,
        max_age=max_age,
        model_pinned=expected_model is not None,
        manifest_pinned=expected_manifest is not None,
    )


def parse_user_data(data: bytes) -> tuple[bytes, str, bytes]:
    """``(ohttp_key_config, model_id, manifest_sha256)`` from a document's ``user_data``.

    ``data`` is signed by the enclave's NSM but still checked field by field: exactly the four
    keys, ``v`` = 1, a 32-byte digest, a printable model id of 1..256 characters.
    """

    try:
        user_data = UserData.decode(data)
    except FrameError as exc:
        raise AttestationFailed(str(exc), reason="UserDataInvalid") from None
    return user_data.ohttp_key_config, user_data.model_id, user_data.manifest_sha256


def load_measurements(expect: Expectation) -> ExpectedMeasurements:
    """Expected measurements from ``expect``: the type itself, one PCR set (a :class:`PcrSet` or
    a mapping of index to 48 bytes), or the path of an ``--expect`` YAML/JSON file."""
    try:
        if isinstance(expect, ExpectedMeasurements):
            return require_image_pinned(expect)
        if isinstance(expect, PcrSet):
            return require_image_pinned(ExpectedMeasurements((expect,)))
        if isinstance(expect, str | os.PathLike):
            sets = tuple(load_expectations(Path(expect)))
            return require_image_pinned(ExpectedMeasurements(sets))
        if isinstance(expect, Mapping):
            return require_image_pinned(ExpectedMeasurements((PcrSet(expect),)))
    except AttestationConfigError as exc:
        raise ConfigError(str(exc)) from None
    raise ConfigError(
        "expect must be ExpectedMeasurements, a PCR set, or the path of an expectation file"
    )


def require_image_pinned(measurements: ExpectedMeasurements) -> ExpectedMeasurements:
    """``measurements`` if every accepted PCR set pins the enclave image, else :class:`ConfigError`.

    A set is matched alone, so a set without PCR0 or PCR8 accepts any image: PCR1 (kernel and
    boot ramdisk) is the same for every EIF one nitro-cli builds, PCR2 measures only the
    application, PCR3 and PCR4 the parent's IAM role and instance (AWS Nitro Enclaves user guide,
    "Where to get an enclave's measurements"). PCR0 measures the whole image; PCR8 the certificate
    a signed image was signed with.
    """
    for number, pcr_set in enumerate(measurements.sets, start=1):
        if not any(index in pcr_set.values for index in IMAGE_PCRS):
            pinned = ", ".join(f"PCR{i}" for i in pcr_set.values)
            raise ConfigError(
                f"accepted PCR set {number} of {len(measurements.sets)} pins only {pinned}, which "
                "any enclave image can match: every set must include PCR0 (the whole enclave "
                "image) or PCR8 (the certificate that signed the image)"
            )
    return measurements


def check_model_id(model_id: object) -> str:
    """A model id to pin: printable text of 1..256 characters (as ``user_data`` carries it)."""
    if (
        not isinstance(model_id, str)
        or not 0 < len(model_id) <= _MAX_MODEL_ID
        or not model_id.isprintable()
    ):
        raise ConfigError(
            f"the expected model id must be printable text of 1..{_MAX_MODEL_ID} characters"
        )
    return model_id


def check_manifest_sha256(digest: object) -> bytes:
    """A manifest digest to pin: 32 bytes, or their 64 hexadecimal digits."""
    if isinstance(digest, str):
        try:
            digest = bytes.fromhex(digest)
        except ValueError:
            raise ConfigError("the expected manifest sha256 is not hexadecimal") from None
    if not isinstance(digest, bytes) or len(digest) != 32:
        raise ConfigError("the expected manifest sha256 is 32 bytes (64 hexadecimal digits)")
    return digest


def load_roots(
    roots: Sequence[TrustRoot] | None = None, trust_local_root: RootSource | None = None
) -> tuple[TrustRoot, ...]:
    """The roots to trust: ``roots`` (default: the pinned AWS Nitro root G1), plus a local
    (emulator) root only when ``trust_local_root`` names it (PEM bytes or a PEM file's path)."""
    try:
        chosen = list(roots) if roots is not None else [TrustRoot.aws_nitro_g1()]
        if trust_local_root is not None:
            if isinstance(trust_local_root, bytes):
                pem = trust_local_root
            else:
                pem = _read_bounded(Path(trust_local_root))
            chosen.append(TrustRoot.local(pem))
    except AttestationConfigError as exc:
        raise ConfigError(str(exc)) from None
    if not chosen or not all(isinstance(r, TrustRoot) for r in chosen):
        raise ConfigError("roots must be a non-empty sequence of TrustRoot")
    return tuple(chosen)


def _read_bounded(path: Path) -> bytes:
    try:
        with path.open("rb") as fh:
            data = fh.read(_MAX_ROOT_PEM + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read local root {path}: {exc.strerror}") from None
    if len(data) > _MAX_ROOT_PEM:
        raise ConfigError(f"local root {path} is larger than {_MAX_ROOT_PEM} bytes")
    return data


def _pinned(on: bool) -> str:
    return " (equals the pinned value)" if on else ""


def _printable(text: str) -> str:
    """Escape anything a terminal could interpret (the module id is chosen by the other side)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
