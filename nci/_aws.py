"""boto3 clients for the CLI: explicit endpoint (local KMS) or the environment's, with timeouts.

The region: ``--region`` if given, else the region of the key ARN the command works on (a KMS key
lives in one region; :func:`region_of`), else the environment as the AWS CLI v2 reads it:
``AWS_REGION`` (which botocore alone ignores), then boto3's own chain (``AWS_DEFAULT_REGION``, the
profile's ``region``); never a built-in default that would override them. Only a local endpoint
(``--endpoint-url``) with no region anywhere gets :data:`LOCAL_REGION`, which it ignores but SigV4
needs.
"""

from __future__ import annotations

import os
import re
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import NoRegionError

__all__ = ["LOCAL_REGION", "NoRegion", "client", "region_of"]

TIMEOUT_SECONDS = 10
ATTEMPTS = 3
LOCAL_REGION = "us-east-1"

_ARN_REGION = re.compile(r"arn:aws[a-z-]*:[a-z0-9-]+:(?P<region>[a-z]{2}(?:-[a-z]+)+-[0-9]+):")


class NoRegion(NoRegionError):  # type: ignore[misc]  # botocore ships no type hints
    """No region anywhere for a service that needs one (a BotoCoreError, as boto3's own)."""

    fmt = "no AWS region: pass --region, or set AWS_REGION (or the profile's region)"


def region_of(key_id: str | None) -> str | None:
    """The region of a KMS key or alias ARN (``arn:aws:kms:REGION:…``); ``None`` for a bare key
    id or alias name, which belong to the caller's region."""
    match = _ARN_REGION.match(key_id or "")
    return match["region"] if match is not None else None


def client(service: str, *, endpoint_url: str | None, region: str | None) -> Any:
    """A boto3 client with bounded connect/read timeouts and retries. ``region`` ``None``: the
    environment decides; :class:`NoRegion` where the service needs one and none is set."""
    config = Config(
        connect_timeout=TIMEOUT_SECONDS,
        read_timeout=TIMEOUT_SECONDS,
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
    )
    # a fresh session per client: boto3's default session keeps the first credentials it saw
    session = boto3.session.Session()
    region = region or os.environ.get("AWS_REGION") or None
    if region is None and session.region_name is None and endpoint_url is not None:
        region = LOCAL_REGION
    try:
        return session.client(service, endpoint_url=endpoint_url, region_name=region, config=config)
    except NoRegionError:
        raise NoRegion() from None
