"""Boot the enclave and serve until told to stop (docs/request-path.md, "Boot").

Numbered steps, each reported through health (:class:`enclave.server.HealthState`):

1. ``nsm``: open the NSM (``/dev/nsm``, or the emulator in local mode) and ask it to describe
   itself;
2. ``credentials``: wait for a CREDENTIALS frame from the parent (the parent role's temporary
   credentials; the enclave has no metadata service);
3. ``key release and unlock``: stream the sealed bundle from the parent, ``kms:Decrypt`` its data
   key with a ``Recipient`` (a fresh RSA key, attested), decrypt the chunks into tensors. KMS is
   reached through the loopback forwarder (:mod:`enclave.kmsforward`); boto3 gets explicit
   credentials and bounded timeouts. KMS being unavailable (timeouts, throttling, 5xx, a relay
   that drops the connection, expired credentials) is retried ``attempts`` times with exponential
   backoff, with the latest credentials each time; a refusal is not. The data key lives inside
   :class:`enclave.unlock.Unlocker` only for the key derivation, then is wiped; the RSA key and
   the KMS client are dropped with this step;
4. ``model load``: the runtime from the unlocked tensors;
5. ``ohttp key``: a fresh X25519 key pair with a random key id;
6. ``ready``: the server answers consumers.

A failed step leaves health ``failed`` with one of :data:`BOOT_ERROR_CODES` and logs one line
naming the step and the error *type* (never the message: no secret or content can leak through
it). The enclave stays up answering health, so that the parent can report the failure, unless the
configuration says ``exit_on_failure``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import boto3

from attestation.emulator import EmulatedNsm
from attestation.errors import NsmError
from attestation.nsm import Nsm, NsmClient, NsmDevice
from enclave.config import EnclaveConfig
from enclave.errors import (
    ConfigError,
    EnclaveError,
    KeyReleaseDenied,
    KeyReleaseTimeout,
    KeyReleaseUnavailable,
    MalformedEnvelope,
)
from enclave.keyrelease import KeyRelease, kms_client_config
from enclave.kmsforward import KmsForwarder
from enclave.server import BOOT_STEPS, EchoRuntime, EnclaveServer, OhttpKey, Ready, Runtime
from enclave.unlock import BundleLoadError, UnlockedModel, Unlocker
from protocol.control import Credentials
from protocol.errors import BundleIntegrityError, FrameError, MalformedBundle, TransportError

__all__ = ["BOOT_ERROR_CODES", "Boot", "RuntimeLoader", "boot_error_code", "run", "serve"]

log = logging.getLogger(__name__)

BOOT_ERROR_CODES: Final = frozenset(
    {
        "nsm_failed",  # the NSM could not be opened or refused a request
        "credentials_timeout",  # no CREDENTIALS frame in time
        "key_release_denied",  # KMS refused (key policy, attestation, context, credentials)
        "kms_unavailable",  # KMS unreachable or failing after every attempt
        "key_release_malformed",  # KMS's answer is not the envelope for our key
        "bundle_refused",  # the parent refused the bundle, or it is not the pinned model/key
        "bundle_integrity",  # a chunk or the manifest failed authentication
        "bundle_malformed",  # the manifest or layout breaks the bundle format
        "transport",  # the bundle streamer could not be reached or broke the stream
        "model_invalid",  # the runtime refused the unlocked weights
        "internal",  # anything else
    }
)

# KMS answers that mean "these credentials", not "this enclave": fresh ones may succeed.
_CREDENTIAL_CODES: Final = frozenset(
    {"ExpiredTokenException", "UnrecognizedClientException", "InvalidSignatureException"}
)


class RuntimeLoader(Protocol):
    """``enclave.models.runtime.load_runtime``'s shape."""

    def __call__(self, model: UnlockedModel, *, threads: int | None = None) -> Runtime: ...


class _CredentialsTimeout(EnclaveError):
    """No CREDENTIALS frame arrived in time."""


def boot_error_code(exc: BaseException, step: int) -> str:
    """The health error code for ``exc`` raised by boot step ``step``."""
    if isinstance(exc, NsmError):
        return "nsm_failed"
    if isinstance(exc, _CredentialsTimeout):
        return "credentials_timeout"
    if isinstance(exc, KeyReleaseDenied):
        return "key_release_denied"
    if isinstance(exc, KeyReleaseTimeout | KeyReleaseUnavailable):
        return "kms_unavailable"
    if isinstance(exc, MalformedEnvelope):
        return "key_release_malformed"
    if isinstance(exc, BundleLoadError):
        return "bundle_refused"
    if isinstance(exc, BundleIntegrityError):
        return "bundle_integrity"
    if isinstance(exc, MalformedBundle):
        return "bundle_malformed"
    if isinstance(exc, TransportError | FrameError):
        return "transport"
    if step == 4 and isinstance(exc, EnclaveError | ValueError):
        return "model_invalid"
    return "internal"


def _load_runtime(model: UnlockedModel, *, threads: int | None = None) -> Runtime:
    # imported when needed: the runtime module pulls in the model code
    from enclave.models.runtime import load_runtime

    return load_runtime(model, threads=threads)


def open_nsm(config: EnclaveConfig) -> Nsm:
    """The NSM the configuration names: the device, or the emulator on its state folder."""
    state = config.emulated_nsm_state
    return NsmDevice() if state is None else EmulatedNsm(state_dir=state)


class Boot:
    """The boot of one enclave (module docstring). :meth:`run` returns whether it became ready.

    ``kms_endpoint`` is boto3's endpoint URL (the configuration's, with the forwarder's port).
    ``nsm`` replaces the configured NSM and ``load_runtime`` the model runtime (tests, the echo
    benchmark). ``attempts``/``backoff``/``max_backoff`` bound the key release retries;
    ``kms_attempts`` and ``kms_timeout`` are botocore's own, per key release attempt.
    """

    def __init__(
        self,
        config: EnclaveConfig,
        server: EnclaveServer,
        *,
        kms_endpoint: str,
        nsm: Nsm | None = None,
        load_runtime: RuntimeLoader | None = None,
        attempts: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        kms_attempts: int = 3,
        kms_timeout: float = 10.0,
        unlock_timeout: float = 30.0,
        credentials_timeout: float | None = None,
        after_unlock: Callable[[], Any] | None = None,
    ) -> None:
        if type(attempts) is not int or attempts < 1 or not 0 <= backoff <= max_backoff:
            raise ConfigError("attempts ≥ 1 and 0 ≤ backoff ≤ max_backoff")
        self._config = config
        self._server = server
        self._kms_endpoint = kms_endpoint
        self._nsm = nsm
        if load_runtime is None and config.runtime == "echo":
            load_runtime = _echo_loader(config.echo_delay)
        self._load_runtime: RuntimeLoader = load_runtime or _load_runtime
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._kms_attempts = kms_attempts
        self._kms_timeout = kms_timeout
        self._unlock_timeout = unlock_timeout
        self._credentials_timeout = credentials_timeout
        self._after_unlock = after_unlock

    async def run(self) -> bool:
        """Run steps 1..6; ``False`` (health ``failed``) if one failed."""
        step = 1
        try:
            # (1) nsm
            self._begin(step)
            nsm = (
                self._nsm
                if self._nsm is not None
                else await asyncio.to_thread(open_nsm, self._config)
            )
            client = NsmClient(nsm)
            await asyncio.to_thread(client.describe_nsm)
            # (2) credentials
            step = 2
            self._begin(step)
            await self._credentials()
            # (3) key release and unlock
            step = 3
            self._begin(step)
            try:
                model = await self._unlock(client)
            finally:
                if self._after_unlock is not None:
                    await _maybe_await(self._after_unlock())
            # (4) model load; only the digest and the id of the manifest are kept
            step = 4
            self._begin(step)
            runtime = await asyncio.to_thread(
                self._load_runtime, model, threads=self._config.threads
            )
            model_id, manifest_sha256 = model.model_id, model.manifest.digest
            del model
            # (5) ohttp key
            step = 5
            self._begin(step)
            key = await asyncio.to_thread(OhttpKey.generate)
            # (6) ready
            self._server.set_ready(Ready(client, runtime, key, model_id, manifest_sha256))
            log.info("boot step 6/6: ready")
            return True
        except Exception as exc:  # noqa: BLE001 - the boundary: every failure becomes a code
            code = boot_error_code(exc, step)
            log.error("boot step %d (%s) failed: %s (%s)", step, _name(step), code, _kind(exc))
            self._server.health.fail(code)
            return False

    def _begin(self, step: int) -> None:
        self._server.health.begin(step)
        log.info("boot step %d/6: %s", step, _name(step))

    async def _credentials(self) -> Credentials:
        try:
            async with asyncio.timeout(self._credentials_timeout):
                return await self._server.wait_credentials()
        except TimeoutError:
            raise _CredentialsTimeout("no CREDENTIALS frame from the parent") from None

    async def _unlock(self, client: NsmClient) -> UnlockedModel:
        for attempt in range(1, self._attempts + 1):
            try:
                return await asyncio.to_thread(self._unlock_once, client)
            except (
                KeyReleaseUnavailable,
                KeyReleaseTimeout,
                KeyReleaseDenied,
                TransportError,
            ) as exc:
                if not _retryable(exc) or attempt == self._attempts:
                    raise
                delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
                log.warning(
                    "key release attempt %d of %d failed (%s); retrying in %.1f s",
                    attempt,
                    self._attempts,
                    _kind(exc),
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover (the loop returns or raises)

    def _unlock_once(self, client: NsmClient) -> UnlockedModel:
        # the latest credentials: the parent may have sent fresh ones since the last attempt
        credentials = self._server.credentials
        if credentials is None:  # pragma: no cover (step 2 waited for them)
            raise _CredentialsTimeout("no credentials")
        kms = boto3.session.Session().client(
            "kms",
            endpoint_url=self._kms_endpoint,
            region_name=self._config.region,
            aws_access_key_id=credentials.access_key_id,
            aws_secret_access_key=credentials.secret_access_key,
            aws_session_token=credentials.session_token or None,
            config=kms_client_config(self._kms_timeout, self._kms_attempts),
        )
        release = KeyRelease(client, kms)
        unlocker = Unlocker(
            self._config.bundle_streamer,
            release,
            expected_model_id=self._config.model_id,
            expected_kms_key_id=self._config.kms_key_arn,
            expected_manifest_sha256=self._config.manifest_sha256,
            timeout=self._unlock_timeout,
            backoff=min(self._backoff, 0.5),
        )
        started = time.monotonic()
        model = unlocker.load(self._config.bundle)
        log.info("unlocked %d tensors in %.1f s", len(model.tensors), time.monotonic() - started)
        return model


def _echo_loader(delay: float) -> RuntimeLoader:
    """``"runtime": "echo"``: the bundle is still unlocked (the boot is the same), but requests
    are answered by :class:`EchoRuntime`, so a benchmark measures the path without the model."""

    def load(model: UnlockedModel, *, threads: int | None = None) -> Runtime:
        return EchoRuntime(delay=delay)

    return load


def _retryable(exc: Exception) -> bool:
    """Unavailable, timed out, a broken stream: yes. Denied: only for the credentials' sake."""
    return not isinstance(exc, KeyReleaseDenied) or exc.code in _CREDENTIAL_CODES


def _name(step: int) -> str:
    return BOOT_STEPS[step - 1] if 1 <= step <= len(BOOT_STEPS) else "ready"


def _kind(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if isinstance(code, str) and code.isidentifier():
        return f"{type(exc).__name__} {code}"  # KMS's and the NSM's codes are public names
    return type(exc).__name__


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value


# --- Running the enclave ----------------------------------------------------------------------


async def serve(
    config: EnclaveConfig,
    *,
    stop: asyncio.Event,
    server: EnclaveServer | None = None,
    **boot_options: Any,
) -> bool:
    """Listen, boot, and serve until ``stop`` is set. Returns ``False`` if the boot failed.

    A failed boot keeps serving health (state ``failed``) until ``stop``, unless
    ``config.exit_on_failure``, in which case it returns at once. ``boot_options`` go to
    :class:`Boot` (tests: ``nsm``, ``load_runtime``, retry bounds).
    """
    server = server or EnclaveServer(config.control, max_concurrency=config.max_concurrency)
    forwarder = KmsForwarder(config.kms_relay)
    await forwarder.start()
    boot_task: asyncio.Task[bool] | None = None
    try:
        await server.start()
        boot = Boot(
            config,
            server,
            kms_endpoint=config.kms_endpoint_url(forwarder.port),
            after_unlock=forwarder.close,  # KMS is needed for the key release only
            **boot_options,
        )
        boot_task = asyncio.create_task(boot.run())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({boot_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        ok = boot_task.result() if boot_task.done() else True
        if not (not ok and config.exit_on_failure):
            await stopped
        stopped.cancel()
        return ok
    finally:
        if boot_task is not None and not boot_task.done():
            boot_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await boot_task
        await server.close()
        await forwarder.close()
        log.info("enclave stopped")


def run(config: EnclaveConfig) -> int:
    """Boot and serve until SIGTERM or SIGINT, on uvloop when it is installed.

    Exit status: 0 after a clean shutdown (also when the boot failed: the enclave stayed up to
    report it), 1 when the boot failed and ``exit_on_failure`` is set.
    """
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        ok = runner.run(_main(config))
    return 0 if ok or not config.exit_on_failure else 1


async def _main(config: EnclaveConfig) -> bool:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for number in signals:
        loop.add_signal_handler(number, stop.set)
    try:
        return await serve(config, stop=stop)
    finally:
        for number in signals:
            loop.remove_signal_handler(number)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a dependency on Linux)
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
