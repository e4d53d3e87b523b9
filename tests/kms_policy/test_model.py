"""Parsing key policy documents: strict grammar, errors that name the statement, round trips."""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms_policy.errors import PolicyParseError
from kms_policy.model import MAX_POLICY_SIZE, WILDCARD, KeyPolicy, Statement

ROOT = "arn:aws:iam::111122223333:root"
ROLE = "arn:aws:iam::111122223333:role/enclave"


def _statement(**overrides: Any) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": "EnclaveDecrypts",
        "Effect": "Allow",
        "Principal": {"AWS": ROLE},
        "Action": "kms:Decrypt",
        "Resource": "*",
        "Condition": {
            "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": "ab" * 48}
        },
    }
    for key, value in overrides.items():
        if value is None:
            statement.pop(key, None)
        else:
            statement[key] = value
    return statement


def _policy(*statements: Any, **top: Any) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements), **top}


def test_parses_a_statement_into_typed_fields() -> None:
    policy = KeyPolicy.from_json(json.dumps(_policy(_statement())))
    (statement,) = policy.statements
    assert statement.sid == "EnclaveDecrypts"
    assert statement.effect == "Allow"
    assert statement.principal == {"AWS": (ROLE,)}
    assert statement.action == ("kms:Decrypt",)
    assert statement.resource == ("*",)
    assert statement.condition["StringEqualsIgnoreCase"] == {
        "kms:RecipientAttestation:ImageSha384": ("ab" * 48,)
    }


def test_a_single_statement_object_is_accepted() -> None:
    policy = KeyPolicy.from_json({"Version": "2012-10-17", "Statement": _statement()})
    assert len(policy.statements) == 1


def test_version_defaults_to_2008_as_in_the_iam_grammar() -> None:
    assert KeyPolicy.from_json({"Statement": [_statement()]}).version == "2008-10-17"


def test_booleans_and_numbers_in_conditions_become_strings_as_iam_compares_them() -> None:
    condition = {"Bool": {"aws:SecureTransport": True}, "NumericLessThan": {"kms:X": [10, 1.5]}}
    policy = KeyPolicy.from_json(_policy(_statement(Condition=condition)))
    assert policy.statements[0].condition["Bool"] == {"aws:SecureTransport": ("true",)}
    assert policy.statements[0].condition["NumericLessThan"] == {"kms:X": ("10", "1.5")}


def test_round_trip_through_to_json() -> None:
    original = _policy(
        _statement(),
        _statement(Sid="Deny", Effect="Deny", Principal="*", Action=["kms:Decrypt", "kms:Re*"],
                   Condition={"Null": {"kms:RecipientAttestation:ImageSha384": "true"}}),
        _statement(Sid=None, Principal=None, NotPrincipal={"AWS": [ROOT, ROLE]},
                   Action=None, NotAction="kms:Decrypt", Resource=None, NotResource="x",
                   Condition=None),
        Id="key-policy-1",
    )  # fmt: skip
    policy = KeyPolicy.from_json(original)
    again = KeyPolicy.from_json(policy.to_json())
    assert again == policy
    assert again.to_json() == policy.to_json()
    assert again.id == "key-policy-1"
    assert policy.statements[1].principal == WILDCARD


def test_to_json_is_stable_and_sorts_conditions() -> None:
    condition = {"StringEquals": {"b": "2", "a": "1"}, "Bool": {"c": "true"}}
    text = KeyPolicy.from_json(_policy(_statement(Condition=condition))).to_json()
    assert text.index('"Bool"') < text.index('"StringEquals"')
    assert text.index('"a"') < text.index('"b"')
    assert text.endswith("}\n")


def test_statement_constructor_enforces_the_pairs() -> None:
    with pytest.raises(PolicyParseError, match="exactly one of Action and NotAction"):
        Statement(effect="Allow", principal=WILDCARD, resource=("*",))
    with pytest.raises(PolicyParseError, match="Effect"):
        Statement(effect="allow", principal=WILDCARD, action=("kms:*",), resource=("*",))  # type: ignore[arg-type]


MALFORMED: dict[str, tuple[object, str]] = {
    "not_json": ("{", "not valid JSON"),
    "not_an_object": ("[]", "must be a JSON object"),
    "nan_constant": ('{"Version": NaN}', "not JSON"),
    "duplicate_names": ('{"Statement": [], "Statement": []}', "repeats the name"),
    "oversized": (" " * (MAX_POLICY_SIZE + 1), "KMS allows"),
    "unknown_top_level": (_policy(_statement(), Extra=1), "unknown top-level"),
    "bad_version": ({"Version": "2024-01-01", "Statement": [_statement()]}, "Version"),
    "no_statement": ({"Version": "2012-10-17"}, "Statement is required"),
    "empty_statement_list": (_policy(), "at least one statement"),
    "statement_not_object": (_policy("x"), "Statement[0]: must be a JSON object"),
    "unknown_statement_key": (_policy(_statement(Principals="*")), "unknown element"),
    "lower_case_effect": (_policy(_statement(Effect="allow")), 'Effect must be "Allow"'),
    "missing_effect": (_policy(_statement(Effect=None)), "Effect"),
    "principal_and_not_principal": (
        _policy(_statement(NotPrincipal="*")),
        "exactly one of Principal and NotPrincipal",
    ),
    "no_principal": (_policy(_statement(Principal=None)), "Principal and NotPrincipal"),
    "action_and_not_action": (_policy(_statement(NotAction="kms:*")), "Action and NotAction"),
    "no_resource": (_policy(_statement(Resource=None)), "Resource and NotResource"),
    "principal_type_unknown": (_policy(_statement(Principal={"User": ROLE})), "type 'User'"),
    "principal_empty": (_policy(_statement(Principal={})), "non-empty object"),
    "action_not_string": (_policy(_statement(Action=7)), "Action must be"),
    "action_empty_list": (_policy(_statement(Action=[])), "Action must be"),
    "action_nested_list": (_policy(_statement(Action=[["kms:Decrypt"]])), "Action must be"),
    "condition_not_object": (_policy(_statement(Condition=[])), "Condition must be an object"),
    "condition_value_object": (
        _policy(_statement(Condition={"StringEquals": {"k": {"v": 1}}})),
        "values must be strings",
    ),
    "condition_value_null": (
        _policy(_statement(Condition={"StringEquals": {"k": None}})),
        "values must be strings",
    ),
    "condition_no_values": (
        _policy(_statement(Condition={"StringEquals": {"k": []}})),
        "at least one value",
    ),
    "condition_keys_differ_by_case": (
        _policy(_statement(Condition={"StringEquals": {"kms:A": "1", "KMS:a": "2"}})),
        "case-insensitive",
    ),
    "duplicate_sid": (_policy(_statement(), _statement()), "Sid values must be unique"),
    "sid_not_string": (_policy(_statement(Sid=3)), "Sid must be a string"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_rejects_malformed_policy(name: str) -> None:
    source, rule = MALFORMED[name]
    text = source if isinstance(source, str) else json.dumps(source)
    with pytest.raises(PolicyParseError, match=re.escape(rule)):
        KeyPolicy.from_json(text)


def test_parse_errors_name_the_statement_by_index_and_sid() -> None:
    document = _policy(_statement(Sid="First"), _statement(Sid="Admins", Effect="Permit"))
    with pytest.raises(PolicyParseError) as caught:
        KeyPolicy.from_json(document)
    assert caught.value.statement == "Statement[1] (Sid 'Admins')"
    assert str(caught.value).startswith("Statement[1] (Sid 'Admins'): Effect")


def test_parse_errors_name_an_unnamed_statement_by_index() -> None:
    document = _policy(_statement(), _statement(Sid=None, Action=None))
    with pytest.raises(PolicyParseError, match=r"^Statement\[1\]: exactly one of Action"):
        KeyPolicy.from_json(document)


def test_rejects_non_serialisable_mapping() -> None:
    with pytest.raises(PolicyParseError):
        KeyPolicy.from_json({"Statement": [_statement(Action={"kms:Decrypt"})]})


def test_rejects_deeply_nested_json() -> None:
    with pytest.raises(PolicyParseError):
        KeyPolicy.from_json("[" * 10_000 + "]" * 10_000)


_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_keys = st.sampled_from(
    ["Version", "Statement", "Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction",
     "Resource", "NotResource", "Condition", "AWS", "Allow", "Deny", "StringEquals", "x"]
) | st.text(max_size=8)  # fmt: skip
_json = st.recursive(
    _scalars | st.sampled_from(["2012-10-17", "Allow", "Deny", "*", "kms:Decrypt"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(document=_json)
def test_from_json_raises_only_policy_parse_error_on_arbitrary_json(document: object) -> None:
    for source in (document, _dumps(document)):
        with contextlib.suppress(PolicyParseError):
            KeyPolicy.from_json(source)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200))
def test_from_json_raises_only_policy_parse_error_on_arbitrary_text(data: bytes | str) -> None:
    with contextlib.suppress(PolicyParseError):
        KeyPolicy.from_json(data)


def _dumps(document: object) -> str:
    try:
        return json.dumps(document)
    except ValueError:
        return "null"
