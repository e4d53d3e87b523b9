"""The enclave launcher and supervisor: start the enclave, watch it, restart it, stop it.

Two implementations of one shape (``start()``, ``stop()``, ``restarts``, ``describe()``):

- :class:`LocalLauncher` (local mode, tests, the demo): the enclave is a child process,
  ``python -m enclave --config FILE``, in its own process group (so a signal to the parent's
  terminal does not reach it and stopping it reaches its children too). When it exits it is
  restarted after a capped exponential backoff (reset once a run lasted ``stable_after`` seconds).
  Stopping sends SIGTERM to the group, then SIGKILL after ``grace`` seconds. Nothing of a run
  outlives it: when the child exits, what is left of its group gets SIGTERM at once and SIGKILL
  before the next run starts (or when the launcher stops). On Linux the child also gets SIGTERM
  when the parent dies (``prctl(PR_SET_PDEATHSIG)``), so a crashed or SIGKILLed ``nci parent
  run`` does not leave the local enclave running.
- :class:`NitroLauncher` (AWS): the same through ``nitro-cli``: ``run-enclave`` with the image,
  CPU count, memory and CID; ``describe-enclaves`` every ``poll_interval`` seconds to notice that
  it stopped; ``terminate-enclave`` to stop it. The enclave image is never started in debug mode
  (its PCRs would read as zeros and no key policy would release the model's key).

The launcher never talks to the enclave: the control link notices a restart by its reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from protocol.errors import ConfigError, TransportError
from protocol.transport import check_timeout

__all__ = ["Launcher", "LocalLauncher", "NitroCli", "NitroLauncher"]

logger = logging.getLogger(__name__)


class Launcher(Protocol):
    """What ``nci parent run`` needs of a launcher."""

    restarts: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class _Backoff:
    initial: float
    cap: float
    stable_after: float

    def __post_init__(self) -> None:
        for value in (self.initial, self.cap, self.stable_after):
            check_timeout(value)

    def next(self, delay: float | None, ran_for: float) -> float:
        """The delay before the next start, given the previous delay (None: first restart) and
        how long the run that just ended lasted."""
        if delay is None or ran_for >= self.stable_after:
            return self.initial
        return min(delay * 2, self.cap)


# -- local -------------------------------------------------------------------------------------


class LocalLauncher:
    """Runs the enclave as a supervised child process (local mode).

    ``command`` replaces ``[sys.executable, "-m", "enclave", "--config", enclave_config]`` (tests
    use a stand-in; ``verbose`` adds ``-v``). The child inherits the environment and stdout; its
    standard error (its logs) is appended to ``log`` (created 0600) when given, else inherited.
    """

    def __init__(
        self,
        enclave_config: Path,
        *,
        command: Sequence[str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        stable_after: float = 60.0,
        grace: float = 10.0,
        log: Path | None = None,
        verbose: bool = False,
    ) -> None:
        check_timeout(grace)
        self.enclave_config = Path(enclave_config)
        self.command = (
            list(command)
            if command is not None
            else [
                sys.executable,
                "-m",
                "enclave",
                *(["-v"] if verbose else []),
                "--config",
                str(self.enclave_config),
            ]
        )
        self.log = log
        self._backoff = _Backoff(backoff_initial, backoff_max, stable_after)
        self._grace = float(grace)
        self._process: asyncio.subprocess.Process | None = None
        self._group: int | None = None  # the process group of the latest run, until emptied
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.restarts = 0
        """Times the child was started again after it exited."""
        self.exit_codes: list[int] = []
        """Exit status of every run that ended (negative: killed by that signal)."""

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def describe(self) -> str:
        return f"local enclave: {' '.join(self.command)}"

    async def start(self) -> None:
        if self._task is not None:
            raise ConfigError("the launcher is already started")
        self._stop.clear()
        await self._spawn()
        self._task = asyncio.create_task(self._watch(), name="enclave-launcher")

    async def _spawn(self) -> None:
        self._kill_leftovers()  # nothing of the previous run may share the enclave's resources
        stderr = None
        if self.log is not None:
            try:
                stderr = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as exc:
                raise ConfigError(f"enclave log {self.log}: {exc.strerror or exc}") from None
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command,
                stdin=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # its own session and process group
                preexec_fn=_die_with_parent(),
            )
        finally:
            if stderr is not None:
                os.close(stderr)
        self._group = self._process.pid
        logger.info("launcher: started the enclave (pid %d)", self._process.pid)

    def _kill_leftovers(self, signum: signal.Signals = signal.SIGKILL) -> None:
        """Signal what is left of the finished run's process group (its leader was reaped)."""
        if self._group is not None:
            _signal_orphaned_group(self._group, signum)
            if signum == signal.SIGKILL:
                self._group = None

    async def _watch(self) -> None:
        delay: float | None = None
        while True:
            process = self._process
            assert process is not None
            started = time.monotonic()
            code = await process.wait()
            self.exit_codes.append(code)
            if self._stop.is_set():
                return
            # helpers the enclave left behind: SIGTERM now, SIGKILL before the next run
            self._kill_leftovers(signal.SIGTERM)
            delay = self._backoff.next(delay, time.monotonic() - started)
            logger.warning(
                "launcher: the enclave exited with status %d; restarting in %.2f s", code, delay
            )
            if await self._stopped_within(delay):
                return
            try:
                await self._spawn()
            except OSError as exc:  # the old, finished process is waited on again: backoff grows
                logger.error("launcher: cannot start the enclave (%s)", exc.strerror)
                continue
            self.restarts += 1

    async def _stopped_within(self, delay: float) -> bool:
        try:
            async with asyncio.timeout(delay):
                await self._stop.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """SIGTERM to the child's process group, SIGKILL after the grace period; then SIGKILL to
        whatever is left in the group once the child has exited."""
        self._stop.set()
        task, self._task = self._task, None
        process = self._process
        if process is not None and process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                async with asyncio.timeout(self._grace):
                    await process.wait()
            except TimeoutError:
                logger.warning("launcher: the enclave ignored SIGTERM; killing it")
                _signal_group(process.pid, signal.SIGKILL)
                await process.wait()
        self._kill_leftovers()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _signal_group(pid: int, signum: signal.Signals) -> None:
    """Signal the process group the child leads (it was started in its own session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signum)


def _signal_orphaned_group(pgid: int, signum: signal.Signals) -> None:
    """Signal what is left of process group ``pgid`` after its leader was reaped.

    The kernel does not hand out a process id while a process group of that id has members
    (``struct pid`` stays referenced), so a live process whose pid is ``pgid`` means the group
    emptied and the id was reused: that group is someone else's and is left alone.
    """
    try:
        os.kill(pgid, 0)  # does a process have the old leader's id?
    except ProcessLookupError:  # no: the group is still ours, with members or empty (ESRCH)
        _signal_group(pgid, signum)
        return
    except PermissionError:  # yes, another user's
        pass
    logger.debug("launcher: process id %d was reused; its group is not ours any more", pgid)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has Linux send the child SIGTERM when this process dies (prctl(2)
    ``PR_SET_PDEATHSIG``; kept across ``execve`` of a non-setuid program), or None elsewhere.

    The signal follows the *thread* that forks: the event loop's (the main thread in ``nci
    parent run``). A parent that died before the child's prctl took effect is caught by
    comparing ``getppid()``; such a child exits at once. Only ctypes calls run in the child
    between fork and exec (the function is looked up beforehand).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:  # in the child, between fork and exec
        if prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(126)  # cannot be tied to the parent, or it is gone: do not run the enclave

    return preexec


# -- AWS Nitro ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NitroCli:
    """The ``nitro-cli`` commands for one enclave image (argv lists, never a shell)."""

    eif_path: Path
    cpu_count: int
    memory_mib: int
    cid: int
    enclave_name: str = "nci"
    binary: str = "nitro-cli"

    def __post_init__(self) -> None:
        if type(self.cpu_count) is not int or self.cpu_count < 1:
            raise ConfigError("launcher.aws.cpu_count must be a positive integer")
        if type(self.memory_mib) is not int or self.memory_mib < 64:
            raise ConfigError("launcher.aws.memory_mib must be an integer of at least 64")
        # CIDs 0-2 are reserved (hypervisor, local, host); 3 is the parent instance
        if type(self.cid) is not int or not 4 <= self.cid <= 0xFFFF_FFFE:
            raise ConfigError("launcher.aws.cid must be an integer in 4..4294967294")

    def run_argv(self) -> list[str]:
        return [
            self.binary, "run-enclave",
            "--eif-path", str(self.eif_path),
            "--cpu-count", str(self.cpu_count),
            "--memory", str(self.memory_mib),
            "--enclave-cid", str(self.cid),
            "--enclave-name", self.enclave_name,
        ]  # fmt: skip

    def describe_argv(self) -> list[str]:
        return [self.binary, "describe-enclaves"]

    def terminate_argv(self, enclave_id: str) -> list[str]:
        return [self.binary, "terminate-enclave", "--enclave-id", enclave_id]


Runner = Callable[[Sequence[str], float], Awaitable[str]]
"""Runs an argv with a deadline and returns its stdout; raises TransportError on failure."""


async def run_command(argv: Sequence[str], timeout: float) -> str:
    """Run ``argv`` (no shell) and return its stdout; a non-zero exit or the deadline is a
    :class:`TransportError` naming the command, not its output."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise TransportError(f"{argv[0]}: {exc.strerror or type(exc).__name__}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise TransportError(f"{' '.join(argv[:2])}: no answer within {timeout} s") from None
    if process.returncode != 0:
        logger.warning("%s failed: %s", " ".join(argv[:2]), err.decode(errors="replace")[-2000:])
        raise TransportError(f"{' '.join(argv[:2])} exited with status {process.returncode}")
    return out.decode(errors="replace")


class NitroLauncher:
    """Runs the enclave image with ``nitro-cli`` and restarts it when it stops (AWS mode)."""

    def __init__(
        self,
        cli: NitroCli,
        *,
        runner: Runner = run_command,
        poll_interval: float = 5.0,
        command_timeout: float = 120.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 300.0,
    ) -> None:
        check_timeout(poll_interval)
        check_timeout(command_timeout)
        self.cli = cli
        self._runner = runner
        self._poll_interval = float(poll_interval)
        self._command_timeout = float(command_timeout)
        self._backoff = _Backoff(backoff_initial, backoff_max, stable_after)
        self._task: asyncio.Task[None] | None = None
        self.enclave_id: str | None = None
        self.restarts = 0

    def describe(self) -> str:
        return f"nitro enclave {self.cli.eif_path} (CID {self.cli.cid})"

    async def start(self) -> None:
        if self._task is not None:
            raise ConfigError("the launcher is already started")
        await self._run()
        self._task = asyncio.create_task(self._watch(), name="nitro-launcher")

    async def _run(self) -> None:
        out = await self._runner(self.cli.run_argv(), self._command_timeout)
        try:
            info = json.loads(out)
            enclave_id = info["EnclaveID"]
        except (ValueError, KeyError, TypeError):
            raise TransportError("nitro-cli run-enclave: no EnclaveID in its answer") from None
        if not isinstance(enclave_id, str) or not enclave_id:
            raise TransportError("nitro-cli run-enclave: no EnclaveID in its answer")
        self.enclave_id = enclave_id
        logger.info("launcher: started enclave %s", enclave_id)

    async def running(self) -> bool:
        """Whether ``describe-enclaves`` lists our enclave as RUNNING."""
        out = await self._runner(self.cli.describe_argv(), self._command_timeout)
        try:
            enclaves = json.loads(out)
        except ValueError:
            raise TransportError("nitro-cli describe-enclaves: unreadable answer") from None
        if not isinstance(enclaves, list):
            raise TransportError("nitro-cli describe-enclaves: unreadable answer")
        return any(
            isinstance(e, dict)
            and e.get("EnclaveID") == self.enclave_id
            and e.get("State") == "RUNNING"
            for e in enclaves
        )

    async def _watch(self) -> None:
        delay: float | None = None
        started = time.monotonic()
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                if await self.running():
                    continue
            except TransportError as exc:
                logger.warning("launcher: %s", exc)
                continue
            delay = self._backoff.next(delay, time.monotonic() - started)
            logger.warning(
                "launcher: enclave %s stopped; restarting in %.1f s", self.enclave_id, delay
            )
            await asyncio.sleep(delay)
            try:
                await self._run()
            except TransportError as exc:
                logger.warning("launcher: %s", exc)
                continue
            started = time.monotonic()
            self.restarts += 1

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.enclave_id is not None:
            with contextlib.suppress(TransportError):
                await self._runner(self.cli.terminate_argv(self.enclave_id), self._command_timeout)
            self.enclave_id = None
