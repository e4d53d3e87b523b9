"""The whole system on one machine, in real processes: what ``nci demo`` and the system tests run.

::

    with LocalSystem(state_dir) as system:
        client = Client(system.bridge_url, expect=system.expect_path,
                        trust_local_root=system.root_pem_path)
        ...
        system.taps          # every byte that crossed the parent, per connection

What runs where (``T`` is a short temporary folder: unix socket paths are limited to 107 bytes)::

    this process        local KMS + S3 (moto, a thread) on tcp://127.0.0.1:K
                        the taps (an event loop thread), recording relays:
    consumer ──tcp://127.0.0.1:B──▶ tap "consumer → bridge" ──▶ unix://T/bridge.sock
    parent   ──unix://T/tap-control.sock──▶ tap "parent → enclave" ──▶ unix://T/enclave.sock
    enclave  ──unix://T/tap-bundles.sock──▶ tap "enclave → bundles" ──▶ unix://T/bundles.sock
    enclave  ──unix://T/tap-kms.sock──▶ tap "enclave → KMS relay" ──▶ unix://T/kms.sock
                                                                   (the parent's relay → K)
    subprocess          nci parent run --config T/parent.yaml: bridge, KMS relay, bundle streamer
                        (S3 source), credentials forwarder (env), local launcher
    its subprocess      python -m enclave --config T/enclave.json, emulated NSM on the state folder
                        (``launcher=False``: a subprocess of this process, so that the parent
                        can be restarted under a living enclave, :meth:`restart_parent`)

The steps, each a method so that the demo can narrate them (:meth:`start` runs them all):
:meth:`start_kms`, :meth:`provision` (the provider's key bound to the emulated enclave's
measurements, the built-in model sealed and published to S3), :meth:`start_parent` (configuration
files, taps, the parent process), :meth:`wait_ready` (``/healthz`` until the enclave is ready,
recording its boot steps). :meth:`close` sends SIGTERM to the parent (its launcher stops the
enclave), kills what outlives a deadline, checks that no process of the system is left
(:attr:`leftovers`) and removes the temporary folder.

The parent's and the enclave's standard error go to their own files (:attr:`parent_log`,
:attr:`enclave_log`), both at log level INFO, so that tests can search them for plaintext (the
parent's launcher writes the enclave's log: ``launcher.local.log`` and ``verbose``). Only the
emulator's CA lives in the state folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import boto3

from attestation import _measure
from attestation.emulator import EmulatedNsm
from attestation.roots import TrustRoot
from enclave.keyrelease import kms_client_config
from kms_policy import check, generate
from kms_policy.check import PolicyReport
from kms_policy.localkms import LocalKms, LocalKmsConfig
from kms_policy.model import KeyPolicy
from nci.tap import Tap
from parent.launcher import LocalLauncher
from protocol.bundle import Manifest
from protocol.errors import TransportError
from protocol.transport import Address, parse_address

__all__ = [
    "ADMIN",
    "BUCKET",
    "PRINCIPALS",
    "PROVIDER",
    "ROLE",
    "BootStep",
    "LocalSystem",
    "LocalSystemError",
    "fresh_measurements",
]

_T = TypeVar("_T")

ACCOUNT: Final = "123456789012"  # moto files every AKIA… caller's keys under this account
ROLE: Final = f"arn:aws:iam::{ACCOUNT}:role/nci-parent-instance"
PROVIDER: Final = f"arn:aws:iam::{ACCOUNT}:role/nci-model-provider"
ADMIN: Final = f"arn:aws:iam::{ACCOUNT}:role/nci-key-admin"
PRINCIPALS: Final = {ROLE: "AKIANCIPARENT", PROVIDER: "AKIANCIPROVIDER", ADMIN: "AKIANCIADMIN"}
_SECRET: Final = "local-demo-secret"  # noqa: S105 (the local KMS checks no secret)
BUCKET: Final = "nci-models"
REGION: Final = "us-east-1"
BUNDLE: Final = "anymal-shapes"

TAP_BRIDGE: Final = "consumer → bridge"
TAP_CONTROL: Final = "parent → enclave control"
TAP_BUNDLES: Final = "enclave → bundle streamer"
TAP_KMS: Final = "enclave → KMS relay"


class LocalSystemError(Exception):
    """The local system could not be brought up (the message says which step and why)."""


@dataclass(frozen=True)
class BootStep:
    """One boot state the parent's ``/healthz`` reported, ``elapsed`` seconds after the start."""

    elapsed: float
    state: str
    step: int
    steps: int
    name: str
    error: str = ""

    def describe(self) -> str:
        if self.state == "down":
            return "the parent's bridge is not listening yet"
        if self.state == "unreachable":
            return "the bridge is up; the enclave is not reachable yet"
        error = f" ({self.error})" if self.error else ""
        return f"{self.step}/{self.steps} {self.name}: {self.state}{error}"


def fresh_measurements() -> dict[int, bytes]:
    """PCR0/1/2 of the enclave application as its files are now (not the per-process cache: the
    enclave process measures the files when it boots)."""
    roots = [root for name in _measure.DEFAULT_PACKAGES for root in _measure.locate_package(name)]
    return _measure.measure_trees(roots)


class LocalSystem:
    """The whole local system in real processes (module docstring). Use it as a context manager.

    ``state_dir`` holds the emulator's CA (kept between runs). ``boot_timeout`` bounds the wait
    for the enclave's ``ready``; ``max_concurrency`` and ``threads`` go to the enclave's
    configuration, ``verbose`` to the parent (``nci -v``) and the enclave (INFO logs); ``runtime``
    ``"echo"`` (with ``echo_delay`` seconds per piece) serves an echo instead of the model.

    ``limits`` adds to the bridge's limits in the parent's configuration (the field names of
    ``parent.bridge.BridgeLimits``: ``client_read_timeout``, ``body_timeout``…).
    ``model`` is the model sealed and served: ``"builtin"`` (the built-in AnyMAL) or
    ``"smollm2"`` (AnyMAL with SmolLM2-135M-Instruct, about 550 MB sealed).
    ``launcher=False`` starts the enclave from this process instead of the parent's launcher (the
    same :class:`parent.launcher.LocalLauncher`, restarting it when it exits, hosted on the taps'
    event loop), so that :meth:`restart_parent` can stop the parent while the enclave lives.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        boot_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        max_concurrency: int = 16,
        threads: int | None = 1,
        verbose: bool = True,
        runtime: str = "model",
        echo_delay: float = 0.0,
        launcher: bool = True,
        limits: Mapping[str, int | float] | None = None,
        model: str = "builtin",
    ) -> None:
        if model not in ("builtin", "smollm2"):
            raise LocalSystemError(f"model must be 'builtin' or 'smollm2', not {model!r}")
        self.model = model
        self.state_dir = Path(state_dir).resolve()
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.max_concurrency = max_concurrency
        self.threads = threads
        self.verbose = verbose
        self.runtime = runtime
        self.echo_delay = echo_delay
        self.launcher = launcher
        self.limits = {**(limits or {}), "max_concurrency": max_concurrency}
        self.root = Path(tempfile.mkdtemp(prefix="nci-"))  # short: unix socket paths ≤ 107 bytes
        self.parent_log = self.root / "parent.log"
        self.parent_out = self.root / "parent.out"
        self.enclave_log = self.root / "enclave.log"
        self.enclave_config = self.root / "enclave.json"
        self.parent_config = self.root / "parent.yaml"
        self.expect_path = self.root / "expect.json"
        self.model_dir = self.root / "provider" / "model"
        self.bundle_dir = self.root / "provider" / "bundle"
        # moto's backends are global to a process: two local systems in one process share S3
        self.s3_url = f"s3://{BUCKET}/{BUNDLE}/{secrets.token_hex(4)}"
        self.taps: dict[str, Tap] = {}
        self.boot_steps: list[BootStep] = []
        self.leftovers: list[int] = []
        """Processes of the system still alive after the parent exited (killed by :meth:`close`)."""
        self.kms: LocalKms | None = None
        self.nsm: EmulatedNsm | None = None
        self.measurements: dict[int, bytes] = {}
        self.key_id = ""
        self.key_arn = ""
        self.key_policy: KeyPolicy | None = None
        self.lint: PolicyReport | None = None
        self.manifest: Manifest | None = None
        self.bridge_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._env: dict[str, str] = {}
        self._enclave_launcher: LocalLauncher | None = None  # launcher=False: ours
        self._seen_pids: set[int] = set()
        self._closed = False
        self._control_open = False

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> Self:
        """Every step, in order: KMS, provider, parent and enclave, ready."""
        self.start_kms()
        self.provision()
        self.start_parent()
        self.wait_ready()
        return self

    @property
    def root_pem_path(self) -> Path:
        """The emulator's root certificate: what verifiers must name to accept local documents."""
        path = self._nsm().root_pem_path
        if path is None:  # pragma: no cover (the CA is always in the state folder here)
            raise LocalSystemError("the emulator's CA is not in a state folder")
        return path

    @property
    def bridge_address(self) -> Address:
        """The parent's real bridge (behind the consumer's tap)."""
        return parse_address(f"unix://{self.root}/bridge.sock")

    # (1) local KMS and S3 ------------------------------------------------------------------

    def start_kms(self) -> LocalKms:
        """The emulator's CA (created once in the state folder), then the local KMS and S3."""
        self.nsm = EmulatedNsm(state_dir=self.state_dir)
        config = LocalKmsConfig(
            principals={akid: arn for arn, akid in PRINCIPALS.items()},
            trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(self.nsm.root_pem)),
        )
        self.kms = LocalKms(config).start()
        return self.kms

    def aws(self, service: str, principal: str) -> Any:
        """A boto3 client of the local ``service`` (kms, s3) as ``principal`` (ROLE, PROVIDER…)."""
        return boto3.session.Session().client(
            service,
            endpoint_url=self._kms().endpoint_url,
            region_name=REGION,
            aws_access_key_id=PRINCIPALS[principal],
            aws_secret_access_key=_SECRET,
            config=kms_client_config() if service == "kms" else None,
        )

    # (2) the provider ----------------------------------------------------------------------

    def provision(self) -> Manifest:
        """:meth:`create_key`, then :meth:`seal_and_publish`."""
        self.create_key()
        return self.seal_and_publish()

    def create_key(self) -> str:
        """The provider's KMS key, its policy generated for the enclave's measurements (as the
        files are now), and the auditor's lint of that policy (:attr:`lint`). Returns its id."""
        self.measurements = fresh_measurements()
        self.expect_path.write_text(
            json.dumps({f"PCR{i}": value.hex() for i, value in sorted(self.measurements.items())})
            + "\n"
        )
        self.key_policy = generate(
            measurements=self.measurements, role_arn=ROLE, provider_arn=PROVIDER, admin_arns=[ADMIN]
        )
        metadata = self.aws("kms", ADMIN).create_key(Policy=self.key_policy.to_json())
        self.key_id, self.key_arn = metadata["KeyMetadata"]["KeyId"], metadata["KeyMetadata"]["Arn"]
        self.lint = check(
            self.key_policy, expect=[self.measurements], role_arn=ROLE, provider_arn=PROVIDER
        )
        return self.key_id

    def seal_and_publish(self) -> Manifest:
        """The model's folder (:attr:`model_dir`), sealed under the key into :attr:`bundle_dir`
        with the provider's credentials, and published to :attr:`s3_url`."""
        from provider import publish, seal

        if not self.key_id:
            raise LocalSystemError("the provider's key is not created yet (create_key)")
        if self.model == "smollm2":
            from enclave.models import smollm2

            model_id = smollm2.MODEL_ID
            smollm2.write_model_folder(self.model_dir)
        else:
            from enclave.models.builtin import BUILTIN_MODEL_ID, write_builtin_model_folder

            model_id = BUILTIN_MODEL_ID
            write_builtin_model_folder(self.model_dir)
        self.manifest = seal(
            self.model_dir,
            kms_client=self.aws("kms", PROVIDER),
            kms_key_id=self.key_id,
            model_id=model_id,
            out=self.bundle_dir,
        )
        s3 = self.aws("s3", PROVIDER)
        s3.create_bucket(Bucket=BUCKET)
        publish(self.bundle_dir, self.s3_url, s3_client=s3)
        return self.manifest

    # (3) parent and enclave ----------------------------------------------------------------

    def start_parent(self) -> None:
        """Write both configurations, put a tap on every connection that crosses the parent,
        start ``nci parent run`` (which launches the enclave; with ``launcher=False`` this
        process launches it)."""
        manifest = self._manifest()
        sock = str(self.root)
        self._start_loop()
        self.taps[TAP_BRIDGE] = self._tcp_tap(TAP_BRIDGE, self.bridge_address)
        self.bridge_url = f"http://127.0.0.1:{self.taps[TAP_BRIDGE].listen.port}"
        for name, listen, upstream in (
            (TAP_BUNDLES, "tap-bundles.sock", "bundles.sock"),
            (TAP_KMS, "tap-kms.sock", "kms.sock"),
        ):
            tap = Tap(
                name,
                parse_address(f"unix://{sock}/{listen}"),
                parse_address(f"unix://{sock}/{upstream}"),
            )
            if name == TAP_BUNDLES:
                # the whole sealed bundle crosses it (a resumed stream crosses twice in part)
                tap.max_capture = max(tap.max_capture, 3 * manifest.plaintext_size)
            self.run(tap.start())
            self.taps[name] = tap
        # opened by wait_ready once the enclave listens (see _gate_control)
        self.taps[TAP_CONTROL] = Tap(
            TAP_CONTROL,
            parse_address(f"unix://{sock}/tap-control.sock"),
            parse_address(f"unix://{sock}/enclave.sock"),
        )

        enclave = {
            "control": f"unix://{sock}/enclave.sock",
            "bundle_streamer": f"unix://{sock}/tap-bundles.sock",
            "kms_relay": f"unix://{sock}/tap-kms.sock",
            "kms_endpoint": "http://127.0.0.1:{port}",
            "region": REGION,
            "bundle": BUNDLE,
            "model_id": manifest.model_id,
            "kms_key_arn": manifest.kms_key_id,
            "manifest_sha256": manifest.digest.hex(),
            "nsm": f"emulated:{self.state_dir}",
            "max_concurrency": self.max_concurrency,
            "threads": self.threads,
        }
        if self.runtime != "model":
            enclave.update(runtime=self.runtime, echo_delay=self.echo_delay)
        self.enclave_config.write_text(json.dumps(enclave, indent=2) + "\n")
        kms_port = self._kms().endpoint_url.rsplit(":", 1)[1]
        self.parent_config.write_text(
            f"bridge: {{listen: 'unix://{sock}/bridge.sock'}}\n"
            f"enclave: {{control: 'unix://{sock}/tap-control.sock', health_interval: 5}}\n"
            "kms_relay:\n"
            f"  listen: 'unix://{sock}/kms.sock'\n"
            f"  upstream: 'tcp://127.0.0.1:{kms_port}'\n"
            "bundles:\n"
            f"  listen: 'unix://{sock}/bundles.sock'\n"
            f"  region: {REGION}\n"
            f"  endpoint_url: '{self._kms().endpoint_url}'\n"
            f"  sources: {{{BUNDLE}: {{s3: '{self.s3_url}'}}}}\n"
            "credentials: {source: env}\n"
            f"limits: {json.dumps(self.limits)}\n"  # YAML's flow mapping is a JSON superset
            + (
                f"launcher: {{local: {{enclave_config: '{self.enclave_config}', grace: 10, "
                f"backoff_max: 2, log: '{self.enclave_log}', "
                f"verbose: {'true' if self.verbose else 'false'}}}}}\n"
                if self.launcher
                else ""
            )
        )
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env.update(
            {
                # the parent role's credentials, as the env source reads them
                "AWS_ACCESS_KEY_ID": PRINCIPALS[ROLE],
                "AWS_SECRET_ACCESS_KEY": _SECRET,
                "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self._env = env
        self.enclave_log.touch(mode=0o600)
        self._spawn_parent(append=False)
        if not self.launcher:
            self._start_enclave()

    def _spawn_parent(self, *, append: bool) -> None:
        command = [sys.executable, "-m", "nci"]
        command += ["-v"] if self.verbose else []
        command += ["parent", "run", "--config", str(self.parent_config)]
        mode = "ab" if append else "wb"
        with (
            open(self.parent_log, mode) as stderr,
            open(self.parent_out, mode) as stdout,
        ):
            self._process = subprocess.Popen(  # noqa: S603 (our own interpreter and arguments)
                command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=self._env
            )

    def _start_enclave(self) -> None:
        """``launcher=False``: the parent's local launcher, run here. The enclave's environment is
        this process's without ``AWS_*`` (as under ``nci parent run``, whose environment holds
        the parent role's credentials only)."""
        unset = [f"--unset={name}" for name in os.environ if name.startswith("AWS_")]
        command = ["env", *unset, sys.executable, "-m", "enclave"]
        command += ["-v"] if self.verbose else []
        command += ["--config", str(self.enclave_config)]
        launcher = LocalLauncher(
            self.enclave_config, command=command, grace=10, backoff_max=2, log=self.enclave_log
        )
        self.run(launcher.start())
        self._enclave_launcher = launcher

    def restart_parent(self, *, sig: signal.Signals = signal.SIGKILL) -> int:
        """Stop ``nci parent run`` with ``sig`` (SIGKILL: a crash; SIGTERM: an orderly stop),
        start it again on the same configuration, and return the new process's id; then
        :meth:`wait_ready` waits for its link to the enclave. With ``launcher=False`` the enclave
        lives on; with the parent's launcher it goes down with the parent (on SIGKILL, through
        its parent-death signal) and the new parent launches a new one."""
        process = self._parent()
        if self.launcher:
            self._seen_pids.update(_descendants(process.pid))
            self._close_control()  # reopened by wait_ready once the new enclave listens
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self._spawn_parent(append=True)
        return self.parent_pid

    def wait_ready(self, timeout: float | None = None, *, restarted: bool = False) -> int:
        """Poll ``/healthz`` until the enclave is ready (after a restart: ready again, once it was
        seen not ready); return its OHTTP key id. Each new boot state is appended to
        :attr:`boot_steps`. A failed boot, a parent that exits or the deadline is a
        :class:`LocalSystemError` carrying the logs' tails."""
        deadline = time.monotonic() + (self.boot_timeout if timeout is None else timeout)
        started = time.monotonic()
        last: dict[str, Any] = {}
        down = not restarted
        while True:
            process = self._parent()
            if process.poll() is not None:
                raise self._failure(f"nci parent run exited with status {process.returncode}")
            self._gate_control(last.get("status"))
            health = self.health()
            state = (health.get("status"), health.get("step"), health.get("key_id"))
            if state != (last.get("status"), last.get("step"), last.get("key_id")):
                last = health
                self.boot_steps.append(
                    BootStep(
                        elapsed=time.monotonic() - started,
                        state=str(health.get("status")),
                        step=int(health.get("step", 0)),
                        steps=int(health.get("steps", 0)),
                        name=str(health.get("name", "")),
                        error=str(health.get("error", "")),
                    )
                )
            status = health.get("status")
            down = down or status != "ready"
            if status == "ready" and down:
                self._seen_pids.update(self.processes())
                return int(health["key_id"])
            if status == "failed":
                raise self._failure(f"the enclave's boot failed: {health.get('error')}")
            if time.monotonic() > deadline:
                raise self._failure(f"the enclave was not ready in time (last health: {health})")
            time.sleep(0.1)

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` on the parent's bridge directly (not through the consumer's tap)."""
        connection = _UnixHTTPConnection(str(self.root / "bridge.sock"), timeout=5)
        try:
            connection.request("GET", "/healthz")
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return {"status": "down"}
        finally:
            connection.close()
        try:
            value = json.loads(body)
        except ValueError:
            return {"status": "unreadable"}
        return value if isinstance(value, dict) else {"status": "unreadable"}

    # -- processes ---------------------------------------------------------------------------

    @property
    def parent_pid(self) -> int:
        return self._parent().pid

    def processes(self) -> list[int]:
        """Every living descendant of the parent process (the enclave, and whatever it started);
        with ``launcher=False``, the enclave and its descendants instead."""
        if self._enclave_launcher is not None:
            pid = self._enclave_launcher.pid
            return [] if pid is None else sorted([pid, *_descendants(pid)])
        return _descendants(self.parent_pid)

    def enclave_pid(self) -> int:
        """The enclave process the launcher runs now."""
        if self._enclave_launcher is not None:
            pid = self._enclave_launcher.pid
            if pid is None:
                raise LocalSystemError("the enclave is not running (its launcher restarts it)")
            self._seen_pids.add(pid)
            return pid
        children = _children(self.parent_pid)
        if len(children) != 1:
            raise LocalSystemError(f"the parent has {len(children)} child processes, not 1")
        self._seen_pids.add(children[0])
        return children[0]

    def kill_enclave(self) -> int:
        """SIGKILL the enclave (the launcher restarts it); returns the pid that was killed."""
        pid = self.enclave_pid()
        self._close_control()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid):  # until then it may still accept on its socket (see _gate_control)
            if time.monotonic() > deadline:
                raise LocalSystemError(f"the enclave (pid {pid}) outlived SIGKILL for 10 s")
            time.sleep(0.01)
        return pid

    def close(self) -> None:
        """SIGTERM to the parent (its launcher stops the enclave; with ``launcher=False`` this
        process's launcher stops it), SIGKILL after ``stop_timeout``; then kill and record in
        :attr:`leftovers` any process of the system still alive; stop the taps and the KMS;
        remove the temporary folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            process = self._process
            if process is not None:
                running = process.poll() is None
                if running:
                    self._seen_pids.update(_descendants(process.pid))
                    process.send_signal(signal.SIGTERM)
                launcher, self._enclave_launcher = self._enclave_launcher, None
                if launcher is not None:  # meanwhile: SIGTERM to the enclave, SIGKILL after grace
                    pid = launcher.pid
                    if pid is not None:
                        self._seen_pids.update([pid, *_descendants(pid)])
                    self.run(launcher.stop(), timeout=self.stop_timeout + 15)
                if running:
                    try:
                        process.wait(self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait(10)
                deadline = time.monotonic() + 5
                alive = [pid for pid in self._seen_pids if _alive(pid)]
                while alive and time.monotonic() < deadline:  # orphans are reaped by init
                    time.sleep(0.05)
                    alive = [pid for pid in alive if _alive(pid)]
                for pid in alive:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.leftovers = sorted(alive)
        finally:
            for name, tap in self.taps.items():
                if name != TAP_CONTROL or self._control_open:
                    with contextlib.suppress(Exception):
                        self.run(tap.close())
            self._stop_loop()
            if self.kms is not None:
                self.kms.stop()
            shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers -----------------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        """Run ``coroutine`` on the taps' event loop (a thread of this process)."""
        if self._loop is None:
            raise LocalSystemError("the event loop of the taps is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the parent's and the enclave's logs (for error messages)."""
        parts = []
        for name, path in (("parent", self.parent_log), ("enclave", self.enclave_log)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {name} log ({path.name}), last lines:\n" + "\n".join(text))
        return "\n".join(parts)

    def _failure(self, message: str) -> LocalSystemError:
        hint = ""
        if any(step.error == "key_release_denied" for step in self.boot_steps):
            hint = (
                " (the enclave's measurements differ from the key policy's: did the code of "
                "enclave/, attestation/ or protocol/ change during the run?)"
            )
        return LocalSystemError(f"{message}{hint}\n{self.log_tail()}")

    def _gate_control(self, status: object = None) -> None:
        """Keep the control tap open only while the enclave listens behind it.

        Workaround: a tap whose upstream is down accepts and closes at once, and the parent's
        link (parent/enclave_link.py, ``_supervise``) reconnects without delay after a dropped
        connection and resets its backoff on every connect: it would reconnect (and resend
        credentials) thousands of times a second until the enclave listens again. With no tap
        listening, its connect fails and its backoff applies. Called by :meth:`wait_ready` with
        the last health status: the tap opens once the enclave accepts, and closes again when
        the parent cannot reach an enclave that stopped accepting (it exited, or was killed)."""
        if self._control_open and status != "unreachable":
            return
        listening = self._enclave_listens()
        if self._control_open and not listening:
            self._close_control()
        elif not self._control_open and listening:
            self.run(self.taps[TAP_CONTROL].start())
            self._control_open = True

    def _enclave_listens(self) -> bool:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1)
            probe.connect(str(self.root / "enclave.sock"))
        except OSError:
            return False
        finally:
            probe.close()
        return True

    def _close_control(self) -> None:
        if self._control_open:
            self._control_open = False
            self.run(self.taps[TAP_CONTROL].close())

    def _tcp_tap(self, name: str, upstream: Address) -> Tap:
        """A tap on a free loopback port (addresses take no port 0: try a few free ones)."""
        for attempt in range(5):
            tap = Tap(name, parse_address(f"tcp://127.0.0.1:{_free_port()}"), upstream)
            try:
                self.run(tap.start())
            except TransportError:  # taken between the probe and the listen
                if attempt == 4:
                    raise
                continue
            return tap
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(_quiet_cancellations)
        self._loop_thread = threading.Thread(
            target=self._loop.run_forever, name="nci-localsystem-taps", daemon=True
        )
        self._loop_thread.start()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        self._loop = self._loop_thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    def _kms(self) -> LocalKms:
        if self.kms is None:
            raise LocalSystemError("the local KMS is not started (start_kms)")
        return self.kms

    def _nsm(self) -> EmulatedNsm:
        if self.nsm is None:
            raise LocalSystemError("the emulator is not set up (start_kms)")
        return self.nsm

    def _manifest(self) -> Manifest:
        if self.manifest is None:
            raise LocalSystemError("the model is not sealed yet (provision)")
        return self.manifest

    def _parent(self) -> subprocess.Popen[bytes]:
        if self._process is None:
            raise LocalSystemError("the parent is not started (start_parent)")
        return self._process


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket (the parent's bridge listens on one)."""

    def __init__(self, path: str, *, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The taps' loop's exception handler, minus one false alarm: on Python 3.11, cancelling a
    connection handler of ``asyncio.start_server`` (``Tap.close``) makes asyncio log "Exception
    in callback StreamReaderProtocol.connection_made" with a CancelledError (fixed in 3.12)."""
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _processes() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, state) of every process, from /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as handle:
                stat = handle.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and ')'
        if len(fields) >= 2:
            yield int(entry.name), int(fields[1]), fields[0]


def _children(pid: int) -> list[int]:
    return sorted(p for p, parent, state in _processes() if parent == pid and state != "Z")


def _descendants(pid: int) -> list[int]:
    table = [(p, parent) for p, parent, state in _processes() if state != "Z"]
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, parent in table if parent == current]
        found += children
        frontier += children
    return sorted(found)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode(errors="replace")
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] != "Z"
