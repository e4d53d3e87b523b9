"""The NSM emulator's local certificate authority, shaped like the AWS Nitro attestation PKI.

Real attestation documents carry ``cabundle = [root, regional, zonal, instance]`` and a leaf
``certificate`` (nsm-api docs/attestation_process.md §2.1 and §3.2.3), all ECDSA P-384 with SHA-384.
This CA issues the same shape, with subjects that say plainly they are local:

============  =====================================================  ==========  ==================
level         subject CN                                             lifetime    BasicConstraints
============  =====================================================  ==========  ==================
root          ``nci-local.nitro-enclaves``                           ~30 years   CA, no pathlen
regional      ``<16 hex>.local.nci-local.nitro-enclaves``            30 days     CA, pathlen 2
zonal         ``<16 hex>.zonal.local.nci-local.nitro-enclaves``      5 days      CA, pathlen 1
instance      ``<instance id>.local.nci-local.nitro-enclaves``       1 day       CA, pathlen 0
leaf          ``<module id>.local.nci-local``                        3 hours     not a CA
============  =====================================================  ==========  ==================

Extensions follow the real chain (root and intermediates: critical BasicConstraints and KeyUsage,
subject and authority key identifiers; leaf: critical ``CA=false``, non-critical
``digitalSignature``).

State. :meth:`LocalCa.open` keeps the keys and certificates in a folder
(:mod:`attestation._castore`: mode 0700, files 0600, changes under an exclusive ``flock``, atomic
replacement) so that separate processes share one root and concurrent first runs end with one
chain. Keys are kept for the life of the folder; certificates are re-issued when they would not
cover their children's lifetime (an intermediate that has expired, or would expire before a child
it signs, is renewed first).

Determinism. :meth:`LocalCa.from_keys` builds the chain in memory from fixed keys and a fixed time;
with a fixed ``rng`` (serial numbers) and RFC 6979 deterministic ECDSA it issues byte-identical
certificates, for checked-in test vectors.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation._castore import CaStore
from attestation.errors import ConfigError

__all__ = [
    "DEFAULT_INSTANCE_ID",
    "LEAF_LIFETIME",
    "CaCertificate",
    "LocalCa",
]

DEFAULT_INSTANCE_ID: Final = "i-00000000000000000"
"""The emulated parent instance: the shape of an EC2 instance id (17 hex digits), all zeros."""

ROOT_LIFETIME: Final = timedelta(days=30 * 365 + 7)
REGIONAL_LIFETIME: Final = timedelta(days=30)
ZONAL_LIFETIME: Final = timedelta(days=5)
INSTANCE_LIFETIME: Final = timedelta(days=1)
LEAF_LIFETIME: Final = timedelta(hours=3)

_ROOT_BACKDATE: Final = timedelta(days=1)  # tolerate clocks that differ between processes
_INTERMEDIATE_BACKDATE: Final = timedelta(minutes=5)
_DOMAIN: Final = "nci-local.nitro-enclaves"
_ORGANIZATION: Final = "nci local emulator"
_CURVE_NAME: Final = ec.SECP384R1.name

Rng = Callable[[int], bytes]


@dataclass(frozen=True)
class _Level:
    name: str
    lifetime: timedelta
    path_length: int
    child_lifetime: timedelta  # the certificate must stay valid at least this long to sign


_INTERMEDIATES: Final = (
    _Level("regional", REGIONAL_LIFETIME, 2, ZONAL_LIFETIME),
    _Level("zonal", ZONAL_LIFETIME, 1, INSTANCE_LIFETIME),
    _Level("instance", INSTANCE_LIFETIME, 0, LEAF_LIFETIME),
)


@dataclass(frozen=True)
class CaCertificate:
    """A CA certificate and its private key."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


# -- issuing --------------------------------------------------------------------------------------


def _name(common_name: str, *, organizational_unit: str = "NCI") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "ZZ"),  # ISO 3166 user-assigned: no country
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_label(key: ec.EllipticCurvePublicKey) -> str:
    """16 hex digits naming a key, as AWS names its regional and zonal CAs."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def _subject(level: str, key: ec.EllipticCurvePublicKey, instance_id: str) -> x509.Name:
    if level == "root":
        return _name(_DOMAIN)
    if level == "regional":
        return _name(f"{_key_label(key)}.local.{_DOMAIN}")
    if level == "zonal":
        return _name(f"{_key_label(key)}.zonal.local.{_DOMAIN}")
    return _name(f"{instance_id}.local.{_DOMAIN}")


def _serial_number(rng: Rng, public_key: ec.EllipticCurvePublicKey, not_before: datetime) -> int:
    """A positive 128-bit serial number (RFC 5280 §4.1.2.2 allows up to 20 octets).

    ``rng`` supplies the randomness; hashing it with the subject key and start time keeps serials
    distinct even under a constant test ``rng``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(rng(16) + der + not_before.isoformat().encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1


def _aware(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ConfigError("times given to the local CA must be timezone-aware")
    return moment


def _utc_seconds(moment: datetime) -> datetime:
    return _aware(moment).replace(microsecond=0)


def _ca_key_usage(*, crl_sign: bool, digital_signature: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _sign(
    builder: x509.CertificateBuilder, issuer_key: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    # RFC 6979 deterministic ECDSA: no signing nonce to get wrong, and reproducible test vectors.
    return builder.sign(issuer_key, hashes.SHA384(), ecdsa_deterministic=True)


def _issue_root(key: ec.EllipticCurvePrivateKey, now: datetime, rng: Rng) -> x509.Certificate:
    not_before = _utc_seconds(now) - _ROOT_BACKDATE
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject("root", public_key, ""))
        .issuer_name(_subject("root", public_key, ""))
        .public_key(public_key)
        .serial_number(_serial_number(rng, public_key, not_before))
        .not_valid_before(not_before)
        .not_valid_after(not_before + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_ca_key_usage(crl_sign=True, digital_signature=True), critical=True)
    )
    return _sign(builder, key)


def _issue_intermediate(
    level: _Level,
    key: ec.EllipticCurvePrivateKey,
    issuer: CaCertificate,
    *,
    instance_id: str,
    now: datetime,
    rng: Rng,
) -> x509.Certificate:
    # A child never outlives its issuer.
    not_before = _utc_seconds(now) - _INTERMEDIATE_BACKDATE
    not_after = min(not_before + level.lifetime, issuer.certificate.not_valid_after_utc)
    public_key = key.public_key()
    issuer_public_key = issuer.key.public_key()
    is_instance = level.name == "instance"
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(level.name, public_key, instance_id))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(_serial_number(rng, public_key, not_before))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=level.path_length), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        # AWS's instance CAs may only sign certificates; regional and zonal ones also sign CRLs.
        .add_extension(
            _ca_key_usage(crl_sign=not is_instance, digital_signature=not is_instance),
            critical=True,
        )
    )
    return _sign(builder, issuer.key)


def _issue_leaf(
    public_key: ec.EllipticCurvePublicKey,
    issuer: CaCertificate,
    *,
    module_id: str,
    now: datetime,
    rng: Rng,
) -> x509.Certificate:
    not_before = _utc_seconds(now)
    not_after = min(not_before + LEAF_LIFETIME, issuer.certificate.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"{module_id}.local.nci-local"))
        .issuer_name(issuer.certificate.subject)
        .public_key(public_key)
        .serial_number(_serial_number(rng, public_key, not_before))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=False,
        )
    )
    return _sign(builder, issuer.key)


def _covers(certificate: x509.Certificate, start: datetime, end: datetime) -> bool:
    return certificate.not_valid_before_utc <= start and end <= certificate.not_valid_after_utc


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _same_key(certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    return certificate.public_key() == key.public_key()


def _renewed(
    level: _Level,
    current: CaCertificate,
    issuer: CaCertificate,
    *,
    instance_id: str,
    now: datetime,
    rng: Rng,
) -> CaCertificate | None:
    """A re-issued certificate for ``level`` if the current one cannot sign for its children's
    whole lifetime from ``now`` on, names another subject, or was not issued by ``issuer``."""
    certificate = current.certificate
    expected_subject = _subject(level.name, current.key.public_key(), instance_id)
    if (
        _covers(certificate, now, now + level.child_lifetime)
        and certificate.subject == expected_subject
        and _same_key(certificate, current.key)
        and _issued_by(certificate, issuer.certificate)
    ):
        return None
    fresh = _issue_intermediate(
        level, current.key, issuer, instance_id=instance_id, now=now, rng=rng
    )
    return CaCertificate(current.key, fresh)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh P-384 private key."""
    return ec.generate_private_key(ec.SECP384R1())


def _check_key(key: object, where: str) -> ec.EllipticCurvePrivateKey:
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != _CURVE_NAME:
        raise ConfigError(f"{where} must be an EC P-384 private key")
    return key


# -- the state folder ---------------------------------------------------------------------------


def _load_or_create(
    store: CaStore, *, instance_id: str, now: datetime, rng: Rng
) -> list[CaCertificate]:
    """The chain [root, regional, zonal, instance] from ``store``, creating or renewing what is
    missing or due, and saving what changed. Call with the store's lock held."""
    # (1) the root: created once, never renewed (verifiers pin it).
    root_key = store.load_key("root")
    if root_key is None:
        root_key = generate_key()
        store.save_key("root", root_key)
    root_certificate = store.load_certificate("root")
    if root_certificate is None or not _same_key(root_certificate, root_key):
        root_certificate = _issue_root(root_key, now, rng)
        store.save_certificate("root", root_certificate)
    if not _covers(root_certificate, now, now):
        raise ConfigError(
            f"the local root {store.certificate_path('root')} is not valid at {now:%Y-%m-%d %H:%M}"
            f" (valid {root_certificate.not_valid_before_utc:%Y-%m-%d} to"
            f" {root_certificate.not_valid_after_utc:%Y-%m-%d}); use a fresh state folder"
        )
    chain = [CaCertificate(root_key, root_certificate)]
    # (2) each intermediate, top-down, so that a renewed issuer signs its renewed children.
    for level in _INTERMEDIATES:
        key = store.load_key(level.name)
        if key is None:
            key = generate_key()
            store.save_key(level.name, key)
        certificate = store.load_certificate(level.name)
        if certificate is None:
            certificate = _issue_intermediate(
                level, key, chain[-1], instance_id=instance_id, now=now, rng=rng
            )
            store.save_certificate(level.name, certificate)
        entry = CaCertificate(key, certificate)
        renewed = _renewed(level, entry, chain[-1], instance_id=instance_id, now=now, rng=rng)
        if renewed is not None:
            store.save_certificate(level.name, renewed.certificate)
            entry = renewed
        chain.append(entry)
    return chain


# -- the CA -------------------------------------------------------------------------------------


class LocalCa:
    """The emulator's CA: a pinned local root and three intermediates that sign enclave leaves.

    Build it with :meth:`open` (shared state folder) or :meth:`from_keys` (in memory, fixed keys).
    Thread-safe.
    """

    def __init__(
        self,
        chain: Sequence[CaCertificate],
        *,
        instance_id: str,
        rng: Rng,
        store: CaStore | None,
    ) -> None:
        if len(chain) != 1 + len(_INTERMEDIATES):
            raise ConfigError("a local CA chain is [root, regional, zonal, instance]")
        self._chain = list(chain)
        self._instance_id = instance_id
        self._rng = rng
        self._store = store
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        now: datetime,
        instance_id: str = DEFAULT_INSTANCE_ID,
        rng: Rng = os.urandom,
    ) -> LocalCa:
        """Load the CA kept in ``directory``, creating it (or renewing due certificates) first."""
        _aware(now)
        store = CaStore(directory)
        with store.locked():
            chain = _load_or_create(store, instance_id=instance_id, now=now, rng=rng)
        return cls(chain, instance_id=instance_id, rng=rng, store=store)

    @classmethod
    def from_keys(
        cls,
        root_key: ec.EllipticCurvePrivateKey,
        regional_key: ec.EllipticCurvePrivateKey,
        zonal_key: ec.EllipticCurvePrivateKey,
        instance_key: ec.EllipticCurvePrivateKey,
        *,
        now: datetime,
        instance_id: str = DEFAULT_INSTANCE_ID,
        rng: Rng = os.urandom,
    ) -> LocalCa:
        """A CA in memory from fixed keys, issued at ``now``; nothing touches the disk.

        With a deterministic ``rng`` the certificates are byte-identical from run to run.
        """
        _aware(now)
        keys = (root_key, regional_key, zonal_key, instance_key)
        for name, key in zip(("root", "regional", "zonal", "instance"), keys, strict=True):
            _check_key(key, f"the {name} key")
        chain = [CaCertificate(root_key, _issue_root(root_key, now, rng))]
        for level, key in zip(_INTERMEDIATES, keys[1:], strict=True):
            certificate = _issue_intermediate(
                level, key, chain[-1], instance_id=instance_id, now=now, rng=rng
            )
            chain.append(CaCertificate(key, certificate))
        return cls(chain, instance_id=instance_id, rng=rng, store=None)

    @property
    def instance_id(self) -> str:
        """The emulated parent instance's id, named by the instance CA."""
        return self._instance_id

    @property
    def root_certificate(self) -> x509.Certificate:
        """The local trust anchor."""
        return self._chain[0].certificate

    @property
    def root_certificate_der(self) -> bytes:
        return self.root_certificate.public_bytes(serialization.Encoding.DER)

    @property
    def root_pem(self) -> bytes:
        return self.root_certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def root_pem_path(self) -> Path | None:
        """The root certificate's file in the state folder; ``None`` for an in-memory CA."""
        return None if self._store is None else self._store.certificate_path("root")

    def cabundle(self) -> list[x509.Certificate]:
        """The document's ``cabundle``: [root, regional, zonal, instance], root first."""
        with self._lock:
            return [entry.certificate for entry in self._chain]

    def refresh(self, now: datetime) -> bool:
        """Renew intermediates that cannot sign a full-lifetime leaf at ``now``; True if any was.

        With a state folder the renewal happens under its lock, after re-reading it (another
        process may have renewed already).
        """
        _aware(now)
        with self._lock:
            if all(
                _covers(entry.certificate, now, now + level.child_lifetime)
                for level, entry in zip(_INTERMEDIATES, self._chain[1:], strict=True)
            ):
                return False
            if self._store is not None:
                with self._store.locked():
                    self._chain = _load_or_create(
                        self._store, instance_id=self._instance_id, now=now, rng=self._rng
                    )
                return True
            for position, level in enumerate(_INTERMEDIATES, start=1):
                renewed = _renewed(
                    level,
                    self._chain[position],
                    self._chain[position - 1],
                    instance_id=self._instance_id,
                    now=now,
                    rng=self._rng,
                )
                if renewed is not None:
                    self._chain[position] = renewed
            return True

    def issue_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey,
        *,
        module_id: str,
        now: datetime,
        rng: Rng | None = None,
    ) -> x509.Certificate:
        """A leaf certificate for an enclave's signing key, valid from ``now`` for three hours (or
        less if the instance CA expires sooner). Call :meth:`refresh` first."""
        with self._lock:
            issuer = self._chain[-1]
        return _issue_leaf(public_key, issuer, module_id=module_id, now=now, rng=rng or self._rng)
