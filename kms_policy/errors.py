"""Errors raised by the kms_policy package.

One base class, split by who is at fault::

    KmsPolicyError
    ├── PolicyParseError   bad or hostile input: not a key policy document as the IAM grammar
    │                      and KMS allow it (names the statement, by Sid or index, and the rule)
    ├── RecipientError     a Recipient's attested public key is not one KMS would encrypt to
    │                      (defined in kms_policy.recipient)
    └── ConfigError        our own inputs are wrong: generator measurements, ARNs, request context

Messages name the element and the rule ("Statement[2] (Sid 'Admins'): exactly one of Principal and
NotPrincipal is required"); they never carry secrets. :meth:`KeyPolicy.from_json` raises only
:class:`PolicyParseError` on hostile input.
"""

from __future__ import annotations

__all__ = ["ConfigError", "KmsPolicyError", "PolicyParseError"]


class KmsPolicyError(Exception):
    """Base class of every error this package raises."""


class PolicyParseError(KmsPolicyError):
    """A key policy document breaks a rule of the IAM policy grammar or of KMS's limits.

    ``statement`` names the offending statement ("Statement[1] (Sid 'Admins')"), or is ``None``
    for a document-level rule; ``rule`` is the broken rule alone.
    """

    def __init__(self, rule: str, *, statement: str | None = None) -> None:
        super().__init__(f"{statement}: {rule}" if statement else rule)
        self.rule = rule
        self.statement = statement


class ConfigError(KmsPolicyError):
    """Our own inputs are wrong: a missing PCR0, a debug-mode measurement, a malformed ARN."""
