"""End to end against the local KMS (moto server + gateway) with plain boto3 over loopback.

An emulated enclave whose PCR0 matches gets the data key; everyone and everything else is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from attestation import _measure
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient
from attestation.roots import TrustRoot
from enclave.errors import KeyReleaseDenied
from enclave.keyrelease import (
    KeyRelease,
    generate_recipient_key,
    public_key_der,
    unwrap_ciphertext_for_recipient,
)
from kms_policy.localkms import LocalKms, LocalKmsConfig
from tests.localaws import (
    ADMIN,
    KEYS,
    ROLE,
    aws_client,
    create_weights_key,
)

CONTEXT = {"model": "demo-vlm", "bundle": "b-0001"}


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nci-state")


@pytest.fixture(scope="module")
def enclave_nsm(state: Path) -> EmulatedNsm:
    return EmulatedNsm(state_dir=state)


@pytest.fixture(scope="module")
def kms(enclave_nsm: EmulatedNsm) -> Iterator[LocalKms]:
    config = LocalKmsConfig(
        principals=KEYS,
        trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(enclave_nsm.root_pem)),
    )
    with LocalKms(config) as server:
        yield server


def client(kms: LocalKms, access_key: str) -> Any:
    return aws_client(kms, access_key)


@pytest.fixture(scope="module")
def key_id(kms: LocalKms) -> str:
    return str(create_weights_key(kms)["KeyId"])


@pytest.fixture(scope="module")
def sealed(kms: LocalKms, key_id: str) -> tuple[bytes, bytes]:
    """(CiphertextBlob, plaintext data key) as the provider made them."""
    answer = client(kms, "AKIAPROVIDER").generate_data_key(
        KeyId=key_id, KeySpec="AES_256", EncryptionContext=CONTEXT
    )
    return answer["CiphertextBlob"], answer["Plaintext"]


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_attested_enclave_with_matching_pcr0_gets_the_data_key(
    kms: LocalKms, enclave_nsm: EmulatedNsm, sealed: tuple[bytes, bytes]
) -> None:
    blob, data_key = sealed
    release = KeyRelease(NsmClient(enclave_nsm), client(kms, "AKIAPARENT"))
    assert release.decrypt(blob, encryption_context=CONTEXT) == data_key
    assert len(data_key) == 32


def test_response_for_recipient_carries_no_plaintext(
    kms: LocalKms, enclave_nsm: EmulatedNsm, sealed: tuple[bytes, bytes]
) -> None:
    key = generate_recipient_key()
    document = NsmClient(enclave_nsm).attestation(public_key=public_key_der(key))
    answer = client(kms, "AKIAPARENT").decrypt(
        CiphertextBlob=sealed[0],
        EncryptionContext=CONTEXT,
        Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document},
    )
    assert "Plaintext" not in answer
    assert unwrap_ciphertext_for_recipient(answer["CiphertextForRecipient"], key) == sealed[1]


def test_rejects_parent_role_decrypt_without_recipient(
    kms: LocalKms, sealed: tuple[bytes, bytes]
) -> None:
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPARENT").decrypt(CiphertextBlob=sealed[0], EncryptionContext=CONTEXT)
    assert error_code(caught) == "AccessDeniedException"


def test_provider_can_seal_but_cannot_decrypt(kms: LocalKms, sealed: tuple[bytes, bytes]) -> None:
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPROVIDER").decrypt(CiphertextBlob=sealed[0], EncryptionContext=CONTEXT)
    assert error_code(caught) == "AccessDeniedException"


def test_rejects_admin_and_other_principals_decrypt(
    kms: LocalKms, sealed: tuple[bytes, bytes]
) -> None:
    for access_key in ("AKIAADMIN", "AKIAOTHER"):
        with pytest.raises(ClientError) as caught:
            client(kms, access_key).decrypt(CiphertextBlob=sealed[0], EncryptionContext=CONTEXT)
        assert error_code(caught) == "AccessDeniedException"


def test_rejects_unknown_access_key(kms: LocalKms, key_id: str) -> None:
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAUNKNOWN").describe_key(KeyId=key_id)
    assert error_code(caught) == "UnrecognizedClientException"


def _release_with(nsm: EmulatedNsm, kms: LocalKms, blob: bytes) -> bytes:
    return KeyRelease(NsmClient(nsm), client(kms, "AKIAPARENT")).decrypt(
        blob, encryption_context=CONTEXT
    )


def test_rejects_enclave_with_wrong_pcr0(
    kms: LocalKms, state: Path, sealed: tuple[bytes, bytes]
) -> None:
    changed = dict(_measure.application_measurements())
    changed[0] = _measure.extend(changed[0], b"a backdoored enclave image")
    with pytest.raises(KeyReleaseDenied):
        _release_with(EmulatedNsm(state_dir=state, measurements=changed), kms, sealed[0])


def test_rejects_debug_mode_enclave(
    kms: LocalKms, state: Path, sealed: tuple[bytes, bytes]
) -> None:
    with pytest.raises(KeyReleaseDenied):
        _release_with(EmulatedNsm(state_dir=state, debug_mode=True), kms, sealed[0])


def test_rejects_wrong_encryption_context(
    kms: LocalKms, enclave_nsm: EmulatedNsm, sealed: tuple[bytes, bytes]
) -> None:
    release = KeyRelease(NsmClient(enclave_nsm), client(kms, "AKIAPARENT"))
    with pytest.raises(KeyReleaseDenied):
        release.decrypt(sealed[0], encryption_context={**CONTEXT, "bundle": "another"})


def _decrypt_with_document(kms: LocalKms, blob: bytes, document: bytes) -> None:
    client(kms, "AKIAPARENT").decrypt(
        CiphertextBlob=blob,
        EncryptionContext=CONTEXT,
        Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document},
    )


def test_rejects_tampered_attestation_document(
    kms: LocalKms, enclave_nsm: EmulatedNsm, sealed: tuple[bytes, bytes]
) -> None:
    key = public_key_der(generate_recipient_key())
    document = NsmClient(enclave_nsm).attestation(public_key=key)
    offset = document.index(key) + 40
    tampered = document[:offset] + bytes([document[offset] ^ 1]) + document[offset + 1 :]
    with pytest.raises(ClientError) as caught:
        _decrypt_with_document(kms, sealed[0], tampered)
    assert error_code(caught) == "ValidationException"
    assert "SignatureInvalid" in str(caught.value)


def test_rejects_expired_attestation_document(
    kms: LocalKms, state: Path, sealed: tuple[bytes, bytes]
) -> None:
    past = datetime.now(UTC) - timedelta(minutes=30)
    old = EmulatedNsm(state_dir=state, clock=lambda: past)
    document = NsmClient(old).attestation(public_key=public_key_der(generate_recipient_key()))
    with pytest.raises(ClientError) as caught:
        _decrypt_with_document(kms, sealed[0], document)
    assert error_code(caught) == "ValidationException"
    assert "StaleDocument" in str(caught.value)


def test_rejects_document_from_untrusted_root(
    kms: LocalKms, tmp_path: Path, sealed: tuple[bytes, bytes]
) -> None:
    rogue = EmulatedNsm(state_dir=tmp_path)  # its own local CA, unknown to the KMS
    document = NsmClient(rogue).attestation(public_key=public_key_der(generate_recipient_key()))
    with pytest.raises(ClientError) as caught:
        _decrypt_with_document(kms, sealed[0], document)
    assert error_code(caught) == "ValidationException"
    assert "ChainInvalid" in str(caught.value)


def test_rejects_document_without_rsa_public_key(
    kms: LocalKms, enclave_nsm: EmulatedNsm, sealed: tuple[bytes, bytes]
) -> None:
    document = NsmClient(enclave_nsm).attestation(public_key=b"not a key")
    with pytest.raises(ClientError) as caught:
        _decrypt_with_document(kms, sealed[0], document)
    assert error_code(caught) == "ValidationException"


def test_generate_random_for_recipient(kms: LocalKms, enclave_nsm: EmulatedNsm) -> None:
    key = generate_recipient_key()
    document = NsmClient(enclave_nsm).attestation(public_key=public_key_der(key))
    answer = client(kms, "AKIAPARENT").generate_random(
        NumberOfBytes=48,
        Recipient={"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document},
    )
    assert "Plaintext" not in answer
    assert len(unwrap_ciphertext_for_recipient(answer["CiphertextForRecipient"], key)) == 48


def test_generated_policy_gives_the_role_decrypt_only(
    kms: LocalKms, enclave_nsm: EmulatedNsm, key_id: str
) -> None:
    document = NsmClient(enclave_nsm).attestation(
        public_key=public_key_der(generate_recipient_key())
    )
    with pytest.raises(ClientError) as caught:
        client(kms, "AKIAPARENT").generate_data_key(
            KeyId=key_id,
            KeySpec="AES_256",
            EncryptionContext=CONTEXT,
            Recipient={
                "KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                "AttestationDocument": document,
            },
        )
    assert error_code(caught) == "AccessDeniedException"


def test_attested_generate_data_key_under_a_policy_that_allows_it(
    kms: LocalKms, enclave_nsm: EmulatedNsm
) -> None:
    pcr0 = _measure.application_measurements()[0].hex()
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "EnclaveMayGenerate",
                "Effect": "Allow",
                "Principal": {"AWS": ROLE},
                "Action": "kms:GenerateDataKey",
                "Resource": "*",
                "Condition": {
                    "StringEqualsIgnoreCase": {"kms:RecipientAttestation:ImageSha384": pcr0}
                },
            },
            {
                "Sid": "Admin",
                "Effect": "Allow",
                "Principal": {"AWS": ADMIN},
                "Action": ["kms:DescribeKey", "kms:PutKeyPolicy"],
                "Resource": "*",
            },
        ],
    }
    created = client(kms, "AKIAADMIN").create_key(Policy=json.dumps(policy))
    key = generate_recipient_key()
    document = NsmClient(enclave_nsm).attestation(public_key=public_key_der(key))
    recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256", "AttestationDocument": document}
    answer = client(kms, "AKIAPARENT").generate_data_key(
        KeyId=created["KeyMetadata"]["KeyId"], KeySpec="AES_256", Recipient=recipient
    )
    assert "Plaintext" not in answer
    assert len(unwrap_ciphertext_for_recipient(answer["CiphertextForRecipient"], key)) == 32
    with pytest.raises(ClientError) as caught:  # the same call without attestation
        client(kms, "AKIAPARENT").generate_data_key(
            KeyId=created["KeyMetadata"]["KeyId"], KeySpec="AES_256"
        )
    assert error_code(caught) == "AccessDeniedException"
