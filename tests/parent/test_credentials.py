"""The credentials forwarder: on every (re)connect and on refresh, never in logs."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from parent.credentials import (
    CredentialsForwarder,
    environment_credentials,
    session_credentials,
)
from parent.enclave_link import EnclaveLink, LinkTimeouts
from protocol.control import Credentials
from protocol.errors import ConfigError
from protocol.transport import Address
from tests.parent.fakeenclave import FakeEnclave

FIRST = Credentials(
    "ASIAFIRSTEXAMPLE0001", "first/secret+KEY", "first-token", "2030-01-01T00:00:00"
)
SECOND = Credentials("ASIASECONDEXAMPLE002", "second/secret+KEY", "second-token", "")


def test_session_credentials_come_from_the_boto3_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAENVEXAMPLE000001")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env/secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    credentials = session_credentials(boto3.Session())
    assert (credentials.access_key_id, credentials.secret_access_key) == (
        "AKIAENVEXAMPLE000001",
        "env/secret",
    )
    assert credentials.session_token == "env-token"


def test_refreshable_credentials_carry_their_expiry() -> None:
    expiry = datetime(2031, 5, 6, 7, 8, 9, tzinfo=UTC)

    class Frozen:
        access_key, secret_key, token = "ASIAREFRESHEXAMPLE01", "s/k", "t"

    class Refreshable:
        _expiry_time = expiry

        def get_frozen_credentials(self) -> Frozen:
            return Frozen()

    class Session:
        def get_credentials(self) -> Refreshable:
            return Refreshable()

    assert session_credentials(Session()).expiration == expiry.isoformat()


def test_missing_credentials_are_a_config_error_that_quotes_nothing() -> None:
    with pytest.raises(ConfigError, match="no AWS credentials"):
        environment_credentials({})
    with pytest.raises(ConfigError) as info:
        environment_credentials(
            {"AWS_ACCESS_KEY_ID": "lowercase-not-allowed", "AWS_SECRET_ACCESS_KEY": "hunter2-x"}
        )
    assert "lowercase-not-allowed" not in str(info.value)
    assert "hunter2" not in str(info.value)


def test_credentials_are_sent_on_every_connect_and_when_they_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    address = Address("unix", path=str(tmp_path / "enclave.sock"))
    current = [FIRST]

    async def run() -> tuple[list[Credentials], list[Credentials], int]:
        link = EnclaveLink(address, timeouts=LinkTimeouts(connect=1), backoff_max=0.05)
        forwarder = CredentialsForwarder(link, lambda: current[0], refresh_interval=0.05)
        first = FakeEnclave(address)
        await first.start()
        async with link, forwarder:
            await link.wait_connected(2)
            await asyncio.sleep(0.15)  # refreshes: unchanged, so not sent again
            current[0] = SECOND  # botocore refreshed them
            await asyncio.sleep(0.15)
            await first.stop()
            second = FakeEnclave(address)  # the enclave restarted
            await second.start()
            await link.wait_connected(2)
            await asyncio.sleep(0.1)
            await second.stop()
            return first.credentials, second.credentials, forwarder.sent

    to_first, to_second, sent = asyncio.run(run())
    assert to_first == [FIRST, SECOND]
    assert to_second == [SECOND]
    assert sent == 3
    for secret in ("first/secret+KEY", "second/secret+KEY", "first-token", "second-token"):
        assert secret not in caplog.text


def test_a_failing_source_is_logged_without_detail_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = Address("unix", path=str(tmp_path / "enclave.sock"))
    calls = [0]

    def flaky() -> Credentials:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("IMDS said: secret-detail-xyz")
        return FIRST

    async def run() -> tuple[list[Credentials], int]:
        async with FakeEnclave(address) as enclave:
            link = EnclaveLink(address, timeouts=LinkTimeouts(connect=1))
            forwarder = CredentialsForwarder(link, flaky, refresh_interval=0.05)
            async with link, forwarder:
                await link.wait_connected(2)
                await asyncio.sleep(0.2)
            return enclave.credentials, forwarder.failures

    received, failures = asyncio.run(run())
    assert received == [FIRST]
    assert failures == 1
    assert "secret-detail-xyz" not in caplog.text
    assert "RuntimeError" in caplog.text
