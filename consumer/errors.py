"""Errors raised by the consumer package.

One base class, split by who is at fault::

    ConsumerError
    ├── AttestationFailed      the enclave's attestation does not verify: AWS chain, expected
    │                          PCRs, debug mode, nonce, age, the binding of its OHTTP key and
    │                          user data to the document, or a pinned model id or manifest digest
    │                          (``reason`` names the failed rule)
    ├── ResponseInvalid        the answer does not authenticate under this request's HPKE context
    │                          (tampered, swapped from another request, truncated) or breaks the
    │                          response format: it is never returned, not even in part as complete
    ├── ServerError            the bridge answered with an error status (``status``, ``problem``)
    │   ├── StaleKey           422 ohttp-key (RFC 9458 §5.3): the enclave's key changed; the
    │   │                      client re-attests once by itself, this is raised if that fails too
    │   ├── ServerBusy         429: the concurrency limit (``retry_after``; retry may help)
    │   └── ServerUnavailable  503: the enclave is booting or unreachable (``retry_after``)
    ├── TransportError         connection refused or closed, a read deadline passed (retry may help)
    ├── InvalidRequest         the caller's prompt, images or parameters break the request format's
    │                          rules (nothing was sent)
    └── ConfigError            our own configuration: expectations (each accepted PCR set must
                               pin the image: PCR0, or PCR8), trust roots, URL, options

Messages name the field and the rule; they never quote prompts, images or completions.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "AttestationFailed",
    "ConfigError",
    "ConsumerError",
    "InvalidRequest",
    "ResponseInvalid",
    "ServerBusy",
    "ServerError",
    "ServerUnavailable",
    "StaleKey",
    "TransportError",
]


class ConsumerError(Exception):
    """Base class of every error this package raises."""


class AttestationFailed(ConsumerError):
    """The enclave's attestation was refused; nothing was encrypted to it.

    ``reason`` is the failed rule's type name (``"MeasurementMismatch"``, ``"NonceMismatch"``,
    ``"StaleDocument"``, ``"DebugModeDocument"``, ``"KeyBindingMismatch"``, ``"UserDataInvalid"``,
    ``"ModelMismatch"``, ``"ManifestMismatch"``…).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class ResponseInvalid(ConsumerError):
    """The response does not authenticate under this request's context or breaks its format."""


class ServerError(ConsumerError):
    """The bridge answered with an error status.

    ``problem`` is the RFC 9457 problem document (``type``, ``title``, ``detail``…) when the bridge
    sent one, else empty; it comes from the untrusted parent and is shown, never relied on.
    ``retry_after`` is the ``Retry-After`` delay in seconds, when given.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        problem: Mapping[str, object] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.problem: Mapping[str, object] = MappingProxyType(dict(problem or {}))
        self.retry_after = retry_after


class StaleKey(ServerError):
    """422 with the ``ohttp-key`` problem type: the request named a key the enclave no longer
    holds (RFC 9458 §5.3)."""


class ServerBusy(ServerError):
    """429: the enclave's concurrency limit is reached; retry after ``retry_after``."""


class ServerUnavailable(ServerError):
    """503: the enclave is booting, failed, or unreachable from the bridge."""


class TransportError(ConsumerError):
    """The connection failed: refused, closed, or a read deadline passed. A retry may help."""


class InvalidRequest(ConsumerError):
    """The prompt, an image or a parameter breaks the request format's rules; nothing was sent."""


class ConfigError(ConsumerError):
    """Our own configuration is wrong: an unreadable expectation file or root, a bad URL."""
