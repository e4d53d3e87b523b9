"""`nci parent check`: the operator's read-only preflight, against moto's KMS and S3 in process and
EIFs from the test-only writer."""

from __future__ import annotations

import argparse
import io
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from moto import mock_aws

import nci.parent
from attestation.eif import measure_eif
from kms_policy import generate
from nci.preflight import preflight
from parent.config import load_config
from tests.attestation.eif_writer import KERNEL, RAMDISK, Section, build_eif, default_sections

REGION = "us-east-1"
ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/nci-parent"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:role/nci-provider"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/nci-key-admin"
BUCKET = "nci-bundles"
PREFIX = "sealed/model"

IMAGE = build_eif(default_sections())
PCRS = measure_eif(IMAGE)
OTHER_IMAGE = build_eif([Section(KERNEL, b"another kernel"), *default_sections()[1:]])
OTHER_PCRS = measure_eif(OTHER_IMAGE)


def run(*argv: str) -> tuple[int, str, str]:
    """``nci parent …`` with only the ``parent`` group (``nci.cli`` imports the model runtimes)."""
    parser = argparse.ArgumentParser(prog="nci")
    nci.parent.add_parser(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(["parent", *argv])
    out, err = io.StringIO(), io.StringIO()
    status: int = args.handler(args, out, err)
    return status, out.getvalue(), err.getvalue()


def key_policy(*images: Mapping[int, bytes]) -> str:
    policy = generate(
        measurements=list(images), role_arn=ROLE, provider_arn=PROVIDER, admin_arns=[ADMIN]
    )
    return policy.to_json()


class Deployment:
    """A parent instance's view: parent.yaml, the EIF, and moto's KMS key and bucket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.kms = boto3.client("kms", region_name=REGION)
        self.s3 = boto3.client("s3", region_name=REGION)
        self.s3.create_bucket(Bucket=BUCKET)
        self.eif = root / "enclave.eif"
        self.eif.write_bytes(IMAGE)
        self.config = root / "parent.yaml"

    def create_key(self, policy: str) -> str:
        return str(self.kms.create_key(Policy=policy)["KeyMetadata"]["Arn"])

    def publish(self) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/chunks.bin", Body=b"sealed chunks")
        self.s3.put_object(Bucket=BUCKET, Key=f"{PREFIX}/manifest.cbor", Body=b"manifest")

    def write_config(
        self,
        key_id: str,
        *,
        rollout: Mapping[int, bytes] | None = None,
        cpu_count: int = 2,
        memory_mib: int = 4096,
    ) -> Path:
        def pcrs(values: Mapping[int, bytes]) -> str:
            return ", ".join(f"PCR{i}: '{v.hex()}'" for i, v in sorted(values.items()))

        text = (
            "bridge: {listen: 'tcp://127.0.0.1:8443'}\n"
            f"enclave: {{control: 'unix://{self.root}/enclave.sock'}}\n"
            f"bundles:\n  listen: 'unix://{self.root}/bundles.sock'\n  region: {REGION}\n"
            f"  sources: {{model: {{s3: 's3://{BUCKET}/{PREFIX}'}}}}\n"
            f"launcher:\n  aws: {{eif_path: {self.eif}, cpu_count: {cpu_count}, "
            f"memory_mib: {memory_mib}, cid: 16}}\n"
            f"deployment:\n  key_id: '{key_id}'\n  expected: {{{pcrs(PCRS)}}}\n"
        )
        if rollout is not None:
            text += f"  rollout: [{{{pcrs(rollout)}}}]\n"
        self.config.write_text(text)
        return self.config

    def check(self, *extra: str) -> tuple[int, dict[str, Any]]:
        status, out, err = run("check", "--config", str(self.config), "--json", *extra)
        assert not err
        return status, {c["name"]: c for c in json.loads(out)["checks"]}


@pytest.fixture
def deployed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Deployment]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield Deployment(tmp_path)


def test_all_checks_pass_for_the_released_image_its_key_and_its_bundle(
    deployed: Deployment,
) -> None:
    deployed.write_config(deployed.create_key(key_policy(PCRS)))
    deployed.publish()
    status, out, err = run("check", "--config", str(deployed.config))
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok    eif",
        "ok    launcher",
        "ok    kms",
        "ok    bundle model",
    ]
    assert "PCR0, PCR1, PCR2 match deployment.expected" in lines[0]
    assert "4096 MiB >= 4 x 1 MiB image, 2 vCPUs" in lines[1]
    assert "kms:Decrypt only with the attestation of deployment.expected" in lines[2]
    assert f"s3://{BUCKET}/{PREFIX}/manifest.cbor is published" in lines[3]
    status, checks = deployed.check()
    assert status == 0
    assert {c["status"] for c in checks.values()} == {"ok"}
    assert checks["kms"]["policy"]["ok"] is True
    assert checks["eif"]["pcrs"]["PCR0"] == PCRS[0].hex()


def test_rejects_an_eif_whose_pcr0_is_not_the_expected_one(deployed: Deployment) -> None:
    deployed.write_config(deployed.create_key(key_policy(PCRS)))
    deployed.publish()
    deployed.eif.write_bytes(OTHER_IMAGE)
    status, checks = deployed.check()
    assert status == 1
    assert checks["eif"]["status"] == "FAIL"
    assert (
        f"PCR0: expected {PCRS[0].hex()}, the image has {OTHER_PCRS[0].hex()}"
        in (checks["eif"]["detail"])
    )
    assert checks["kms"]["status"] == checks["bundle model"]["status"] == "ok"


def test_rejects_a_missing_eif(deployed: Deployment) -> None:
    deployed.write_config(deployed.create_key(key_policy(PCRS)))
    deployed.publish()
    deployed.eif.unlink()
    status, checks = deployed.check()
    assert status == 1
    assert checks["eif"]["detail"] == f"{deployed.eif} does not exist"


def test_rejects_a_key_policy_pinning_another_image(deployed: Deployment) -> None:
    deployed.write_config(deployed.create_key(key_policy(OTHER_PCRS)))
    deployed.publish()
    status, checks = deployed.check()
    assert status == 1
    assert checks["kms"]["status"] == "FAIL"
    assert "KP009" in checks["kms"]["detail"]
    assert checks["kms"]["policy"]["ok"] is False


def test_rejects_a_key_policy_allowing_decrypt_without_attestation(deployed: Deployment) -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": ADMIN},
             "Action": ["kms:GetKeyPolicy", "kms:PutKeyPolicy"], "Resource": "*"},
            {"Sid": "Decrypt", "Effect": "Allow", "Principal": {"AWS": ROLE},
             "Action": "kms:Decrypt", "Resource": "*"},
        ],
    }  # fmt: skip
    deployed.write_config(deployed.create_key(json.dumps(policy)))
    deployed.publish()
    status, checks = deployed.check()
    assert status == 1
    assert "KP001" in checks["kms"]["detail"]
    assert "without attestation" in checks["kms"]["detail"]


def test_rejects_a_missing_key(deployed: Deployment) -> None:
    missing = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"
    deployed.write_config(missing)
    deployed.publish()
    status, checks = deployed.check()
    assert status == 1
    assert checks["kms"]["error"] == "NotFoundException"
    assert checks["eif"]["status"] == "ok"


def test_rejects_an_unpublished_bundle(deployed: Deployment) -> None:
    deployed.write_config(deployed.create_key(key_policy(PCRS)))
    status, checks = deployed.check()
    assert status == 1
    assert checks["bundle model"]["status"] == "FAIL"
    assert checks["bundle model"]["error"] == "NotFound (404)"
    assert f"s3://{BUCKET}/{PREFIX}/manifest.cbor" in checks["bundle model"]["detail"]


def test_rollout_policy_passes_only_when_the_other_image_is_declared(
    deployed: Deployment,
) -> None:
    key = deployed.create_key(key_policy(PCRS, OTHER_PCRS))
    deployed.publish()
    deployed.write_config(key)
    status, checks = deployed.check()
    assert status == 1
    assert "KP009 a measurement in no expected set can decrypt" in checks["kms"]["detail"]
    deployed.write_config(key, rollout=OTHER_PCRS)
    status, checks = deployed.check()
    assert status == 0
    assert "deployment.expected or deployment.rollout" in checks["kms"]["detail"]


def test_skipped_checks_are_reported_and_do_not_fail(deployed: Deployment) -> None:
    deployed.write_config(f"arn:aws:kms:{REGION}:{ACCOUNT}:key/unreadable")
    status, checks = deployed.check("--skip", "kms", "--skip", "bundles")
    assert status == 0
    assert [c["status"] for c in checks.values()] == ["ok", "ok", "skip", "skip"]


def test_rejects_a_run_where_every_check_was_skipped(deployed: Deployment) -> None:
    deployed.write_config(f"arn:aws:kms:{REGION}:{ACCOUNT}:key/unreadable")
    skips = [arg for name in ("eif", "launcher", "kms", "bundles") for arg in ("--skip", name)]
    status, out, err = run("check", "--config", str(deployed.config), *skips)
    assert status == 1
    assert all(line.startswith("skip") for line in out.splitlines())
    assert "nothing checked" in err
    status, out, _ = run("check", "--config", str(deployed.config), "--json", *skips)
    assert status == 1
    document = json.loads(out)
    assert (document["ok"], document["error"]) == (False, "nothing checked")


@pytest.mark.parametrize(
    ("memory_mib", "cpu_count", "message"),
    [
        (3, 2, "memory_mib is 3; the 1 MiB image needs at least 4 x 1 = 4"),
        (4096, 1, "cpu_count is 1; an enclave takes whole cores"),
        (4096, 3, "cpu_count is 3; an enclave takes whole cores"),
    ],
)
def test_rejects_enclave_sizes_nitro_cli_would_refuse(
    deployed: Deployment, memory_mib: int, cpu_count: int, message: str
) -> None:
    deployed.write_config(
        deployed.create_key(key_policy(PCRS)), memory_mib=memory_mib, cpu_count=cpu_count
    )
    deployed.publish()
    status, checks = deployed.check()
    assert status == 1
    assert checks["launcher"]["status"] == "FAIL"
    assert message in checks["launcher"]["detail"]
    assert checks["launcher"]["eif_mib"] == 1
    assert checks["eif"]["status"] == "ok"


def test_memory_rule_rounds_the_eif_size_up_to_whole_mib(deployed: Deployment) -> None:
    # a 5 MiB + 1 byte image needs 4 x 6 MiB, not 4 x 5
    big = build_eif([*default_sections(), Section(RAMDISK, b"\0" * (5 * 2**20 - len(IMAGE) + 1))])
    deployed.eif.write_bytes(big)
    assert len(big) > 5 * 2**20
    deployed.write_config(deployed.create_key(key_policy(PCRS)), memory_mib=23)
    status, checks = deployed.check("--skip", "eif")
    assert checks["launcher"]["eif_mib"] == 6
    assert "needs at least 4 x 6 = 24" in checks["launcher"]["detail"]
    deployed.write_config(deployed.create_key(key_policy(PCRS)), memory_mib=24)
    status, checks = deployed.check("--skip", "eif", "--skip", "kms", "--skip", "bundles")
    assert (status, checks["launcher"]["status"]) == (0, "ok")


class Refusing:
    """A boto3 client stand-in whose every call fails the way AWS or the network does."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def get_key_policy(self, **_: str) -> None:
        raise self.error

    def head_object(self, **_: str) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ClientError({"Error": {"Code": "AccessDeniedException"}}, "GetKeyPolicy"),
         "AccessDeniedException"),
        (ClientError({"Error": {"Code": "403"}}, "HeadObject"), "AccessDenied (403)"),
        (ReadTimeoutError(endpoint_url="https://kms.us-east-1.amazonaws.com"),
         "ReadTimeoutError"),
    ],
)  # fmt: skip
def test_aws_errors_are_failed_checks_naming_the_code(
    deployed: Deployment, error: Exception, code: str
) -> None:
    config = load_config(deployed.write_config(deployed.create_key(key_policy(PCRS))))
    outcomes = {o.name: o for o in preflight(config, client=lambda _service: Refusing(error))}
    for name in ("kms", "bundle model"):
        assert outcomes[name].status == "FAIL"
        assert outcomes[name].data["error"] == code
    if code == "AccessDeniedException":  # the instance role may read no key policy
        assert "key administrator's credentials" in outcomes["kms"].detail


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "parent.yaml"
    path.write_text(
        "bridge: {listen: 'tcp://127.0.0.1:8443'}\nenclave: {control: 'unix:///e.sock'}\n"
        "deployment: {key_id: alias/nci, expected: {}}\n"
    )
    status, out, err = run("check", "--config", str(path))
    assert (status, out) == (2, "")
    assert "deployment.key_id" in err
    assert "Traceback" not in err


def test_without_a_deployment_section_the_key_check_fails(tmp_path: Path) -> None:
    path = tmp_path / "parent.yaml"
    path.write_text(
        "bridge: {listen: 'tcp://127.0.0.1:8443'}\nenclave: {control: 'unix:///e.sock'}\n"
    )
    status, out, _ = run("check", "--config", str(path))
    assert status == 1
    assert out.splitlines() == [
        "skip  eif: no launcher.aws section: no image to measure",
        "skip  launcher: no launcher.aws section: no enclave to size",
        "FAIL  kms: no deployment section (key_id, expected)",
    ]
