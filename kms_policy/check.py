"""The auditor's linter: does this key policy really keep the data key inside attested enclaves?

:func:`check` never raises on a parsed policy: it returns a :class:`PolicyReport` listing every
finding (python-tuf's pair of APIs: :func:`kms_policy.evaluate.evaluate` decides, this reports).
Most rules are decided by *probing* the evaluator, which is the ground truth: representative
callers (the parent's role, each principal the policy names, an arbitrary principal of each
account it names, a principal of another account) send requests without attestation, and with
attestation documents built from every measurement the policy or ``expect`` mentions plus
"any other value" per PCR. The encryption context is the attacker's choice, so each probe also
tries the values the policy pins. The lexical rules inspect the document itself.

Rules (stable ids; severity in brackets):

- KP001 [error] kms:Decrypt or kms:ReEncrypt* is allowed without attestation.
- KP002 [error] kms:Decrypt is allowed to an attested enclave whatever its image (neither
  ImageSha384/PCR0 nor the signing certificate PCR8 is pinned).
- KP003 [error] kms:GenerateDataKey* or kms:Encrypt is allowed to someone other than the provider
  (a new data key or a chosen one lets that caller forge bundles the enclave would load).
- KP004 [error] ``…IfExists`` or ``ForAllValues:`` on an attestation key: true when the request
  carries no attestation at all (IAM "Condition operators", "Multivalued context keys").
- KP005 [error] an Allow of a data-plane action to ``"*"``, an account principal or via
  NotPrincipal (KMS "Key policies": the account principal is every principal of the account).
- KP006 [error] kms:CreateGrant or kms:PutKeyPolicy is allowed to the parent's role, an arbitrary
  principal of an account or an outsider (a grant carries no attestation condition).
- KP007 [error] a value compared with an attestation key is not 96 hexadecimal characters.
- KP008 [error] a value compared with an attestation key is all zero: a debug-mode enclave.
- KP009 [error] the allowed measurements differ from ``expect`` (an image no expected set names
  can decrypt, or no expected set can decrypt; a warning when only some expected sets cannot).
- KP010 [warning] the policy pins fewer PCRs than ``expect``: the image matches, another PCR
  is free.
- KP011 [error] no explicit Deny of kms:Decrypt without attestation (``Null`` on ImageSha384).
- KP012 [warning] a condition operator this evaluator does not know (evaluated fail-closed).
- KP013 [warning] NotPrincipal (AWS advises against it; its Deny semantics are subtle).
- KP014 [warning] kms:CreateGrant is allowed to a principal the policy names.
- KP015 [info] GenerateDataKey without attestation is allowed to a named principal taken to be the
  provider (pass ``provider_arn`` to make this exact).
- KP016 [warning] a Resource other than ``"*"``, or NotResource (KMS: a key policy's Resource is
  ``"*"``, "this KMS key").
- KP017 [warning] the measurement analysis was skipped: too many combinations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

from attestation.document import PCR_INDEXES, PCR_LENGTH
from attestation.policy import PcrSet
from kms_policy.errors import ConfigError
from kms_policy.evaluate import (
    ATTESTATION_PREFIX,
    IMAGE_SHA384,
    Decision,
    KmsRequest,
    evaluate,
    known_operator,
    pcr_key,
    request_context,
)
from kms_policy.generate import DATA_PLANE_ACTIONS
from kms_policy.model import WILDCARD, KeyPolicy, Statement

__all__ = ["RULES", "Finding", "PolicyReport", "Severity", "check"]

Severity: TypeAlias = Literal["error", "warning", "info"]

RULES: dict[str, str] = {
    "KP001": "data-plane action allowed without attestation",
    "KP002": "decrypt allowed for any enclave image",
    "KP003": "data keys or encryption allowed to someone other than the provider",
    "KP004": "IfExists or ForAllValues on an attestation key",
    "KP005": "wildcard or account principal with data-plane actions",
    "KP006": "CreateGrant or PutKeyPolicy reachable by the role or a broad principal",
    "KP007": "attestation value is not a 96-hex-digit SHA-384 measurement",
    "KP008": "attestation value is all zero (debug-mode enclave)",
    "KP009": "allowed measurements differ from the expected ones",
    "KP010": "policy pins fewer PCRs than expected",
    "KP011": "no explicit deny of decrypt without attestation",
    "KP012": "unknown condition operator",
    "KP013": "NotPrincipal in use",
    "KP014": "CreateGrant allowed to a named principal",
    "KP015": "provider inferred",
    "KP016": "resource other than the key itself",
    "KP017": "measurement analysis skipped",
}

_HEX96 = re.compile(r"[0-9a-fA-F]{96}")
_PCR_KEY = re.compile(r"kms:recipientattestation:pcr(\d{1,2})")
_ACCOUNT = re.compile(r"\d{12}")
_MAX_COMBINATIONS = 4096
_UNATTESTED_KEY_ACTIONS = ("kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo")
_DATA_KEY_ACTIONS = tuple(a for a in DATA_PLANE_ACTIONS if a.startswith(("kms:Gen", "kms:Enc")))
_OTHER = "other"  # a measurement named nowhere: "any other image"


@dataclasses.dataclass(frozen=True)
class Finding:
    """One broken (or noteworthy) rule, with the statement (Sid or #index) it points at."""

    id: str
    severity: Severity
    message: str
    statement: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PolicyReport:
    """Every finding, and in plain words who can obtain the data key under which measurements."""

    findings: tuple[Finding, ...]
    can_decrypt: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """No finding of severity "error"."""
        return not any(f.severity == "error" for f in self.findings)

    def ids(self, severity: Severity | None = None) -> set[str]:
        return {f.id for f in self.findings if severity is None or f.severity == severity}

    def summary(self) -> str:
        counts = {s: sum(f.severity == s for f in self.findings) for s in ("error", "warning")}
        verdict = "OK" if self.ok else "FAIL"
        lines = [
            f"key policy: {verdict} ({counts['error']} error(s), {counts['warning']} warning(s))"
        ]
        for f in self.findings:
            where = f" [{f.statement}]" if f.statement else ""
            lines.append(f"  {f.severity:<7} {f.id}{where} {f.message}")
        lines.append("who can obtain the data key (kms:Decrypt):")
        lines += [f"  - {line}" for line in self.can_decrypt]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
            "can_decrypt": list(self.can_decrypt),
        }


@dataclasses.dataclass(frozen=True)
class _Probe:
    label: str
    principal: str
    principal_arn: str
    kind: Literal["role", "provider", "named", "account", "outsider"]


def check(
    policy: KeyPolicy,
    *,
    expect: Sequence[Mapping[int, bytes] | PcrSet] | None = None,
    role_arn: str | None = None,
    provider_arn: str | None = None,
) -> PolicyReport:
    """Lint ``policy``. ``expect``: the accepted PCR sets (several for rolling deploys);
    ``role_arn``: the parent instance's role; ``provider_arn``: who seals. Each optional input
    sharpens the rules; bad inputs raise :class:`ConfigError`, the policy never makes this raise."""
    expected = _expected_hex(expect)
    for name, arn in (("role_arn", role_arn), ("provider_arn", provider_arn)):
        if arn is not None and not re.fullmatch(r"arn:[\w-]+:iam::\d{12}:(role|user)/\S+", arn):
            raise ConfigError(f"{name}: {arn!r} is not an IAM role or user ARN")
    findings: list[Finding] = []
    # (1) lexical rules on the document
    for index, statement in enumerate(policy.statements):
        findings += _lexical(statement, statement.label(index))
    # (2) probes through the evaluator
    probes = _probes(policy, role_arn, provider_arn)
    contexts = _encryption_contexts(policy)
    findings += _unattested(policy, probes, contexts, provider_arn)
    can_decrypt, measurement_findings = _measurements(policy, probes, contexts, expected, role_arn)
    findings += measurement_findings
    return PolicyReport(tuple(_dedupe(findings)), tuple(can_decrypt))


# --- (1) lexical rules ------------------------------------------------------------------------


def _lexical(statement: Statement, label: str) -> Iterator[Finding]:
    if statement.not_principal is not None:
        yield Finding("KP013", "warning", "NotPrincipal: list principals explicitly", label)
    if statement.not_resource is not None or statement.resource not in (None, (WILDCARD,)):
        yield Finding("KP016", "warning", 'a key policy\'s Resource should be "*"', label)
    for operator, keys in statement.condition.items():
        if not known_operator(operator):
            yield Finding(
                "KP012", "warning", f"unknown operator {operator!r} (fails closed)", label
            )
        for key, values in keys.items():
            if not key.lower().startswith(ATTESTATION_PREFIX.lower()):
                continue
            if operator.endswith("IfExists") or operator.startswith("ForAllValues:"):
                message = f"{operator} on {key} is satisfied by a request without attestation"
                yield Finding("KP004", "error", message, label)
            if operator.removesuffix("IfExists").endswith("Null"):
                continue
            for value in values:
                if not _HEX96.fullmatch(value):
                    shown = value if len(value) <= 20 else value[:16] + "…"
                    message = f"{key} is compared with {shown!r}: not 96 hex digits (SHA-384)"
                    yield Finding("KP007", "error", message, label)
                elif set(value) == {"0"}:
                    message = f"{key} is compared with all zeros: a debug-mode enclave"
                    yield Finding("KP008", "error", message, label)
    if statement.effect == "Allow" and _broad(statement):
        actions = [a for a in DATA_PLANE_ACTIONS if _covers(statement, a)]
        if actions:
            message = f"{_who(statement)} is allowed data-plane actions ({', '.join(actions[:4])})"
            yield Finding("KP005", "error", message, label)


def _broad(statement: Statement) -> bool:
    if statement.not_principal is not None or not isinstance(statement.principal, Mapping):
        return True  # NotPrincipal, or Principal "*"
    return any(
        value == WILDCARD or _ACCOUNT.fullmatch(value) or value.endswith(":root")
        for value in statement.principal.get("AWS", ())
    )


def _who(statement: Statement) -> str:
    if statement.not_principal is not None:
        return "everyone but the NotPrincipal list"
    if statement.principal == WILDCARD:
        return 'Principal "*"'
    return "an account principal or wildcard"


def _covers(statement: Statement, action: str) -> bool:
    probe = Statement(
        effect="Allow",
        principal=WILDCARD,
        action=statement.action,
        not_action=statement.not_action,
        resource=(WILDCARD,),
    )
    single = KeyPolicy(version="2012-10-17", statements=(probe,))
    return evaluate(single, KmsRequest(principal="probe", action=action)).allowed


# --- (2) probes -------------------------------------------------------------------------------


def _probes(policy: KeyPolicy, role_arn: str | None, provider_arn: str | None) -> list[_Probe]:
    named: dict[str, None] = {}
    accounts: dict[str, str] = {}  # account → partition
    for arn in (role_arn, provider_arn):
        if arn is not None:
            _note_account(arn, accounts)
    for statement in policy.statements:
        for spec in (statement.principal, statement.not_principal):
            if spec is None or spec == WILDCARD:
                continue
            for value in spec.get("AWS", ()):
                _note_account(value, accounts)
                parts = value.split(":", 5)
                if (
                    len(parts) == 6
                    and parts[2] == "iam"
                    and parts[5].startswith(("role/", "user/"))
                ):
                    named[value] = None
    probes: list[_Probe] = []
    for arn in ([role_arn] if role_arn else []) + [a for a in named if a != role_arn]:
        kind: Literal["role", "provider", "named"] = (
            "role" if arn == role_arn else "provider" if arn == provider_arn else "named"
        )
        probes.append(_Probe(_describe(arn, kind), _session_of(arn), arn, kind))
    if provider_arn and provider_arn not in named and provider_arn != role_arn:
        label = f"the provider {provider_arn}"
        probes.append(_Probe(label, _session_of(provider_arn), provider_arn, "provider"))
    for account, partition in sorted(accounts.items()):
        role = f"arn:{partition}:iam::{account}:role/kp-probe-any-principal"
        label = f"any IAM principal of account {account}"
        probes.append(_Probe(label, _session_of(role), role, "account"))
    numbers = (f"{n:012d}" for n in range(999_999_999_999, 0, -1))
    outsider = next(a for a in numbers if a not in accounts)
    role = f"arn:aws:iam::{outsider}:role/kp-probe-outsider"
    probes.append(_Probe("a principal of another AWS account", _session_of(role), role, "outsider"))
    return probes


def _note_account(value: str, accounts: dict[str, str]) -> None:
    if _ACCOUNT.fullmatch(value):
        accounts.setdefault(value, "aws")
        return
    parts = value.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and _ACCOUNT.fullmatch(parts[4]):
        accounts.setdefault(parts[4], parts[1])


def _session_of(arn: str) -> str:
    parts = arn.split(":", 5)
    if parts[2] == "iam" and parts[5].startswith("role/"):
        name = parts[5].rsplit("/", 1)[1]
        return f"arn:{parts[1]}:sts::{parts[4]}:assumed-role/{name}/kp-probe-session"
    return arn


def _describe(arn: str, kind: str) -> str:
    return {"role": "the parent's role", "provider": "the provider"}.get(kind, "") + (
        f" {arn}" if kind in ("role", "provider") else arn
    )


def _encryption_contexts(policy: KeyPolicy) -> list[dict[str, str] | None]:
    """No context, and one satisfying every literal pin in the policy: the caller picks it."""
    pinned: dict[str, str] = {}
    prefix = "kms:encryptioncontext:"
    for statement in policy.statements:
        for operator, keys in statement.condition.items():
            if operator.removesuffix("IfExists") not in ("StringEquals", "StringEqualsIgnoreCase"):
                continue
            for key, values in keys.items():
                if key.lower().startswith(prefix) and len(key) > len(prefix):
                    pinned.setdefault(key[len(prefix) :], values[0])
    return [None, pinned] if pinned else [None]


def _decide(
    policy: KeyPolicy,
    probe: _Probe,
    action: str,
    contexts: list[dict[str, str] | None],
    attestation: Mapping[str, str] | None = None,
) -> Decision:
    """The first allowing decision over the caller's choices of context, else the last one."""
    decision = Decision(False, "not probed", None)
    for encryption_context in contexts:
        context: dict[str, str | Sequence[str]] = dict(
            request_context(
                probe.principal,
                encryption_context=encryption_context,
                principal_arn=probe.principal_arn,
            )
        )
        context.update(attestation or {})
        decision = evaluate(policy, KmsRequest(probe.principal, action, WILDCARD, context))
        if decision.allowed:
            return decision
    return decision


def _unattested(
    policy: KeyPolicy,
    probes: list[_Probe],
    contexts: list[dict[str, str] | None],
    provider_arn: str | None,
) -> Iterator[Finding]:
    # KP011: the parent's role (or, without one, every named or account principal) must meet an
    # explicit Deny when it asks for kms:Decrypt without attestation, whatever context it picks
    kinds = ("role",) if any(p.kind == "role" for p in probes) else ("named", "provider", "account")
    undenied = [
        probe.label
        for probe in probes
        if probe.kind in kinds
        and not all(
            (d := _decide(policy, probe, "kms:Decrypt", [c])).statement is not None
            and not d.allowed
            for c in contexts
        )
    ]
    if undenied:
        message = f"no statement explicitly denies kms:Decrypt without attestation to {undenied[0]}"
        more = f" (and {len(undenied) - 1} more)" if len(undenied) > 1 else ""
        yield Finding("KP011", "error", message + more, None)
    for probe in probes:
        key_release = _allowed(policy, probe, _UNATTESTED_KEY_ACTIONS, contexts)
        if key_release:
            message = f"{_list(key_release)} allowed without attestation to {probe.label}"
            yield Finding("KP001", "error", message, next(iter(key_release.values())))
        data_keys = _allowed(policy, probe, _DATA_KEY_ACTIONS, contexts)
        if data_keys and probe.kind == "named" and provider_arn is None:
            message = f"{_list(data_keys)} allowed to {probe.label}: taken to be the provider"
            yield Finding("KP015", "info", message, next(iter(data_keys.values())))
        elif data_keys and probe.kind != "provider":
            message = f"{_list(data_keys)} allowed to {probe.label}, who is not the provider"
            yield Finding("KP003", "error", message, next(iter(data_keys.values())))
        control = _allowed(policy, probe, ("kms:CreateGrant", "kms:PutKeyPolicy"), contexts)
        if control and probe.kind in ("role", "account", "outsider"):
            message = f"{_list(control)} allowed to {probe.label}"
            yield Finding("KP006", "error", message, next(iter(control.values())))
        elif "kms:CreateGrant" in control:
            message = f"kms:CreateGrant is allowed to {probe.label}; a grant skips attestation"
            yield Finding("KP014", "warning", message, control["kms:CreateGrant"])


def _allowed(
    policy: KeyPolicy,
    probe: _Probe,
    actions: Sequence[str],
    contexts: list[dict[str, str] | None],
) -> dict[str, str | None]:
    """The actions ``probe`` may take without attestation → the statement that allows each."""
    decisions = {action: _decide(policy, probe, action, contexts) for action in actions}
    return {action: d.statement for action, d in decisions.items() if d.allowed}


def _list(actions: Mapping[str, object]) -> str:
    names = list(actions)
    return f"{names[0]} is" if len(names) == 1 else f"{', '.join(names)} are"


# --- (3) measurements -------------------------------------------------------------------------


def _measurements(
    policy: KeyPolicy,
    probes: list[_Probe],
    contexts: list[dict[str, str] | None],
    expected: list[dict[int, str]],
    role_arn: str | None,
) -> tuple[list[str], list[Finding]]:
    candidates = _candidates(policy, expected)
    sizes = [len(values) for values in candidates.values()]
    findings: list[Finding] = []
    can_decrypt: list[str] = []
    if math.prod(sizes) > _MAX_COMBINATIONS:
        message = f"{math.prod(sizes)} measurement combinations; analysed unattested access only"
        findings.append(Finding("KP017", "warning", message, None))
        combinations: list[dict[int, str]] = []
    else:
        indexes = sorted(candidates)
        combinations = [
            dict(zip(indexes, values, strict=True))
            for values in itertools.product(*(candidates[i] for i in indexes))
        ]
    relevant: list[tuple[dict[int, str], str | None]] = []
    wide_open = False  # a relevant caller decrypts without attestation: KP001 says it all
    for probe in probes:
        unattested = _decide(policy, probe, "kms:Decrypt", contexts)
        if unattested.allowed:
            can_decrypt.append(f"{probe.label}: WITHOUT attestation ({unattested.statement})")
            wide_open = wide_open or role_arn is None or probe.kind == "role"
            continue
        allowed = []
        for combination in combinations:
            decision = _decide(policy, probe, "kms:Decrypt", contexts, _context(combination))
            if decision.allowed:
                allowed.append((combination, decision.statement))
        for combination, statement in allowed:
            if all(combination.get(i, _OTHER) == _OTHER for i in (0, 8)):
                message = f"kms:Decrypt is allowed to {probe.label} for any enclave image"
                findings.append(Finding("KP002", "error", message, statement))
        if allowed:
            shown = [_show(c) for c, _ in allowed[:4]]
            more = f" (and {len(allowed) - 4} more)" if len(allowed) > 4 else ""
            can_decrypt.append(f"{probe.label}: with attestation of {'; or '.join(shown)}{more}")
        if role_arn is None or probe.kind == "role":
            relevant += allowed
    if not can_decrypt:
        can_decrypt.append("nobody among the probed principals")
    if expected and combinations and not wide_open:
        findings += _compare(expected, relevant)
    return can_decrypt, findings


def _compare(
    expected: list[dict[int, str]], allowed: list[tuple[dict[int, str], str | None]]
) -> Iterator[Finding]:
    def consistent(combination: dict[int, str], pcrs: dict[int, str]) -> bool:
        return all(combination.get(i) == v for i, v in pcrs.items())

    missing = [
        number
        for number, pcrs in enumerate(expected, 1)
        if not any(consistent(c, pcrs) for c, _ in allowed)
    ]
    if len(missing) == len(expected):
        yield Finding("KP009", "error", "no expected measurement set can decrypt", None)
    elif missing:
        message = f"expected set(s) {missing} of {len(expected)} cannot decrypt"
        yield Finding("KP009", "warning", message, None)
    for combination, statement in allowed:
        if any(consistent(combination, pcrs) for pcrs in expected):
            continue
        if any(combination.get(0) == pcrs.get(0, combination.get(0)) for pcrs in expected):
            message = f"an expected image decrypts with other PCR values: {_show(combination)}"
            yield Finding("KP010", "warning", message, statement)
        else:
            message = f"a measurement in no expected set can decrypt: {_show(combination)}"
            yield Finding("KP009", "error", message, statement)


def _candidates(policy: KeyPolicy, expected: list[dict[int, str]]) -> dict[int, list[str]]:
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
    return {i: [*sorted(values), _OTHER] for i, values in found.items()}


def _index_of(key: str) -> int | None:
    lowered = key.lower()
    if lowered == IMAGE_SHA384.lower():
        return 0
    match = _PCR_KEY.fullmatch(lowered)
    return int(match.group(1)) if match and int(match.group(1)) in PCR_INDEXES else None


def _context(combination: Mapping[int, str]) -> dict[str, str]:
    """The attestation keys KMS adds for a document with these PCRs ("other": a fresh value)."""
    values = {
        i: hashlib.sha384(f"kms-policy-probe-{i}".encode()).hexdigest() if v == _OTHER else v
        for i, v in combination.items()
    }
    context = {IMAGE_SHA384: values[0]}
    context.update({pcr_key(i): v for i, v in values.items()})
    return context


def _show(combination: Mapping[int, str]) -> str:
    return ", ".join(
        f"PCR{i}={'any' if v == _OTHER else v[:16] + '…'}" for i, v in sorted(combination.items())
    )


def _expected_hex(expect: Sequence[Mapping[int, bytes] | PcrSet] | None) -> list[dict[int, str]]:
    out: list[dict[int, str]] = []
    for item in expect or ():
        pcrs = item.values if isinstance(item, PcrSet) else item
        if not isinstance(pcrs, Mapping) or not pcrs:
            raise ConfigError("expect takes non-empty mappings of PCR index to 48-byte value")
        for index, value in pcrs.items():
            if index not in PCR_INDEXES or not isinstance(value, bytes) or len(value) != PCR_LENGTH:
                raise ConfigError(f"expected pcr{index} must be 48 bytes at an index 0 to 31")
        out.append({index: value.hex() for index, value in pcrs.items()})
    return out


def _dedupe(findings: list[Finding]) -> list[Finding]:
    order = {"error": 0, "warning": 1, "info": 2}
    unique = list(dict.fromkeys(findings))
    return sorted(unique, key=lambda f: (order[f.severity], f.id))
