"""Trust roots: the pinned AWS Nitro Enclaves root G1, and explicitly named local roots.

The AWS root ships as package data and is pinned by the SHA-256 fingerprint of its DER encoding,
published by AWS with ``AWS_NitroEnclaves_Root-G1.zip`` (the fingerprint is checked every time the
file is loaded, so a corrupted or swapped copy is refused instead of trusted). A local root (the
emulated NSM's) is trusted only when a caller names it, and every result verified under it says that
no Nitro hardware was involved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from attestation.errors import ConfigError

__all__ = ["AWS_NITRO_ROOT_G1_SHA256", "AWS_ROOT_NAME", "LOCAL_ROOT_NAME", "TrustRoot"]

AWS_NITRO_ROOT_G1_SHA256 = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"
AWS_ROOT_NAME = "aws-nitro-enclaves-g1"
LOCAL_ROOT_NAME = "local"
_MAX_PEM = 16 * 1024


@dataclass(frozen=True)
class TrustRoot:
    """A root certificate a verifier accepts as ``cabundle[0]``, compared by DER fingerprint."""

    name: str
    certificate_der: bytes

    @property
    def fingerprint(self) -> str:
        """Upper-case hex SHA-256 of the DER certificate."""
        return hashlib.sha256(self.certificate_der).hexdigest().upper()

    @property
    def is_nitro_hardware(self) -> bool:
        """True only for the pinned AWS root: documents under it come from Nitro hardware."""
        return self.name == AWS_ROOT_NAME and self.fingerprint == AWS_NITRO_ROOT_G1_SHA256

    @staticmethod
    def aws_nitro_g1() -> TrustRoot:
        """The AWS Nitro Enclaves root G1 from package data, once its pinned fingerprint matches."""
        return _aws_root()

    @staticmethod
    def local(pem: bytes) -> TrustRoot:
        """A local (emulator) root from its PEM: its documents were not made by Nitro hardware."""
        der = _pem_to_der(pem, what="local root")
        if hashlib.sha256(der).hexdigest().upper() == AWS_NITRO_ROOT_G1_SHA256:
            return _aws_root()
        return TrustRoot(name=LOCAL_ROOT_NAME, certificate_der=der)


@cache
def _aws_root() -> TrustRoot:
    pem = (
        resources.files("attestation").joinpath("data/aws-nitro-enclaves-root-g1.pem").read_bytes()
    )
    der = _pem_to_der(pem, what="packaged AWS Nitro root")
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    if fingerprint != AWS_NITRO_ROOT_G1_SHA256:
        raise ConfigError(
            f"packaged AWS Nitro root has SHA-256 {fingerprint}; the pinned fingerprint is "
            f"{AWS_NITRO_ROOT_G1_SHA256}: the installation is corrupted"
        )
    return TrustRoot(name=AWS_ROOT_NAME, certificate_der=der)


def _pem_to_der(pem: bytes, *, what: str) -> bytes:
    if len(pem) > _MAX_PEM:
        raise ConfigError(
            f"{what} is {len(pem)} bytes; a root certificate PEM is at most {_MAX_PEM}"
        )
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{what} is not a PEM certificate: {exc}") from None
    return cert.public_bytes(Encoding.DER)
