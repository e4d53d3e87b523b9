"""Key release: ask KMS for a key with the enclave's attestation, unwrap what KMS sends back.

The enclave never receives a plaintext key from KMS. It sends ``Recipient={"KeyEncryptionAlgorithm":
"RSAES_OAEP_SHA_256", "AttestationDocument": doc}`` where ``doc`` is a fresh attestation document
whose ``public_key`` is this enclave's RSA key (DER SubjectPublicKeyInfo). KMS checks the key
policy's ``kms:RecipientAttestation:*`` conditions against the document and answers with
``CiphertextForRecipient``: a BER CMS ``EnvelopedData`` (RFC 5652 §6) that only the enclave's
private key opens. :func:`unwrap_ciphertext_for_recipient` opens it, strictly:

- one ``KeyTransRecipientInfo`` (RFC 5652 §6.2.1), version 2, ``rid`` the subjectKeyIdentifier of
  our key (SHA-1 of the subjectPublicKey, RFC 5280 §4.2.1.2 method 1);
- key transport RSAES-OAEP with SHA-256 and MGF1-SHA-256 and an empty label (RFC 4055 §4.1);
  absent parameters mean SHA-1 there and are refused;
- content encryption AES-256-CBC with a 16-byte IV (RFC 3565 §4.1), PKCS#7 padding (RFC 5652
  §6.3).

CMS AES-CBC has no integrity protection: a modified ``encryptedContent`` either breaks the padding
(:class:`MalformedEnvelope`) or decrypts to other bytes. Data keys released this way are then
checked by the sealed bundle's AEAD before any weight is used, and KMS traffic is TLS from inside
the enclave; a modified *encrypted key* always fails (OAEP is checked).

:class:`KeyRelease` is the enclave-side flow over a boto3 KMS client and an
:class:`attestation.nsm.NsmClient`; :func:`kms_client_config` gives callers bounded timeouts and
retries.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import botocore.config
import botocore.exceptions
from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.padding import MGF1, OAEP
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from attestation.nsm import NsmClient
from enclave.errors import (
    ConfigError,
    KeyReleaseDenied,
    KeyReleaseTimeout,
    KeyReleaseUnavailable,
    MalformedEnvelope,
)

__all__ = [
    "KEY_ENCRYPTION_ALGORITHM",
    "MAX_ENVELOPE_SIZE",
    "KeyRelease",
    "generate_recipient_key",
    "kms_client_config",
    "public_key_der",
    "unwrap_ciphertext_for_recipient",
]

_log = logging.getLogger(__name__)
_UNDECRYPTABLE = "the envelope does not decrypt under this enclave's key"

KEY_ENCRYPTION_ALGORITHM: Final = "RSAES_OAEP_SHA_256"
"""The ``Recipient.KeyEncryptionAlgorithm`` KMS supports (the only one)."""

MAX_ENVELOPE_SIZE: Final = 64 * 1024
"""Largest ``CiphertextForRecipient`` accepted. KMS plaintexts are at most 4096 bytes, so a real
envelope is under 5 KiB even with a 4096-bit key."""

RSA_KEY_SIZE: Final = 2048
RSA_PUBLIC_EXPONENT: Final = 65537
_MIN_RSA_BITS: Final = 2048  # what KMS accepts in a Recipient
_MAX_RSA_BITS: Final = 4096
_CEK_SIZE: Final = 32  # AES-256 for id-aes256-CBC (RFC 3565 §4.1)
_BLOCK_SIZE: Final = 16  # the AES block, and the CBC IV (RFC 3565 §4.1)
_MAX_RANDOM_BYTES: Final = 1024  # GenerateRandom NumberOfBytes is 1..1024
_MAX_KMS_MESSAGE: Final = 300  # characters of KMS's error message kept in ours

# RFC 4055 §4.1 RSAES-OAEP-params as asn1crypto reads them (defaults filled in); hash
# AlgorithmIdentifiers may carry absent or NULL parameters (RFC 4055 §2.1), both read as None.
_SHA256: Final = {"algorithm": "sha256", "parameters": None}
_EMPTY_LABEL: Final = {"algorithm": "p_specified", "parameters": b""}

_METHODS: Final = {"Decrypt": "decrypt", "GenerateRandom": "generate_random"}  # boto3 names

# KMS error codes that say "not now" rather than "no": throttling and KMS-side failures.
_UNAVAILABLE_CODES: Final = frozenset(
    {
        "DependencyTimeoutException",
        "InternalFailure",
        "KMSInternalException",
        "KeyUnavailableException",
        "LimitExceededException",
        "RequestLimitExceeded",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "ThrottlingException",
    }
)


# -- the recipient key -------------------------------------------------------------------------


def generate_recipient_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-2048 key (e = 65537) for ``Recipient``; it never leaves the enclave."""
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_KEY_SIZE)


def public_key_der(private_key: rsa.RSAPrivateKey) -> bytes:
    """The public half as a DER SubjectPublicKeyInfo: the attestation document's ``public_key``."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _subject_key_identifier(public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-1 of the subjectPublicKey BIT STRING's contents (RFC 5280 §4.2.1.2, method 1)."""
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest


# -- the envelope ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CheckedEnvelope:
    """The three values of an envelope that passed every structural check."""

    encrypted_key: bytes
    iv: bytes
    ciphertext: bytes


def _describe(value: object) -> str:
    """A short rendering of a parsed value for an error message (only public envelope fields)."""
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _check_algorithm_parameters(key_algorithm: Mapping[str, Any]) -> None:
    """RSAES-OAEP with SHA-256, MGF1-SHA-256 and an empty label (RFC 4055 §4.1)."""
    name = key_algorithm["algorithm"]
    if name != "rsaes_oaep":
        raise MalformedEnvelope(
            f"keyEncryptionAlgorithm is {_describe(name)}; KMS uses id-RSAES-OAEP (RFC 4055 §4.1)"
        )
    params = key_algorithm["parameters"]
    if params is None:
        raise MalformedEnvelope(
            "keyEncryptionAlgorithm parameters are absent, which RFC 4055 §4.1 reads as SHA-1 "
            "and MGF1-SHA-1; KMS uses SHA-256"
        )
    if params["hash_algorithm"] != _SHA256:
        raise MalformedEnvelope(
            f"keyEncryptionAlgorithm hashAlgorithm is {_describe(params['hash_algorithm'])}; "
            "KMS uses sha256 (RFC 4055 §4.1)"
        )
    mask = params["mask_gen_algorithm"]
    if mask["algorithm"] != "mgf1" or mask["parameters"] != _SHA256:
        raise MalformedEnvelope(
            f"keyEncryptionAlgorithm maskGenAlgorithm is {_describe(mask)}; "
            "KMS uses mgf1 with sha256 (RFC 4055 §4.1)"
        )
    if params["p_source_algorithm"] != _EMPTY_LABEL:
        raise MalformedEnvelope(
            "keyEncryptionAlgorithm pSourceAlgorithm is not the empty label KMS uses"
        )


def _check_envelope(info: Any, key_id: bytes) -> _CheckedEnvelope:
    """Every structural rule, on a fully parsed ``cms.ContentInfo``."""
    # (3) ContentInfo: contentType id-envelopedData (RFC 5652 §3, §6.1).
    content_type = info["content_type"].native
    if content_type != "enveloped_data":
        raise MalformedEnvelope(
            f"ContentInfo contentType is {_describe(content_type)}; expected id-envelopedData"
        )
    enveloped = info["content"]
    # (4) exactly one KeyTransRecipientInfo, version 2, rid a subjectKeyIdentifier
    # (RFC 5652 §6.2.1: version 2 if and only if rid is a subjectKeyIdentifier).
    recipients = enveloped["recipient_infos"]
    if len(recipients) != 1:
        raise MalformedEnvelope(
            f"recipientInfos has {len(recipients)} entries; KMS sends exactly one"
        )
    recipient = recipients[0]
    if recipient.name != "ktri":
        raise MalformedEnvelope(
            f"recipientInfos[0] is {recipient.name}; KMS sends a KeyTransRecipientInfo (ktri)"
        )
    ktri = recipient.chosen
    rid = ktri["rid"]
    if rid.name != "subject_key_identifier":
        raise MalformedEnvelope(
            f"KeyTransRecipientInfo rid is {rid.name}; KMS names the recipient by its "
            "subjectKeyIdentifier"
        )
    if ktri["version"].native != "v2":
        raise MalformedEnvelope(
            f"KeyTransRecipientInfo version is {_describe(ktri['version'].native)}; expected v2"
        )
    # The rid's value is not compared: AWS does not document how KMS derives it, other
    # implementations ignore it, and the RSA-OAEP decryption below is what proves the envelope
    # is for this key. A differing value is only logged.
    if rid.native != key_id:
        _log.debug("CiphertextForRecipient rid differs from the RFC 5280 method-1 key identifier")
    # (5) EnvelopedData: version 2, as RFC 5652 §6.1 requires with a version 2 RecipientInfo
    # (checked after the recipient, whose error says more); KMS sends neither originatorInfo
    # nor unprotectedAttrs.
    if enveloped["version"].native != "v2":
        raise MalformedEnvelope(
            f"EnvelopedData version is {_describe(enveloped['version'].native)}; expected v2"
        )
    if enveloped["originator_info"].native is not None:
        raise MalformedEnvelope("EnvelopedData has originatorInfo; KMS sends none")
    if enveloped["unprotected_attrs"].native is not None:
        raise MalformedEnvelope("EnvelopedData has unprotectedAttrs; KMS sends none")
    # (6) key transport: RSAES-OAEP, SHA-256, MGF1-SHA-256 (RFC 4055 §4.1).
    _check_algorithm_parameters(ktri["key_encryption_algorithm"].native)
    encrypted_key = ktri["encrypted_key"].native
    # (7) EncryptedContentInfo: id-data, id-aes256-CBC with a 16-byte IV (RFC 3565 §4.1), a
    # ciphertext made of whole blocks. ``.native`` joins the chunks of a constructed OCTET
    # STRING (``.contents`` would not).
    content_info = enveloped["encrypted_content_info"]
    if content_info["content_type"].native != "data":
        raise MalformedEnvelope(
            "encryptedContentInfo contentType is "
            f"{_describe(content_info['content_type'].native)}; expected id-data"
        )
    content_algorithm = content_info["content_encryption_algorithm"]
    if content_algorithm["algorithm"].native != "aes256_cbc":
        raise MalformedEnvelope(
            "contentEncryptionAlgorithm is "
            f"{_describe(content_algorithm['algorithm'].native)}; KMS uses id-aes256-CBC "
            "(RFC 3565 §4.1)"
        )
    iv = content_algorithm["parameters"].native
    if not isinstance(iv, bytes) or len(iv) != _BLOCK_SIZE:
        raise MalformedEnvelope(
            "contentEncryptionAlgorithm parameters must be the 16-byte AES-CBC IV (RFC 3565 §4.1)"
        )
    ciphertext = content_info["encrypted_content"].native
    if not isinstance(ciphertext, bytes):
        raise MalformedEnvelope("encryptedContent is absent")
    if not ciphertext or len(ciphertext) % _BLOCK_SIZE:
        raise MalformedEnvelope(
            f"encryptedContent is {len(ciphertext)} bytes; AES-CBC with PKCS#7 padding "
            "gives a positive multiple of 16"
        )
    if not isinstance(encrypted_key, bytes):
        raise MalformedEnvelope("KeyTransRecipientInfo encryptedKey is not an OCTET STRING")
    return _CheckedEnvelope(encrypted_key=encrypted_key, iv=iv, ciphertext=ciphertext)


def unwrap_ciphertext_for_recipient(blob: bytes, private_key: rsa.RSAPrivateKey) -> bytes:
    """The plaintext inside KMS's ``CiphertextForRecipient`` for ``private_key``.

    ``blob`` comes from KMS through the untrusted parent: every field is checked (module
    docstring) and any deviation raises :class:`MalformedEnvelope` naming the field; arbitrary
    bytes raise nothing else. The plaintext is key material: the caller keeps it in memory only.
    """
    # (1) size cap, before any parsing.
    if not isinstance(blob, bytes | bytearray):
        raise MalformedEnvelope(f"CiphertextForRecipient is a {type(blob).__name__}, not bytes")
    if len(blob) > MAX_ENVELOPE_SIZE:
        raise MalformedEnvelope(
            f"CiphertextForRecipient is {len(blob)} bytes; at most {MAX_ENVELOPE_SIZE} accepted"
        )
    key_id = _subject_key_identifier(private_key.public_key())
    # (2) parse the BER ContentInfo in full (asn1crypto parses lazily: ``.native`` forces every
    # level), refusing trailing data (``strict``); then (3)-(7) the structural checks. asn1crypto
    # raises ValueError, TypeError, KeyError and others on hostile input: all of them become
    # MalformedEnvelope here, the one boundary where bytes from outside meet the parser.
    try:
        info = cms.ContentInfo.load(bytes(blob), strict=True)
        info.native  # noqa: B018 - forces the lazy parser over the whole structure
        envelope = _check_envelope(info, key_id)
    except MalformedEnvelope:
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's whole failure surface, on purpose
        raise MalformedEnvelope(
            f"CiphertextForRecipient is not a well-formed BER CMS ContentInfo "
            f"({type(exc).__name__}: {_describe(str(exc))})"
        ) from None
    # (8) RSAES-OAEP decryption of the content-encryption key (RFC 4055 §4), (9) AES-256-CBC and
    # PKCS#7 unpadding (RFC 5652 §6.3, RFC 3565 §4.1). Every failure from here on raises the one
    # same message with no chained cause: an OAEP failure, a CEK of the wrong size and bad padding
    # must be indistinguishable, or the error would be a padding oracle on the data key.
    try:
        cek = private_key.decrypt(
            envelope.encrypted_key,
            OAEP(mgf=MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None),
        )
        if len(cek) != _CEK_SIZE:
            raise ValueError("content-encryption key size")
        decryptor = Cipher(algorithms.AES(cek), modes.CBC(envelope.iv)).decryptor()
        padded = decryptor.update(envelope.ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
        plaintext = unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise MalformedEnvelope(_UNDECRYPTABLE) from None
    _log.debug(
        "unwrapped CiphertextForRecipient: %d-byte envelope, %d-byte plaintext",
        len(blob),
        len(plaintext),
    )
    return plaintext


# -- the KMS edge ------------------------------------------------------------------------------


def kms_client_config(timeout_seconds: float = 10, attempts: int = 3) -> botocore.config.Config:
    """A botocore ``Config`` with connect and read timeouts and at most ``attempts`` attempts.

    Pass it to ``boto3.client("kms", config=...)``; without it botocore waits 60 s per read.
    """
    if not timeout_seconds > 0:
        raise ConfigError(f"timeout_seconds is {timeout_seconds}; it must be positive")
    if attempts < 1:
        raise ConfigError(f"attempts is {attempts}; at least 1 is needed")
    return botocore.config.Config(
        connect_timeout=timeout_seconds,
        read_timeout=timeout_seconds,
        retries={"mode": "standard", "total_max_attempts": attempts},
    )


def _kms_error(exc: Exception, operation: str) -> Exception:
    """The enclave error for a botocore exception; messages keep KMS's code and message only."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        message = str(error.get("Message", ""))[:_MAX_KMS_MESSAGE]
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        text = f"KMS {operation} failed with {code}: {message}"
        if code in _UNAVAILABLE_CODES or (isinstance(status, int) and status >= 500):
            return KeyReleaseUnavailable(text, code=code)
        return KeyReleaseDenied(text, code=code)
    if isinstance(
        exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError
    ):
        return KeyReleaseTimeout(f"KMS {operation} timed out: {exc}")
    if isinstance(exc, botocore.exceptions.ParamValidationError):
        return ConfigError(f"KMS {operation} request is invalid: {exc}")
    return KeyReleaseUnavailable(f"KMS {operation} failed: {type(exc).__name__}: {exc}")


class KeyRelease:
    """The enclave's side of KMS key release with ``Recipient``.

    ``nsm`` produces the attestation documents (the device, or the emulator in local mode);
    ``kms_client`` is a boto3 KMS client, ideally built with :func:`kms_client_config`.
    ``private_key`` is the RSA key KMS wraps keys for (2048 to 4096 bits); by default a fresh
    RSA-2048 key made here, which never leaves this object.
    """

    def __init__(
        self,
        nsm: NsmClient,
        kms_client: Any,
        *,
        private_key: rsa.RSAPrivateKey | None = None,
    ) -> None:
        if private_key is None:
            private_key = generate_recipient_key()
        if not isinstance(private_key, rsa.RSAPrivateKey):
            raise ConfigError(f"private_key is a {type(private_key).__name__}; RSA is needed")
        if not _MIN_RSA_BITS <= private_key.key_size <= _MAX_RSA_BITS:
            raise ConfigError(
                f"private_key has {private_key.key_size} bits; KMS accepts "
                f"{_MIN_RSA_BITS} to {_MAX_RSA_BITS}"
            )
        self._nsm = nsm
        self._kms = kms_client
        self._private_key = private_key
        self._public_key_der = public_key_der(private_key)

    @property
    def public_key_der(self) -> bytes:
        """The DER SubjectPublicKeyInfo every attestation document of this object carries."""
        return self._public_key_der

    def _recipient(self) -> dict[str, Any]:
        # (1) a fresh attestation document binding our public key, one per request, so that
        # KMS's view of the PCRs is current.
        document = self._nsm.attestation(public_key=self._public_key_der)
        return {"KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM, "AttestationDocument": document}

    def _call(self, operation: str, **params: Any) -> Mapping[str, Any]:
        # (2) the KMS call; botocore's exceptions become this package's.
        method = getattr(self._kms, _METHODS[operation])
        try:
            response = method(**params)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            error = _kms_error(exc, operation)
            _log.warning("KMS %s failed: %s", operation, type(error).__name__)
            raise error from exc
        if not isinstance(response, Mapping):
            raise MalformedEnvelope(f"KMS {operation} answered with a {type(response).__name__}")
        return response

    def _unwrap(self, operation: str, response: Mapping[str, Any]) -> bytes:
        # (3) with a Recipient KMS never returns Plaintext. A response that carries it went
        # through something that dropped the Recipient (a proxy) or a KMS that ignores it: the
        # key has been outside the enclave's protection, so fail closed.
        if "Plaintext" in response:
            _log.error(
                "KMS %s response carries Plaintext despite the Recipient; refused", operation
            )
            raise MalformedEnvelope(
                f"KMS {operation} response carries Plaintext although a Recipient was sent; "
                "something between the enclave and KMS dropped the Recipient"
            )
        # (4) open the envelope with our private key.
        blob = response.get("CiphertextForRecipient")
        if blob is None:
            raise MalformedEnvelope(f"KMS {operation} response has no CiphertextForRecipient")
        return unwrap_ciphertext_for_recipient(blob, self._private_key)

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str],
        key_id: str | None = None,
    ) -> bytes:
        """The plaintext of a KMS ciphertext (a sealed bundle's encrypted data key).

        ``ciphertext_blob`` and ``encryption_context`` come from the sealed-bundle manifest,
        through the untrusted parent; KMS authenticates both. Raises :class:`KeyReleaseDenied`,
        :class:`KeyReleaseTimeout`, :class:`KeyReleaseUnavailable`, :class:`MalformedEnvelope`,
        or :class:`attestation.errors.NsmError` when the NSM fails.
        """
        params: dict[str, Any] = {
            "CiphertextBlob": ciphertext_blob,
            "EncryptionContext": dict(encryption_context),
            "Recipient": self._recipient(),
        }
        if key_id is not None:
            params["KeyId"] = key_id
        response = self._call("Decrypt", **params)
        plaintext = self._unwrap("Decrypt", response)
        _log.info("KMS released a %d-byte key (KeyId %s)", len(plaintext), response.get("KeyId"))
        return plaintext

    def generate_random(self, n: int) -> bytes:
        """``n`` random bytes from KMS (1 to 1024), delivered for this enclave only."""
        if not 1 <= n <= _MAX_RANDOM_BYTES:
            raise ConfigError(f"n is {n}; KMS GenerateRandom returns 1 to {_MAX_RANDOM_BYTES}")
        response = self._call("GenerateRandom", NumberOfBytes=n, Recipient=self._recipient())
        random = self._unwrap("GenerateRandom", response)
        if len(random) != n:
            raise MalformedEnvelope(f"KMS GenerateRandom returned {len(random)} bytes; asked {n}")
        return random
