"""The fuzz loop behind ``python -m tests.fuzz``: seeds and probes (crafted worst cases) first,
then mutated seeds and random bytes, each input under a time limit, with a little feedback.

Per input: the target either returns (accepted), raises one of its allowed errors (a typed
refusal), or does something else, which is a finding: any other exception (``AssertionError``
from a property the target checks, ``MemoryError`` under the address-space limit), or more time
than the target's limit. A ``SIGALRM`` at the limit interrupts a case stuck in Python code; one
stuck in C code is reported when it returns (measured), and one that never returns is killed by
:func:`faulthandler.dump_traceback_later` after ten times the limit (at least 10 s), leaving its
input in ``current-<target>.bin`` in the crash folder (an 8-byte length, then the input).

Feedback, without coverage instrumentation: an input joins the corpus that later mutations start
from when it is accepted, or when it is refused for a reason not seen before (the error type and
its message with numbers and quoted values masked), so each new rule reached is a new start.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import math
import mmap
import random
import re
import resource
import signal
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Final

from tests.fuzz.mutate import mutate, random_bytes
from tests.fuzz.targets import Target

__all__ = ["CaseTimeout", "Finding", "Result", "limit_memory", "run_target", "table"]

ROOT: Final = Path(__file__).resolve().parent.parent.parent
MAX_CORPUS: Final = 1024
MAX_ENTRY: Final = 1 << 16  # longer inputs are not kept (the repeat mutation makes them anew)
RANDOM_SHARE: Final = 0.1  # the share of fresh random inputs after the seeds
HANG_FACTOR: Final = 10  # a case still running after this many time limits kills the process


class CaseTimeout(BaseException):
    """Raised by the alarm in a case that ran past its time limit."""


@dataclass(frozen=True)
class Finding:
    """One input that did something other than succeed or raise an allowed error."""

    target: str
    kind: str  # "exception" or "slow"
    detail: str  # the exception's type and message, or the time taken
    location: str  # the innermost frame of ours (file:line), and the innermost frame
    data: bytes
    saved: Path | None

    def describe(self) -> str:
        shown = self.data[:256].hex() + ("…" if len(self.data) > 256 else "")
        where = f"\n  saved:    {self.saved}" if self.saved else ""
        return (
            f"{self.target}: {self.kind}: {self.detail}\n  at:       {self.location}\n"
            f"  input:    {len(self.data)} bytes, hex {shown}{where}"
        )


@dataclass
class Result:
    name: str
    cases: int = 0
    typed: int = 0
    accepted: int = 0
    max_seconds: float = 0.0
    total_seconds: float = 0.0
    reasons: set[str] = field(default_factory=set)  # distinct refusals (values masked)
    new_accepted: set[bytes] = field(default_factory=set)  # SHA-256 of accepted non-seeds
    findings: list[Finding] = field(default_factory=list)
    rss_growth_mb: float = 0.0


_MASKS: Final = (
    (re.compile(r"'[^']*'|\"[^\"]*\""), "'…'"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "0x#"),
    (re.compile(r"\b[0-9a-fA-F]{8,}\b"), "H"),
    (re.compile(r"[0-9]+"), "#"),
)


def _reason(exc: BaseException) -> str:
    """The rule an error names, without the values that vary from input to input."""
    text = str(exc)
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return f"{type(exc).__name__}: {text[:100]}"


def _location(exc: BaseException) -> str:
    """The innermost frame of ours (file:line), and the innermost (the alarm's own left out)."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.endswith("tests/fuzz/runner.py")
    ]
    if not frames:
        return "?"
    ours = [
        f
        for f in frames
        if f.filename.startswith(str(ROOT))
        and "/.venv/" not in f.filename
        and "/tests/fuzz/" not in f.filename
    ]
    innermost = frames[-1]
    text = f"{Path(innermost.filename).name}:{innermost.lineno} ({innermost.name})"
    if ours and ours[-1] is not innermost:
        mine = ours[-1]
        text = f"{Path(mine.filename).relative_to(ROOT)}:{mine.lineno} ({mine.name}); in {text}"
    elif ours:
        text = f"{Path(innermost.filename).relative_to(ROOT)}:{innermost.lineno} ({innermost.name})"
    return text


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def limit_memory(headroom_mb: int) -> None:
    """Cap the address space at what the process maps now plus ``headroom_mb``: an allocation
    past it is a ``MemoryError`` (a finding) instead of a machine brought to its knees."""
    status = Path("/proc/self/status")
    if headroom_mb <= 0 or not status.exists():
        return
    match = re.search(r"VmSize:\s+(\d+) kB", status.read_text())
    if match is None:
        return
    limit = int(match.group(1)) * 1024 + headroom_mb * 1024 * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _on_alarm(_signum: int, _frame: FrameType | None) -> None:
    raise CaseTimeout


@contextlib.contextmanager
def _alarm(seconds: float | None) -> Iterator[None]:
    if seconds is None:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Recorder:
    """Keeps the case in progress in a memory-mapped file, for the hang killer to leave behind:
    ``current-<target>.bin`` holds an 8-byte big-endian length, then the input."""

    def __init__(self, crash_dir: Path | None, name: str, max_size: int) -> None:
        self._map: mmap.mmap | None = None
        if crash_dir is not None:
            crash_dir.mkdir(parents=True, exist_ok=True)
            self.path = crash_dir / f"current-{name}.bin"
            with self.path.open("wb+") as file:
                file.truncate(8 + max_size)
                self._map = mmap.mmap(file.fileno(), 8 + max_size)

    def record(self, data: bytes) -> None:
        if self._map is not None:
            self._map[:8] = len(data).to_bytes(8, "big")
            self._map[8 : 8 + len(data)] = data

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self.path.unlink(missing_ok=True)


class _HangKiller:
    """:func:`faulthandler.dump_traceback_later`, re-armed at most once a second (arming costs a
    thread): a case running longer than ``seconds`` kills the process with every traceback."""

    def __init__(self, seconds: float, enabled: bool) -> None:
        self._seconds = seconds
        self._enabled = enabled
        self._armed_at = -math.inf

    def arm(self) -> None:
        now = time.monotonic()
        if self._enabled and now - self._armed_at > 1.0:
            faulthandler.dump_traceback_later(self._seconds + 1.0, exit=True)
            self._armed_at = now

    def disarm(self) -> None:
        if self._enabled:
            faulthandler.cancel_dump_traceback_later()


def _save(crash_dir: Path | None, name: str, data: bytes) -> Path | None:
    if crash_dir is None:
        return None
    crash_dir.mkdir(parents=True, exist_ok=True)
    path = crash_dir / f"{name}-{hashlib.sha256(data).hexdigest()[:16]}.bin"
    path.write_bytes(data)
    return path


class _Corpus:
    """The inputs mutations start from: the seeds, then novel inputs of at most 64 KiB (at most
    :data:`MAX_CORPUS`; past it a novel input replaces a non-seed entry)."""

    def __init__(self, seeds: list[bytes], rng: random.Random) -> None:
        self.entries = list(seeds)
        self._seeds = len(seeds)
        self._known = set(seeds)
        self._rng = rng

    def add(self, data: bytes) -> None:
        if len(data) > MAX_ENTRY or data in self._known:
            return
        if len(self.entries) < MAX_CORPUS:
            self.entries.append(data)
        else:
            index = self._rng.randrange(self._seeds, len(self.entries))
            self._known.discard(self.entries[index])
            self.entries[index] = data
        self._known.add(data)


def run_target(
    name: str,
    target: Target,
    *,
    cases: int,
    seconds: float | None = None,
    rng: random.Random,
    time_limit: float | None = None,
    crash_dir: Path | None = None,
    alarm: bool = True,
    max_findings: int = 5,
    keep_accepted: Path | None = None,
) -> Result:
    """Run ``target`` on its seeds and probes, then on mutated corpus entries and random bytes,
    until ``cases`` inputs ran or ``seconds`` passed (the seeds and probes always run).

    ``keep_accepted``: a folder for the accepted inputs that are not seeds (a forgery of an
    authenticated format would be one)."""
    seeds = [bytes(s) for s in target.seeds()]
    probes = [bytes(p) for p in target.probes()]
    case = _Case(name, target, time_limit, alarm, crash_dir, keep_accepted, seeds, probes)
    corpus = _Corpus(seeds, rng)
    result = Result(name)
    rss_before = _rss_mb()
    started = time.monotonic()
    try:
        with _alarm(case.limit if alarm else None):
            fixed = seeds + probes
            for index in range(max(cases, len(fixed))):
                if index >= len(fixed) and (
                    index >= cases or (seconds and time.monotonic() - started > seconds)
                ):
                    break
                if index < len(fixed):
                    data = fixed[index]
                elif rng.random() < RANDOM_SHARE:
                    data = random_bytes(rng, max_size=target.max_size)
                else:
                    entries = corpus.entries
                    data = mutate(rng.choice(entries), rng, entries, max_size=target.max_size)
                case.run(data, corpus, result)
                if len(result.findings) >= max_findings:
                    break
    finally:
        case.close()
    result.rss_growth_mb = max(_rss_mb() - rss_before, 0.0)
    return result


class _Case:
    """Runs one input of one target and files its outcome."""

    def __init__(
        self,
        name: str,
        target: Target,
        time_limit: float | None,
        alarm: bool,
        crash_dir: Path | None,
        keep_accepted: Path | None,
        seeds: list[bytes],
        probes: list[bytes],
    ) -> None:
        self.name = name
        self.target = target
        self.allowed = target.allowed
        self.limit = target.time_limit if time_limit is None else time_limit
        self.alarm = alarm
        self.crash_dir = crash_dir
        self.keep_accepted = keep_accepted
        self.seeds = frozenset(seeds)
        longest = max((len(d) for d in (*seeds, *probes)), default=0)
        self.recorder = _Recorder(crash_dir, name, max(target.max_size, longest))
        self.killer = _HangKiller(max(HANG_FACTOR * self.limit, 10.0), alarm)

    def close(self) -> None:
        self.killer.disarm()
        self.recorder.close()

    def _finding(self, kind: str, detail: str, location: str, data: bytes) -> Finding:
        return Finding(
            self.name, kind, detail, location, data, _save(self.crash_dir, self.name, data)
        )

    def run(self, data: bytes, corpus: _Corpus, result: Result) -> None:
        self.recorder.record(data)
        self.killer.arm()
        if self.alarm:
            signal.setitimer(signal.ITIMER_REAL, self.limit)
        reason: str | None = None
        accepted = False
        start = time.perf_counter()
        try:
            self.target.function(data)
            accepted = True
        except CaseTimeout as exc:
            detail = f"interrupted after {self.limit} s"
            result.findings.append(self._finding("slow", detail, _location(exc), data))
        except self.allowed as exc:
            reason = _reason(exc)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            detail = f"{type(exc).__name__}: {str(exc)[:300]}"
            result.findings.append(self._finding("exception", detail, _location(exc), data))
        finally:
            if self.alarm:
                signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - start
        result.cases += 1
        result.total_seconds += elapsed
        result.max_seconds = max(result.max_seconds, elapsed)
        if elapsed > self.limit and (accepted or reason is not None):
            detail = f"{elapsed:.2f} s, over the {self.limit} s limit"
            result.findings.append(self._finding("slow", detail, "(returned)", data))
        if accepted:
            result.accepted += 1
            corpus.add(data)
            if data not in self.seeds:
                digest = hashlib.sha256(data).digest()
                if digest not in result.new_accepted and self.keep_accepted is not None:
                    _save(self.keep_accepted, self.name, data)
                result.new_accepted.add(digest)
        elif reason is not None:
            result.typed += 1
            if reason not in result.reasons:
                result.reasons.add(reason)
                corpus.add(data)


def table(results: list[Result]) -> str:
    """The results as a Markdown table (docs/fuzzing.md keeps one)."""
    lines = [
        "| target | cases | typed errors | accepted | new accepted | refusals | max ms/case "
        "| mean µs/case | RSS +MB | findings |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        mean = r.total_seconds / r.cases * 1e6 if r.cases else 0.0
        lines.append(
            f"| {r.name} | {r.cases} | {r.typed} | {r.accepted} | {len(r.new_accepted)} "
            f"| {len(r.reasons)} | {r.max_seconds * 1e3:.1f} | {mean:.0f} "
            f"| {r.rss_growth_mb:.0f} | {len(r.findings)} |"
        )
    return "\n".join(lines)
