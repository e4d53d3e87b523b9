"""boto3 clients for the CLI: explicit endpoint (local KMS) or the environment's, with timeouts."""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config

__all__ = ["client"]

TIMEOUT_SECONDS = 10
ATTEMPTS = 3


def client(service: str, *, endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 client with bounded connect/read timeouts and retries."""
    config = Config(
        connect_timeout=TIMEOUT_SECONDS,
        read_timeout=TIMEOUT_SECONDS,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
    )
    # a fresh session per client: boto3's default session keeps the first credentials it saw
    session = boto3.session.Session()
    return session.client(
        service, endpoint_url=endpoint_url, region_name=region or "us-east-1", config=config
    )
