"""Verify an attestation document: AWS signature chain, COSE signature, then the caller's policy.

Two APIs over one procedure (python-tuf's pair):

- :func:`verify` raises the first failure as a typed error, or returns a frozen
  :class:`VerifiedAttestation`. It refuses a policy without expected measurements.
- :func:`attestation.report.audit` never raises for a bad document: it runs every check it can and
  lists each outcome, for auditors.

The procedure follows AWS's "Verifying the root of trust" (attestation process §3):

1. parse: COSE_Sign1 with ES384, the payload's field rules (§3.2 syntactical validation);
2. chain: ``cabundle[0]`` is a trusted root (pinned by fingerprint), each following certificate and
   finally ``certificate`` is directly issued by the one before, with CA constraints and key usages
   (§3.2.2 certificate validity);
3. validity: every certificate is valid at ``now``, a required argument; the document's timestamp
   lies within the leaf's validity;
4. signature: the COSE ``Sig_structure`` (RFC 9052 §4.4) over the protected header and the payload
   bytes *as received* verifies with the leaf's P-384 key (§3.2.3 COSE signature);
5. policy: debug mode, expected measurements, nonce, age, public key, user data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.utils import CryptographyDeprecationWarning

from attestation.document import AttestationDocument
from attestation.errors import (
    AttestationError,
    CertificateExpired,
    ChainInvalid,
    ConfigError,
    MalformedDocument,
    SignatureInvalid,
)
from attestation.policy import Check, MaxAge, Policy
from attestation.roots import TrustRoot

__all__ = [
    "AuthenticDocument",
    "CheckOutcome",
    "ProcedureState",
    "VerifiedAttestation",
    "authenticate",
    "run_checks",
    "verify",
]


@dataclass(frozen=True)
class VerifiedAttestation:
    """A document that passed chain, signature and a policy with pinned measurements.

    Key release and request handling accept only this type, never raw bytes.
    """

    document: AttestationDocument
    root: TrustRoot
    verified_at: datetime
    checks: tuple[CheckOutcome, ...]

    @property
    def module_id(self) -> str:
        return self.document.module_id

    @property
    def timestamp(self) -> datetime:
        return self.document.timestamp

    @property
    def pcrs(self) -> Mapping[int, bytes]:
        return self.document.pcrs

    @property
    def public_key(self) -> bytes | None:
        return self.document.public_key

    @property
    def user_data(self) -> bytes | None:
        return self.document.user_data

    @property
    def nonce(self) -> bytes | None:
        return self.document.nonce

    @property
    def is_nitro_hardware(self) -> bool:
        """False when the chain ends at a local (emulator) root: no Nitro hardware was involved."""
        return self.root.is_nitro_hardware


@dataclass(frozen=True)
class CheckOutcome:
    """One step of the procedure: its name, whether it held, and a one-line detail."""

    name: str
    ok: bool
    detail: str
    error: AttestationError | None = None


def verify(
    raw: bytes, *, roots: Sequence[TrustRoot], now: datetime, policy: Policy
) -> VerifiedAttestation:
    """Verify ``raw`` (untrusted: it comes from the enclave's host or the network).

    Raises the first failing rule's :class:`~attestation.errors.AttestationError`; a
    :class:`~attestation.errors.ConfigError` when the policy pins no measurement.
    """
    if policy.measurements is None:
        raise ConfigError(
            "the policy pins no measurement: pass ExpectedMeasurements "
            "(or UnsafeNoMeasurements to accept any enclave image, which is unsafe)"
        )
    outcomes: list[CheckOutcome] = []
    state = ProcedureState()
    for outcome in run_checks(
        raw, state, roots=roots, now=now, checks=policy.checks(), stop_on_failure=True
    ):
        if outcome.error is not None:
            raise outcome.error
        outcomes.append(outcome)
    if state.document is None or state.root is None:  # pragma: no cover (every step passed)
        raise AssertionError("verification ended without a document and a root")
    return VerifiedAttestation(
        document=state.document, root=state.root, verified_at=now, checks=tuple(outcomes)
    )


@dataclass(frozen=True)
class AuthenticDocument:
    """A document whose chain, validity, signature and age are checked, and nothing else.

    For a relying party that enforces measurements itself, as KMS does through the key policy's
    ``kms:RecipientAttestation:*`` conditions. It is not a :class:`VerifiedAttestation`: code that
    needs the enclave's identity must not accept it.
    """

    document: AttestationDocument
    root: TrustRoot
    verified_at: datetime


def authenticate(
    raw: bytes, *, roots: Sequence[TrustRoot], now: datetime, max_age: timedelta
) -> AuthenticDocument:
    """Check that Nitro hardware (or a named local root) made ``raw`` at most ``max_age`` ago.

    ``raw`` is untrusted. Raises the first failing rule's error. Debug-mode documents pass: their
    all-zero PCRs are left for the caller's conditions to refuse.
    """
    state = ProcedureState()
    checks = [MaxAge(max_age)]
    for outcome in run_checks(
        raw, state, roots=roots, now=now, checks=checks, stop_on_failure=True
    ):
        if outcome.error is not None:
            raise outcome.error
    if state.document is None or state.root is None:  # pragma: no cover (every step passed)
        raise AssertionError("authentication ended without a document and a root")
    return AuthenticDocument(document=state.document, root=state.root, verified_at=now)


@dataclass
class ProcedureState:
    """What the procedure has established so far: the parsed document, the chain, its root."""

    document: AttestationDocument | None = None
    root: TrustRoot | None = None
    chain: list[x509.Certificate] | None = None


def run_checks(
    raw: bytes,
    state: ProcedureState,
    *,
    roots: Sequence[TrustRoot],
    now: datetime,
    checks: Iterable[Check],
    stop_on_failure: bool,
) -> Iterator[CheckOutcome]:
    """Yield each check's outcome in order, filling ``state`` as the steps pass.

    With ``stop_on_failure`` the first failure ends the run. Without it, checks that depend on a
    failed one are reported as not run, and the others still run (the auditor's view).
    """
    _require_aware(now)
    if not roots:
        raise ConfigError("no trust root given")
    steps: list[tuple[str, Callable[[], str], Callable[[], bool]]] = [
        ("parse", lambda: _parse(raw, state), lambda: True),
        ("chain", lambda: _chain(state, roots), lambda: state.document is not None),
        ("validity", lambda: _validity(state, now), lambda: state.chain is not None),
        ("signature", lambda: _signature(state), lambda: state.chain is not None),
    ]
    for check in checks:
        steps.append((check.name, _bind(check, state, now), lambda: state.root is not None))
    failed_names: list[str] = []
    for name, step, ready in steps:
        if not ready():
            reason = failed_names[0] if failed_names else "an earlier check"
            yield CheckOutcome(name, False, f"not run: {reason} failed")
            continue
        try:
            detail = step()
        except AttestationError as exc:
            failed_names.append(name)
            yield CheckOutcome(name, False, str(exc), exc)
            if stop_on_failure:
                return
            continue
        yield CheckOutcome(name, True, detail)


def _bind(check: Any, state: ProcedureState, now: datetime) -> Callable[[], str]:
    def run() -> str:
        assert state.document is not None
        detail: str = check.check(state.document, now)
        return detail

    return run


def _require_aware(now: datetime) -> None:
    if not isinstance(now, datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ConfigError("now must be a timezone-aware datetime")


# (1) parse ---------------------------------------------------------------------------------------


def _parse(raw: bytes, state: ProcedureState) -> str:
    state.document = AttestationDocument.from_cbor(raw)
    doc = state.document
    return f"COSE_Sign1 ES384, {len(raw)} bytes, {len(doc.pcrs)} PCRs, module {doc.module_id}"


# (2) chain to a pinned root -----------------------------------------------------------------


def _chain(state: ProcedureState, roots: Sequence[TrustRoot]) -> str:
    doc = state.document
    assert doc is not None
    # (2a) cabundle[0] must be one of the trusted roots, compared by DER fingerprint
    root = next((r for r in roots if r.certificate_der == doc.cabundle[0]), None)
    if root is None:
        raise ChainInvalid("cabundle[0] is not a trusted root certificate")
    ders = [*doc.cabundle, doc.certificate]
    certs = [_load_cert(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle)]
    certs.append(_load_cert(doc.certificate, "certificate"))
    names = [f"cabundle[{i}]" for i in range(len(doc.cabundle))] + ["certificate"]
    if len(set(ders)) != len(ders):
        raise ChainInvalid("the chain repeats a certificate")
    # (2b) every certificate: ECDSA P-384 key, signed with ecdsa-with-SHA384
    for cert, name in zip(certs, names, strict=True):
        _check_algorithms(cert, name)
        _check_critical_extensions(cert, name)
    # (2c) the root is trusted by its exact bytes (2a), so its self-signature adds nothing; it must
    # still be a CA whose path length admits the chain
    _check_ca(certs[0], names[0], below=len(certs) - 2)
    # (2d) each one directly issued by the one before: issuer name and signature
    for i in range(1, len(certs)):
        try:
            certs[i].verify_directly_issued_by(certs[i - 1])
        except (ValueError, TypeError, InvalidSignature):
            raise ChainInvalid(f"{names[i]} is not issued by {names[i - 1]}") from None
        if i < len(certs) - 1:
            # (2e) intermediates: CA, path length allows the CAs below, keyCertSign
            _check_ca(certs[i], names[i], below=len(certs) - 2 - i)
    # (2f) the leaf: not a CA, may sign (digitalSignature)
    _check_leaf(certs[-1])
    state.chain = certs
    state.root = root
    return f"{len(certs)} certificates chain to the {root.name} root ({root.fingerprint[:16]}…)"


def _load_cert(der: bytes, name: str) -> x509.Certificate:
    # cryptography warns (and will later refuse) on RFC 5280 violations such as a non-positive
    # serial number; a certificate in an attestation document must not have any
    with warnings.catch_warnings():
        warnings.simplefilter("error", CryptographyDeprecationWarning)
        try:
            return x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion, CryptographyDeprecationWarning):
            raise MalformedDocument(f"{name} is not a valid DER X.509 certificate") from None


def _check_algorithms(cert: x509.Certificate, name: str) -> None:
    try:
        key = cert.public_key()
        hash_algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        raise ChainInvalid(f"{name} has an unsupported key or signature algorithm") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ChainInvalid(f"{name} key is not ECDSA P-384")
    if not isinstance(hash_algorithm, hashes.SHA384):
        raise ChainInvalid(f"{name} is not signed with ecdsa-with-SHA384")


def _extension(cert: x509.Certificate, kind: type[Any], name: str) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind)
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise ChainInvalid(f"{name} has malformed extensions") from None


# RFC 5280 §4.2: a verifier must reject a certificate with a critical extension it does not process
_UNDERSTOOD_CRITICAL = {
    x509.oid.ExtensionOID.BASIC_CONSTRAINTS,
    x509.oid.ExtensionOID.KEY_USAGE,
    x509.oid.ExtensionOID.EXTENDED_KEY_USAGE,
    x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER,
    x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
}


def _check_critical_extensions(cert: x509.Certificate, name: str) -> None:
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise ChainInvalid(f"{name} has malformed extensions") from None
    for extension in extensions:
        if extension.critical and extension.oid not in _UNDERSTOOD_CRITICAL:
            raise ChainInvalid(
                f"{name} has a critical extension this verifier does not process "
                f"({extension.oid.dotted_string})"
            )


def _check_ca(cert: x509.Certificate, name: str, *, below: int) -> None:
    basic = _extension(cert, x509.BasicConstraints, name)
    if basic is None or not basic.critical or not basic.value.ca:
        raise ChainInvalid(f"{name} is not a CA (BasicConstraints ca=true, critical)")
    if basic.value.path_length is not None and basic.value.path_length < below:
        raise ChainInvalid(
            f"{name} allows {basic.value.path_length} CA(s) below it; the chain has {below}"
        )
    usage = _extension(cert, x509.KeyUsage, name)
    if usage is None or not usage.critical or not usage.value.key_cert_sign:
        raise ChainInvalid(f"{name} may not sign certificates (KeyUsage keyCertSign, critical)")


def _check_leaf(cert: x509.Certificate) -> None:
    basic = _extension(cert, x509.BasicConstraints, "certificate")
    if basic is not None and basic.value.ca:
        raise ChainInvalid("certificate (the leaf) is a CA")
    usage = _extension(cert, x509.KeyUsage, "certificate")
    if usage is None or not usage.value.digital_signature:
        raise ChainInvalid("certificate (the leaf) may not sign (KeyUsage digitalSignature)")


# (3) validity at `now` ----------------------------------------------------------------------


def _validity(state: ProcedureState, now: datetime) -> str:
    assert state.chain is not None
    assert state.document is not None
    names = [f"cabundle[{i}]" for i in range(len(state.document.cabundle))] + ["certificate"]
    for cert, name in zip(state.chain, names, strict=True):
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise CertificateExpired(
                f"{name} is valid from {cert.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{cert.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}, not at {_utc(now)}"
            )
    leaf = state.chain[-1]
    # the NSM signs with a fresh leaf; a timestamp outside its life means a misissued document
    stamp = state.document.timestamp
    slack = timedelta(seconds=1)
    if not leaf.not_valid_before_utc - slack <= stamp <= leaf.not_valid_after_utc:
        raise ChainInvalid(f"document timestamp {stamp.isoformat()} is outside the leaf's validity")
    return f"every certificate valid at {_utc(now)}"


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# (4) COSE signature ----------------------------------------------------------------------------


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """RFC 9052 §4.4: ``["Signature1", protected, external_aad = h'', payload]``."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def _signature(state: ProcedureState) -> str:
    assert state.chain is not None
    assert state.document is not None
    doc = state.document
    key = state.chain[-1].public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    r = int.from_bytes(doc.signature[:48], "big")
    s = int.from_bytes(doc.signature[48:], "big")
    try:
        key.verify(
            encode_dss_signature(r, s),
            sig_structure(doc.protected, doc.payload),
            ec.ECDSA(hashes.SHA384()),
        )
    except InvalidSignature:
        raise SignatureInvalid(
            "the COSE_Sign1 signature does not verify with the leaf key"
        ) from None
    return "ES384 signature over the payload as received verifies with the leaf key"
