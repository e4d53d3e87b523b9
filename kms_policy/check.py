"""The auditor's linter: does this key policy really keep the data key inside attested enclaves?

:func:`check` never raises on a parsed policy: it returns a :class:`PolicyReport` listing every
finding (python-tuf's pair of APIs: :func:`kms_policy.evaluate.evaluate` decides, this reports).
Most rules are decided by *probing* the evaluator, which is the ground truth: representative
callers (the parent's role, each IAM role or user the policy names in a Principal or an
``aws:PrincipalArn`` condition, an arbitrary role and user of each account it names, a role and
user of another account) send requests without attestation, and with attestation documents built
from every measurement the policy or ``expect`` mentions plus "any other value" per PCR. The
made-up principals' names derive from a hash of the policy, so no statement can single them out.
The lexical rules inspect the document itself.

What the probes cannot know is what else the caller puts in a request, so they are evaluated
against the *worst case* over everything the caller controls (``kms_policy._probe.attacker_view``):

- Trusted condition keys are those KMS sets and the caller cannot choose: the attestation keys
  (``kms:RecipientAttestation:*``, present only with an authenticated attestation document, and
  enumerated by the probes: none, each named measurement, any other), and the caller's identity
  (``aws:PrincipalArn``, ``kms:CallerAccount``, ``aws:PrincipalAccount``, which the probes supply
  truthfully). Conditions on them keep their real evaluation, in Allows and in Denies.
- Every other key is the caller's or the environment's: the encryption context and
  ``kms:EncryptionContextKeys`` (any pairs the caller likes), ``aws:SecureTransport``,
  ``aws:SourceIp``/``aws:SourceVpce`` (the parent sits in the VPC), ``kms:ViaService``,
  ``kms:GrantIsForAWSResource``, ``aws:PrincipalType``, ``aws:PrincipalTag/*``, ``aws:userid``…
- An Allow's conditions on such keys are taken as satisfied: the caller supplies whatever makes
  them true (over-approximation: a contradictory condition is still taken as satisfiable, so a
  finding may be a false alarm, never a miss).
- A Deny with any condition on such a key is taken as possibly not applying, and left out: its
  conditions are AND-ed, so making one false lifts it, and the linter does not count on the
  caller failing to. What a Deny can be counted on for is what the caller cannot change: ``Null``
  on ``kms:RecipientAttestation:ImageSha384`` (no attestation document, no key; KMS adds the key
  only from an authenticated document), comparisons with the pinned measurements, conditions on
  ``aws:PrincipalArn``/``kms:CallerAccount`` (KMS sets them from the caller's credentials), and
  unconditional Denies. Those are exactly the Denies :func:`kms_policy.generate.generate` writes,
  so its policy still passes clean.

Rules (stable ids; severity in brackets):

- KP001 [error] kms:Decrypt or kms:ReEncrypt* is allowed without attestation.
- KP002 [error] kms:Decrypt is allowed to an attested enclave whatever its image (neither
  ImageSha384/PCR0 nor the signing certificate PCR8 is pinned).
- KP003 [error] kms:GenerateDataKey* or kms:Encrypt is allowed to someone other than the provider
  (a new data key or a chosen one lets that caller forge bundles the enclave would load); without
  ``provider_arn``, to each named principal when more than one principal can make data keys.
- KP004 [error] ``…IfExists`` or ``ForAllValues:`` on an attestation key: true when the request
  carries no attestation at all (IAM "Condition operators", "Multivalued context keys").
- KP005 [error] an Allow of a data-plane action to ``"*"``, an account principal or via
  NotPrincipal (KMS "Key policies": the account principal is every principal of the account).
- KP006 [error] kms:CreateGrant or kms:PutKeyPolicy is allowed to the parent's role, an arbitrary
  principal of an account or an outsider (a grant carries no attestation condition). Without
  ``role_arn`` any principal might be the role: kms:CreateGrant to anyone is an error, and so is
  kms:PutKeyPolicy to a principal that can also decrypt (PutKeyPolicy to other named principals
  is administration).
- KP007 [error] a value compared with an attestation key is not 96 hexadecimal characters.
- KP008 [error] a value compared with an attestation key is all zero: a debug-mode enclave.
- KP009 [error] the allowed measurements differ from ``expect`` (an image no expected set names
  can decrypt, or no expected set can decrypt; a warning when only some expected sets cannot).
  Also an expected image with another value of a PCR that PCR0 does not determine (PCR3 role,
  PCR4 instance, PCR8 signing certificate): one Allow listing two images' PCR0 and PCR8 lets
  image A decrypt when signed with B's certificate, a combination no expected set names.
- KP010 [warning] the policy pins fewer PCRs than ``expect``: the image matches, another PCR
  is free (or is another expected set's PCR1/PCR2, which PCR0 rules out).
- KP011 [error] no explicit Deny of kms:Decrypt without attestation (``Null`` on ImageSha384).
- KP012 [warning] a condition operator this evaluator does not know (evaluated fail-closed).
- KP013 [warning] NotPrincipal (AWS advises against it; its Deny semantics are subtle).
- KP014 [warning] kms:CreateGrant is allowed to a principal the policy names, other than the
  parent's role (``role_arn`` given; without it, KP006).
- KP015 [info] GenerateDataKey without attestation is allowed to a named principal taken to be the
  provider, the only principal that can make data keys (pass ``provider_arn`` to make this exact).
- KP016 [warning] a Resource other than ``"*"``, or NotResource (KMS: a key policy's Resource is
  ``"*"``, "this KMS key").
- KP017 [warning] the measurement analysis was skipped: too many combinations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal, TypeAlias

from attestation.document import PCR_INDEXES, PCR_LENGTH
from attestation.policy import PcrSet
from kms_policy._probe import (
    OTHER,
    Probe,
    View,
    allowed,
    attacker_view,
    attestation,
    candidates,
    decide,
    probes,
)
from kms_policy.errors import ConfigError
from kms_policy.evaluate import ATTESTATION_PREFIX, KmsRequest, evaluate, known_operator
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
# PCR0 hashes the whole image, so it fixes PCR1 and PCR2 (parts of the image); it does not fix the
# parent's IAM role (PCR3), the instance (PCR4) or the signing certificate (PCR8): an image can be
# signed by anyone and run anywhere (AWS Nitro Enclaves User Guide, "Cryptographic attestation",
# the PCR table)
_NOT_IN_PCR0 = (3, 4, 8)
_ACCOUNT = re.compile(r"\d{12}")
_MAX_COMBINATIONS = 4096
_UNATTESTED_KEY_ACTIONS = ("kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo")
_DATA_KEY_ACTIONS = tuple(a for a in DATA_PLANE_ACTIONS if a.startswith(("kms:Gen", "kms:Enc")))


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
    # (2) probes through the evaluator, on the worst case over what the caller controls
    view = attacker_view(policy)
    callers = probes(policy, role_arn, provider_arn)
    can_decrypt, measurement_findings, decrypters = _measurements(
        policy, view, callers, expected, role_arn
    )
    findings += _unattested(view, callers, role_arn, provider_arn, decrypters)
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


def _unattested(
    view: View,
    probes: list[Probe],
    role_arn: str | None,
    provider_arn: str | None,
    decrypters: set[str],
) -> Iterator[Finding]:
    # KP011: the parent's role (or, without one, every named or account principal) must meet an
    # explicit Deny when it asks for kms:Decrypt without attestation, whatever identity it uses
    kinds = ("role",) if any(p.kind == "role" for p in probes) else ("named", "provider", "account")
    undenied = [
        probe.label
        for probe in probes
        if probe.kind in kinds
        and not (
            (d := decide(view, probe, "kms:Decrypt", every=True)).statement is not None
            and not d.allowed
        )
    ]
    if undenied:
        message = f"no statement explicitly denies kms:Decrypt without attestation to {undenied[0]}"
        more = f" (and {len(undenied) - 1} more)" if len(undenied) > 1 else ""
        yield Finding("KP011", "error", message + more, None)
    makers = {p.label: a for p in probes if (a := allowed(view, p, _DATA_KEY_ACTIONS))}
    for probe in probes:
        key_release = allowed(view, probe, _UNATTESTED_KEY_ACTIONS)
        if key_release:
            message = f"{_list(key_release)} allowed without attestation to {probe.label}"
            yield Finding("KP001", "error", message, next(iter(key_release.values())))
        data_keys = makers.get(probe.label)
        if data_keys and probe.kind == "named" and provider_arn is None and len(makers) == 1:
            message = f"{_list(data_keys)} allowed to {probe.label}: taken to be the provider"
            yield Finding("KP015", "info", message, next(iter(data_keys.values())))
        elif data_keys and probe.kind == "named" and provider_arn is None:
            message = (
                f"{_list(data_keys)} allowed to {probe.label}, one of {len(makers)} principals "
                "that can make data keys: at most one of them is the provider"
            )
            yield Finding("KP003", "error", message, next(iter(data_keys.values())))
        elif data_keys and probe.kind != "provider":
            message = f"{_list(data_keys)} allowed to {probe.label}, who is not the provider"
            yield Finding("KP003", "error", message, next(iter(data_keys.values())))
        yield from _control(view, probe, role_arn, decrypters)


def _control(
    view: View, probe: Probe, role_arn: str | None, decrypters: set[str]
) -> Iterator[Finding]:
    """KP006 and KP014: who may issue grants or rewrite the policy."""
    control = allowed(view, probe, ("kms:CreateGrant", "kms:PutKeyPolicy"))
    if control and probe.kind in ("role", "account", "outsider"):
        message = f"{_list(control)} allowed to {probe.label}"
        yield Finding("KP006", "error", message, next(iter(control.values())))
        return
    if "kms:CreateGrant" in control and role_arn is None:
        message = (
            f"kms:CreateGrant is allowed to {probe.label}, who may be the parent's role (pass "
            "role_arn); a grant skips attestation"
        )
        yield Finding("KP006", "error", message, control["kms:CreateGrant"])
    elif "kms:CreateGrant" in control:
        message = f"kms:CreateGrant is allowed to {probe.label}; a grant skips attestation"
        yield Finding("KP014", "warning", message, control["kms:CreateGrant"])
    if "kms:PutKeyPolicy" in control and role_arn is None and probe.label in decrypters:
        message = (
            f"kms:PutKeyPolicy is allowed to {probe.label}, who also decrypts: presumably the "
            "parent's role (pass role_arn)"
        )
        yield Finding("KP006", "error", message, control["kms:PutKeyPolicy"])


def _list(actions: Mapping[str, object]) -> str:
    names = list(actions)
    return f"{names[0]} is" if len(names) == 1 else f"{', '.join(names)} are"


# --- (3) measurements -------------------------------------------------------------------------


def _measurements(
    policy: KeyPolicy,
    view: View,
    probes: list[Probe],
    expected: list[dict[int, str]],
    role_arn: str | None,
) -> tuple[list[str], list[Finding], set[str]]:
    """Who decrypts with which measurements: the can_decrypt lines, the findings, and the labels
    of the probes that can decrypt at all."""
    options = candidates(policy, expected)
    sizes = [len(values) for values in options.values()]
    findings: list[Finding] = []
    can_decrypt: list[str] = []
    decrypters: set[str] = set()
    if math.prod(sizes) > _MAX_COMBINATIONS:
        message = f"{math.prod(sizes)} measurement combinations; analysed unattested access only"
        findings.append(Finding("KP017", "warning", message, None))
        combinations: list[dict[int, str]] = []
    else:
        indexes = sorted(options)
        combinations = [
            dict(zip(indexes, values, strict=True))
            for values in itertools.product(*(options[i] for i in indexes))
        ]
    relevant: list[tuple[dict[int, str], str | None]] = []
    wide_open = False  # a relevant caller decrypts without attestation: KP001 says it all
    for probe in probes:
        unattested = decide(view, probe, "kms:Decrypt")
        if unattested.allowed:
            can_decrypt.append(f"{probe.label}: WITHOUT attestation ({unattested.statement})")
            decrypters.add(probe.label)
            wide_open = wide_open or role_arn is None or probe.kind == "role"
            continue
        allowed_with = []
        for combination in combinations:
            decision = decide(view, probe, "kms:Decrypt", attestation(combination))
            if decision.allowed:
                allowed_with.append((combination, decision.statement))
        for combination, statement in allowed_with:
            if all(combination.get(i, OTHER) == OTHER for i in (0, 8)):
                message = f"kms:Decrypt is allowed to {probe.label} for any enclave image"
                findings.append(Finding("KP002", "error", message, statement))
        if allowed_with:
            decrypters.add(probe.label)
            shown = [_show(c) for c, _ in allowed_with[:4]]
            more = f" (and {len(allowed_with) - 4} more)" if len(allowed_with) > 4 else ""
            can_decrypt.append(f"{probe.label}: with attestation of {'; or '.join(shown)}{more}")
        if role_arn is None or probe.kind == "role":
            relevant += allowed_with
    if not can_decrypt:
        can_decrypt.append("nobody among the probed principals")
    if expected and combinations and not wide_open:
        findings += _compare(expected, relevant)
    return can_decrypt, findings, decrypters


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
    allowed_keys = {_key(combination) for combination, _ in allowed}
    for combination, statement in allowed:
        if any(consistent(combination, pcrs) for pcrs in expected):
            continue
        same_image = [
            pcrs for pcrs in expected if combination.get(0) == pcrs.get(0, combination.get(0))
        ]
        if not same_image:
            message = f"a measurement in no expected set can decrypt: {_show(combination)}"
            yield Finding("KP009", "error", message, statement)
        elif any(not _mixed(combination, pcrs, allowed_keys) for pcrs in same_image):
            message = f"an expected image decrypts with other PCR values: {_show(combination)}"
            yield Finding("KP010", "warning", message, statement)
        else:
            mixed = (_mixed(combination, pcrs, allowed_keys) for pcrs in same_image)
            indexes = sorted(set().union(*mixed))
            which = ", ".join(f"PCR{i}" for i in indexes)
            message = (
                f"an expected image decrypts with another value of {which}, which its PCR0 does "
                f"not determine (one Allow listing several images' values?): {_show(combination)}"
            )
            yield Finding("KP009", "error", message, statement)


def _key(combination: Mapping[int, str]) -> tuple[tuple[int, str], ...]:
    return tuple(sorted(combination.items()))


def _mixed(
    combination: Mapping[int, str],
    pcrs: Mapping[int, str],
    allowed: set[tuple[tuple[int, str], ...]],
) -> set[int]:
    """The PCRs outside PCR0's reach (:data:`_NOT_IN_PCR0`) on which ``combination`` has another
    value than ``pcrs`` *and* the policy pins them: the same combination with that PCR set to any
    other value is refused. A PCR the policy leaves free is KP010's case, not a mixture."""
    return {
        index
        for index in _NOT_IN_PCR0
        if index in pcrs
        and combination.get(index, OTHER) not in (OTHER, pcrs[index])
        and _key({**combination, index: OTHER}) not in allowed
    }


def _show(combination: Mapping[int, str]) -> str:
    return ", ".join(
        f"PCR{i}={'any' if v == OTHER else v[:16] + '…'}" for i, v in sorted(combination.items())
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
