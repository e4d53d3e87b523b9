"""The CLI's boto3 clients take their region from --region, else the key ARN, else the AWS
environment (AWS_REGION, AWS_DEFAULT_REGION, the profile), never from a built-in default that
overrides it; against moto in process."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

import nci.audit
from kms_policy import generate
from nci._aws import LOCAL_REGION, NoRegion, client, region_of

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/nci-parent"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:role/nci-provider"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/nci-key-admin"


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No region anywhere, fake credentials, and an empty AWS config file to write profiles in."""
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "aws-config"
    config.write_text("")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    return config


def test_rejects_overriding_aws_region_with_a_built_in_default(
    environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert client("kms", endpoint_url=None, region=None).meta.region_name == "eu-west-1"


def test_rejects_overriding_the_profiles_region_with_a_built_in_default(
    environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    environment.write_text("[profile nci-key-admin]\nregion = ap-southeast-2\n")
    monkeypatch.setenv("AWS_PROFILE", "nci-key-admin")
    assert client("kms", endpoint_url=None, region=None).meta.region_name == "ap-southeast-2"


def test_rejects_overriding_aws_default_region_with_a_built_in_default(
    environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "sa-east-1")
    assert client("kms", endpoint_url=None, region=None).meta.region_name == "sa-east-1"
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # the AWS CLI v2's order: AWS_REGION first
    assert client("kms", endpoint_url=None, region=None).meta.region_name == "eu-west-1"


def test_an_explicit_region_wins(environment: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert client("kms", endpoint_url=None, region="us-west-2").meta.region_name == "us-west-2"


def test_rejects_guessing_a_region_when_none_is_set(environment: Path) -> None:
    with pytest.raises(NoRegion, match="pass --region, or set AWS_REGION"):
        client("kms", endpoint_url=None, region=None)


def test_a_local_endpoint_without_any_region_still_signs(environment: Path) -> None:
    made = client("kms", endpoint_url="http://127.0.0.1:4566", region=None)
    assert made.meta.region_name == LOCAL_REGION


@pytest.mark.parametrize(
    ("key_id", "region"),
    [
        ("arn:aws:kms:eu-central-1:123456789012:key/1234abcd-12ab", "eu-central-1"),
        ("arn:aws:kms:us-gov-west-1:123456789012:alias/weights", "us-gov-west-1"),
        ("arn:aws-cn:kms:cn-north-1:123456789012:key/1234abcd", "cn-north-1"),
        ("1234abcd-12ab-34cd-56ef-1234567890ab", None),  # a bare id: the caller's region
        ("alias/weights", None),
        (None, None),
    ],
)
def test_region_of_a_key_arn(key_id: str | None, region: str | None) -> None:
    assert region_of(key_id) == region


def _audit(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="nci")
    nci.audit.add_parser(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["audit", *argv])
    out, err = io.StringIO(), io.StringIO()
    status: int = args.handler(args, out, err)
    return status, out.getvalue(), err.getvalue()


def test_rejects_fetching_a_key_policy_from_another_region_than_the_keys(
    environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the key lives in eu-central-1, the shell says us-east-1: the ARN decides
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    policy = generate(
        measurements={0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48},
        role_arn=ROLE,
        provider_arn=PROVIDER,
        admin_arns=[ADMIN],
    )
    with mock_aws():
        kms = boto3.client("kms", region_name="eu-central-1")
        arn = kms.create_key(Policy=policy.to_json())["KeyMetadata"]["Arn"]
        status, out, err = _audit("policy", "--key-id", arn, "--role", ROLE)
        assert (status, err) == (0, ""), err
        assert "key policy: OK" in out
        # an explicit --region still wins (and here finds no such key)
        status, _, err = _audit("policy", "--key-id", arn, "--region", "us-east-1")
        assert status == 2
        assert "NotFoundException" in err
