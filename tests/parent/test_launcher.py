"""The enclave launcher: a supervised child locally, nitro-cli on AWS.

The local tests run stand-in children (``python -c …``): the real entry point,
``python -m enclave``, is exercised by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from parent.launcher import LocalLauncher, NitroCli, NitroLauncher, _Backoff, run_command
from protocol.errors import ConfigError, TransportError


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to a non-reaping init counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def wait_for(path: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} never appeared")
        await asyncio.sleep(0.02)
    return path.read_text()


def test_default_command_runs_the_enclave_module(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "enclave.json")
    assert launcher.command == [
        sys.executable, "-m", "enclave", "--config", str(tmp_path / "enclave.json"),
    ]  # fmt: skip


def test_verbose_runs_the_enclave_with_info_logs(tmp_path: Path) -> None:
    launcher = LocalLauncher(tmp_path / "enclave.json", verbose=True)
    assert launcher.command[3] == "-v"


def test_enclave_log_gets_every_runs_stderr_and_is_private(tmp_path: Path) -> None:
    log = tmp_path / "enclave.log"
    launcher = LocalLauncher(
        tmp_path / "unused.json",
        command=python("import sys; sys.stderr.write('run\\n'); sys.exit(1)"),
        backoff_initial=0.05,
        backoff_max=0.05,
        log=log,
    )

    async def run() -> None:
        await launcher.start()
        while launcher.restarts < 2:
            await asyncio.sleep(0.02)
        await launcher.stop()

    asyncio.run(run())
    assert log.read_text().count("run\n") >= 2  # appended, not truncated, across restarts
    assert log.stat().st_mode & 0o777 == 0o600


def test_restarts_a_dying_child_with_growing_backoff(tmp_path: Path) -> None:
    launcher = LocalLauncher(
        tmp_path / "unused.json",
        command=python("import sys; sys.exit(3)"),
        backoff_initial=0.05,
        backoff_max=0.2,
        stable_after=30,
    )

    async def run() -> tuple[int, list[int], float]:
        started = time.monotonic()
        await launcher.start()
        while launcher.restarts < 3:
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        await launcher.stop()
        return launcher.restarts, launcher.exit_codes, elapsed

    restarts, codes, elapsed = asyncio.run(run())
    assert restarts >= 3
    assert codes[:3] == [3, 3, 3]  # (the run that stop() ends exits on SIGTERM)
    assert elapsed >= 0.05 + 0.1 + 0.2  # the delays doubled (0.05, 0.1), up to the cap (0.2)


def test_backoff_resets_after_a_stable_run() -> None:
    backoff = _Backoff(initial=1, cap=8, stable_after=60)
    assert [backoff.next(d, 1) for d in (None, 1, 2, 4, 8)] == [1, 2, 4, 8, 8]
    assert backoff.next(8, 61) == 1


def test_stops_the_child_cleanly_with_sigterm(tmp_path: Path) -> None:
    launcher = LocalLauncher(
        tmp_path / "unused.json", command=python("import time; time.sleep(60)"), grace=5
    )

    async def run() -> tuple[int, list[int], float, int]:
        await launcher.start()
        pid = launcher.pid
        assert pid is not None
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await launcher.stop()
        await asyncio.sleep(0.1)
        return pid, launcher.exit_codes, time.monotonic() - started, launcher.restarts

    pid, codes, elapsed, restarts = asyncio.run(run())
    assert codes[-1] == -signal.SIGTERM
    assert elapsed < 2
    assert restarts == 0  # a stop is not a crash
    assert not alive(pid)


def test_kills_a_child_that_ignores_sigterm_after_the_grace_period(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"open({str(ready)!r}, 'w').write('1')\n"
        "time.sleep(60)\n"
    )
    launcher = LocalLauncher(tmp_path / "unused.json", command=python(code), grace=0.3)

    async def run() -> tuple[list[int], float]:
        await launcher.start()
        await wait_for(ready)
        started = time.monotonic()
        await launcher.stop()
        return launcher.exit_codes, time.monotonic() - started

    codes, elapsed = asyncio.run(run())
    assert codes[-1] == -signal.SIGKILL
    assert 0.25 < elapsed < 3


def test_stop_reaches_the_childs_own_children(tmp_path: Path) -> None:
    grandchild = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        f"open({str(grandchild)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    launcher = LocalLauncher(tmp_path / "unused.json", command=python(code), grace=5)

    async def run() -> int:
        await launcher.start()
        pid = int(await wait_for(grandchild))
        await launcher.stop()
        for _ in range(100):
            if not alive(pid):
                break
            await asyncio.sleep(0.02)
        return pid

    assert not alive(asyncio.run(run()))


GRANDCHILD = (  # a helper the enclave leaves behind; it ignores SIGTERM and logs its pid
    "import os, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    f.write(f'{os.getpid()}\\n')\n"
    "time.sleep(60)\n"
)


def leaving_a_grandchild(pids: Path, then: str) -> list[str]:
    """A stand-in enclave that starts :data:`GRANDCHILD`, waits for its pid in ``pids``, then
    runs ``then``."""
    code = (
        "import os, subprocess, sys, time\n"
        f"path = {str(pids)!r}\n"
        "def count():\n"
        "    return len(open(path).read().split()) if os.path.exists(path) else 0\n"
        "before = count()\n"
        f"subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}, path])\n"
        "while count() <= before:\n"
        "    time.sleep(0.01)\n"
        f"{then}\n"
    )
    return python(code)


def recorded(pids: Path) -> list[int]:
    return [int(pid) for pid in pids.read_text().split()] if pids.exists() else []


async def all_dead(pids: list[int], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def kill_survivors(pids: Path) -> None:
    for pid in recorded(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_orphaned_grandchildren_do_not_survive_restarts_or_stop(tmp_path: Path) -> None:
    """/tmp/review/launcher_orphans.py: an enclave that exits and leaves a helper behind (one
    that even ignores SIGTERM) must not leave it running across restarts or after stop()."""
    pids = tmp_path / "grandchildren"
    launcher = LocalLauncher(
        tmp_path / "unused.json",
        command=leaving_a_grandchild(pids, "sys.exit(3)"),
        backoff_initial=0.05,
        backoff_max=0.05,
        grace=1,
    )

    async def run() -> tuple[bool, bool, int]:
        await launcher.start()
        try:
            async with asyncio.timeout(20):
                while launcher.restarts < 3:
                    await asyncio.sleep(0.02)
            earlier = recorded(pids)[:2]  # runs 1 and 2: killed before runs 2 and 3 started
            restarted_clean = await all_dead(earlier)
        finally:
            await launcher.stop()
        return restarted_clean, await all_dead(recorded(pids)), len(recorded(pids))

    try:
        restarted_clean, stopped_clean, count = asyncio.run(run())
    finally:
        kill_survivors(pids)
    assert count >= 3
    assert restarted_clean  # was: every earlier run's helper still running
    assert stopped_clean


def test_stop_kills_a_grandchild_that_ignores_sigterm(tmp_path: Path) -> None:
    pids = tmp_path / "grandchildren"
    command = leaving_a_grandchild(pids, "time.sleep(60)")
    launcher = LocalLauncher(tmp_path / "unused.json", command=command, grace=5)

    async def run() -> tuple[list[int], float, bool]:
        await launcher.start()
        try:
            async with asyncio.timeout(10):
                while not recorded(pids):
                    await asyncio.sleep(0.02)
        finally:
            started = time.monotonic()
            await launcher.stop()  # the child exits on SIGTERM; its helper does not
        return launcher.exit_codes, time.monotonic() - started, await all_dead(recorded(pids))

    try:
        codes, elapsed, dead = asyncio.run(run())
    finally:
        kill_survivors(pids)
    assert codes == [-signal.SIGTERM]
    assert elapsed < 2  # no need to wait out the grace period for the helper
    assert dead


PARENT = """
import asyncio, sys
from pathlib import Path
from parent.launcher import LocalLauncher

async def main() -> None:
    code = "import os, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    command = [sys.executable, "-c", "import sys\\n" + code, sys.argv[1]]
    await LocalLauncher(Path("unused.json"), command=command).start()
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_crashed_parent_does_not_leave_the_enclave_running(tmp_path: Path) -> None:
    """``nci parent run`` killed with SIGKILL (or crashing) takes its local enclave along."""
    child_pid = tmp_path / "child.pid"
    root = Path(__file__).resolve().parents[2]
    with subprocess.Popen([sys.executable, "-c", PARENT, str(child_pid)], cwd=root) as parent:
        try:
            pid = int(asyncio.run(wait_for(child_pid)))
            assert alive(pid)
        finally:
            parent.kill()
            parent.wait(5)

    async def gone() -> bool:
        return await all_dead([pid])

    try:
        assert asyncio.run(gone())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_child_runs_in_its_own_process_group(tmp_path: Path) -> None:
    launcher = LocalLauncher(
        tmp_path / "unused.json", command=python("import time; time.sleep(60)")
    )

    async def run() -> tuple[int, int]:
        await launcher.start()
        try:
            pid = launcher.pid
            assert pid is not None
            return pid, os.getpgid(pid)
        finally:
            await launcher.stop()

    pid, group = asyncio.run(run())
    assert group == pid != os.getpgrp()


# -- AWS ---------------------------------------------------------------------------------------

CLI = NitroCli(Path("/opt/nci/enclave.eif"), cpu_count=2, memory_mib=4096, cid=16)


def test_nitro_cli_commands() -> None:
    assert CLI.run_argv() == [
        "nitro-cli", "run-enclave",
        "--eif-path", "/opt/nci/enclave.eif",
        "--cpu-count", "2",
        "--memory", "4096",
        "--enclave-cid", "16",
        "--enclave-name", "nci",
    ]  # fmt: skip
    assert "--debug-mode" not in CLI.run_argv()  # never: its PCRs are zeros
    assert CLI.describe_argv() == ["nitro-cli", "describe-enclaves"]
    assert CLI.terminate_argv("i-0abc-enc0123") == [
        "nitro-cli", "terminate-enclave", "--enclave-id", "i-0abc-enc0123",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "bad",
    [{"cpu_count": 0}, {"memory_mib": 16}, {"cid": 3}, {"cid": 2**32}, {"cpu_count": True}],
)
def test_nitro_cli_rejects_bad_settings(bad: dict[str, object]) -> None:
    settings: dict[str, object] = {"cpu_count": 2, "memory_mib": 4096, "cid": 16} | bad
    with pytest.raises(ConfigError):
        NitroCli(Path("/x.eif"), **settings)  # type: ignore[arg-type]


def test_nitro_launcher_restarts_a_stopped_enclave_and_terminates_it() -> None:
    calls: list[list[str]] = []
    describe_answers = [
        [{"EnclaveID": "enc-1", "State": "RUNNING"}],
        [],  # it stopped
        [{"EnclaveID": "enc-2", "State": "RUNNING"}],
    ]

    async def runner(argv: Sequence[str], timeout: float) -> str:
        calls.append(list(argv))
        if argv[1] == "run-enclave":
            runs = sum(1 for c in calls if c[1] == "run-enclave")
            return json.dumps({"EnclaveID": f"enc-{runs}", "EnclaveCID": 16})
        if argv[1] == "describe-enclaves":
            answer = describe_answers.pop(0) if describe_answers else []
            return json.dumps(answer)
        return "{}"

    launcher = NitroLauncher(
        CLI, runner=runner, poll_interval=0.01, backoff_initial=0.01, backoff_max=0.02
    )

    async def run() -> None:
        await launcher.start()
        while launcher.restarts < 1:
            await asyncio.sleep(0.01)
        await launcher.stop()

    asyncio.run(run())
    verbs = [c[1] for c in calls]
    assert verbs[:4] == ["run-enclave", "describe-enclaves", "describe-enclaves", "run-enclave"]
    assert calls[-1] == CLI.terminate_argv("enc-2")


def test_run_command_reports_failures_without_output() -> None:
    async def run() -> tuple[str, TransportError, TransportError]:
        out = await run_command(python("print('ok')"), 10)
        with pytest.raises(TransportError) as failed:
            await run_command(python("import sys; print('secret'); sys.exit(4)"), 10)
        with pytest.raises(TransportError) as slow:
            await run_command(python("import time; time.sleep(10)"), 0.2)
        return out, failed.value, slow.value

    out, failed, slow = asyncio.run(run())
    assert out == "ok\n"
    assert "status 4" in str(failed)
    assert "secret" not in str(failed)
    assert "within" in str(slow)


@pytest.mark.nitro
@pytest.mark.skipif(os.environ.get("NCI_NITRO") != "1", reason="needs nitro-cli (set NCI_NITRO=1)")
def test_runs_a_real_enclave_image() -> None:
    eif = Path(os.environ.get("NCI_EIF", "/opt/nci/enclave.eif"))
    launcher = NitroLauncher(NitroCli(eif, cpu_count=2, memory_mib=4096, cid=16))

    async def run() -> bool:
        await launcher.start()
        try:
            return await launcher.running()
        finally:
            await launcher.stop()

    assert asyncio.run(run())
