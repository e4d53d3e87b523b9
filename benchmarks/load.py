"""What does the confidential path cost under load, next to the same model without it?

``python -m benchmarks.load [--consumers N] [--seconds T] [--way a,b,c] [--runtime model|echo]
[--sweep] [--echo-delay S] [--max-requests M] [--state-dir DIR] [--json]``

``N`` concurrent consumers (asyncio tasks of this process) send requests back to back for ``T``
seconds per way, then finish what they started; the same workload goes three ways, in ``R``
rounds (``--rounds``, 2) of ``T / R`` seconds interleaved in alternating order (a b c, c b a), so
that load from elsewhere on the machine, and its drift, hit every way alike:

``a_direct``
    The runtime in this process (``load_runtime`` on the built-in model folder's tensors, or the
    echo runtime): generation in a pool of as many worker threads as the enclave's
    (``max_concurrency``), no sockets, no cryptography.
``b_plain_http``
    The same runtime behind plain HTTP on loopback (``benchmarks._plain``, its own process): JSON
    in and out, streamed answers as a chunked body, the enclave's worker pool and 429 policy.
``c_confidential``
    The whole system in real processes (:class:`nci.localsystem.LocalSystem`: bridge, parent,
    enclave): each request encrypted by :class:`consumer.AsyncClient` (one client shared by the
    consumers, so the enclave is attested once per key) to the attested key, through the parent.
    The local system puts a recording tap on the consumer → bridge and parent → enclave
    connections (two relays that a deployment does not have, on an event loop thread of this
    process); they are part of what is measured here.

The workload cycles through a fixed list of shapes questions with temperature 0 (greedy, so every
way must give the same answer to the same request; a different one counts as an error,
``wrong_answer``): half streamed, half not; with an image (a 32×32 PNG, or a 128×128 JPEG) and,
with the echo runtime, text alone (the built-in model takes exactly one image per request).

Figures per way: ``requests_per_s`` (answered requests over the wall time, drain included),
``latency_ms`` p50/p95/p99 (from the call to the complete, checked answer), ``ttft_ms``
p50/p95/p99 (to the first piece, streamed requests only), ``accepted`` (requests sent),
``answered``, ``errors`` by type (typed errors: the consumer's errors, HTTP statuses, the runtime's
refusals), and ``lost``: sent but neither answered nor failed with a typed error (a request still
unanswered after ``REQUEST_TIMEOUT``, or an unexpected exception). ``cpu_ms_per_request``: CPU
time (user and system) per answered request by process: ``this_process`` (the consumers; with way
a the runtime too, with way c the local system's taps too), ``plain_server``, ``parent``,
``enclave``. ``c_over_a_p50`` and ``c_over_b_p50`` compare the medians. ``errors``, ``accepted``,
``answered`` and ``lost`` at the top are totals over every phase of the run (echo and sweep too).

``echo``
    The path's own cost without the model's: ways b and c again on ``LocalSystem(runtime="echo")``
    (with ``--runtime echo``: the main figures), ``hop_ms_p50`` (c − b, medians), and
    ``crypto_us``: what encapsulating and decapsulating one request and its answer cost in-process
    (RFC 9458 OHTTP alone, and with the padding, Binary HTTP and CBOR framing around it), medians.
``sweep`` (``--sweep``)
    Throughput at 1, 4, 16 and 64 consumers, each way for ``T`` seconds per level (one round, the
    ways interleaved), with the median latency and the CPU time per request (a cost per request
    that grows with concurrency is a real fall; a flat one under a falling rate is the machine);
    the enclave's and the bridge's limits (``max_concurrency`` 64) admit 64, and any 429 is
    counted under ``errors``.

``goals`` lists the targets next to the figures (reported, not asserted): confidential p50 at
most 1.05 × plain HTTP with the built-in model; nothing lost; throughput not falling from 1 to 64
consumers (by more than 5 % below the best lower level). Everything runs on loopback and unix
sockets; on a small shared machine the load generator, the servers and the model share its cores,
so figures move between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

import aiohttp

from benchmarks._plain import MAX_CONCURRENCY, build_runtime
from consumer import AsyncClient
from consumer.errors import ConsumerError, ServerError
from enclave._echo import Runtime
from enclave.errors import EnclaveError
from protocol.inference import Image, MediaType, Params

if TYPE_CHECKING:
    from nci.localsystem import LocalSystem

__all__ = [
    "SWEEP",
    "WAYS",
    "Item",
    "crypto_cost",
    "main",
    "progress_to_stderr",
    "run",
    "workload",
]

WAYS: Final = {"a": "a_direct", "b": "b_plain_http", "c": "c_confidential"}
SWEEP: Final = (1, 4, 16, 64)
THREADS: Final = 1  # torch threads, in the enclave (LocalSystem's default) and the other ways
MAX_TOKENS: Final = 16  # the built-in model's answers are a word or two; the echo's ≤ 8 words
ITEMS: Final = 24  # distinct requests the consumers cycle through
REQUEST_TIMEOUT: Final = 60.0  # a request unanswered after this is lost
CLIENT_TIMEOUT: Final = 30.0  # the clients' own read deadline: a typed error before that
GOAL_C_OVER_B: Final = 1.05
GOAL_FALL: Final = 0.05
_ROOT: Final = Path(__file__).resolve().parent.parent


# -- the workload ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One request of the workload; ``index`` finds its expected answer."""

    index: int
    kind: str  # "text", "png" or "jpeg"
    prompt: str
    images: tuple[Image, ...]
    stream: bool

    @property
    def params(self) -> Params:
        return Params(max_tokens=MAX_TOKENS, temperature=0.0, stream=self.stream)


def workload(runtime: str, n: int = ITEMS, seed: int = 7) -> list[Item]:
    """``n`` shapes questions about fresh scenes, kinds and streaming mixed evenly (the built-in
    model takes exactly one image, so ``"text"`` requests are for the echo runtime only)."""
    import numpy as np
    from PIL import Image as PILImage

    from enclave.models import shapes

    kinds = ("text", "png", "jpeg") if runtime == "echo" else ("png", "jpeg")
    mix = list(itertools.product(kinds, (False, True)))
    items = []
    for i, sample in enumerate(shapes.sample_qa(seed, n, "heldout")):
        kind, stream = mix[i % len(mix)]
        array = (shapes.render(sample.scene).transpose(1, 2, 0) * 255).round().astype(np.uint8)
        picture = PILImage.fromarray(array)
        out = io.BytesIO()
        if kind == "jpeg":
            picture.resize((128, 128), PILImage.Resampling.NEAREST).save(out, "JPEG", quality=90)
        else:
            picture.save(out, "PNG")
        media_type: MediaType = "image/jpeg" if kind == "jpeg" else "image/png"
        images = () if kind == "text" else (Image(media_type, out.getvalue()),)
        items.append(Item(i, kind, sample.question, images, stream))
    return items


def expected_answers(runtime: Runtime, items: Sequence[Item]) -> list[str]:
    """What the runtime answers each item (greedy: the same in every way)."""
    return ["".join(runtime.generate(it.prompt, it.images, it.params)) for it in items]


# -- the three ways --------------------------------------------------------------------------


@dataclass
class _Answer:
    text: str
    first_piece: float | None  # time.perf_counter() of the first streamed piece


class _Incomplete(Exception):
    """An answer that ended without its end (plain HTTP)."""


class _HttpStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


class _Way(Protocol):
    name: str

    async def send(self, item: Item) -> _Answer: ...

    def processes(self) -> dict[str, list[int]]:
        """The other processes serving this way, by role (for their CPU time)."""
        ...

    def error_type(self, exc: BaseException) -> str | None:
        """The error's type when it is a typed error of this way, else ``None`` (lost)."""
        ...


def _generate(runtime: Runtime, item: Item) -> _Answer:
    generation = runtime.generate(item.prompt, item.images, item.params)
    first: float | None = None
    parts = []
    for piece in generation:
        if first is None:
            first = time.perf_counter()
        parts.append(piece)
    if generation.finish_reason is None:
        raise _Incomplete("the generation has no finish reason")
    return _Answer("".join(parts), first if item.stream else None)


class _Direct:
    name = WAYS["a"]

    def __init__(self, runtime: Runtime, pool: ThreadPoolExecutor) -> None:
        self._runtime = runtime
        self._pool = pool

    async def send(self, item: Item) -> _Answer:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _generate, self._runtime, item)

    def processes(self) -> dict[str, list[int]]:
        return {}

    def error_type(self, exc: BaseException) -> str | None:
        return type(exc).__name__ if isinstance(exc, EnclaveError | _Incomplete) else None


class _Plain:
    name = WAYS["b"]

    def __init__(self, url: str, pid: int) -> None:
        self._url = url
        self._pid = pid
        self._session: aiohttp.ClientSession | None = None

    def processes(self) -> dict[str, list[int]]:
        return {"plain_server": [self._pid]}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=CLIENT_TIMEOUT, sock_read=CLIENT_TIMEOUT
                )
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, item: Item) -> _Answer:
        body = {
            "prompt": item.prompt,
            "images": [
                {"media_type": im.media_type, "data": base64.b64encode(im.data).decode()}
                for im in item.images
            ],
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "stream": item.stream,
        }
        async with self._http().post(f"{self._url}/v1/generate", json=body) as response:
            if response.status != 200:
                raise _HttpStatus(response.status)
            if not item.stream:
                answer = await response.json()
                if answer.get("finish_reason") is None:
                    raise _Incomplete("no finish reason")
                return _Answer(str(answer["text"]), None)
            first: float | None = None
            parts: list[str] = []
            async for line in response.content:
                piece = json.loads(line)
                if "delta" not in piece:
                    return _Answer("".join(parts), first)
                if first is None:
                    first = time.perf_counter()
                parts.append(piece["delta"])
        raise _Incomplete("the stream ended without its end line")

    def error_type(self, exc: BaseException) -> str | None:
        if isinstance(exc, _HttpStatus):
            return f"HTTP {exc.status}"
        if isinstance(exc, aiohttp.ClientError | _Incomplete):
            return type(exc).__name__
        return None


class _Confidential:
    name = WAYS["c"]

    def __init__(self, client: AsyncClient, system: LocalSystem) -> None:
        self.client = client
        self._system = system

    def processes(self) -> dict[str, list[int]]:
        return {"parent": [self._system.parent_pid], "enclave": self._system.processes()}

    async def send(self, item: Item) -> _Answer:
        params = item.params
        if not item.stream:
            completion = await self.client.generate(
                item.prompt,
                images=item.images,
                max_tokens=params.max_tokens,
                temperature=params.temperature,
            )
            return _Answer(completion.text, None)
        stream = await self.client.generate(
            item.prompt,
            images=item.images,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            stream=True,
        )
        first: float | None = None
        parts = []
        async with stream:
            async for piece in stream:  # ends only after the final chunk authenticated
                if first is None:
                    first = time.perf_counter()
                parts.append(piece)
        return _Answer("".join(parts), first)

    def error_type(self, exc: BaseException) -> str | None:
        if isinstance(exc, ServerError):
            return f"{type(exc).__name__} {exc.status}"
        if isinstance(exc, ConsumerError):
            return type(exc).__name__
        return None


# -- one phase: N consumers for T seconds ----------------------------------------------------


def _cpu(processes: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds (user and system) so far: this process's (the consumers; with way a the
    runtime, with way c the local system's taps), and each role's processes' (from /proc)."""
    out = {"this_process": time.process_time()}
    ticks = os.sysconf("SC_CLK_TCK")
    for role, pids in processes.items():
        total = 0.0
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{pid}/stat", "rb") as handle:
                    stat = handle.read().decode(errors="replace")
                fields = stat.rsplit(")", 1)[-1].split()  # the name may hold spaces and ')'
                total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime (proc(5))
        out[role] = total
    return out


@dataclass
class _Tally:
    """What the rounds of one way at one level add up to."""

    consumers: int
    accepted: int = 0
    answered: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    cpu: Counter[str] = field(default_factory=Counter)

    def figures(self) -> dict[str, Any]:
        answered = self.answered
        return {
            "consumers": self.consumers,
            "elapsed_s": round(self.elapsed, 3),
            "requests_per_s": round(answered / self.elapsed, 2) if self.elapsed else 0.0,
            "latency_ms": _percentiles(self.latencies),
            "ttft_ms": _percentiles(self.ttfts),
            "cpu_ms_per_request": {
                role: round(seconds / answered * 1000, 3) if answered else None
                for role, seconds in self.cpu.items()
            },
            "accepted": self.accepted,
            "answered": answered,
            "errors": dict(sorted(self.errors.items())),
            "lost": sum(self.lost.values()),
            "lost_reasons": dict(sorted(self.lost.items())),
        }


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    if len(values) == 1:
        return {name: round(values[0] * 1000, 3) for name in ("p50", "p95", "p99")}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "p50": round(cuts[49] * 1000, 3),
        "p95": round(cuts[94] * 1000, 3),
        "p99": round(cuts[98] * 1000, 3),
    }


async def _round(
    way: _Way,
    items: Sequence[Item],
    expected: Sequence[str],
    tally: _Tally,
    *,
    seconds: float,
    max_requests: int,
    final: bool,
    progress: Callable[[str], None],
) -> None:
    """``tally.consumers`` tasks sending back to back for ``seconds`` (or until ``tally`` holds
    ``max_requests``), then finishing what they sent; added to ``tally``. ``final``: the last
    round of this way (its progress line is complete)."""
    consumers = tally.consumers
    processes = way.processes()
    cpu_before = _cpu(processes)
    start = time.perf_counter()
    deadline = start + seconds
    elapsed_before = tally.elapsed

    async def consumer(k: int) -> None:
        index = k * len(items) // consumers  # consumers start at different items
        while time.perf_counter() < deadline and tally.accepted < max_requests:
            item = items[index % len(items)]
            index += 1
            tally.accepted += 1
            sent = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    answer = await way.send(item)
            except Exception as exc:  # noqa: BLE001 - every failure is sorted: typed or lost
                kind = way.error_type(exc)
                if kind is not None:
                    tally.errors[kind] += 1
                elif isinstance(exc, TimeoutError):
                    tally.lost[f"unanswered after {REQUEST_TIMEOUT:.0f} s"] += 1
                else:
                    tally.lost[type(exc).__name__] += 1
                continue
            done = time.perf_counter()
            if answer.text != expected[item.index]:
                tally.errors["wrong_answer"] += 1
                continue
            tally.answered += 1
            tally.latencies.append(done - sent)
            if answer.first_piece is not None:
                tally.ttfts.append(answer.first_piece - sent)

    def line() -> str:
        elapsed = elapsed_before + min(time.perf_counter() - start, seconds)
        return (
            f"{way.name} × {consumers}: {elapsed:5.1f} s, {tally.answered} answered, "
            f"{sum(tally.errors.values())} errors, {sum(tally.lost.values())} lost"
        )

    async def report() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress("\r" + line())

    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(consumer(k) for k in range(consumers)))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    tally.elapsed += time.perf_counter() - start
    cpu_after = _cpu(processes)
    tally.cpu.update({role: cpu_after[role] - cpu_before[role] for role in cpu_before})
    progress("\r" + line() + ("\n" if final else ""))


# -- the servers -----------------------------------------------------------------------------


class _PlainProcess:
    """``python -m benchmarks._plain`` in its own process; its port from its first line."""

    def __init__(self, runtime: str, echo_delay: float) -> None:
        command = [sys.executable, "-m", "benchmarks._plain", "--runtime", runtime]
        command += ["--echo-delay", str(echo_delay), "--threads", str(THREADS)]
        command += ["--max-concurrency", str(MAX_CONCURRENCY)]
        # its standard error, in a file (a pipe could fill and block it); closed by close()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        self._process = subprocess.Popen(
            command,
            cwd=_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        self.url = f"http://127.0.0.1:{self._port(timeout=120)}"
        self.pid = self._process.pid

    def _port(self, timeout: float) -> int:
        found: list[bytes] = []
        stdout = self._process.stdout
        assert stdout is not None
        reader = threading.Thread(target=lambda: found.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        line = found[0].decode() if found else ""
        if not line.startswith("port "):
            self._process.kill()
            self._process.wait(10)
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-2000:]
            self.close()
            raise RuntimeError(f"the plain HTTP server did not start: {line!r}\n{tail}")
        return int(line.split()[1])

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        if self._process.stdout is not None:
            self._process.stdout.close()
        if not self._log.closed:
            self._log.close()


class _Setup:
    """The ways of one runtime, up: the in-process runtime (always: it gives the expected
    answers), the plain server for b, the local system for c."""

    def __init__(
        self,
        runner: asyncio.Runner,
        runtime: str,
        ways: Sequence[str],
        *,
        echo_delay: float,
        state_dir: Path | None,
        progress: Callable[[str], None],
    ) -> None:
        self.runtime = runtime
        self.items = workload(runtime)
        self._stack = contextlib.ExitStack()
        self.ways: dict[str, _Way] = {}
        self.attest_ms: float | None = None
        self.system: LocalSystem | None = None
        try:
            self._open(runner, runtime, ways, echo_delay, state_dir, progress)
        except BaseException:
            self._stack.close()
            raise

    def _open(
        self,
        runner: asyncio.Runner,
        runtime: str,
        ways: Sequence[str],
        echo_delay: float,
        state_dir: Path | None,
        progress: Callable[[str], None],
    ) -> None:
        progress(f"load: {runtime} runtime in process\n")
        local = build_runtime(runtime, echo_delay=echo_delay, threads=THREADS)
        self.expected = expected_answers(local, self.items)
        if "a" in ways:
            pool = ThreadPoolExecutor(MAX_CONCURRENCY, thread_name_prefix="load-direct")
            self._stack.callback(pool.shutdown, cancel_futures=True)
            self.ways["a"] = _Direct(local, pool)
        if "b" in ways:
            progress(f"load: plain HTTP server ({runtime})\n")
            plain = _PlainProcess(runtime, echo_delay)
            self._stack.callback(plain.close)
            way = _Plain(plain.url, plain.pid)
            self._stack.callback(lambda: runner.run(way.aclose()))
            self.ways["b"] = way
        if "c" in ways:
            from attestation.emulator import default_state_dir
            from nci.localsystem import LocalSystem

            progress(f"load: local system ({runtime}), booting\n")
            system = LocalSystem(
                (state_dir or default_state_dir()).resolve(),
                max_concurrency=MAX_CONCURRENCY,  # the enclave's cap; the bridge's limit too
                threads=THREADS,
                verbose=False,
                runtime=runtime,
                echo_delay=echo_delay,
            )
            self._stack.enter_context(system)
            self.system = system
            client = AsyncClient(
                system.bridge_url,
                expect=system.expect_path,
                trust_local_root=system.root_pem_path,
                timeout=CLIENT_TIMEOUT,
            )
            self._stack.callback(lambda: runner.run(client.aclose()))
            started = time.perf_counter()
            runner.run(client.attest())
            self.attest_ms = round((time.perf_counter() - started) * 1000, 3)
            self.ways["c"] = _Confidential(client, system)

    def warm_up(self, runner: asyncio.Runner) -> None:
        """A few requests each way, not counted (connections, caches, the first model call)."""

        async def go() -> None:
            for way in self.ways.values():
                for item in self.items[:4]:
                    await way.send(item)

        runner.run(go())

    def clear_taps(self, runner: asyncio.Runner) -> None:
        """Drop what the local system's taps captured so far (they cap what they keep)."""
        system = self.system
        if system is None:
            return

        async def clear() -> None:
            for tap in system.taps.values():
                tap.captured.clear()

        system.run(clear())

    def close(self) -> None:
        self._stack.close()


# -- in-process cryptography -----------------------------------------------------------------


def crypto_cost(items: Sequence[Item], rounds: int = 300) -> dict[str, Any]:
    """Per request, in this process (µs, medians over ``rounds``): encapsulating the request,
    decapsulating it, encapsulating the answer, decapsulating it (RFC 9458), for a plain and a
    chunked exchange of an image request; ``with_framing`` adds the padding, Binary HTTP and CBOR
    each side builds or parses around it. ``chunk_us``: sealing and opening one streamed piece."""
    from consumer._core import MAX_PADDED_REQUEST
    from protocol.bhttp import pad
    from protocol.inference import (
        InferenceRequest,
        InferenceResponse,
        StreamDelta,
        Usage,
        encode_stream_piece,
        http_request,
        http_response,
        parse_http_request,
        parse_http_response,
    )
    from protocol.ohttp import (
        chunked_request_reader,
        decapsulate_request,
        encapsulate_chunked_request,
        encapsulate_request,
        generate_key_config,
    )

    item = next(it for it in items if it.images)
    private_key, key_config = generate_key_config(1)
    answer = InferenceResponse(text="red", finish_reason="stop", usage=Usage(20, 2))
    piece = encode_stream_piece(StreamDelta("red "))
    times: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def clock(name: str) -> Iterator[None]:
        started = time.perf_counter()
        yield
        times.setdefault(name, []).append(time.perf_counter() - started)

    for _ in range(rounds):
        # plain: consumer → enclave → consumer
        with clock("frame_request"):
            request = InferenceRequest(item.prompt, item.images, Params(MAX_TOKENS, 0.0))
            message = pad(http_request(request), limit=MAX_PADDED_REQUEST)
        with clock("encapsulate_request"):
            body, client = encapsulate_request(key_config, message)
        with clock("decapsulate_request"):
            plaintext, server = decapsulate_request(private_key, key_config, body)
        with clock("parse_request"):
            parse_http_request(plaintext)
        with clock("frame_response"):
            response = http_response(answer)
        with clock("encapsulate_response"):
            sealed = server.encapsulate_response(response)
        with clock("decapsulate_response"):
            opened = client.decapsulate_response(sealed)
        with clock("parse_response"):
            parse_http_response(opened)
        # chunked: the whole request in its final chunk, then one sealed chunk per piece
        with clock("chunked_request"):
            writer, chunked_client = encapsulate_chunked_request(key_config)
            chunked_body = writer.final(message)
            reader = chunked_request_reader(private_key, key_config)
            reader.feed(chunked_body)
            reader.close()
        chunks = reader.context.chunked_response()
        pieces = chunked_client.chunked_response_reader()
        with clock("chunk"):
            pieces.feed(chunks.chunk(piece))

    def us(*names: str) -> float:
        return round(sum(statistics.median(times[n]) for n in names) * 1e6, 2)

    ohttp = ("encapsulate_request", "decapsulate_request")
    ohttp_response = ("encapsulate_response", "decapsulate_response")
    framing = ("frame_request", "parse_request", "frame_response", "parse_response")
    return {
        "request_bytes": len(body),
        "encapsulate_request_us": us("encapsulate_request"),
        "decapsulate_request_us": us("decapsulate_request"),
        "encapsulate_response_us": us("encapsulate_response"),
        "decapsulate_response_us": us("decapsulate_response"),
        "ohttp_us": us(*ohttp, *ohttp_response),
        "with_framing_us": us(*ohttp, *ohttp_response, *framing),
        "chunked_request_us": us("chunked_request"),
        "chunk_us": us("chunk"),
    }


# -- the run ---------------------------------------------------------------------------------


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _p50(way: dict[str, Any] | None) -> float | None:
    return None if way is None else way["latency_ms"]["p50"]


def _phases(
    runner: asyncio.Runner,
    setup: _Setup,
    levels: Sequence[int],
    *,
    seconds: float,
    rounds: int,
    max_requests: int,
    progress: Callable[[str], None],
) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Each level: every way of ``setup`` for ``seconds``, in ``rounds`` rounds interleaved in
    alternating order (a b c, c b a, …) so that load from elsewhere on the machine, and its drift,
    hit every way alike."""
    for level in levels:
        tallies = {key: _Tally(level) for key in setup.ways}
        for r in range(rounds):
            order = list(setup.ways.items())
            for key, way in order if r % 2 == 0 else order[::-1]:
                setup.clear_taps(runner)
                runner.run(
                    _round(
                        way,
                        setup.items,
                        setup.expected,
                        tallies[key],
                        seconds=seconds / rounds,
                        max_requests=max_requests,
                        final=r == rounds - 1,
                        progress=progress,
                    )
                )
        for key, tally in tallies.items():
            yield level, WAYS[key], tally.figures()


def _sweep_summary(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per way: throughput by level and its worst fall below the best lower level."""
    out: dict[str, Any] = {}
    for way, levels in table.items():
        rates = [levels[str(level)]["requests_per_s"] for level in SWEEP if str(level) in levels]
        fall = 0.0
        for i in range(1, len(rates)):
            best = max(rates[:i])
            if best > 0:
                fall = max(fall, 1 - rates[i] / best)
        out[way] = {
            "levels": levels,
            "throughput_64_over_1": _ratio(rates[-1], rates[0]) if rates else None,
            "worst_fall": round(fall, 3),
        }
    return out


def run(
    *,
    consumers: int = 4,
    seconds: float = 5.0,
    rounds: int = 2,
    ways: Sequence[str] = ("a", "b", "c"),
    runtime: str = "model",
    sweep: bool = False,
    echo_delay: float = 0.0,
    max_requests: int = 100_000,
    state_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every figure of the module docstring, as one JSON-ready dict."""
    if not 1 <= consumers <= MAX_CONCURRENCY:
        raise ValueError(f"consumers must be in 1..{MAX_CONCURRENCY}")
    if not 0 < seconds <= 3600 or max_requests < 1 or not 1 <= rounds <= 100:
        raise ValueError("seconds must be in (0, 3600], rounds in 1..100, max_requests >= 1")
    if runtime not in ("model", "echo"):
        raise ValueError("runtime must be model or echo")
    ways = [w for w in WAYS if w in ways]
    if not ways:
        raise ValueError("ways: one or more of a, b, c")
    say = progress or (lambda text: None)
    result: dict[str, Any] = {
        "runtime": runtime,
        "consumers": consumers,
        "seconds": seconds,
        "rounds": rounds,
        "max_concurrency": MAX_CONCURRENCY,
        "threads": THREADS,
    }
    totals: dict[str, Any] = {"accepted": 0, "answered": 0, "lost": 0, "errors": Counter()}

    def count(figures: dict[str, Any]) -> dict[str, Any]:
        for name in ("accepted", "answered", "lost"):
            totals[name] += figures[name]
        totals["errors"].update(figures["errors"])
        return figures

    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        setup = _Setup(
            runner, runtime, ways, echo_delay=echo_delay, state_dir=state_dir, progress=say
        )
        try:
            result["workload"] = {
                "items": len(setup.items),
                "kinds": sorted({it.kind for it in setup.items}),
                "streamed": sum(it.stream for it in setup.items) / len(setup.items),
                "max_tokens": MAX_TOKENS,
                "temperature": 0.0,
            }
            result["attest_ms"] = setup.attest_ms
            setup.warm_up(runner)
            main = {
                name: count(figures)
                for _, name, figures in _phases(
                    runner,
                    setup,
                    [consumers],
                    seconds=seconds,
                    rounds=rounds,
                    max_requests=max_requests,
                    progress=say,
                )
            }
            result["ways"] = main
            result["c_over_a_p50"] = _ratio(_p50(main.get(WAYS["c"])), _p50(main.get(WAYS["a"])))
            result["c_over_b_p50"] = _ratio(_p50(main.get(WAYS["c"])), _p50(main.get(WAYS["b"])))
            if sweep:
                table: dict[str, dict[str, Any]] = {WAYS[w]: {} for w in ways}
                for level, name, figures in _phases(
                    runner,
                    setup,
                    SWEEP,
                    seconds=seconds,
                    rounds=1,  # the levels interleave the ways already
                    max_requests=max_requests,
                    progress=say,
                ):
                    count(figures)
                    table[name][str(level)] = {
                        "requests_per_s": figures["requests_per_s"],
                        "latency_p50_ms": figures["latency_ms"]["p50"],
                        "cpu_ms_per_request": figures["cpu_ms_per_request"],
                        "errors": figures["errors"],
                        "lost": figures["lost"],
                    }
                result["sweep"] = _sweep_summary(table)
        finally:
            setup.close()

        # the path's own cost: b and c again with the echo runtime (or the main figures)
        echo_ways = {name: main[name] for name in (WAYS["b"], WAYS["c"]) if name in main}
        if runtime == "model" and ("b" in ways or "c" in ways):
            setup = _Setup(
                runner,
                "echo",
                [w for w in ways if w in ("b", "c")],
                echo_delay=0.0,
                state_dir=state_dir,
                progress=say,
            )
            try:
                setup.warm_up(runner)
                echo_ways = {
                    name: count(figures)
                    for _, name, figures in _phases(
                        runner,
                        setup,
                        [consumers],
                        seconds=seconds,
                        rounds=rounds,
                        max_requests=max_requests,
                        progress=say,
                    )
                }
            finally:
                setup.close()
    echo_c, echo_b = _p50(echo_ways.get(WAYS["c"])), _p50(echo_ways.get(WAYS["b"]))
    say("load: in-process cryptography\n")
    result["echo"] = {
        "ways": echo_ways,
        "c_requests_per_s": echo_ways[WAYS["c"]]["requests_per_s"] if echo_c is not None else None,
        "hop_ms_p50": None if echo_c is None or echo_b is None else round(echo_c - echo_b, 3),
        "crypto_us": crypto_cost(workload("echo")),
    }
    result["errors"] = dict(sorted(totals["errors"].items()))
    result["accepted"] = totals["accepted"]
    result["answered"] = totals["answered"]
    result["lost"] = totals["lost"]
    result["goals"] = _goals(result)
    return result


def _goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets next to the figures; ``met`` is ``None`` where the run cannot tell."""
    c_over_b = result["c_over_b_p50"]
    goals = [
        {
            "goal": f"confidential p50 <= {GOAL_C_OVER_B} x plain HTTP (built-in model)",
            "value": c_over_b,
            "met": None
            if c_over_b is None or result["runtime"] != "model"
            else c_over_b <= GOAL_C_OVER_B,
        },
        {"goal": "zero lost requests", "value": result["lost"], "met": result["lost"] == 0},
    ]
    for way, figures in result.get("sweep", {}).items():
        goals.append(
            {
                "goal": f"{way}: throughput not falling from 1 to 64 consumers "
                f"(no level > {GOAL_FALL:.0%} below the best lower one)",
                "value": figures["worst_fall"],
                "met": figures["worst_fall"] <= GOAL_FALL,
            }
        )
    return goals


# -- the command -----------------------------------------------------------------------------


def _print_text(result: dict[str, Any], out: IO[str]) -> None:
    print(
        f"runtime {result['runtime']}, {result['consumers']} consumers x {result['seconds']:g} s "
        f"per way (max_concurrency {result['max_concurrency']}, {result['threads']} thread)",
        file=out,
    )
    header = f"  {'way':<16} {'req/s':>8} {'p50':>8} {'p95':>8} {'p99':>8} {'ttft50':>8}"
    header += f" {'ttft95':>8} {'answered':>9} {'errors':>7} {'lost':>5}   (ms)"

    def table(ways: dict[str, Any]) -> None:
        print(header, file=out)
        for name, f in ways.items():
            lat, ttft = f["latency_ms"], f["ttft_ms"]
            cells = [lat["p50"], lat["p95"], lat["p99"], ttft["p50"], ttft["p95"]]
            shown = " ".join(f"{'-' if c is None else f'{c:.2f}':>8}" for c in cells)
            print(
                f"  {name:<16} {f['requests_per_s']:>8.1f} {shown} {f['answered']:>9} "
                f"{sum(f['errors'].values()):>7} {f['lost']:>5}",
                file=out,
            )
            cpu = ", ".join(f"{role} {ms}" for role, ms in f["cpu_ms_per_request"].items())
            print(f"  {'':<16} CPU ms per request: {cpu}", file=out)

    table(result["ways"])
    print(f"  c/a p50 {result['c_over_a_p50']}   c/b p50 {result['c_over_b_p50']}", file=out)
    echo = result["echo"]
    print("echo runtime (the path's own cost):", file=out)
    table(echo["ways"])
    print(f"  hop (c - b) p50 ms {echo['hop_ms_p50']}", file=out)
    for key, value in echo["crypto_us"].items():
        print(f"  {key:<32} {value}", file=out)
    if "sweep" in result:
        print("sweep (requests/s by consumers):", file=out)
        for way, figures in result["sweep"].items():
            rates = "  ".join(
                f"{level}: {row['requests_per_s']:.1f}" for level, row in figures["levels"].items()
            )
            print(f"  {way:<16} {rates}   64/1 {figures['throughput_64_over_1']}", file=out)
    print(f"errors {result['errors']}   accepted {result['accepted']}", file=out)
    print(f"answered {result['answered']}   lost {result['lost']}", file=out)
    print("goals (reported, not asserted):", file=out)
    for goal in result["goals"]:
        met = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        print(f"  {goal['goal']}: {goal['value']} ({met})", file=out)


def progress_to_stderr(text: str) -> None:
    """The progress line: rewritten in place on a terminal, else only its final state."""
    tty = sys.stderr.isatty()
    if tty or not text.startswith("\r") or text.endswith("\n"):
        sys.stderr.write(text if tty else text.lstrip("\r"))
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--consumers", type=int, default=4, help="concurrent consumers (4)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per way and level (5)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per way (2)")
    parser.add_argument("--way", default="a,b,c", help="which ways: a, b, c (a,b,c)")
    parser.add_argument("--runtime", choices=("model", "echo"), default="model")
    parser.add_argument("--echo-delay", type=float, default=0.0, help="seconds per echoed piece")
    parser.add_argument("--max-requests", type=int, default=100_000, help="per way and level")
    parser.add_argument("--sweep", action="store_true", help="also 1, 4, 16, 64 consumers")
    parser.add_argument("--state-dir", type=Path, default=None, help="$NCI_STATE_DIR or ./.nci")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    ways = [w.strip() for w in args.way.split(",") if w.strip()]
    if not ways or any(w not in WAYS for w in ways):
        parser.error("--way takes a comma-separated list of a, b, c")
    result = run(
        consumers=args.consumers,
        seconds=args.seconds,
        rounds=args.rounds,
        ways=ways,
        runtime=args.runtime,
        sweep=args.sweep,
        echo_delay=args.echo_delay,
        max_requests=args.max_requests,
        state_dir=args.state_dir,
        progress=progress_to_stderr,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_text(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
