"""The linter's probes: who asks, with which attestation, against which view of the policy.

Private to :mod:`kms_policy.check`, whose docstring explains the over-approximation this module
implements (:func:`attacker_view`) and why each condition key is trusted or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Literal, TypeAlias

from attestation.document import PCR_INDEXES
from kms_policy.evaluate import (
    ATTESTATION_PREFIX,
    IMAGE_SHA384,
    Decision,
    KmsRequest,
    evaluate,
    pcr_key,
    request_context,
)
from kms_policy.model import WILDCARD, KeyPolicy, Principal, Statement

Kind: TypeAlias = Literal["role", "provider", "named", "account", "outsider"]

OTHER = "other"  # a measurement named nowhere: "any other image"

# Condition keys KMS sets from the caller's credentials or from an authenticated attestation
# document: the caller cannot choose their values, so the probes supply them truthfully and the
# evaluator decides them. Every other key is the caller's or the environment's to choose.
_TRUSTED_KEYS = frozenset({"aws:principalarn", "aws:principalaccount", "kms:calleraccount"})
_NEVER = Decision(False, "not probed", None)
_ACCOUNT = re.compile(r"\d{12}")
_HEX96 = re.compile(r"[0-9a-fA-F]{96}")
_PCR_KEY = re.compile(r"kms:recipientattestation:pcr(\d{1,2})")


@dataclasses.dataclass(frozen=True)
class Probe:
    """A representative caller. ``identities``: (principal, aws:PrincipalArn) pairs it may use;
    an account or an outsider is probed as an IAM role's session and as an IAM user."""

    label: str
    identities: tuple[tuple[str, str], ...]
    kind: Kind


@dataclasses.dataclass(frozen=True)
class View:
    """The policy as the linter evaluates it (None: no statement left), and the original label
    of each view statement."""

    policy: KeyPolicy | None
    labels: tuple[str, ...]


def trusted_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in _TRUSTED_KEYS or lowered.startswith(ATTESTATION_PREFIX.lower())


def attacker_view(policy: KeyPolicy) -> View:
    """The worst case over everything the caller controls: an Allow keeps only its conditions on
    trusted keys (the rest are taken as satisfied), a Deny with any condition on another key is
    left out (the caller may make it not apply)."""
    statements: list[Statement] = []
    labels: list[str] = []
    for index, statement in enumerate(policy.statements):
        trusted = {
            operator: {key: values for key, values in keys.items() if trusted_key(key)}
            for operator, keys in statement.condition.items()
        }
        dropped = any(
            len(trusted[operator]) != len(keys) for operator, keys in statement.condition.items()
        )
        if statement.effect == "Deny" and dropped:
            continue
        condition = {operator: keys for operator, keys in trusted.items() if keys}
        statements.append(dataclasses.replace(statement, sid=None, condition=condition))
        labels.append(statement.label(index))
    view = dataclasses.replace(policy, statements=tuple(statements)) if statements else None
    return View(view, tuple(labels))


def decide(
    view: View,
    probe: Probe,
    action: str,
    attestation: Mapping[str, str] | None = None,
    *,
    every: bool = False,
) -> Decision:
    """The first allowing decision over the probe's identities, else the last one; with
    ``every``, the first decision that does not explicitly deny, else the last one."""
    if view.policy is None:
        return Decision(False, f"implicitly denied: no statement allows {action}", None)
    decision = _NEVER
    for principal, principal_arn in probe.identities:
        context: dict[str, str | Sequence[str]] = dict(
            request_context(principal, principal_arn=principal_arn)
        )
        context.update(attestation or {})
        raw = evaluate(view.policy, KmsRequest(principal, action, WILDCARD, context))
        if raw.statement is None:
            decision = raw
        else:
            label = view.labels[int(raw.statement.removeprefix("#"))]
            decision = Decision(raw.allowed, raw.reason.removesuffix(raw.statement) + label, label)
        if decision.allowed or (every and decision.statement is None):
            return decision
    return decision


def allowed(view: View, probe: Probe, actions: Sequence[str]) -> dict[str, str | None]:
    """The actions ``probe`` may take without attestation → the statement that allows each."""
    decisions = {action: decide(view, probe, action) for action in actions}
    return {action: d.statement for action, d in decisions.items() if d.allowed}


def probes(policy: KeyPolicy, role_arn: str | None, provider_arn: str | None) -> list[Probe]:
    """The parent's role, the provider, each IAM role or user the policy names (in a Principal
    or in an ``aws:PrincipalArn`` condition), any principal of each account it names, and an
    outsider. Names of made-up principals derive from the policy's hash: a policy cannot single
    them out."""
    named: dict[str, None] = {}
    accounts: dict[str, str] = {}  # account → partition
    for arn in (role_arn, provider_arn):
        if arn is not None:
            _note_account(arn, accounts)
    for statement in policy.statements:
        for spec in (statement.principal, statement.not_principal):
            for value in _aws_values(spec):
                _note_account(value, accounts)
                if _iam_principal(value):
                    named[value] = None
        for keys in statement.condition.values():
            for key, values in keys.items():
                if key.lower() == "aws:principalarn":
                    named.update((v, None) for v in values if _iam_principal(v) and "*" not in v)
    found: list[Probe] = []
    for arn in ([role_arn] if role_arn else []) + [a for a in named if a != role_arn]:
        kind: Kind = "role" if arn == role_arn else "provider" if arn == provider_arn else "named"
        label = {"role": "the parent's role ", "provider": "the provider "}.get(kind, "") + arn
        found.append(Probe(label, ((_session_of(arn), arn),), kind))
    if provider_arn and provider_arn not in named and provider_arn != role_arn:
        found.append(Probe(f"the provider {provider_arn}", _identity(provider_arn), "provider"))
    salt = hashlib.sha256(policy.to_json().encode()).hexdigest()
    for account, partition in sorted(accounts.items()):
        label = f"any IAM principal of account {account}"
        found.append(Probe(label, _made_up(partition, account, salt), "account"))
    numbers = (f"{(int(salt[:24], 16) + n) % 10**12:012d}" for n in range(len(accounts) + 1))
    outsider = next(a for a in numbers if a not in accounts)
    label = "a principal of another AWS account"
    found.append(Probe(label, _made_up("aws", outsider, salt), "outsider"))
    return found


def _aws_values(spec: Principal | None) -> tuple[str, ...]:
    if spec is None or spec == WILDCARD:
        return ()
    return spec.get("AWS", ())


def _iam_principal(value: str) -> bool:
    parts = value.split(":", 5)
    return (
        len(parts) == 6
        and parts[0] == "arn"
        and parts[2] == "iam"
        and parts[5].startswith(("role/", "user/"))
    )


def _note_account(value: str, accounts: dict[str, str]) -> None:
    if _ACCOUNT.fullmatch(value):
        accounts.setdefault(value, "aws")
        return
    parts = value.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and _ACCOUNT.fullmatch(parts[4]):
        accounts.setdefault(parts[4], parts[1])


def _made_up(partition: str, account: str, salt: str) -> tuple[tuple[str, str], ...]:
    role = f"arn:{partition}:iam::{account}:role/p{salt[:20]}"
    user = f"arn:{partition}:iam::{account}:user/u{salt[20:40]}"
    return (*_identity(role), *_identity(user))


def _identity(arn: str) -> tuple[tuple[str, str], ...]:
    return ((_session_of(arn), arn),)


def _session_of(arn: str) -> str:
    parts = arn.split(":", 5)
    if parts[2] == "iam" and parts[5].startswith("role/"):
        name = parts[5].rsplit("/", 1)[1]
        return f"arn:{parts[1]}:sts::{parts[4]}:assumed-role/{name}/kp-probe-session"
    return arn


# --- measurements -------------------------------------------------------------------------------


def candidates(policy: KeyPolicy, expected: list[dict[int, str]]) -> dict[int, list[str]]:
    """Per PCR: every value the policy or ``expect`` names, then "any other value"."""
    found: dict[int, set[str]] = {0: set()}
    for statement in policy.statements:
        for keys in statement.condition.values():
            for key, values in keys.items():
                index = _index_of(key)
                if index is not None:
                    found.setdefault(index, set()).update(
                        v.lower() for v in values if _HEX96.fullmatch(v)
                    )
    for pcrs in expected:
        for index, value in pcrs.items():
            found.setdefault(index, set()).add(value)
    return {i: [*sorted(values), OTHER] for i, values in found.items()}


def attestation(combination: Mapping[int, str]) -> dict[str, str]:
    """The attestation keys KMS adds for a document with these PCRs ("other": a fresh value)."""
    values = {
        i: hashlib.sha384(f"kms-policy-probe-{i}".encode()).hexdigest() if v == OTHER else v
        for i, v in combination.items()
    }
    context = {IMAGE_SHA384: values[0]}
    context.update({pcr_key(i): v for i, v in values.items()})
    return context


def _index_of(key: str) -> int | None:
    lowered = key.lower()
    if lowered == IMAGE_SHA384.lower():
        return 0
    match = _PCR_KEY.fullmatch(lowered)
    return int(match.group(1)) if match and int(match.group(1)) in PCR_INDEXES else None
