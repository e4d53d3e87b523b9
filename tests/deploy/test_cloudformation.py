"""The CloudFormation template: it lints, its key policy is generate()'s with one image and, with
NextPcr0/1/2 set, with two (a rollout), and the instance role has no KMS action."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms_policy.check import check
from kms_policy.evaluate import KmsRequest, evaluate, request_context
from kms_policy.generate import generate
from kms_policy.model import KeyPolicy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TEMPLATE = DEPLOY / "cloudformation.yaml"

ACCOUNT = "111122223333"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/nci-InstanceRole-ABC123"
PROVIDER_ARN = f"arn:aws:iam::{ACCOUNT}:role/Provider"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT}:role/KeyAdmin"
SESSION_ARN = f"arn:aws:sts::{ACCOUNT}:assumed-role/nci-InstanceRole-ABC123/i-0abc"
PCRS = {0: bytes([0xA0]) * 48, 1: bytes([0xB1]) * 48, 2: bytes([0xC2]) * 48}
NEXT_PCRS = {0: bytes([0xD0]) * 48, 1: bytes([0xE1]) * 48, 2: bytes([0xF2]) * 48}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # long-form intrinsics only (Ref:, Fn::Sub:, Fn::GetAtt:), so plain YAML loads it
    document = yaml.safe_load(TEMPLATE.read_text())
    assert isinstance(document, dict)
    return document


_NO_VALUE = object()  # AWS::NoValue: the property or list item is left out


def _condition(node: Any, refs: dict[str, str], conditions: dict[str, Any]) -> bool:
    """Evaluate a Conditions or Rules expression (the intrinsics the template uses)."""
    [(name, value)] = node.items()
    if name == "Fn::Not":
        return not _condition(value[0], refs, conditions)
    if name == "Fn::And":
        return all(_condition(item, refs, conditions) for item in value)
    if name == "Fn::Equals":
        left, right = (refs[v["Ref"]] if isinstance(v, dict) else v for v in value)
        return bool(left == right)
    if name == "Condition":
        return _condition(conditions[value], refs, conditions)
    raise AssertionError(f"unexpected intrinsic {name}")


def _resolve(node: Any, refs: dict[str, str], attributes: dict[str, str], when: Any) -> Any:
    """Substitute the template's Ref, Fn::GetAtt and Fn::If (all the key policy uses); ``when``
    evaluates a condition name."""
    if isinstance(node, list):
        items = [_resolve(item, refs, attributes, when) for item in node]
        return [item for item in items if item is not _NO_VALUE]
    if isinstance(node, dict):
        if node == {"Ref": "AWS::NoValue"}:
            return _NO_VALUE
        if set(node) == {"Ref"}:
            return refs[node["Ref"]]
        if set(node) == {"Fn::GetAtt"}:
            return attributes[".".join(node["Fn::GetAtt"])]
        if set(node) == {"Fn::If"}:
            name, then, otherwise = node["Fn::If"]
            return _resolve(then if when(name) else otherwise, refs, attributes, when)
        assert not any(key.startswith("Fn::") for key in node), node
        resolved = {key: _resolve(value, refs, attributes, when) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not _NO_VALUE}
    return node


def _parameters(next_pcrs: dict[int, bytes] | None = None) -> dict[str, str]:
    refs = {f"PCR{i}": PCRS[i].hex() for i in (0, 1, 2)}
    refs.update({f"NextPcr{i}": next_pcrs[i].hex() if next_pcrs else "" for i in (0, 1, 2)})
    return {**refs, "ProviderArn": PROVIDER_ARN, "KeyAdminArn": ADMIN_ARN}


def _key_policy(template: dict[str, Any], next_pcrs: dict[int, bytes] | None = None) -> KeyPolicy:
    raw = template["Resources"]["WeightsKey"]["Properties"]["KeyPolicy"]
    refs = _parameters(next_pcrs)
    conditions = template["Conditions"]

    def when(name: str) -> bool:
        return _condition(conditions[name], refs, conditions)

    resolved = _resolve(copy.deepcopy(raw), refs, {"InstanceRole.Arn": ROLE_ARN}, when)
    return KeyPolicy.from_json(json.dumps(resolved))


def _rules_hold(template: dict[str, Any], refs: dict[str, str]) -> bool:
    """Would CloudFormation accept these parameters (the template's Rules)?"""
    for rule in template["Rules"].values():
        if "RuleCondition" in rule and not _condition(rule["RuleCondition"], refs, {}):
            continue
        if not all(_condition(a["Assert"], refs, {}) for a in rule["Assertions"]):
            return False
    return True


def test_template_passes_cfn_lint() -> None:
    # the Python API of cfn-lint (the package has no __main__); no warnings either
    from cfnlint.api import lint_file

    matches = lint_file(TEMPLATE)
    assert not matches, "\n".join(str(match) for match in matches)


def test_key_policy_is_generates(template: dict[str, Any]) -> None:
    expected = generate(
        measurements=PCRS, role_arn=ROLE_ARN, provider_arn=PROVIDER_ARN, admin_arns=[ADMIN_ARN]
    )
    assert _key_policy(template) == expected


def test_rollout_key_policy_is_generates_for_both_images(template: dict[str, Any]) -> None:
    expected = generate(
        measurements=[PCRS, NEXT_PCRS],
        role_arn=ROLE_ARN,
        provider_arn=PROVIDER_ARN,
        admin_arns=[ADMIN_ARN],
    )
    assert _key_policy(template, NEXT_PCRS) == expected


def test_key_policy_passes_the_audit(template: dict[str, Any]) -> None:
    report = check(
        _key_policy(template), expect=[PCRS], role_arn=ROLE_ARN, provider_arn=PROVIDER_ARN
    )
    assert report.ok, report.summary()
    assert not report.ids("error")


def test_rollout_key_policy_passes_the_audit_only_with_both_images(
    template: dict[str, Any],
) -> None:
    policy = _key_policy(template, NEXT_PCRS)
    both = check(policy, expect=[PCRS, NEXT_PCRS], role_arn=ROLE_ARN, provider_arn=PROVIDER_ARN)
    assert both.ok, both.summary()
    assert not both.findings
    # an auditor who expects only the new image is told the old one still decrypts
    new_only = check(policy, expect=[NEXT_PCRS], role_arn=ROLE_ARN, provider_arn=PROVIDER_ARN)
    assert not new_only.ok
    assert new_only.ids("error") == {"KP009"}


def test_rollout_key_policy_refuses_mixed_pcrs_of_the_two_images(
    template: dict[str, Any],
) -> None:
    policy = _key_policy(template, NEXT_PCRS)
    for mixed in ({**PCRS, 2: NEXT_PCRS[2]}, {**NEXT_PCRS, 1: PCRS[1]}):
        context = request_context(SESSION_ARN, attestation_pcrs=mixed, principal_arn=ROLE_ARN)
        request = KmsRequest(SESSION_ARN, "kms:Decrypt", "*", context)
        assert not evaluate(policy, request).allowed
    for image in (PCRS, NEXT_PCRS):
        context = request_context(SESSION_ARN, attestation_pcrs=image, principal_arn=ROLE_ARN)
        assert evaluate(policy, KmsRequest(SESSION_ARN, "kms:Decrypt", "*", context)).allowed


def test_pcr_parameters_are_48_byte_hex(template: dict[str, Any]) -> None:
    for name in ("PCR0", "PCR1", "PCR2"):
        assert template["Parameters"][name]["AllowedPattern"] == "^[0-9a-f]{96}$"
    for name in ("NextPcr0", "NextPcr1", "NextPcr2"):
        assert template["Parameters"][name]["AllowedPattern"] == "^([0-9a-f]{96})?$"
        assert template["Parameters"][name]["Default"] == ""


@pytest.mark.parametrize(
    ("given", "accepted"),
    [
        ((), True),
        ((0, 1, 2), True),
        ((0,), False),  # a half image would pin PCR1 and PCR2 to ""
        ((0, 1), False),
        ((1, 2), False),  # ignored without NextPcr0: refused rather than silently dropped
    ],
)
def test_rules_refuse_a_partial_next_image(
    template: dict[str, Any], given: tuple[int, ...], accepted: bool
) -> None:
    refs = _parameters()
    refs.update({f"NextPcr{i}": NEXT_PCRS[i].hex() for i in given})
    assert _rules_hold(template, refs) is accepted


def _actions(statement: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key in ("Action", "NotAction"):
        value = statement.get(key, [])
        found += [value] if isinstance(value, str) else value
    return found


SSM_CORE = "AmazonSSMManagedInstanceCore"


def _managed_policy(name: str) -> dict[str, Any]:
    """An AWS managed policy's document, from moto's snapshot of AWS's managed policies."""
    from moto.iam.aws_managed_policies import aws_managed_policies_data

    document: dict[str, Any] = json.loads(aws_managed_policies_data)[name]["Document"]
    return document


def test_instance_role_has_no_kms_action(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    role = resources["InstanceRole"]["Properties"]
    # the one managed policy: Session Manager's (the runbook's shell and port forwarding)
    assert role["ManagedPolicyArns"] == [
        {"Fn::Sub": f"arn:${{AWS::Partition}}:iam::aws:policy/{SSM_CORE}"}
    ]
    actions = [
        action
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        for action in _actions(statement)
    ]
    assert actions
    assert not [a for a in actions if a.lower().startswith("kms:") or "*" in a]
    assert "NotAction" not in json.dumps(role["Policies"])
    managed = _managed_policy(SSM_CORE)["Statement"]
    assert all(statement["Effect"] == "Allow" for statement in managed)
    granted = [action for statement in managed for action in _actions(statement)]
    assert granted
    assert {a.split(":")[0] for a in granted} == {"ssm", "ssmmessages", "ec2messages"}
    assert "NotAction" not in json.dumps(managed)
    # and no other IAM policy in the stack attaches to it
    kinds = {resource["Type"] for resource in resources.values()}
    assert not kinds & {"AWS::IAM::Policy", "AWS::IAM::ManagedPolicy", "AWS::IAM::RolePolicy"}


def test_instance_and_bucket_settings(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    instance = resources["ParentInstance"]["Properties"]
    assert instance["EnclaveOptions"] == {"Enabled": True}
    assert instance["MetadataOptions"]["HttpTokens"] == "required"
    bucket = resources["BundleBucket"]["Properties"]
    assert all(bucket["PublicAccessBlockConfiguration"].values())
    assert len(bucket["PublicAccessBlockConfiguration"]) == 4
    assert bucket["VersioningConfiguration"] == {"Status": "Enabled"}
    assert bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
    assert set(template["Outputs"]) == {"BucketName", "KeyArn", "RoleArn", "InstanceId"}


def test_rejects_replacing_the_instance_on_a_pcr_update(template: dict[str, Any]) -> None:
    # an AWS::SSM::Parameter::Value<...> parameter is re-resolved on every update: a newer AL2023
    # AMI would then replace the instance, and its running enclave, when only PCRs change
    image = template["Parameters"]["ImageId"]
    assert image["Type"] == "AWS::EC2::Image::Id"
    assert "Default" not in image  # resolved once by the runbook, then reused on updates
    assert template["Resources"]["ParentInstance"]["Properties"]["ImageId"] == {"Ref": "ImageId"}
    # the PCR parameters reach the key policy and nothing else
    pcr_names = {f"PCR{i}" for i in (0, 1, 2)} | {f"NextPcr{i}" for i in (0, 1, 2)}
    for name, resource in template["Resources"].items():
        if name != "WeightsKey":
            assert not pcr_names & _refs(resource), name
    key = template["Resources"]["WeightsKey"]
    assert not pcr_names & _refs({k: v for k, v in key["Properties"].items() if k != "KeyPolicy"})


def _refs(node: Any) -> set[str]:
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    if isinstance(node, dict):
        found = {node["Ref"]} if set(node) == {"Ref"} else set()
        return found.union(*(_refs(value) for value in node.values()))
    return set()


@pytest.mark.parametrize("name", ["WeightsKey", "BundleBucket"])
def test_rejects_deleting_the_key_or_the_bundles_with_the_stack(
    template: dict[str, Any], name: str
) -> None:
    resource = template["Resources"][name]
    assert resource["DeletionPolicy"] == "Retain"
    assert resource["UpdateReplacePolicy"] == "Retain"


def test_rejects_bucket_requests_without_tls(template: dict[str, Any]) -> None:
    policies = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::S3::BucketPolicy"
    ]
    assert len(policies) == 1
    assert policies[0]["Bucket"] == {"Ref": "BundleBucket"}
    [statement] = policies[0]["PolicyDocument"]["Statement"]
    assert statement["Effect"] == "Deny"
    assert statement["Principal"] == "*"
    assert statement["Action"] == "s3:*"
    assert statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert statement["Resource"] == [
        {"Fn::GetAtt": ["BundleBucket", "Arn"]},
        {"Fn::Sub": "${BundleBucket.Arn}/*"},
    ]


# GiB of memory per allowed instance type (EC2 instance type specifications)
INSTANCE_MEMORY_GIB = {
    "m5.xlarge": 16, "m5.2xlarge": 32, "m5.4xlarge": 64,
    "c5.xlarge": 8, "c5.2xlarge": 16, "c5.4xlarge": 32,
    "r5.xlarge": 32, "r5.2xlarge": 64,
    "m6i.xlarge": 16, "m6i.2xlarge": 32,
    "c6i.xlarge": 8, "c6i.2xlarge": 16,
    "r6i.xlarge": 32,
}  # fmt: skip


def test_rejects_instance_types_too_small_for_the_enclave_and_the_parent(
    template: dict[str, Any],
) -> None:
    parameter = template["Parameters"]["InstanceType"]
    allowed = parameter["AllowedValues"]
    assert parameter["Default"] in allowed
    assert set(allowed) <= set(INSTANCE_MEMORY_GIB), "add the new type's memory to the table"
    assert all(INSTANCE_MEMORY_GIB[t] >= 16 for t in allowed), allowed
