"""What serving consumers needs once boot is done: the OHTTP key, the state handed over at boot
step 6, and the record of the requests a key has already answered.

Re-exported by :mod:`enclave.server`.
"""

from __future__ import annotations

import enum
import secrets
import threading
from dataclasses import dataclass, field
from typing import Final

from attestation.nsm import NsmClient
from enclave._echo import Runtime
from enclave.errors import ConfigError
from protocol.control import UserData
from protocol.errors import FrameError
from protocol.ohttp import generate_key_config

__all__ = [
    "DEFAULT_REPLAY_CAPACITY",
    "Admission",
    "OhttpKey",
    "Ready",
    "ReplayGuard",
    "attestation_user_data",
]

DEFAULT_REPLAY_CAPACITY: Final = 100_000
"""Requests one OHTTP key answers before it is replaced (at 32 bytes an entry: about 10 MB)."""

_KEY_IDS: Final = 256


@dataclass(frozen=True)
class OhttpKey:
    """The enclave's request-encryption key (boot step 5): X25519, with its RFC 9458 key
    configuration. The private key never leaves the enclave."""

    key_id: int
    private_key: bytes = field(repr=False)
    key_config: bytes

    @classmethod
    def generate(cls, *, exclude: int | None = None) -> OhttpKey:
        """A fresh key pair with a random key id (0..255), never ``exclude`` (the id of the key it
        replaces: a request for the old key must be told ``unknown_key``, not fail to decrypt)."""
        if exclude is None:
            key_id = secrets.randbelow(_KEY_IDS)
        else:
            if type(exclude) is not int or not 0 <= exclude < _KEY_IDS:
                raise ConfigError("exclude must be a key id, 0..255")
            key_id = secrets.randbelow(_KEY_IDS - 1)
            key_id += key_id >= exclude  # uniform over the 255 other ids
        private_key, key_config = generate_key_config(key_id)
        return cls(key_id, private_key, key_config)

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte X25519 public key (the attestation document's ``public_key``)."""
        return self.key_config[3:35]


def attestation_user_data(key_config: bytes, model_id: str, manifest_sha256: bytes) -> bytes:
    """The attestation document's ``user_data`` (:class:`protocol.control.UserData`)."""
    try:
        return UserData(key_config, model_id, manifest_sha256).encode()
    except FrameError as exc:
        raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class Ready:
    """Everything the server needs to serve consumers; handed over at boot step 6."""

    nsm: NsmClient
    runtime: Runtime
    key: OhttpKey
    model_id: str
    manifest_sha256: bytes

    @property
    def user_data(self) -> bytes:
        return attestation_user_data(self.key.key_config, self.model_id, self.manifest_sha256)


class Admission(enum.Enum):
    """What :meth:`ReplayGuard.admit` says about a request."""

    FRESH = "fresh"  # first seen: serve it
    FRESH_AND_FULL = "fresh and full"  # first seen, and the last this key serves: replace the key
    REPLAYED = "replayed"  # seen before under this key: refuse it
    RETIRED = "retired"  # the key has been replaced: the consumer must fetch the new one


class ReplayGuard:
    """The encapsulated keys (``enc``) of the requests one OHTTP key has served.

    A consumer draws a fresh ``enc`` for every request (RFC 9180 §5.1), so one seen twice under the
    same key is the parent replaying a consumer's ciphertext: each replay would be another sample
    of the answer's length and timing. The set is bounded: the request that fills it is the key's
    last, after which the key is replaced (requests for it are ``unknown_key`` and consumers
    re-attest). Called from worker threads.
    """

    def __init__(self, capacity: int = DEFAULT_REPLAY_CAPACITY) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ConfigError("the replay capacity must be a positive integer")
        self._capacity = capacity
        self._seen: set[bytes] = set()
        self._retired = False
        self._lock = threading.Lock()

    def admit(self, enc: bytes) -> Admission:
        """Record ``enc`` (public: it travels in clear) of a request that has authenticated."""
        with self._lock:
            if self._retired:
                return Admission.RETIRED
            if enc in self._seen:
                return Admission.REPLAYED
            self._seen.add(enc)
            if len(self._seen) < self._capacity:
                return Admission.FRESH
            self._retired = True
            return Admission.FRESH_AND_FULL

    def retire(self) -> None:
        """The key was replaced: every later request for it is :attr:`Admission.RETIRED`."""
        with self._lock:
            self._retired = True
            self._seen.clear()

    @property
    def retired(self) -> bool:
        return self._retired

    def __len__(self) -> int:
        return len(self._seen)
