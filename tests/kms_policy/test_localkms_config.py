"""The local KMS's configuration: who is who, which roots; mistakes are typed and explained."""

from __future__ import annotations

from pathlib import Path

import pytest

from attestation.roots import TrustRoot
from kms_policy.errors import ConfigError
from kms_policy.localkms import LocalKms, LocalKmsConfig, principals_from

ROLE = "arn:aws:iam::123456789012:role/nci-parent"


def test_reads_principals_and_roots_from_yaml(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent / "assets" / "synthetic" / "local-root.pem"
    (tmp_path / "root.pem").write_bytes(root.read_bytes())
    path = tmp_path / "kms.yaml"
    path.write_text(f"principals:\n  AKIAPARENT: {ROLE}\ntrusted_roots: [aws, root.pem]\n")
    config = LocalKmsConfig.from_yaml(path)
    assert config.principals == {"AKIAPARENT": ROLE}
    assert [r.name for r in config.trusted_roots] == ["aws-nitro-enclaves-g1", "local"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("unknown_key", f"principals: {{AKIA: {ROLE}}}\nroles: []\n", "expected keys"),
        ("principal_not_an_arn", "principals: {AKIA: someone}\n", "arn:aws"),
        ("no_principals", "principals: {}\n", "at least one"),
        (
            "missing_root_file",
            f"principals: {{AKIA: {ROLE}}}\ntrusted_roots: [nope.pem]\n",
            "nope.pem",
        ),
        ("not_yaml", "principals: [", "cannot read"),
    ],
)
def test_rejects_bad_configuration(name: str, text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "kms.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        LocalKmsConfig.from_yaml(path)


def test_principal_pairs_need_an_equals_sign() -> None:
    assert principals_from([f"AKIA={ROLE}"]) == {"AKIA": ROLE}
    with pytest.raises(ConfigError, match="ACCESS_KEY_ID=ARN"):
        principals_from([ROLE])


def test_refuses_a_configuration_without_trusted_roots() -> None:
    with pytest.raises(ConfigError, match="at least one trusted"):
        LocalKmsConfig(principals={"AKIA": ROLE}, trusted_roots=())


def test_refuses_to_listen_beyond_loopback() -> None:
    good = LocalKmsConfig(principals={"AKIA": ROLE}, trusted_roots=(TrustRoot.aws_nitro_g1(),))
    with pytest.raises(ConfigError, match="loopback"):
        LocalKms(good, host="0.0.0.0")
