"""Errors raised by the attestation package.

One base class, split by who is at fault::

    AttestationError
    ├── MalformedDocument        bad or hostile input: not an attestation document as AWS emits it
    ├── SignatureInvalid         the COSE_Sign1 signature does not verify with the leaf certificate
    ├── ChainInvalid             the certificate chain does not lead to a trusted root
    │   └── CertificateExpired   a certificate in the chain is not valid at the verification time
    ├── PolicyViolation          a genuine document that does not meet the caller's expectations
    │   ├── MeasurementMismatch  no accepted PCR set matches
    │   ├── MeasurementNotPinned no expected measurement given: an inspection, not a verification
    │   ├── DebugModeDocument    PCR0, 1, 2 and 8 are all zero: a debug-mode enclave
    │   ├── NonceMismatch        the nonce is absent or differs
    │   ├── StaleDocument        older than the maximum age, or dated in the future
    │   ├── PublicKeyMismatch    the public_key field differs from the expected one
    │   └── UserDataMismatch     the user_data field differs from the expected one
    ├── NsmError                 the NSM (device or emulator) refused or failed a request
    │   └── NsmTransportError    the device could not be reached (retry may help)
    └── ConfigError              our own configuration: no measurement pinned, bad expectation file

Messages name the field and the rule ("pcrs[0] is 32 bytes; SHA384 PCRs are 48"); they never carry
secrets. Every parser in this package raises only these types on hostile input.
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "CertificateExpired",
    "ChainInvalid",
    "ConfigError",
    "DebugModeDocument",
    "MalformedDocument",
    "MeasurementMismatch",
    "MeasurementNotPinned",
    "NonceMismatch",
    "NsmError",
    "NsmTransportError",
    "PolicyViolation",
    "PublicKeyMismatch",
    "SignatureInvalid",
    "StaleDocument",
    "UserDataMismatch",
]


class AttestationError(Exception):
    """Base class of every error this package raises."""


class MalformedDocument(AttestationError):
    """The bytes are not a well-formed attestation document (CBOR, COSE or field rules)."""


class SignatureInvalid(AttestationError):
    """The COSE_Sign1 signature does not verify under the document's leaf certificate."""


class ChainInvalid(AttestationError):
    """The certificate chain is broken, constrained wrongly, or ends at an untrusted root."""


class CertificateExpired(ChainInvalid):
    """A certificate of the chain is not valid at the verification time."""


class PolicyViolation(AttestationError):
    """An authentic document that does not satisfy the caller's verification policy."""


class MeasurementMismatch(PolicyViolation):
    """The document's PCRs match none of the accepted measurement sets."""


class MeasurementNotPinned(PolicyViolation):
    """No expected measurement was given: an authentic document, but of any enclave image."""


class DebugModeDocument(PolicyViolation):
    """The document comes from a debug-mode enclave (PCR0, 1, 2 and 8 all zero)."""


class NonceMismatch(PolicyViolation):
    """The document's nonce is absent or differs from the expected one."""


class StaleDocument(PolicyViolation):
    """The document is older than the allowed maximum age, or dated in the future."""


class PublicKeyMismatch(PolicyViolation):
    """The document's public_key differs from the expected one."""


class UserDataMismatch(PolicyViolation):
    """The document's user_data differs from the expected one."""


class NsmError(AttestationError):
    """The Nitro Security Module answered a request with an error, or with a malformed response.

    ``code`` is the NSM ``ErrorCode`` name (``"InvalidIndex"``, ``"ReadOnlyIndex"``...) when the
    module answered with one, else ``None``.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class NsmTransportError(NsmError):
    """The NSM device could not be opened or the ioctl failed; a retry may help."""


class ConfigError(AttestationError):
    """Our own configuration is wrong: no measurement pinned, an unreadable expectation file."""
