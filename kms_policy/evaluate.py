"""Evaluate a KMS request against a key policy alone, the way KMS and IAM do.

Sources:

- IAM User Guide, "Policy evaluation logic": an explicit Deny in any statement wins; otherwise an
  Allow that applies allows; otherwise the request is implicitly denied.
- AWS KMS Developer Guide, "Key policies in AWS KMS": in a key policy, the account principal
  (``arn:aws:iam::ACCOUNT:root`` or the bare account id) stands for every IAM principal of that
  account whose IAM policies allow the call. This module evaluates the key policy alone, so it
  treats the account principal as matching *every* principal of the account: the worst case, and
  the one that matters when the enclave and the parent share one IAM role.
- IAM User Guide, "AWS JSON policy elements: Principal": a role ARN also matches the role's
  sessions (``arn:aws:sts::ACCOUNT:assumed-role/NAME/SESSION``); wildcards are not allowed inside a
  principal ARN (only ``"*"`` alone), so such a value matches itself only.
- IAM User Guide, "Condition operators": operators AND-ed, keys within an operator AND-ed, values
  within a key OR-ed. A key absent from the request makes the condition false, except for negated
  operators (``StringNotEquals``, ``ArnNotLike``…), which are then true, ``…IfExists`` (true when
  absent: a trap on attestation keys) and ``Null``. "Multivalued context keys": ``ForAnyValue:`` is
  false on an absent or empty key, ``ForAllValues:`` is vacuously *true* (another trap).
- AWS KMS Developer Guide, "Condition keys for AWS Nitro Enclaves": KMS adds
  ``kms:RecipientAttestation:ImageSha384`` (PCR0) and ``kms:RecipientAttestation:PCR<n>`` to the
  context only when the request carries a valid attestation document in ``Recipient``.

Fail closed: an operator this module does not know, or a malformed operator value (a non-numeric
``NumericEquals`` value, a ``Bool`` value other than true/false), is "unknown": an Allow statement
with an unknown condition does not apply, a Deny statement with one does. Simplification: a
``NotPrincipal`` value is matched like a ``Principal`` value (IAM's Deny-with-NotPrincipal also
requires the account ARN to be listed); the linter flags every ``NotPrincipal``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

from attestation.document import PCR_INDEXES, PCR_LENGTH
from kms_policy.errors import ConfigError
from kms_policy.model import WILDCARD, KeyPolicy, Principal, Statement

__all__ = [
    "ATTESTATION_PREFIX",
    "IMAGE_SHA384",
    "Decision",
    "KmsRequest",
    "attestation_context",
    "evaluate",
    "known_operator",
    "pcr_key",
    "principal_matches",
    "request_context",
]

ATTESTATION_PREFIX = "kms:RecipientAttestation:"
IMAGE_SHA384 = "kms:RecipientAttestation:ImageSha384"
_ACCOUNT_ID = re.compile(r"\d{12}")

Tri = bool | None  # None: the statement's meaning is unknown here; resolved fail-closed


def pcr_key(index: int) -> str:
    """The KMS condition key of one PCR: ``kms:RecipientAttestation:PCR<index>``."""
    return f"{ATTESTATION_PREFIX}PCR{index}"


@dataclass(frozen=True)
class KmsRequest:
    """One KMS call: who (``principal``, an ARN), what (``kms:Decrypt``), on which key, how.

    ``resource`` is the key's ARN; ``"*"`` stands for "the key this policy is attached to" and
    matches every ``Resource`` pattern (a ``NotResource`` is then unknown: fails closed).
    ``context`` maps condition keys (case-insensitive) to a value or a list of values; build it
    with :func:`request_context`.
    """

    principal: str
    action: str
    resource: str = WILDCARD
    context: Mapping[str, str | Sequence[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        normalized: dict[str, tuple[str, ...]] = {}
        for key, value in self.context.items():
            values = (value,) if isinstance(value, str) else tuple(value)
            if not isinstance(key, str) or not all(isinstance(v, str) for v in values):
                raise ConfigError(f"request context {key!r}: keys and values must be strings")
            if key.lower() in normalized:
                raise ConfigError(f"request context repeats {key!r} (keys are case-insensitive)")
            normalized[key.lower()] = values
        object.__setattr__(self, "context", MappingProxyType(normalized))

    def values(self, key: str) -> tuple[str, ...]:
        """The context values of ``key`` (case-insensitive); empty when absent."""
        found = self.context.get(key.lower(), ())
        return (found,) if isinstance(found, str) else tuple(found)


@dataclass(frozen=True)
class Decision:
    """The outcome: ``allowed``, a one-line ``reason``, the deciding statement (Sid or #index)."""

    allowed: bool
    reason: str
    statement: str | None


def evaluate(policy: KeyPolicy, request: KmsRequest) -> Decision:
    """Decide ``request`` against ``policy`` alone: explicit deny > allow > implicit deny."""
    allowed_by: str | None = None
    for index, statement in enumerate(policy.statements):
        if not _applies(statement, request):
            continue
        label = statement.label(index)
        if statement.effect == "Deny":
            # (1) IAM evaluation logic: an explicit deny overrides every allow
            return Decision(False, f"explicitly denied by statement {label}", label)
        allowed_by = allowed_by or label
    if allowed_by is not None:
        # (2) an allow that applies, and no deny
        return Decision(True, f"allowed by statement {allowed_by}", allowed_by)
    # (3) implicit deny
    return Decision(False, f"implicitly denied: no statement allows {request.action}", None)


def principal_matches(spec: Principal, principal: str) -> bool:
    """Whether a Principal element value covers the request's ``principal``."""
    if spec == WILDCARD:
        return True
    for kind, values in spec.items():
        for value in values:
            if kind == "AWS" and _aws_principal_matches(value, principal):
                return True
            if kind != "AWS" and value == principal:
                return True
    return False


def attestation_context(pcrs: Mapping[int, bytes]) -> dict[str, str]:
    """The keys KMS adds for a request whose ``Recipient`` holds a valid attestation document.

    ``pcrs`` are an authenticated document's PCRs. ImageSha384 is PCR0; every PCR present gets
    ``kms:RecipientAttestation:PCR<n>``; values are lower-case hex ("Condition keys for AWS Nitro
    Enclaves").
    """
    if 0 not in pcrs:
        raise ConfigError("an attestation document always has PCR0; pcrs has none")
    context = {IMAGE_SHA384: _pcr_hex(0, pcrs[0])}
    for index in sorted(pcrs):
        context[pcr_key(index)] = _pcr_hex(index, pcrs[index])
    return context


def request_context(
    principal: str,
    *,
    encryption_context: Mapping[str, str] | None = None,
    attestation_pcrs: Mapping[int, bytes] | None = None,
    principal_arn: str | None = None,
) -> dict[str, str | list[str]]:
    """The request context KMS builds for a call by ``principal``.

    ``kms:CallerAccount`` and ``aws:PrincipalAccount`` (the caller's account), ``aws:PrincipalArn``
    (for a role session, the role's ARN: pass ``principal_arn`` when the role has a path, which
    a session ARN does not show), ``kms:EncryptionContext:<key>`` per pair and
    ``kms:EncryptionContextKeys``, and the attestation keys only when ``attestation_pcrs`` (from
    an authenticated document) is given.
    """
    context: dict[str, str | list[str]] = {}
    arn = _parse_arn(principal)
    if arn is not None:
        context["kms:CallerAccount"] = arn.account
        context["aws:PrincipalAccount"] = arn.account
        context["aws:PrincipalArn"] = principal_arn or _role_arn_of_session(arn) or principal
    if encryption_context:
        for key, value in encryption_context.items():
            context[f"kms:EncryptionContext:{key}"] = value
        context["kms:EncryptionContextKeys"] = sorted(encryption_context)
    if attestation_pcrs is not None:
        context.update(attestation_context(attestation_pcrs))
    return context


# --- statements -------------------------------------------------------------------------------


def _applies(statement: Statement, request: KmsRequest) -> bool:
    deny = statement.effect == "Deny"
    if statement.principal is not None:
        if not principal_matches(statement.principal, request.principal):
            return False
    elif statement.not_principal is not None and principal_matches(
        statement.not_principal, request.principal
    ):
        return False
    if statement.action is not None:
        if not any(_glob(p, request.action, fold=True) for p in statement.action):
            return False
    elif statement.not_action is not None and any(
        _glob(p, request.action, fold=True) for p in statement.not_action
    ):
        return False
    resource: Tri
    if request.resource == WILDCARD:  # the policy's own key: Resource matches, NotResource unknown
        resource = True if statement.resource is not None else None
    elif statement.resource is not None:
        resource = any(_glob(p, request.resource, fold=False) for p in statement.resource)
    else:
        patterns = statement.not_resource or ()
        resource = not any(_glob(p, request.resource, fold=False) for p in patterns)
    outcome = _and(resource, _conditions(statement, request))
    return deny if outcome is None else outcome


def _and(*values: Tri) -> Tri:
    if any(v is False for v in values):
        return False
    return None if any(v is None for v in values) else True


def _aws_principal_matches(value: str, principal: str) -> bool:
    if value in (WILDCARD, principal):
        return True
    caller = _parse_arn(principal)
    if caller is None:
        return False
    if _ACCOUNT_ID.fullmatch(value):  # a bare account id is the account principal
        return caller.account == value
    named = _parse_arn(value)
    if named is None or named.partition != caller.partition or named.account != caller.account:
        return False
    if named.service == "iam" and named.resource == "root":
        return True  # the account principal: every principal of the account (worst case)
    if named.service == "iam" and named.resource.startswith("role/"):
        session = caller.resource.split("/")
        return (
            caller.service == "sts"
            and len(session) == 3
            and session[0] == "assumed-role"
            and session[1] == named.resource.rsplit("/", 1)[1]
        )
    return False


class _Arn(NamedTuple):
    partition: str
    service: str
    region: str
    account: str
    resource: str


def _parse_arn(text: str) -> _Arn | None:
    parts = text.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        return None
    return _Arn(parts[1], parts[2], parts[3], parts[4], parts[5])


def _role_arn_of_session(arn: _Arn) -> str | None:
    parts = arn.resource.split("/")
    if arn.service == "sts" and len(parts) == 3 and parts[0] == "assumed-role":
        return f"arn:{arn.partition}:iam::{arn.account}:role/{parts[1]}"
    return None


def _pcr_hex(index: object, value: object) -> str:
    if isinstance(index, bool) or not isinstance(index, int) or index not in PCR_INDEXES:
        raise ConfigError(f"PCR index {index!r} is not in 0 to 31")
    if not isinstance(value, bytes) or len(value) != PCR_LENGTH:
        length = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ConfigError(f"pcrs[{index}] is {length} bytes; SHA384 PCRs are {PCR_LENGTH}")
    return value.hex()


@lru_cache(maxsize=4096)
def _pattern(pattern: str, fold: bool) -> re.Pattern[str]:
    body = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    )  # IAM wildcards: * any run of characters, ? exactly one
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold else 0))


def _glob(pattern: str, value: str, *, fold: bool) -> bool:
    return _pattern(pattern, fold).fullmatch(value) is not None


# --- condition operators ------------------------------------------------------------------------

Compare = Callable[[str, str], bool | None]  # (context value, policy value); None: incomparable


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _numeric(test: Callable[[float, float], bool]) -> Compare:
    def compare(actual: str, expected: str) -> bool | None:
        a, e = _number(actual), _number(expected)
        return None if a is None or e is None else test(a, e)

    return compare


def _arn_like(actual: str, expected: str) -> bool:
    # IAM "ARN condition operators": each of the six colon-separated parts is matched on its own
    a, e = actual.split(":", 5), expected.split(":", 5)
    return len(a) == len(e) == 6 and all(_glob(p, v, fold=False) for p, v in zip(e, a, strict=True))


# base operator → (comparison of one context value with one policy value, negated)
_OPERATORS: dict[str, tuple[Compare, bool]] = {
    "StringEquals": (lambda a, e: a == e, False),
    "StringNotEquals": (lambda a, e: a == e, True),
    "StringEqualsIgnoreCase": (lambda a, e: a.lower() == e.lower(), False),
    "StringNotEqualsIgnoreCase": (lambda a, e: a.lower() == e.lower(), True),
    "StringLike": (lambda a, e: _glob(e, a, fold=False), False),
    "StringNotLike": (lambda a, e: _glob(e, a, fold=False), True),
    "ArnEquals": (_arn_like, False),
    "ArnLike": (_arn_like, False),
    "ArnNotEquals": (_arn_like, True),
    "ArnNotLike": (_arn_like, True),
    "NumericEquals": (_numeric(lambda a, e: a == e), False),
    "NumericNotEquals": (_numeric(lambda a, e: a == e), True),
    "NumericLessThan": (_numeric(lambda a, e: a < e), False),
    "NumericLessThanEquals": (_numeric(lambda a, e: a <= e), False),
    "NumericGreaterThan": (_numeric(lambda a, e: a > e), False),
    "NumericGreaterThanEquals": (_numeric(lambda a, e: a >= e), False),
    "Bool": (lambda a, e: a.lower() == e.lower(), False),
}
_SET_QUALIFIERS = ("ForAnyValue:", "ForAllValues:")


def known_operator(operator: str) -> bool:
    """Whether this module evaluates ``operator`` (anything else fails closed)."""
    _, base, if_exists = _split_operator(operator)
    return (base == "Null" and not if_exists and ":" not in operator) or base in _OPERATORS


def _split_operator(operator: str) -> tuple[str | None, str, bool]:
    qualifier = next((q for q in _SET_QUALIFIERS if operator.startswith(q)), None)
    base = operator[len(qualifier) :] if qualifier else operator
    if_exists = base.endswith("IfExists")
    return qualifier, base.removesuffix("IfExists") if if_exists else base, if_exists


def _conditions(statement: Statement, request: KmsRequest) -> Tri:
    results: list[Tri] = []
    for operator, keys in statement.condition.items():
        for key, expected in keys.items():
            results.append(_condition(operator, request.values(key), expected))
    return _and(*results)


def _condition(operator: str, actual: tuple[str, ...], expected: tuple[str, ...]) -> Tri:
    qualifier, base, if_exists = _split_operator(operator)
    if base == "Null":
        # "Null condition operator": "true" means the key must be absent, "false" present
        flags = {value.lower() for value in expected}
        if qualifier or if_exists or not flags <= {"true", "false"}:
            return None
        return any((flag == "true") == (not actual) for flag in flags)
    if base not in _OPERATORS:
        return None  # unknown operator: fail closed
    compare, negated = _OPERATORS[base]
    if base.startswith("Numeric") and any(_number(e) is None for e in expected):
        return None
    if base == "Bool" and not {e.lower() for e in expected} <= {"true", "false"}:
        return None

    def satisfies(value: str) -> bool:
        if negated:  # values OR-ed, then negated: the value matches none of them
            return all(compare(value, e) is False for e in expected)
        return any(compare(value, e) is True for e in expected)

    if qualifier == "ForAllValues:":
        return all(satisfies(v) for v in actual)  # vacuously true on an absent or empty key
    if not actual:
        if if_exists:
            return True  # …IfExists: an absent key satisfies the condition
        return negated and qualifier is None  # negated operators are true on an absent key
    if qualifier == "ForAnyValue:" or not negated:
        return any(satisfies(v) for v in actual)
    return all(satisfies(v) for v in actual)
