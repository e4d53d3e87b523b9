"""The enclave's health as the parent reads it (boot steps, state, error code, OHTTP key id) and
the control server's counters. Never content.

Re-exported by :mod:`enclave.server`.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from enclave.errors import ConfigError
from protocol.control import Health

__all__ = ["BOOT_STEPS", "HealthState", "ServerStats"]

BOOT_STEPS: Final = ("nsm", "credentials", "key release and unlock", "model load", "ohttp key")
"""The boot steps 1..5 of docs/request-path.md; step 6 is ``ready``."""
_STEPS: Final = len(BOOT_STEPS) + 1

_U32_MAX: Final = 0xFFFF_FFFF  # HEALTH_PONG counters are u32


class HealthState:
    """Where the boot stands: ``booting`` at a step, ``ready``, or ``failed`` with a code.

    Boot steps are numbered 1..5 (:data:`BOOT_STEPS`); ``ready`` is step 6 of 6.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "booting"
        self._step = 1
        self._error = ""
        self._key_id = 0

    def begin(self, step: int) -> None:
        """Boot step ``step`` (1-based) starts."""
        if not 1 <= step <= len(BOOT_STEPS):
            raise ConfigError(f"boot steps are 1..{len(BOOT_STEPS)}")
        with self._lock:
            if self._state != "booting":
                raise ConfigError(f"the boot is already {self._state}")
            self._step = step

    def fail(self, code: str) -> None:
        """The current step failed with error ``code``; the state stays failed."""
        with self._lock:
            self._state = "failed"
            self._error = code

    def ready(self, key_id: int) -> None:
        with self._lock:
            if self._state != "booting":
                raise ConfigError(f"the boot is already {self._state}")
            self._state = "ready"
            self._step = _STEPS
            self._key_id = key_id

    def rotated(self, key_id: int) -> None:
        """The OHTTP key was replaced by one with ``key_id``."""
        with self._lock:
            if self._state != "ready":
                raise ConfigError(f"a key is rotated only when ready, not {self._state}")
            self._key_id = key_id

    @property
    def state(self) -> str:
        return self._state

    @property
    def step(self) -> int:
        return self._step

    @property
    def error(self) -> str:
        return self._error

    def snapshot(self, *, active: int = 0, served: int = 0) -> Health:
        with self._lock:
            name = "ready" if self._state == "ready" else BOOT_STEPS[self._step - 1]
            return Health(
                state=self._state,
                step=self._step,
                steps=_STEPS,
                name=name,
                error=self._error,
                key_id=self._key_id,
                active=min(active, _U32_MAX),
                served=min(served, _U32_MAX),
            )


@dataclass
class ServerStats:
    """Counters of the control server; never content."""

    connections: int = 0
    requests: int = 0  # INFER_REQUEST frames received
    attestations: int = 0  # documents issued
    served: int = 0  # inference requests answered completely
    active: int = 0  # inference requests admitted whose worker has not finished
    replays: int = 0  # requests refused because their key had served them already
    key_rotations: int = 0  # OHTTP keys replaced (their replay record was full)
    errors: Counter[str] = field(default_factory=Counter)  # ERROR frames sent, by code
