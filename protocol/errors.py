"""Errors raised by the protocol package.

One base class, split by who is at fault::

    ProtocolError
    ├── MalformedBundle        bad or hostile input: a manifest or layout that breaks the format
    ├── BundleIntegrityError   authentication failed: a chunk or the manifest was altered, swapped,
    │                          reordered, truncated or extended, or the key is wrong
    ├── FrameError             bad or hostile input on the enclave transport: a frame that breaks
    │                          the frame format (type, size, layout)
    ├── TransportError         the transport failed: connection refused or closed, deadline passed
    │                          (retry may help)
    ├── ConfigError            our own configuration: an address that cannot be parsed, bad limits
    └── OhttpError             the request path: Oblivious HTTP, Binary HTTP, inference bodies
        ├── MalformedMessage   bad or hostile input: a message, key configuration, BHTTP message
        │                      or inference body that breaks its format (framing, sizes, fields)
        ├── UnknownKeyId       the request names a key this server does not hold: the client
        │                      should fetch the key configuration again (and re-attest)
        └── DecapsulationError authentication failed: wrong key, tampered, reordered or truncated;
                               one message for every cause, so it is no oracle

Messages name the field and the rule ("chunk 7: authentication failed"); they never carry plaintext
or key material.
"""

from __future__ import annotations

__all__ = [
    "BundleIntegrityError",
    "ConfigError",
    "DecapsulationError",
    "FrameError",
    "MalformedBundle",
    "MalformedMessage",
    "OhttpError",
    "ProtocolError",
    "TransportError",
    "UnknownKeyId",
]


class ProtocolError(Exception):
    """Base class of every error this package raises."""


class MalformedBundle(ProtocolError):
    """A manifest or bundle layout breaks the format's rules."""


class BundleIntegrityError(ProtocolError):
    """A chunk or the manifest failed authentication: tampered, swapped, reordered, truncated."""


class FrameError(ProtocolError):
    """A frame on the enclave transport breaks the frame format."""


class TransportError(ProtocolError):
    """The transport failed (refused, closed, deadline passed); a retry may help."""


class ConfigError(ProtocolError):
    """Our own configuration is wrong: an unparseable address, impossible limits."""


class OhttpError(ProtocolError):
    """Base class of the request path's errors: Oblivious HTTP, Binary HTTP, inference bodies."""


class MalformedMessage(OhttpError):
    """A message, key configuration, BHTTP message or inference body breaks its format's rules."""


class UnknownKeyId(OhttpError):
    """The request names a key id this server does not hold; fetch the key configuration again."""


class DecapsulationError(OhttpError):
    """Authentication failed (wrong key, tampered, reordered, truncated); the cause is not told."""
