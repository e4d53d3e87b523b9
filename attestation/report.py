"""The auditor's report: every check of a document and its outcome, without raising.

:func:`audit` runs the same procedure as :func:`attestation.verify.verify` but does not stop at the
first failure, accepts a policy without pinned measurements (an inspection, said so in the report),
and never raises for a bad document. ``to_json()`` gives the stable machine-readable form that
``nci audit verify --json`` prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from attestation.document import AttestationDocument
from attestation.errors import AttestationError
from attestation.policy import Policy
from attestation.roots import TrustRoot
from attestation.verify import CheckOutcome, ProcedureState, run_checks

__all__ = ["AUTHENTICITY_CHECKS", "AuditReport", "audit"]

AUTHENTICITY_CHECKS = ("parse", "chain", "validity", "signature")

NO_HARDWARE_NOTE = (
    "this document chains to a LOCAL root: it was produced by the NSM emulator, "
    "not by Nitro hardware, and proves nothing about an AWS enclave"
)
NO_MEASUREMENT_NOTE = (
    "no measurement was pinned: this proves who signed the document, not which code it attests"
)
DOCUMENT_TIME_NOTE = (
    "verified at the document's own timestamp: this proves authenticity, not freshness"
)


@dataclass(frozen=True)
class AuditReport:
    """Outcome of every check; ``valid`` only when all of them held."""

    checks: tuple[CheckOutcome, ...]
    verified_at: datetime
    module_id: str | None
    timestamp_ms: int | None
    debug: bool | None
    pcrs: dict[str, str]
    root: str | None
    nitro_hardware: bool
    notes: tuple[str, ...]
    error: AttestationError | None

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def authentic(self) -> bool:
        """Parse, chain, validity and signature held: the document is what its root signed."""
        steps = {c.name: c.ok for c in self.checks}
        return all(steps.get(name, False) for name in AUTHENTICITY_CHECKS)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "valid": self.valid,
            "authentic": self.authentic,
            "module_id": self.module_id,
            "timestamp": self.timestamp_ms,
            "debug": self.debug,
            "pcrs": self.pcrs,
            "root": self.root,
            "nitro_hardware": self.nitro_hardware,
            "verified_at": self.verified_at.isoformat(),
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "notes": list(self.notes),
        }
        if self.error is not None:
            out["error"] = {"type": type(self.error).__name__, "message": str(self.error)}
        return out


def audit(
    raw: bytes,
    *,
    roots: Sequence[TrustRoot],
    now: datetime,
    policy: Policy,
    at_document_time: bool = False,
) -> AuditReport:
    """Check ``raw`` (untrusted) and report every outcome; raises only ConfigError (bad arguments).

    With ``at_document_time`` the certificates are checked at the document's own timestamp (``now``
    is then ignored for validity), which proves authenticity but not freshness.
    """
    if at_document_time:
        now = _document_time(raw, now)
    state = ProcedureState()
    outcomes = list(
        run_checks(raw, state, roots=roots, now=now, checks=policy.checks(), stop_on_failure=False)
    )
    first_error = next((o.error for o in outcomes if o.error is not None), None)
    if first_error is None and any(not o.ok for o in outcomes):  # pragma: no cover (defensive)
        first_error = AttestationError("a check did not run")
    doc, root = state.document, state.root
    notes: list[str] = []
    if root is not None and not root.is_nitro_hardware:
        notes.append(NO_HARDWARE_NOTE)
    if policy.measurements is None:
        notes.append(NO_MEASUREMENT_NOTE)
    if at_document_time:
        notes.append(DOCUMENT_TIME_NOTE)
    return AuditReport(
        checks=tuple(outcomes),
        verified_at=now,
        module_id=doc.module_id if doc else None,
        timestamp_ms=doc.timestamp_ms if doc else None,
        debug=doc.is_debug_mode if doc else None,
        pcrs={str(i): v.hex() for i, v in doc.pcrs.items()} if doc else {},
        root=root.name if root else None,
        nitro_hardware=root.is_nitro_hardware if root else False,
        notes=tuple(notes),
        error=first_error,
    )


def _document_time(raw: bytes, fallback: datetime) -> datetime:
    try:
        return AttestationDocument.from_cbor(raw).timestamp
    except AttestationError:
        return fallback  # the parse check reports the problem
