"""The linter: hole-ridden key policies, each flagged by the rule that names the hole."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from attestation.policy import PcrSet
from kms_policy.check import RULES, check
from kms_policy.errors import ConfigError
from kms_policy.generate import generate
from kms_policy.model import KeyPolicy

ACCOUNT = "111122223333"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/enclave-parent"
PROVIDER = "arn:aws:iam::444455556666:role/model-provider"
ADMIN = "arn:aws:iam::444455556666:user/key-admin"
IMAGE = "kms:RecipientAttestation:ImageSha384"
MEASUREMENTS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
PCR0 = MEASUREMENTS[0].hex()
GENERATED = generate(
    measurements=MEASUREMENTS,
    role_arn=ROLE,
    provider_arn=PROVIDER,
    admin_arns=[ADMIN],
    encryption_context={"model": "m1"},
)
DENY_UNATTESTED = {
    "Sid": "DenyUnattested",
    "Effect": "Deny",
    "Principal": "*",
    "Action": "kms:Decrypt",
    "Resource": "*",
    "Condition": {"Null": {IMAGE: "true"}},
}


def _allow_role(
    condition: dict[str, Any] | None, action: Any = "kms:Decrypt", **extra: Any
) -> dict[str, Any]:
    statement = {"Sid": "Enclave", "Effect": "Allow", "Principal": {"AWS": ROLE},
                 "Action": action, "Resource": "*", **extra}  # fmt: skip
    if condition is not None:
        statement["Condition"] = condition
    return statement


def _doc(*statements: dict[str, Any]) -> dict[str, Any]:
    return {"Version": "2012-10-17", "Statement": list(statements)}


def _generated_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = copy.deepcopy(GENERATED.to_dict())
    change(document)
    return document


def _add(statement: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    return lambda document: document["Statement"].append(statement)


def _drop(*sids: str) -> Callable[[dict[str, Any]], None]:
    def change(document: dict[str, Any]) -> None:
        document["Statement"] = [s for s in document["Statement"] if s.get("Sid") not in sids]

    return change


PINNED = {"StringEqualsIgnoreCase": {IMAGE: PCR0}}
AWS_DEFAULT_KEY_POLICY = _doc(
    {"Sid": "Enable IAM User Permissions", "Effect": "Allow",
     "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"},
)  # fmt: skip

# name → (document, rule id expected among the errors or warnings)
HOLES: dict[str, tuple[dict[str, Any], str]] = {
    "aws_default_policy_root_kms_star": (AWS_DEFAULT_KEY_POLICY, "KP001"),
    "aws_default_policy_account_principal_on_data_plane": (AWS_DEFAULT_KEY_POLICY, "KP005"),
    "aws_default_policy_lets_any_principal_rewrite_policy": (AWS_DEFAULT_KEY_POLICY, "KP006"),
    "generated_plus_root_statement": (
        _generated_with(_add(AWS_DEFAULT_KEY_POLICY["Statement"][0])), "KP006"),
    "if_exists_on_image_sha384": (
        _doc(_allow_role({"StringEqualsIfExists": {IMAGE: PCR0}})), "KP004"),
    "if_exists_on_image_sha384_decrypts_unattested": (
        _doc(_allow_role({"StringEqualsIfExists": {IMAGE: PCR0}})), "KP001"),
    "for_all_values_on_image_sha384": (
        _doc(_allow_role({"ForAllValues:StringEquals": {IMAGE: PCR0}}), DENY_UNATTESTED), "KP004"),
    "principal_star_with_decrypt": (
        _doc({**_allow_role(PINNED), "Principal": "*"}, DENY_UNATTESTED), "KP005"),
    "not_principal_allow_with_decrypt": (
        _doc({**_allow_role(PINNED), "Principal": None, "NotPrincipal": {"AWS": ADMIN}},
             DENY_UNATTESTED), "KP005"),
    "create_grant_allowed_to_role": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:CreateGrant", Sid="Grants"),
             DENY_UNATTESTED), "KP006"),
    "put_key_policy_allowed_to_role": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:Put*", Sid="Put"), DENY_UNATTESTED),
        "KP006"),
    "zero_pcr_debug_mode": (
        _doc(_allow_role({"StringEqualsIgnoreCase": {IMAGE: "00" * 48}}), DENY_UNATTESTED),
        "KP008"),
    "short_pcr": (
        _doc(_allow_role({"StringEqualsIgnoreCase": {IMAGE: PCR0[:64]}}), DENY_UNATTESTED),
        "KP007"),
    "wildcard_pcr_pattern": (
        _doc(_allow_role({"StringLike": {IMAGE: "*"}}), DENY_UNATTESTED), "KP007"),
    "attested_decrypt_for_any_image": (
        _doc(_allow_role({"Null": {IMAGE: "false"}}), DENY_UNATTESTED), "KP002"),
    "no_explicit_deny_for_unattested_decrypt": (
        _generated_with(_drop("DenyDecryptWithoutAttestation", "DenyDecryptOtherImage",
                              "DenyDecryptOtherPCR0", "DenyDecryptOtherPCR1",
                              "DenyDecryptOtherPCR2")), "KP011"),
    "generate_data_key_allowed_to_role": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:GenerateDataKey", Sid="Gen"),
             DENY_UNATTESTED), "KP003"),
    "encrypt_allowed_to_account": (
        _doc(_allow_role(PINNED), DENY_UNATTESTED,
             {"Effect": "Allow", "Principal": {"AWS": ACCOUNT}, "Action": "kms:Encrypt",
              "Resource": "*"}), "KP003"),
    "re_encrypt_allowed_to_role": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:ReEncrypt*", Sid="Re"),
             DENY_UNATTESTED), "KP001"),
    "unknown_operator": (
        _doc(_allow_role({"StringEqualz": {IMAGE: PCR0}}), DENY_UNATTESTED), "KP012"),
    "not_principal_in_use": (
        _generated_with(_add({"Sid": "X", "Effect": "Deny", "NotPrincipal": {"AWS": ADMIN},
                              "Action": "kms:PutKeyPolicy", "Resource": "*"})), "KP013"),
    "resource_names_another_key": (
        _doc(_allow_role(PINNED, Resource="arn:aws:kms:eu-west-1:1:key/x"), DENY_UNATTESTED),
        "KP016"),
}  # fmt: skip


SECURE_TRANSPORT = {"Bool": {"aws:SecureTransport": "true"}}
ROOT_PUT_KEY_POLICY = {"Sid": "Root", "Effect": "Allow", "Resource": "*",
                       "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                       "Action": "kms:PutKeyPolicy"}  # fmt: skip
# a Deny that stops every role of the account (and any role named like the old probes)
ROLES = [f"arn:aws:iam::{ACCOUNT}:role/*", "arn:aws:iam::*:role/kp-probe-*"]
DENY_ROLES_PUT = {"Sid": "DenyRoles", "Effect": "Deny", "Principal": "*", "Resource": "*",
                  "Action": "kms:PutKeyPolicy",
                  "Condition": {"ArnLike": {"aws:PrincipalArn": ROLES}}}  # fmt: skip
# holes behind conditions on keys the caller controls: the probes once never supplied them
HOLES.update({
    "re_encrypt_behind_secure_transport": (
        _generated_with(lambda d: (_drop("DenyReEncrypt")(d), _add(
            {"Sid": "X", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": "kms:ReEncrypt*", "Resource": "*", "Condition": SECURE_TRANSPORT})(d))),
        "KP001"),
    "generate_data_key_to_non_provider_behind_secure_transport": (
        _generated_with(lambda d: (_drop("DenyDataKeysExceptProvider")(d), _add(
            {"Sid": "X", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": "kms:GenerateDataKey", "Resource": "*", "Condition": SECURE_TRANSPORT})(d))),
        "KP003"),
    "create_grant_to_role_behind_secure_transport": (
        _generated_with(lambda d: (_drop("DenyGrants", "DenyEnclaveRoleAllButDecrypt")(d), _add(
            _allow_role(SECURE_TRANSPORT, "kms:CreateGrant", Sid="X"))(d))), "KP006"),
    "create_grant_to_role_for_aws_resource": (
        _generated_with(lambda d: (_drop("DenyGrants", "DenyEnclaveRoleAllButDecrypt")(d), _add(
            _allow_role({"Bool": {"kms:GrantIsForAWSResource": "true"}}, "kms:CreateGrant",
                        Sid="X"))(d))), "KP006"),
    "decrypt_behind_principal_type": (
        _doc(_allow_role({"StringEquals": {"aws:PrincipalType": "AssumedRole"}})), "KP001"),
    "decrypt_behind_via_service": (
        _doc(_allow_role({"StringEquals": {"kms:ViaService": "s3.eu-west-1.amazonaws.com"}})),
        "KP001"),
    "decrypt_behind_string_like_encryption_context": (
        _doc(_allow_role({"StringLike": {"kms:EncryptionContext:model": "m*"}})), "KP001"),
    "decrypt_behind_null_false_encryption_context": (
        _doc(_allow_role({"Null": {"kms:EncryptionContext:model": "false"}})), "KP001"),
    "decrypt_behind_for_any_value_encryption_context_keys": (
        _doc(_allow_role({"ForAnyValue:StringEquals": {"kms:EncryptionContextKeys": "model"}})),
        "KP001"),
    "deny_unattested_lifted_by_encryption_context": (
        _doc(_allow_role(None), {**DENY_UNATTESTED, "Condition": {
            "Null": {IMAGE: "true", "kms:EncryptionContextKeys": "true"}}}), "KP001"),
    "deny_unattested_lifted_by_string_not_like_encryption_context": (
        _doc(_allow_role(PINNED), {**DENY_UNATTESTED, "Condition": {
            "Null": {IMAGE: "true"}, "StringNotLike": {"kms:EncryptionContext:model": "m*"}}}),
        "KP011"),
    "deny_of_account_roles_leaves_account_users": (
        _generated_with(lambda d: (_add(ROOT_PUT_KEY_POLICY)(d), _add(DENY_ROLES_PUT)(d))),
        "KP006"),
})  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOLES))
def test_flags_hole(name: str) -> None:
    document, rule = HOLES[name]
    document = {**document, "Statement": [
        {k: v for k, v in s.items() if v is not None} for s in document["Statement"]]}  # fmt: skip
    report = check(KeyPolicy.from_json(document), role_arn=ROLE, provider_arn=PROVIDER)
    assert rule in report.ids(), report.summary()
    if rule not in ("KP012", "KP013", "KP016"):
        assert not report.ok
        assert rule in report.ids("error")


def test_flags_measurement_that_differs_from_expected() -> None:
    report = check(GENERATED, expect=[{0: b"\x20" * 48}], role_arn=ROLE, provider_arn=PROVIDER)
    assert "KP009" in report.ids("error"), report.summary()
    assert any("no expected measurement set" in f.message for f in report.findings)
    assert any("in no expected set" in f.message for f in report.findings)


def test_flags_policy_allowing_an_extra_image_beyond_expected() -> None:
    extra = _allow_role({"StringEqualsIgnoreCase": {IMAGE: "aa" * 48}}, Sid="Old")
    policy = KeyPolicy.from_json(_doc(_allow_role(PINNED), extra, DENY_UNATTESTED))
    report = check(policy, expect=[{0: MEASUREMENTS[0]}], role_arn=ROLE)
    errors = [f for f in report.findings if f.id == "KP009"]
    assert errors, report.summary()
    assert errors[0].statement == "Old"


def test_warns_when_policy_pins_fewer_pcrs_than_expected() -> None:
    policy = KeyPolicy.from_json(_doc(_allow_role(PINNED), DENY_UNATTESTED))
    report = check(policy, expect=[MEASUREMENTS], role_arn=ROLE)
    assert "KP010" in report.ids("warning"), report.summary()
    assert "KP009" not in report.ids("error")


SIGNED_A = {0: b"\x30" * 48, 1: b"\x31" * 48, 2: b"\x32" * 48, 8: b"\x38" * 48}
SIGNED_B = {0: b"\x40" * 48, 1: b"\x41" * 48, 2: b"\x42" * 48, 8: b"\x48" * 48}


def _one_allow_for_both(*indexes: int) -> KeyPolicy:
    """One Allow listing both images' values per PCR: its conditions also match the mixtures."""
    condition = {
        f"kms:RecipientAttestation:PCR{i}": [SIGNED_A[i].hex(), SIGNED_B[i].hex()] for i in indexes
    }
    condition[IMAGE] = [SIGNED_A[0].hex(), SIGNED_B[0].hex()]
    allow = _allow_role({"StringEqualsIgnoreCase": condition})
    return KeyPolicy.from_json(_doc(allow, DENY_UNATTESTED))


def test_rejects_one_allow_that_lets_image_a_decrypt_with_image_bs_signing_certificate() -> None:
    # PCR0 does not determine PCR8: image A re-signed with B's certificate measures (A, cert B),
    # a combination neither expected set names
    report = check(_one_allow_for_both(0, 8), expect=[SIGNED_A, SIGNED_B], role_arn=ROLE)
    assert not report.ok, report.summary()
    mixed = [f for f in report.findings if f.id == "KP009" and "PCR8" in f.message]
    assert mixed, report.summary()
    assert all(f.severity == "error" for f in mixed)
    assert "PCR0 does not determine" in mixed[0].message


def test_one_allow_mixing_pcr1_and_pcr2_of_two_images_stays_a_warning() -> None:
    # PCR0 hashes the image and so fixes PCR1 and PCR2: (A's PCR0, B's PCR1) never occurs
    report = check(_one_allow_for_both(0, 1, 2), expect=[SIGNED_A, SIGNED_B], role_arn=ROLE)
    assert report.ok, report.summary()
    assert report.ids("warning") == {"KP010"}


def test_one_of_two_expected_sets_missing_is_a_warning() -> None:
    report = check(GENERATED, expect=[MEASUREMENTS, {0: b"\x21" * 48}], role_arn=ROLE)
    assert "KP009" in report.ids("warning")
    assert "KP009" not in report.ids("error")


def test_generated_policy_passes_clean() -> None:
    report = check(GENERATED, expect=[PcrSet(MEASUREMENTS)], role_arn=ROLE, provider_arn=PROVIDER)
    assert report.ok, report.summary()
    assert report.findings == ()
    assert len(report.can_decrypt) == 1
    assert report.can_decrypt[0].startswith(f"the parent's role {ROLE}: with attestation of PCR0=")


def test_generated_policy_passes_without_optional_inputs() -> None:
    report = check(GENERATED)
    assert report.ok, report.summary()
    assert report.ids() <= {"KP015"}


def test_can_decrypt_says_who_decrypts_without_attestation() -> None:
    report = check(KeyPolicy.from_json(AWS_DEFAULT_KEY_POLICY), role_arn=ROLE)
    assert any("WITHOUT attestation" in line and ACCOUNT in line for line in report.can_decrypt)


def test_report_json_shape() -> None:
    data = check(KeyPolicy.from_json(AWS_DEFAULT_KEY_POLICY)).to_json()
    assert set(data) == {"ok", "findings", "can_decrypt"}
    assert data["ok"] is False
    assert all(set(f) == {"id", "severity", "message", "statement"} for f in data["findings"])
    assert all(f["id"] in RULES for f in data["findings"])
    assert all("\n" not in f["message"] for f in data["findings"])


def test_summary_lists_verdict_findings_and_who() -> None:
    summary = check(KeyPolicy.from_json(AWS_DEFAULT_KEY_POLICY)).summary()
    assert summary.startswith("key policy: FAIL")
    assert "KP001" in summary
    assert "who can obtain the data key" in summary


def test_rejects_unfit_expectations() -> None:
    with pytest.raises(ConfigError):
        check(GENERATED, expect=[{0: b"\x10" * 32}])


@pytest.mark.parametrize("arn", ["enclave", "arn:aws:iam::111122223333:root", "*"])
def test_rejects_unfit_role_arn(arn: str) -> None:
    with pytest.raises(ConfigError, match="role_arn"):
        check(GENERATED, role_arn=arn)


# holes once reported as warnings or info because an optional input was left out
HOLES_WITHOUT_INPUTS: dict[str, tuple[dict[str, Any], dict[str, str], str]] = {
    "create_grant_to_role_without_role_arn": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:CreateGrant", Sid="Grants"),
             DENY_UNATTESTED), {"provider_arn": PROVIDER}, "KP006"),
    "create_grant_to_admin_without_role_arn": (
        _generated_with(lambda d: (_drop("DenyGrants")(d), _add(
            {"Sid": "X", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": "kms:CreateGrant", "Resource": "*"})(d))), {}, "KP006"),
    "put_key_policy_to_decrypting_role_without_role_arn": (
        _doc(_allow_role(PINNED), _allow_role(None, "kms:PutKeyPolicy", Sid="Put"),
             DENY_UNATTESTED), {"provider_arn": PROVIDER}, "KP006"),
    "data_keys_to_admin_without_provider_arn": (
        _generated_with(lambda d: (_drop("DenyDataKeysExceptProvider")(d), _add(
            {"Sid": "X", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": ["kms:GenerateDataKey", "kms:Encrypt"], "Resource": "*"})(d))),
        {"role_arn": ROLE}, "KP003"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOLES_WITHOUT_INPUTS))
def test_flags_hole_without_optional_inputs(name: str) -> None:
    document, inputs, rule = HOLES_WITHOUT_INPUTS[name]
    report = check(KeyPolicy.from_json(document), **inputs)
    assert rule in report.ids("error"), report.summary()
    assert not report.ok


def test_two_data_key_makers_without_provider_arn_are_both_errors() -> None:
    document, inputs, _ = HOLES_WITHOUT_INPUTS["data_keys_to_admin_without_provider_arn"]
    report = check(KeyPolicy.from_json(document), **inputs)
    flagged = [f.message for f in report.findings if f.id == "KP003"]
    assert any(f"to {ADMIN}," in m for m in flagged), flagged
    assert any(f"to {PROVIDER}," in m for m in flagged), flagged
    assert "KP015" not in report.ids()


def test_single_data_key_maker_is_taken_to_be_the_provider() -> None:
    report = check(GENERATED, role_arn=ROLE)
    assert report.ok, report.summary()
    assert [f.id for f in report.findings] == ["KP015"]
    assert PROVIDER in report.findings[0].message


def test_put_key_policy_to_named_admin_without_role_arn_is_administration() -> None:
    report = check(GENERATED, provider_arn=PROVIDER)
    assert report.ok, report.summary()
    assert report.findings == ()


def test_create_grant_to_admin_with_role_arn_stays_a_warning() -> None:
    document, _, _ = HOLES_WITHOUT_INPUTS["create_grant_to_admin_without_role_arn"]
    report = check(KeyPolicy.from_json(document), role_arn=ROLE, provider_arn=PROVIDER)
    assert report.ok, report.summary()
    assert report.ids() == {"KP014"}


def test_denies_on_identity_and_attestation_keys_are_counted() -> None:
    # generate()'s denies use Null on ImageSha384, ArnNotEquals on aws:PrincipalArn and no
    # condition at all: the caller can lift none of them, so they still block the probes
    for inputs in ({}, {"role_arn": ROLE}, {"provider_arn": PROVIDER}):
        report = check(GENERATED, **inputs)
        assert report.ok, report.summary()
        assert "KP011" not in report.ids()


def test_policy_of_liftable_denies_only_does_not_raise() -> None:
    deny = {**DENY_UNATTESTED, "Condition": {"Bool": {"aws:SecureTransport": "false"}}}
    report = check(KeyPolicy.from_json(_doc(deny)), role_arn=ROLE)
    assert "KP011" in report.ids("error"), report.summary()
    assert report.can_decrypt == ("nobody among the probed principals",)
