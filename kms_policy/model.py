"""A typed model of AWS KMS key policy documents (the IAM JSON policy grammar).

A key policy is a JSON document ``{"Version", "Id"?, "Statement"}``; each statement has an
``Effect``, exactly one of ``Principal``/``NotPrincipal``, exactly one of ``Action``/``NotAction``,
exactly one of ``Resource``/``NotResource`` and an optional ``Condition``. Sources:

- AWS KMS Developer Guide, "Key policies in AWS KMS" and "Elements in a key policy": Principal and
  Resource are required in a key policy (Resource is ``"*"``, "this KMS key"); a key policy is at
  most 32 KiB (32768 bytes).
- IAM User Guide, "IAM JSON policy elements reference" and "grammar": element names are
  case-sensitive, ``Effect`` is exactly ``Allow`` or ``Deny``, values are a string or a list of
  strings, ``Version`` is ``2012-10-17`` or ``2008-10-17`` (the default when absent), Sids are
  unique within a policy.
- IAM User Guide, "Condition": ``{operator: {key: value(s)}}``; Boolean and number values are
  compared as strings; condition keys are case-insensitive, operators are case-sensitive.

:meth:`KeyPolicy.from_json` takes text from whoever wrote the policy (possibly hostile) and raises
only :class:`~kms_policy.errors.PolicyParseError`, naming the statement and the rule.
:meth:`KeyPolicy.to_json` writes a stable, indented document that parses back to an equal policy.
Unknown condition operators are kept (the evaluator fails closed on them; the linter flags them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TypeAlias

from kms_policy.errors import PolicyParseError

__all__ = [
    "MAX_POLICY_SIZE",
    "PRINCIPAL_TYPES",
    "VERSIONS",
    "WILDCARD",
    "Condition",
    "Effect",
    "KeyPolicy",
    "Principal",
    "Statement",
]

MAX_POLICY_SIZE = 32 * 1024  # KMS "Quotas": key policy document size, 32 KiB
VERSIONS = ("2012-10-17", "2008-10-17")
DEFAULT_VERSION = "2008-10-17"  # IAM grammar: the version when the element is absent
PRINCIPAL_TYPES = ("AWS", "Service", "Federated")
WILDCARD: Literal["*"] = "*"

Effect: TypeAlias = Literal["Allow", "Deny"]
Principal: TypeAlias = Mapping[str, tuple[str, ...]] | Literal["*"]
Condition: TypeAlias = Mapping[str, Mapping[str, tuple[str, ...]]]

_POLICY_KEYS = frozenset({"Version", "Id", "Statement"})
_STATEMENT_KEYS = frozenset(
    {
        "Sid",
        "Effect",
        "Principal",
        "NotPrincipal",
        "Action",
        "NotAction",
        "Resource",
        "NotResource",
        "Condition",
    }
)


def _empty_condition() -> Condition:
    return MappingProxyType({})


@dataclass(frozen=True, kw_only=True)
class Statement:
    """One statement. Exactly one of each pair (principal/not_principal, action/not_action,
    resource/not_resource) is set; ``condition`` maps operator → key → accepted values."""

    sid: str | None = None
    effect: Effect
    principal: Principal | None = None
    not_principal: Principal | None = None
    action: tuple[str, ...] | None = None
    not_action: tuple[str, ...] | None = None
    resource: tuple[str, ...] | None = None
    not_resource: tuple[str, ...] | None = None
    condition: Condition = field(default_factory=_empty_condition)

    def __post_init__(self) -> None:
        where = f"Statement (Sid {self.sid!r})" if self.sid else "Statement"
        if self.effect not in ("Allow", "Deny"):
            raise PolicyParseError(
                f'Effect must be "Allow" or "Deny", not {self.effect!r}', statement=where
            )
        for one, other in (
            ("principal", "not_principal"),
            ("action", "not_action"),
            ("resource", "not_resource"),
        ):
            if (getattr(self, one) is None) == (getattr(self, other) is None):
                rule = f"exactly one of {_element(one)} and {_element(other)} is required"
                raise PolicyParseError(rule, statement=where)
        for name in ("principal", "not_principal"):
            value = getattr(self, name)
            if value is not None and value != WILDCARD:
                frozen = {kind: tuple(values) for kind, values in value.items()}
                object.__setattr__(self, name, MappingProxyType(frozen))
        condition = {
            op: MappingProxyType({key: tuple(values) for key, values in keys.items()})
            for op, keys in self.condition.items()
        }
        object.__setattr__(self, "condition", MappingProxyType(condition))

    def label(self, index: int) -> str:
        """How findings and decisions name this statement: its Sid, else ``#index``."""
        return self.sid if self.sid else f"#{index}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.sid is not None:
            out["Sid"] = self.sid
        out["Effect"] = self.effect
        for name in ("principal", "not_principal"):
            value = getattr(self, name)
            if value is not None:
                out[_element(name)] = (
                    value
                    if value == WILDCARD
                    else {kind: _one_or_list(values) for kind, values in sorted(value.items())}
                )
        for name in ("action", "not_action", "resource", "not_resource"):
            value = getattr(self, name)
            if value is not None:
                out[_element(name)] = _one_or_list(value)
        if self.condition:
            out["Condition"] = {
                op: {key: _one_or_list(values) for key, values in sorted(keys.items())}
                for op, keys in sorted(self.condition.items())
            }
        return out


@dataclass(frozen=True)
class KeyPolicy:
    """A parsed key policy: ``version``, ``statements`` and the optional policy ``id``."""

    version: str
    statements: tuple[Statement, ...]
    id: str | None = None

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise PolicyParseError(f"Version must be one of {VERSIONS}, not {self.version!r}")
        if not self.statements:
            raise PolicyParseError("Statement must hold at least one statement")
        sids = [s.sid for s in self.statements if s.sid is not None]
        duplicates = sorted({sid for sid in sids if sids.count(sid) > 1})
        if duplicates:
            raise PolicyParseError(f"Sid values must be unique; repeated: {duplicates}")
        object.__setattr__(self, "statements", tuple(self.statements))

    @classmethod
    def from_json(cls, source: str | bytes | Mapping[str, Any]) -> KeyPolicy:
        """Parse a key policy. ``source`` comes from the policy's author: treat it as hostile.

        Accepts JSON text (``str`` or ``bytes``) or an already decoded mapping. Raises
        :class:`PolicyParseError` naming the statement and the rule; never another type.
        """
        # (1) size: KMS refuses key policies over 32 KiB ("Quotas", key policy document size)
        document: object
        try:
            if isinstance(source, str | bytes):
                size = len(source.encode() if isinstance(source, str) else source)
                if size > MAX_POLICY_SIZE:
                    raise PolicyParseError(f"policy is {size} bytes; KMS allows {MAX_POLICY_SIZE}")
                document = json.loads(
                    source, object_pairs_hook=_unique_keys, parse_constant=_no_constants
                )
            elif isinstance(source, Mapping):
                text = json.dumps(source, allow_nan=False)
                if len(text.encode()) > MAX_POLICY_SIZE:
                    raise PolicyParseError(f"policy is over {MAX_POLICY_SIZE} bytes as JSON")
                document = source
            else:
                raise PolicyParseError(f"policy must be JSON text, not {type(source).__name__}")
        except (ValueError, TypeError, RecursionError) as error:
            # JSONDecodeError, UnicodeError, NaN, huge ints and unserialisable values
            raise PolicyParseError(f"policy is not valid JSON ({type(error).__name__})") from None
        # (2) the document (IAM grammar: policy = {version_block?, id_block?, statement_block})
        if not isinstance(document, Mapping):
            raise PolicyParseError("policy must be a JSON object")
        unknown = [key for key in document if key not in _POLICY_KEYS]
        if unknown:
            raise PolicyParseError(f"unknown top-level element(s) {_names(unknown)}")
        version = document.get("Version", DEFAULT_VERSION)
        if not isinstance(version, str):
            raise PolicyParseError("Version must be a string")
        policy_id = document.get("Id")
        if policy_id is not None and not isinstance(policy_id, str):
            raise PolicyParseError("Id must be a string")
        if "Statement" not in document:
            raise PolicyParseError("Statement is required")
        raw_statements = document["Statement"]
        if isinstance(raw_statements, Mapping):
            raw_statements = [raw_statements]
        if not isinstance(raw_statements, list | tuple):
            raise PolicyParseError("Statement must be an object or a list of objects")
        # (3) each statement, named by index (and Sid when it has one) in every error
        statements = tuple(_parse_statement(raw, index) for index, raw in enumerate(raw_statements))
        return cls(version=version, statements=statements, id=policy_id)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Version": self.version}
        if self.id is not None:
            out["Id"] = self.id
        out["Statement"] = [s.to_dict() for s in self.statements]
        return out

    def to_json(self) -> str:
        """Indented JSON in a stable order (elements in AWS's order, conditions sorted)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"


def _parse_statement(raw: object, index: int) -> Statement:
    where = f"Statement[{index}]"
    if not isinstance(raw, Mapping):
        raise PolicyParseError("must be a JSON object", statement=where)
    sid = raw.get("Sid")
    if sid is not None:
        if not isinstance(sid, str):
            raise PolicyParseError("Sid must be a string", statement=where)
        where = f"{where} (Sid {sid!r})"
    unknown = [key for key in raw if key not in _STATEMENT_KEYS]
    if unknown:
        raise PolicyParseError(f"unknown element(s) {_names(unknown)}", statement=where)
    effect = raw.get("Effect")
    if effect not in ("Allow", "Deny"):
        raise PolicyParseError(f'Effect must be "Allow" or "Deny", not {effect!r}', statement=where)
    for one, other in (("Principal", "NotPrincipal"), ("Action", "NotAction")):
        if (one in raw) == (other in raw):
            raise PolicyParseError(f"exactly one of {one} and {other} is required", statement=where)
    if ("Resource" in raw) == ("NotResource" in raw):
        rule = "exactly one of Resource and NotResource is required (a key policy names the key)"
        raise PolicyParseError(rule, statement=where)
    fields: dict[str, Any] = {}
    for name in ("Principal", "NotPrincipal"):
        if name in raw:
            fields[_attribute(name)] = _parse_principal(raw[name], name, where)
    for name in ("Action", "NotAction", "Resource", "NotResource"):
        if name in raw:
            fields[_attribute(name)] = _strings(raw[name], name, where)
    condition = _parse_condition(raw["Condition"], where) if "Condition" in raw else {}
    try:
        return Statement(sid=sid, effect=effect, condition=condition, **fields)
    except PolicyParseError as error:  # pragma: no cover - the checks above come first
        raise PolicyParseError(error.rule, statement=where) from None


def _parse_principal(value: object, name: str, where: str) -> Principal:
    if value == WILDCARD:
        return WILDCARD
    if not isinstance(value, Mapping) or not value:
        raise PolicyParseError(f'{name} must be "*" or a non-empty object', statement=where)
    out: dict[str, tuple[str, ...]] = {}
    for kind, values in value.items():
        if kind not in PRINCIPAL_TYPES:
            rule = f"{name} type {kind!r} is not one of {PRINCIPAL_TYPES}"
            raise PolicyParseError(rule, statement=where)
        out[kind] = _strings(values, f"{name}.{kind}", where)
    return out


def _parse_condition(value: object, where: str) -> dict[str, dict[str, tuple[str, ...]]]:
    if not isinstance(value, Mapping):
        raise PolicyParseError("Condition must be an object", statement=where)
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for operator, keys in value.items():
        if not isinstance(operator, str) or not operator:
            raise PolicyParseError("condition operators must be non-empty strings", statement=where)
        if not isinstance(keys, Mapping) or not keys:
            rule = f"Condition.{operator} must be a non-empty object of keys"
            raise PolicyParseError(rule, statement=where)
        parsed: dict[str, tuple[str, ...]] = {}
        seen: set[str] = set()
        for key, values in keys.items():
            if not isinstance(key, str) or not key:
                raise PolicyParseError(
                    f"Condition.{operator} keys must be strings", statement=where
                )
            if key.lower() in seen:  # IAM: condition key names are case-insensitive
                rule = f"Condition.{operator} repeats key {key!r} (keys are case-insensitive)"
                raise PolicyParseError(rule, statement=where)
            seen.add(key.lower())
            parsed[key] = _condition_values(values, f"Condition.{operator}.{key}", where)
        out[operator] = parsed
    return out


def _condition_values(value: object, name: str, where: str) -> tuple[str, ...]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items:
        raise PolicyParseError(f"{name} must hold at least one value", statement=where)
    out: list[str] = []
    for item in items:
        # IAM compares Boolean and number values as their JSON text ("true", "10")
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, bool | int | float):
            try:
                out.append(json.dumps(item, allow_nan=False))
            except ValueError:
                raise PolicyParseError(
                    f"{name} holds a non-finite number", statement=where
                ) from None
        else:
            rule = f"{name} values must be strings, Booleans or numbers"
            raise PolicyParseError(rule, statement=where)
    return tuple(out)


def _strings(value: object, name: str, where: str) -> tuple[str, ...]:
    items = list(value) if isinstance(value, list | tuple) else [value]
    if not items or not all(isinstance(item, str) and item for item in items):
        rule = f"{name} must be a non-empty string or a non-empty list of non-empty strings"
        raise PolicyParseError(rule, statement=where)
    return tuple(str(item) for item in items)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # JSON text with a repeated name is ambiguous: parsers disagree
            raise PolicyParseError(f"JSON object repeats the name {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise PolicyParseError(f"{name} is not JSON")


def _one_or_list(values: tuple[str, ...]) -> str | list[str]:
    return values[0] if len(values) == 1 else list(values)


def _element(attribute: str) -> str:
    return "".join(part.capitalize() for part in attribute.split("_"))


def _attribute(element: str) -> str:
    return "not_" + element[3:].lower() if element.startswith("Not") else element.lower()


def _names(keys: list[Any]) -> str:
    return ", ".join(repr(key) for key in keys[:5])
