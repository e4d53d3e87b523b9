"""IAM evaluation of one key policy: a table of named cases, each one a rule or a known trap."""

from __future__ import annotations

from typing import Any

import pytest

from kms_policy.errors import ConfigError
from kms_policy.evaluate import (
    IMAGE_SHA384,
    KmsRequest,
    attestation_context,
    evaluate,
    pcr_key,
    request_context,
)
from kms_policy.model import KeyPolicy

ACCOUNT = "111122223333"
OTHER_ACCOUNT = "444455556666"
ROOT = f"arn:aws:iam::{ACCOUNT}:root"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/service/enclave"
SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/enclave/i-0abc"
OTHER_SESSION = f"arn:aws:sts::{ACCOUNT}:assumed-role/operator/alice"
USER = f"arn:aws:iam::{ACCOUNT}:user/alice"
OUTSIDER = f"arn:aws:sts::{OTHER_ACCOUNT}:assumed-role/enclave/i-0abc"
KEY = f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
PCR0 = bytes(range(48))
PCR0_HEX = PCR0.hex()
ATTESTED = attestation_context({0: PCR0, 1: b"\x01" * 48})
PIN_IMAGE = {"StringEqualsIgnoreCase": {IMAGE_SHA384: PCR0_HEX}}


def _s(
    effect: str = "Allow", principal: Any = None, action: Any = "kms:Decrypt", **extra: Any
) -> dict[str, Any]:
    statement: dict[str, Any] = {"Effect": effect, "Resource": "*", **extra}
    if "NotPrincipal" not in extra:
        statement["Principal"] = {"AWS": ROLE} if principal is None else principal
    if "NotAction" not in extra:
        statement["Action"] = action
    return statement


def _ctx(principal: str, **kwargs: Any) -> dict[str, Any]:
    return dict(request_context(principal, **kwargs))


# name → (statements, principal, action, context, allowed)
CASES: dict[str, tuple[list[dict[str, Any]], str, str, dict[str, Any], bool]] = {
    "allow_exact_role_arn": ([_s()], ROLE, "kms:Decrypt", {}, True),
    "allow_role_matches_its_assumed_role_session": ([_s()], SESSION, "kms:Decrypt", {}, True),
    "role_does_not_match_another_roles_session": ([_s()], OTHER_SESSION, "kms:Decrypt", {}, False),
    "role_does_not_match_same_name_in_other_account": ([_s()], OUTSIDER, "kms:Decrypt", {}, False),
    "implicit_deny_without_statement": ([_s(action="kms:Encrypt")], ROLE, "kms:Decrypt", {}, False),
    "explicit_deny_beats_allow": (
        [_s(), _s("Deny", principal="*")], SESSION, "kms:Decrypt", {}, False),
    "deny_listed_first_or_last_wins": (
        [_s("Deny", principal="*"), _s()], SESSION, "kms:Decrypt", {}, False),
    "account_root_matches_every_principal_of_account": (
        [_s(principal={"AWS": ROOT}, action="kms:*")], OTHER_SESSION, "kms:Decrypt", {}, True),
    "account_root_matches_users_too": (
        [_s(principal={"AWS": ROOT})], USER, "kms:Decrypt", {}, True),
    "account_root_does_not_match_other_account": (
        [_s(principal={"AWS": ROOT})], OUTSIDER, "kms:Decrypt", {}, False),
    "bare_account_id_is_the_account_principal": (
        [_s(principal={"AWS": ACCOUNT})], OTHER_SESSION, "kms:Decrypt", {}, True),
    "wildcard_principal_matches_anyone": ([_s(principal="*")], OUTSIDER, "kms:Decrypt", {}, True),
    "aws_wildcard_principal_matches_anyone": (
        [_s(principal={"AWS": "*"})], "anonymous", "kms:Decrypt", {}, True),
    "wildcard_inside_principal_arn_is_literal": (
        [_s(principal={"AWS": f"arn:aws:iam::{ACCOUNT}:role/*"})], SESSION, "kms:Decrypt", {},
        False),
    "not_principal_allow_excludes_listed_role": (
        [_s(NotPrincipal={"AWS": ROLE})], SESSION, "kms:Decrypt", {}, False),
    "not_principal_allow_covers_everyone_else": (
        [_s(NotPrincipal={"AWS": ROLE})], OUTSIDER, "kms:Decrypt", {}, True),
    "not_principal_deny_spares_listed_principal": (
        [_s(principal="*"), _s("Deny", NotPrincipal={"AWS": ROLE})], SESSION, "kms:Decrypt", {},
        True),
    "not_action_allow_excludes_listed_action": (
        [_s(NotAction="kms:Decrypt")], ROLE, "kms:Decrypt", {}, False),
    "not_action_allow_covers_other_actions": (
        [_s(NotAction="kms:Decrypt")], ROLE, "kms:PutKeyPolicy", {}, True),
    "kms_star_covers_decrypt": ([_s(action="kms:*")], ROLE, "kms:Decrypt", {}, True),
    "star_covers_every_action": ([_s(action="*")], ROLE, "kms:CreateGrant", {}, True),
    "prefix_wildcard_covers_generate_data_key_pair": (
        [_s(action="kms:Gen*")], ROLE, "kms:GenerateDataKeyPair", {}, True),
    "question_mark_matches_one_character": (
        [_s(action="kms:ReEncrypt????")], ROLE, "kms:ReEncryptFrom", {}, True),
    "question_mark_needs_exactly_one_character": (
        [_s(action="kms:Decryp?")], ROLE, "kms:Decrypts", {}, False),
    "actions_are_case_insensitive": ([_s(action="KMS:decrypt")], ROLE, "kms:Decrypt", {}, True),
    "resource_mismatch_does_not_apply": (
        [_s(Resource=KEY.replace("1234abcd", "ffffffff"))], ROLE, "kms:Decrypt", {}, False),
    "attested_with_matching_image_allowed": (
        [_s(Condition=PIN_IMAGE)], SESSION, "kms:Decrypt", ATTESTED, True),
    "unattested_string_equals_denied": (
        [_s(Condition=PIN_IMAGE)], SESSION, "kms:Decrypt", {}, False),
    "wrong_image_denied": (
        [_s(Condition=PIN_IMAGE)], SESSION, "kms:Decrypt",
        attestation_context({0: b"\x07" * 48}), False),
    "string_equals_is_case_sensitive": (
        [_s(Condition={"StringEquals": {IMAGE_SHA384: PCR0_HEX.upper()}})], SESSION, "kms:Decrypt",
        ATTESTED, False),
    "string_equals_ignore_case_accepts_upper_hex": (
        [_s(Condition={"StringEqualsIgnoreCase": {IMAGE_SHA384: PCR0_HEX.upper()}})], SESSION,
        "kms:Decrypt", ATTESTED, True),
    "condition_keys_are_case_insensitive": (
        [_s(Condition={"StringEquals": {IMAGE_SHA384.upper(): PCR0_HEX}})], SESSION,
        "kms:Decrypt", ATTESTED, True),
    "if_exists_trap_allows_unattested_request": (
        [_s(Condition={"StringEqualsIfExists": {IMAGE_SHA384: PCR0_HEX}})], SESSION,
        "kms:Decrypt", {}, True),
    "if_exists_still_checks_a_present_key": (
        [_s(Condition={"StringEqualsIfExists": {IMAGE_SHA384: "00" * 48}})], SESSION,
        "kms:Decrypt", ATTESTED, False),
    "for_all_values_trap_allows_absent_key": (
        [_s(Condition={"ForAllValues:StringEquals": {IMAGE_SHA384: PCR0_HEX}})], SESSION,
        "kms:Decrypt", {}, True),
    "for_any_value_is_false_on_absent_key": (
        [_s(Condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "model"}})],
        SESSION, "kms:Decrypt", {}, False),
    "for_any_value_matches_one_of_many": (
        [_s(Condition={"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "model"}})],
        SESSION, "kms:Decrypt", _ctx(SESSION, encryption_context={"a": "1", "model": "m"}), True),
    "for_all_values_rejects_an_extra_value": (
        [_s(Condition={"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": "model"}})],
        SESSION, "kms:Decrypt", _ctx(SESSION, encryption_context={"a": "1", "model": "m"}), False),
    "string_not_equals_is_true_on_absent_key": (
        [_s(Condition={"StringNotEquals": {IMAGE_SHA384: "00" * 48}})], SESSION, "kms:Decrypt",
        {}, True),
    "null_true_matches_unattested_request_deny": (
        [_s(), _s("Deny", principal="*", Condition={"Null": {IMAGE_SHA384: "true"}})], SESSION,
        "kms:Decrypt", {}, False),
    "null_true_spares_attested_request": (
        [_s(), _s("Deny", principal="*", Condition={"Null": {IMAGE_SHA384: "true"}})], SESSION,
        "kms:Decrypt", ATTESTED, True),
    "null_false_requires_the_key": (
        [_s(Condition={"Null": {IMAGE_SHA384: "false"}})], SESSION, "kms:Decrypt", {}, False),
    "values_within_a_key_are_ored": (
        [_s(Condition={"StringEqualsIgnoreCase": {IMAGE_SHA384: ["11" * 48, PCR0_HEX]}})],
        SESSION, "kms:Decrypt", ATTESTED, True),
    "keys_within_an_operator_are_anded": (
        [_s(Condition={"StringEqualsIgnoreCase": {IMAGE_SHA384: PCR0_HEX,
                                                  pcr_key(1): "02" * 48}})],
        SESSION, "kms:Decrypt", ATTESTED, False),
    "encryption_context_pin_enforced": (
        [_s(Condition={"StringEquals": {"kms:EncryptionContext:model": "m1"}})], SESSION,
        "kms:Decrypt", _ctx(SESSION, encryption_context={"model": "m2"}), False),
    "encryption_context_pin_satisfied": (
        [_s(Condition={"StringEquals": {"kms:EncryptionContext:model": "m1"}})], SESSION,
        "kms:Decrypt", _ctx(SESSION, encryption_context={"model": "m1"}), True),
    "caller_account_condition": (
        [_s(principal="*", Condition={"StringEquals": {"kms:CallerAccount": OTHER_ACCOUNT}})],
        OUTSIDER, "kms:Decrypt", _ctx(OUTSIDER), True),
    "principal_arn_of_a_session_is_its_role": (
        [_s(principal="*", Condition={"ArnEquals": {"aws:PrincipalArn": ROLE}})], SESSION,
        "kms:Decrypt", _ctx(SESSION, principal_arn=ROLE), True),
    "arn_not_equals_is_true_without_principal_arn": (
        [_s(principal="*"), _s("Deny", principal="*",
                               Condition={"ArnNotEquals": {"aws:PrincipalArn": ROLE}})],
        "anonymous", "kms:Decrypt", {}, False),
    "arn_like_matches_per_component": (
        [_s(principal="*", Condition={"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/*"}})],
        SESSION, "kms:Decrypt", _ctx(SESSION, principal_arn=ROLE), True),
    "unknown_operator_fails_closed_in_allow": (
        [_s(Condition={"StringEqualz": {IMAGE_SHA384: PCR0_HEX}})], SESSION, "kms:Decrypt",
        ATTESTED, False),
    "unknown_operator_fails_closed_in_deny": (
        [_s(), _s("Deny", principal="*", Condition={"StringEqualz": {"k": "v"}})], SESSION,
        "kms:Decrypt", {}, False),
    "operators_are_case_sensitive": (
        [_s(Condition={"stringequals": {IMAGE_SHA384: PCR0_HEX}})], SESSION, "kms:Decrypt",
        ATTESTED, False),
    "numeric_less_than": (
        [_s(Condition={"NumericLessThan": {"kms:X": "10"}})], SESSION, "kms:Decrypt",
        {"kms:X": "9.5"}, True),
    "numeric_with_non_numeric_policy_value_fails_closed": (
        [_s(Condition={"NumericLessThan": {"kms:X": "ten"}})], SESSION, "kms:Decrypt",
        {"kms:X": "9"}, False),
    "bool_condition": (
        [_s(Condition={"Bool": {"aws:SecureTransport": "true"}})], SESSION, "kms:Decrypt",
        {"aws:SecureTransport": "TRUE"}, True),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CASES))
def test_evaluation_case(name: str) -> None:
    statements, principal, action, context, allowed = CASES[name]
    policy = KeyPolicy.from_json({"Version": "2012-10-17", "Statement": statements})
    decision = evaluate(policy, KmsRequest(principal, action, KEY, context))
    assert decision.allowed is allowed, decision.reason


def test_decision_names_the_deciding_statement() -> None:
    policy = KeyPolicy.from_json(
        {"Version": "2012-10-17",
         "Statement": [_s(Sid="Allow"), _s("Deny", principal="*", action="kms:Re*")]}
    )  # fmt: skip
    assert evaluate(policy, KmsRequest(ROLE, "kms:Decrypt", KEY)).statement == "Allow"
    denied = evaluate(policy, KmsRequest(ROLE, "kms:ReEncryptFrom", KEY))
    assert (denied.allowed, denied.statement) == (False, "#1")
    assert "explicitly denied" in denied.reason
    implicit = evaluate(policy, KmsRequest(ROLE, "kms:Encrypt", KEY))
    assert (implicit.allowed, implicit.statement) == (False, None)


def test_attestation_context_uses_lower_case_hex_and_pcr0_as_image() -> None:
    context = attestation_context({0: PCR0, 8: b"\xab" * 48})
    assert context == {
        IMAGE_SHA384: PCR0_HEX,
        pcr_key(0): PCR0_HEX,
        pcr_key(8): "ab" * 48,
    }


@pytest.mark.parametrize(
    "pcrs",
    [{1: PCR0}, {0: PCR0[:32]}, {0: PCR0, 32: PCR0}, {0: "00" * 48}],
    ids=["no_pcr0", "short_pcr", "index_out_of_range", "hex_instead_of_bytes"],
)
def test_attestation_context_rejects_unfit_pcrs(pcrs: Any) -> None:
    with pytest.raises(ConfigError):
        attestation_context(pcrs)


def test_request_context_without_attestation_has_no_attestation_keys() -> None:
    context = request_context(SESSION, encryption_context={"model": "m1"})
    assert context["kms:CallerAccount"] == ACCOUNT
    assert context["aws:PrincipalArn"] == f"arn:aws:iam::{ACCOUNT}:role/enclave"
    assert context["kms:EncryptionContext:model"] == "m1"
    assert context["kms:EncryptionContextKeys"] == ["model"]
    assert not any(key.startswith("kms:RecipientAttestation") for key in context)
    attested = request_context(SESSION, attestation_pcrs={0: PCR0})
    assert attested[IMAGE_SHA384] == PCR0_HEX


def test_request_rejects_context_keys_differing_only_by_case() -> None:
    with pytest.raises(ConfigError):
        KmsRequest(ROLE, "kms:Decrypt", KEY, {"kms:A": "1", "KMS:a": "2"})
