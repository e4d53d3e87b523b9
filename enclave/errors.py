"""Errors raised by the enclave package.

One base class, split by who is at fault::

    EnclaveError
    ├── KeyReleaseDenied        KMS refused: AccessDenied, the key policy's attestation
    │                           conditions, a disabled key, a wrong ciphertext or context
    ├── KeyReleaseTimeout       transport: KMS did not connect or answer in time (retry may help)
    ├── KeyReleaseUnavailable   other transport or service errors: connection refused, throttling,
    │                           KMS internal errors (retry may help)
    ├── MalformedEnvelope       hostile or wrong input: a CiphertextForRecipient that is not the
    │                           CMS EnvelopedData KMS sends to this enclave's key, or a KMS
    │                           response that carries Plaintext although a Recipient was sent
    ├── InvalidWeights          a model weight file that breaks its rules (enclave.models.anymal)
    ├── InvalidRequest          a generation request the model refuses (enclave.models.anymal)
    └── ConfigError             our own configuration: a bad key, timeout or argument

Messages name the field and the rule ("keyEncryptionAlgorithm hash is sha1; KMS uses sha256");
they never carry key material (data keys, content-encryption keys, plaintexts, private keys).
Failures of the NSM itself surface as :class:`attestation.errors.NsmError`.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EnclaveError",
    "KeyReleaseDenied",
    "KeyReleaseTimeout",
    "KeyReleaseUnavailable",
    "MalformedEnvelope",
]


class EnclaveError(Exception):
    """Base class of every error this package raises."""


class KeyReleaseDenied(EnclaveError):
    """KMS refused to release the key.

    ``code`` is the KMS error code (``"AccessDeniedException"``, ``"KMSInvalidStateException"``…)
    when KMS answered with one.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class KeyReleaseTimeout(EnclaveError):
    """KMS could not be reached, or did not answer, within the timeout; a retry may help."""


class KeyReleaseUnavailable(EnclaveError):
    """KMS could not be reached or failed on its side (throttling, internal error).

    ``code`` is the KMS error code when KMS answered with one, else ``None``.
    """

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class MalformedEnvelope(EnclaveError):
    """The ``CiphertextForRecipient`` (or the KMS response around it) is not what KMS sends.

    Covers hostile input from the parent as well as envelopes for another key or with other
    algorithms. A failed RSA decryption is reported without details, so that the error is no
    decryption oracle.
    """


class ConfigError(EnclaveError):
    """Our own configuration is wrong: a key of the wrong type or size, a bad timeout."""
