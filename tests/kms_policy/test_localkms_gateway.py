"""Attacks on the local KMS gateway itself: raw HTTP requests that try to reach moto unchecked."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from attestation.emulator import EmulatedNsm
from attestation.roots import TrustRoot
from kms_policy.localkms import LocalKms, LocalKmsConfig
from tests.localaws import KEYS, aws_client, create_weights_key

CONTEXT = {"model": "m", "bundle": "b"}
SIGNATURE = "0" * 64


@pytest.fixture(scope="module")
def kms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKms]:
    nsm = EmulatedNsm(state_dir=tmp_path_factory.mktemp("state"))
    config = LocalKmsConfig(
        principals=KEYS, trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(nsm.root_pem))
    )
    with LocalKms(config) as server:
        yield server


def client(kms: LocalKms, access_key: str, service: str = "kms") -> Any:
    return aws_client(kms, access_key, service)


@pytest.fixture(scope="module")
def sealed(kms: LocalKms) -> tuple[str, bytes]:
    key_id = create_weights_key(kms)["KeyId"]
    blob = client(kms, "AKIAPROVIDER").generate_data_key(
        KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT
    )["CiphertextBlob"]
    return str(key_id), bytes(blob)


def raw_call(
    kms: LocalKms,
    target: str,
    body: object,
    *,
    access_key: str = "AKIAPARENT",
    region: str = "us-east-1",
    path: str = "/",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        kms.endpoint_url + path,
        data=data,
        method="POST",
        headers={
            "X-Amz-Target": target,
            "Content-Type": "application/x-amz-json-1.1",
            "Authorization": f"AWS4-HMAC-SHA256 Credential={access_key}/20260101/{region}/kms/"
            f"aws4_request, SignedHeaders=host, Signature={SIGNATURE}",
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        with exc:
            payload = exc.read()
        return exc.code, json.loads(payload) if payload[:1] == b"{" else {}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_raw_decrypt_without_attestation_is_denied(
    kms: LocalKms, sealed: tuple[str, bytes]
) -> None:
    status, body = raw_call(
        kms,
        "TrentService.Decrypt",
        {"CiphertextBlob": b64(sealed[1]), "EncryptionContext": CONTEXT},
    )
    assert (status, body["__type"]) == (400, "AccessDeniedException")
    assert "Plaintext" not in body


@pytest.mark.parametrize("value", [None, "", [], False, 7, {"a": 1}])
def test_rejects_decrypt_with_key_id_null_or_not_a_string(
    kms: LocalKms, sealed: tuple[str, bytes], value: object
) -> None:
    status, body = raw_call(
        kms,
        "TrentService.Decrypt",
        {"CiphertextBlob": b64(sealed[1]), "EncryptionContext": CONTEXT, "KeyId": value},
    )
    assert status == 400
    assert "Plaintext" not in body
    assert body["__type"] in {"ValidationException", "AccessDeniedException"}


@pytest.mark.parametrize(
    "target",
    [
        "Decrypt",
        "X.Decrypt",
        "trentservice.Decrypt",
        "TrentService.decrypt",
        "TrentService.DECRYPT",
        "TrentService.Decrypt ",
        "TrentService.Decrypt.Decrypt",
        "",
    ],
)
def test_rejects_x_amz_target_variants(
    kms: LocalKms, sealed: tuple[str, bytes], target: str
) -> None:
    status, body = raw_call(
        kms, target, {"CiphertextBlob": b64(sealed[1]), "EncryptionContext": CONTEXT}
    )
    assert status == 400
    assert "Plaintext" not in body
    assert body["__type"] == "UnknownOperationException"


def test_refuses_moto_admin_api(kms: LocalKms) -> None:
    for path in ("/moto-api/reset", "/moto-api/data.json", "/moto-api/seed?a=1"):
        request = urllib.request.Request(kms.endpoint_url + path, data=b"", method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        caught.value.close()
        assert caught.value.code == 403


def test_ignores_moto_account_and_user_agent_region_overrides(
    kms: LocalKms, sealed: tuple[str, bytes]
) -> None:
    status, body = raw_call(
        kms,
        "TrentService.Decrypt",
        {"CiphertextBlob": b64(sealed[1]), "EncryptionContext": CONTEXT},
        region="eu-west-1",
        headers={"x-moto-account-id": "111111111111", "User-Agent": "x region/us-east-1"},
    )
    assert status == 400
    assert "Plaintext" not in body


def test_rejects_authorization_header_with_a_second_credential(
    kms: LocalKms, sealed: tuple[str, bytes]
) -> None:
    forged = (
        "AWS4-HMAC-SHA256 Foo=a/b/eu-west-1, Credential=AKIAPARENT/20260101/us-east-1/kms/"
        f"aws4_request, SignedHeaders=host, Signature={SIGNATURE}"
    )
    status, body = raw_call(
        kms,
        "TrentService.Decrypt",
        {"CiphertextBlob": b64(sealed[1]), "EncryptionContext": CONTEXT},
        headers={"Authorization": forged},
    )
    assert status == 400
    assert body["__type"] == "MissingAuthenticationTokenException"


def test_refuses_unsigned_and_foreign_service_requests(kms: LocalKms) -> None:
    request = urllib.request.Request(kms.endpoint_url + "/", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    caught.value.close()
    assert caught.value.code == 403


def test_update_and_delete_alias_need_permission_on_the_current_key(
    kms: LocalKms, sealed: tuple[str, bytes]
) -> None:
    key_id = sealed[0]
    admin = client(kms, "AKIAADMIN")
    admin.create_alias(AliasName="alias/weights-under-test", TargetKeyId=key_id)
    own = client(kms, "AKIAPARENT").create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPARENT").update_alias(
            AliasName="alias/weights-under-test", TargetKeyId=own
        )
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPARENT").delete_alias(AliasName="alias/weights-under-test")
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"


def test_reencrypt_is_checked_as_reencrypt_from_and_to(
    kms: LocalKms, sealed: tuple[str, bytes]
) -> None:
    own = client(kms, "AKIAPARENT").create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPARENT").re_encrypt(
            CiphertextBlob=sealed[1],
            SourceEncryptionContext=CONTEXT,
            DestinationKeyId=own,
        )
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "kms:ReEncryptFrom" in str(caught.value)


@pytest.mark.parametrize(
    ("name", "body", "code"),
    [
        ("colliding_context", {"EncryptionContext": {"a": "1", "A": "2"}}, "ValidationException"),
        ("context_not_strings", {"EncryptionContext": {"a": 1}}, "ValidationException"),
        ("deeply_nested_json", b"[" * 100_000 + b"]" * 100_000, "SerializationException"),
        ("not_json", b"{not json", "SerializationException"),
        ("json_array", b"[]", "SerializationException"),
    ],
)  # fmt: skip
def test_hostile_bodies_get_typed_errors_not_500(
    kms: LocalKms, sealed: tuple[str, bytes], name: str, body: object, code: str
) -> None:
    if isinstance(body, dict):
        body = {"CiphertextBlob": b64(sealed[1]), **body}
    status, answer = raw_call(kms, "TrentService.Decrypt", body)
    assert (status, answer["__type"]) == (400, code)


def test_rejects_unparseable_key_policy_on_create(kms: LocalKms) -> None:
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAADMIN").create_key(Policy="not json")
    assert caught.value.response["Error"]["Code"] == "MalformedPolicyDocumentException"


def test_s3_still_served_for_sealed_bundles(kms: LocalKms, tmp_path: Path) -> None:
    s3 = client(kms, "AKIAPROVIDER", "s3")
    s3.create_bucket(Bucket="nci-gateway-test")
    s3.put_object(Bucket="nci-gateway-test", Key="b/manifest.cbor", Body=b"ciphertext only")
    body = s3.get_object(Bucket="nci-gateway-test", Key="b/manifest.cbor")["Body"]
    with body:
        assert body.read() == b"ciphertext only"
