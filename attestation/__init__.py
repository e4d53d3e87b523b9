"""Attestation documents of AWS Nitro Enclaves: parse, verify, measurement policies, the NSM.

Verify a document from the other side of a trust boundary::

    from attestation import Policy, TrustRoot, verify
    result = verify(raw, roots=[TrustRoot.aws_nitro_g1()], now=now, policy=Policy.expect({0: pcr0}))

``verify`` returns a frozen :class:`VerifiedAttestation` or raises one error from
:mod:`attestation.errors`; :func:`audit` is the non-raising report for auditors.
"""

from attestation.document import AttestationDocument
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient, NsmDevice
from attestation.policy import ExpectedMeasurements, Nonce, PcrSet, Policy
from attestation.report import AuditReport, audit
from attestation.roots import TrustRoot
from attestation.verify import VerifiedAttestation, verify

__all__ = [
    "AttestationDocument",
    "AuditReport",
    "EmulatedNsm",
    "ExpectedMeasurements",
    "Nonce",
    "NsmClient",
    "NsmDevice",
    "PcrSet",
    "Policy",
    "TrustRoot",
    "VerifiedAttestation",
    "audit",
    "verify",
]
