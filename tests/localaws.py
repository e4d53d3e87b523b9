"""Shared test helpers for the local KMS and moto S3: principals, clients, the weights key."""

from __future__ import annotations

from typing import Any

import boto3

from attestation import _measure
from kms_policy import generate
from kms_policy.localkms import LocalKms

ACCOUNT = "123456789012"  # moto's account: keys of any access key land there
ROLE = f"arn:aws:iam::{ACCOUNT}:role/nci-parent"
PROVIDER = f"arn:aws:iam::{ACCOUNT}:role/nci-provider"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/nci-key-admin"
OTHER = f"arn:aws:iam::{ACCOUNT}:user/someone-else"
KEYS = {"AKIAPARENT": ROLE, "AKIAPROVIDER": PROVIDER, "AKIAADMIN": ADMIN, "AKIAOTHER": OTHER}


def aws_client(kms: LocalKms, access_key: str, service: str = "kms") -> Any:
    """A boto3 client of ``service`` on the local endpoint, as the principal of ``access_key``."""
    return boto3.session.Session().client(
        service,
        endpoint_url=kms.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key="local-secret",
    )


def create_weights_key(kms: LocalKms) -> dict[str, Any]:
    """The provider's key, its policy generated for this checkout's enclave measurements."""
    policy = generate(
        measurements=_measure.application_measurements(),
        role_arn=ROLE,
        provider_arn=PROVIDER,
        admin_arns=[ADMIN],
    )
    metadata: dict[str, Any] = aws_client(kms, "AKIAADMIN").create_key(Policy=policy.to_json())[
        "KeyMetadata"
    ]
    return metadata
