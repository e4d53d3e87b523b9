"""The credentials forwarder: the parent role's AWS credentials, to the enclave, kept fresh.

The enclave has no instance metadata service; for its KMS calls (``kms:Decrypt`` with an
attestation document as Recipient) it uses the parent role's temporary credentials, which the
parent sends as a CREDENTIALS frame (docs/request-path.md). The key policy still demands an
attestation document that matches the released image, so these credentials alone release nothing;
they are secrets all the same, and never appear in logs, metrics or error messages (only their
expiry time does).

Sources (:class:`CredentialSource`): :func:`session_credentials` (boto3's chain: environment,
profile, and on EC2 the instance metadata service, refreshed by botocore before expiry) and
:func:`environment_credentials` (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN`` only).

:class:`CredentialsForwarder` sends them on every (re)connect of the enclave link, and again
whenever the source yields different ones (botocore refreshes temporary credentials ahead of their
expiry), checked every ``refresh_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from parent.enclave_link import EnclaveError, EnclaveLink
from protocol.control import Credentials
from protocol.errors import ConfigError, FrameError
from protocol.transport import check_timeout

__all__ = [
    "CredentialSource",
    "CredentialsForwarder",
    "environment_credentials",
    "session_credentials",
]

logger = logging.getLogger(__name__)

CredentialSource = Callable[[], Credentials]
"""Returns the current credentials, or raises :class:`~protocol.errors.ConfigError` when there
are none (the message never quotes them)."""


def _credentials(
    access_key: object, secret_key: object, token: object, expiry: object
) -> Credentials:
    if not access_key or not secret_key:
        raise ConfigError("no AWS credentials found for the parent")
    expiration = expiry.isoformat() if isinstance(expiry, datetime) else ""
    try:
        return Credentials(str(access_key), str(secret_key), str(token or ""), expiration)
    except FrameError as exc:  # names the field, never its value
        raise ConfigError(f"the parent's AWS credentials are unusable: {exc}") from None


def session_credentials(session: Any = None) -> Credentials:
    """The credentials of a boto3 session (default: a new ``boto3.Session()``): environment,
    shared files, or on EC2 the instance role through IMDS. Frozen at the time of the call;
    botocore refreshes temporary ones ahead of expiry, so call again for fresh ones."""
    if session is None:
        import boto3

        session = boto3.Session()
    found = session.get_credentials()
    if found is None:
        raise ConfigError("no AWS credentials found for the parent (boto3 session)")
    frozen = found.get_frozen_credentials()  # refreshes first if they are about to expire
    expiry = getattr(found, "_expiry_time", None)  # RefreshableCredentials only
    return _credentials(frozen.access_key, frozen.secret_key, frozen.token, expiry)


def environment_credentials(environ: Mapping[str, str] | None = None) -> Credentials:
    """``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` and ``AWS_SESSION_TOKEN`` (optional)."""
    env = os.environ if environ is None else environ
    return _credentials(
        env.get("AWS_ACCESS_KEY_ID"),
        env.get("AWS_SECRET_ACCESS_KEY"),
        env.get("AWS_SESSION_TOKEN"),
        None,
    )


class CredentialsForwarder:
    """Keeps the enclave supplied with credentials from ``source`` over ``link``.

    Registers itself as an on-connect hook of ``link`` (so register it before the link connects,
    or it waits for the next refresh), and checks the source every ``refresh_interval`` seconds.
    """

    def __init__(
        self, link: EnclaveLink, source: CredentialSource, *, refresh_interval: float = 60.0
    ) -> None:
        check_timeout(refresh_interval)
        self._link = link
        self._source = source
        self._refresh_interval = float(refresh_interval)
        self._last: Credentials | None = None
        self._task: asyncio.Task[None] | None = None
        self._sending: asyncio.Task[None] | None = None  # the send started by the last connect
        self.sent = 0
        """CREDENTIALS frames sent so far."""
        self.failures = 0
        """Times the source had no usable credentials or the send failed."""
        link.on_connect(self._on_connect)

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._refresh(), name="credentials-forwarder")

    async def close(self) -> None:
        tasks = [t for t in (self._task, self._sending) if t is not None]
        self._task = self._sending = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> CredentialsForwarder:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def _on_connect(self) -> None:
        # in the background: a slow source (IMDS) must not hold up the link; the enclave takes
        # CREDENTIALS at any time, and one send in flight is enough (it reads the source afresh)
        if self._sending is None or self._sending.done():
            self._sending = asyncio.create_task(self._send(force=True), name="credentials-send")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            if self._link.connected:
                await self._send(force=False)

    async def _send(self, *, force: bool) -> None:
        try:
            # the source may block (IMDS, STS): keep it off the event loop
            credentials = await asyncio.to_thread(self._source)
        except ConfigError as exc:
            self.failures += 1
            logger.warning("credentials forwarder: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - botocore's many errors; the message may be long
            self.failures += 1
            logger.warning("credentials forwarder: the source failed (%s)", type(exc).__name__)
            return
        if not force and credentials == self._last:
            return
        try:
            await self._link.send_credentials(credentials)
        except EnclaveError as exc:
            self.failures += 1
            logger.warning("credentials forwarder: not sent (%s)", exc.code)
            return
        self._last = credentials
        self.sent += 1
        logger.info(
            "credentials forwarder: sent credentials (expire %s)", credentials.expiration or "n/a"
        )
