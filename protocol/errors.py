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
    └── ConfigError            our own configuration: an address that cannot be parsed, bad limits

Messages name the field and the rule ("chunk 7: authentication failed"); they never carry plaintext
or key material.
"""

from __future__ import annotations

__all__ = [
    "BundleIntegrityError",
    "ConfigError",
    "FrameError",
    "MalformedBundle",
    "ProtocolError",
    "TransportError",
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
