"""The deployment files: the CloudFormation template lints, its key policy is generate()'s, the
instance role has no KMS action, and the example parent.yaml parses."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kms_policy.check import check
from kms_policy.generate import generate
from kms_policy.model import KeyPolicy
from parent.config import AwsLauncherConfig, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
TEMPLATE = DEPLOY / "cloudformation.yaml"

ACCOUNT = "111122223333"
ROLE_ARN = f"arn:aws:iam::{ACCOUNT}:role/nci-InstanceRole-ABC123"
PROVIDER_ARN = f"arn:aws:iam::{ACCOUNT}:role/Provider"
ADMIN_ARN = f"arn:aws:iam::{ACCOUNT}:role/KeyAdmin"
PCRS = {0: bytes([0xA0]) * 48, 1: bytes([0xB1]) * 48, 2: bytes([0xC2]) * 48}


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # long-form intrinsics only (Ref:, Fn::Sub:, Fn::GetAtt:), so plain YAML loads it
    document = yaml.safe_load(TEMPLATE.read_text())
    assert isinstance(document, dict)
    return document


def _resolve(node: Any, refs: dict[str, str], attributes: dict[str, str]) -> Any:
    """Substitute the template's Ref and Fn::GetAtt placeholders (all the key policy uses)."""
    if isinstance(node, list):
        return [_resolve(item, refs, attributes) for item in node]
    if isinstance(node, dict):
        if set(node) == {"Ref"}:
            return refs[node["Ref"]]
        if set(node) == {"Fn::GetAtt"}:
            return attributes[".".join(node["Fn::GetAtt"])]
        assert not any(key.startswith("Fn::") for key in node), node
        return {key: _resolve(value, refs, attributes) for key, value in node.items()}
    return node


def _key_policy(template: dict[str, Any]) -> KeyPolicy:
    raw = template["Resources"]["WeightsKey"]["Properties"]["KeyPolicy"]
    refs = {
        "PCR0": PCRS[0].hex(),
        "PCR1": PCRS[1].hex(),
        "PCR2": PCRS[2].hex(),
        "ProviderArn": PROVIDER_ARN,
        "KeyAdminArn": ADMIN_ARN,
    }
    resolved = _resolve(copy.deepcopy(raw), refs, {"InstanceRole.Arn": ROLE_ARN})
    return KeyPolicy.from_json(json.dumps(resolved))


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


def test_key_policy_passes_the_audit(template: dict[str, Any]) -> None:
    report = check(
        _key_policy(template), expect=[PCRS], role_arn=ROLE_ARN, provider_arn=PROVIDER_ARN
    )
    assert report.ok, report.summary()
    assert not report.ids("error")


def test_pcr_parameters_are_48_byte_hex(template: dict[str, Any]) -> None:
    for name in ("PCR0", "PCR1", "PCR2"):
        assert template["Parameters"][name]["AllowedPattern"] == "^[0-9a-f]{96}$"


def _actions(statement: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key in ("Action", "NotAction"):
        value = statement.get(key, [])
        found += [value] if isinstance(value, str) else value
    return found


def test_instance_role_has_no_kms_action(template: dict[str, Any]) -> None:
    resources = template["Resources"]
    role = resources["InstanceRole"]["Properties"]
    assert "ManagedPolicyArns" not in role
    actions = [
        action
        for policy in role["Policies"]
        for statement in policy["PolicyDocument"]["Statement"]
        for action in _actions(statement)
    ]
    assert actions
    assert not [a for a in actions if a.lower().startswith("kms:") or "*" in a]
    assert "NotAction" not in json.dumps(role["Policies"])
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


def test_parent_yaml_example_parses() -> None:
    path = DEPLOY / "parent.yaml.example"
    config = parse_config(path.read_text(), base=path.parent)
    assert isinstance(config.launcher, AwsLauncherConfig)
    assert config.kms_relay is not None
    assert config.kms_relay.upstream.port == 443
    assert config.bundles is not None
    assert all(source.s3_bucket for source in config.bundles.sources.values())
    assert config.enclave_control.kind == "vsock"


def test_systemd_unit_runs_the_parent_hardened() -> None:
    text = (DEPLOY / "systemd" / "nci-parent.service").read_text()
    lines = {line.strip() for line in text.splitlines()}
    assert "ExecStart=/usr/local/bin/nci parent run --config /etc/nci/parent.yaml" in lines
    for setting in (
        "User=nci",
        "Restart=always",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ):
        assert setting in lines
