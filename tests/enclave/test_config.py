"""The enclave configuration's rules that bind one key to another (the per-key table of malformed
values lives with the boot tests, tests/enclave/test_boot.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from enclave.config import InvalidConfig, parse_config

ARN = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def aws_config(**changes: Any) -> bytes:
    value: dict[str, Any] = {
        "control": "vsock://ANY:5000",
        "bundle_streamer": "vsock://3:5001",
        "kms_relay": "vsock://3:5002",
        "kms_endpoint": "https://kms.us-east-1.amazonaws.com:{port}",
        "region": "us-east-1",
        "bundle": "anymal-shapes",
        "model_id": "anymal-shapes",
        "kms_key_arn": ARN,
        "manifest_sha256": None,
        "nsm": "device",
        "max_concurrency": 2,
        "threads": 2,
    }
    value.update(changes)
    return json.dumps(value).encode()


def test_accepts_https_kms_endpoint_with_the_real_nsm() -> None:
    config = parse_config(aws_config())
    assert config.kms_endpoint_url(8443) == "https://kms.us-east-1.amazonaws.com:8443"
    assert config.emulated_nsm_state is None


@pytest.mark.parametrize(
    "endpoint", ["http://kms.us-east-1.amazonaws.com:{port}", "http://127.0.0.1:{port}"]
)
def test_rejects_plain_http_kms_endpoint_with_the_real_nsm(endpoint: str) -> None:
    # over http the parent, which carries the bytes, could answer Decrypt itself: a data key of
    # its choosing wrapped to the enclave's RSA key, so the enclave would "unlock" its weights
    with pytest.raises(InvalidConfig) as caught:
        parse_config(aws_config(kms_endpoint=endpoint))
    assert caught.value.key == "kms_endpoint"
    assert "https" in str(caught.value)


def test_plain_http_stays_allowed_for_the_local_kms_with_the_emulated_nsm() -> None:
    config = parse_config(
        aws_config(kms_endpoint="http://127.0.0.1:{port}", nsm="emulated:/tmp/nci-state")
    )
    assert config.kms_endpoint_url(4242) == "http://127.0.0.1:4242"


def test_runtime_defaults_to_the_model() -> None:
    config = parse_config(aws_config())
    assert (config.runtime, config.echo_delay) == ("model", 0.0)


def test_echo_runtime_with_a_delay_is_accepted() -> None:
    config = parse_config(aws_config(runtime="echo", echo_delay=0.01))
    assert (config.runtime, config.echo_delay) == ("echo", 0.01)


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"runtime": "shell"}, "runtime"),
        ({"runtime": 1}, "runtime"),
        ({"runtime": "echo", "echo_delay": -1}, "echo_delay"),
        ({"runtime": "echo", "echo_delay": 11}, "echo_delay"),
        ({"runtime": "echo", "echo_delay": True}, "echo_delay"),
        ({"echo_delay": 0.5}, "echo_delay"),  # a delay without the echo runtime is a mistake
    ],
)
def test_rejects_a_bad_runtime_choice(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidConfig) as info:
        parse_config(aws_config(**changes))
    assert info.value.key == key


@pytest.mark.parametrize(
    "host", ["kms.us-east-1.amazonaws.com", "kms-fips.us-east-1.amazonaws.com"]
)
def test_accepts_the_kms_endpoint_of_the_configured_region_with_the_real_nsm(host: str) -> None:
    config = parse_config(aws_config(kms_endpoint=f"https://{host}:{{port}}"))
    assert config.kms_host == host


@pytest.mark.parametrize(
    "host",
    [
        "kms.eu-west-1.amazonaws.com",  # another region: the key is not there
        "kms.us-east-1.amazonaws.com.example.net",  # a look-alike
        "example.net",
        "127.0.0.1",
        "s3.us-east-1.amazonaws.com",
    ],
)
def test_rejects_a_kms_endpoint_that_is_not_the_kms_of_the_region_with_the_real_nsm(
    host: str,
) -> None:
    # the image's entry point maps this host to the loopback forwarder and boto3 verifies TLS
    # against it: anything but the region's KMS would fail at boot, or talk to someone else
    with pytest.raises(InvalidConfig) as caught:
        parse_config(aws_config(kms_endpoint=f"https://{host}:{{port}}"))
    assert caught.value.key == "kms_endpoint"
    assert "kms.us-east-1.amazonaws.com" in str(caught.value)


def test_china_regions_use_the_amazonaws_com_cn_kms_host() -> None:
    arn = "arn:aws-cn:kms:cn-north-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    config = parse_config(
        aws_config(
            region="cn-north-1",
            kms_key_arn=arn,
            kms_endpoint="https://kms.cn-north-1.amazonaws.com.cn:{port}",
        )
    )
    assert config.kms_host == "kms.cn-north-1.amazonaws.com.cn"


def test_the_emulated_nsm_may_use_any_kms_host() -> None:
    config = parse_config(
        aws_config(kms_endpoint="http://127.0.0.1:{port}", nsm="emulated:/tmp/nci-state")
    )
    assert config.kms_host == "127.0.0.1"
