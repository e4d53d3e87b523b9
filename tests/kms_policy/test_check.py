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
