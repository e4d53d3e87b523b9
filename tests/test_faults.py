"""Faults the system survives (issue 7), across real processes: the local KMS and S3, ``nci parent
run``, and the enclave, started by this process's launcher (``LocalSystem(launcher=False)``: the
parent's own launcher class, run outside the parent so that the parent can be restarted under a
living enclave). The enclave serves the echo runtime (``ECHO_DELAY`` seconds per word), so a
stream lasts as long as a test needs it to.

Each test is named after its fault. One system serves the module (about 15 s to bring up); the
tests that crash the parent come after those that need it steady, and the one that kills the
enclave comes last. docs/reliability.md's table says what happens in each case.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

import pytest

from consumer import Client
from consumer.client import build_request
from consumer.errors import (
    ConsumerError,
    ResponseInvalid,
    ServerBusy,
    ServerUnavailable,
    TransportError,
)
from nci import localsystem
from nci.localsystem import TAP_BRIDGE, TAP_BUNDLES, TAP_KMS, LocalSystem
from protocol.inference import http_request
from protocol.ohttp import encapsulate_request
from tests.enclave.test_faults_boot import CuttingRelay, FlakyKms

pytestmark = pytest.mark.slow

ECHO_DELAY = 0.05  # seconds per echoed word
LIMIT = 4  # inference requests at once, in the bridge and in the enclave
UPLOADS = 2 * LIMIT  # request bodies being received at once (the bridge's default)
READ_TIMEOUT = 1.0  # the bridge's deadline on each read from a consumer (headers: from the start)
BODY_TIMEOUT = 1.5  # the bridge's deadline on a whole request body
MAX_BODY = 16 * 1024 * 1024
MIB = 1024 * 1024
INFER = b"POST /v1/infer HTTP/1.1\r\nHost: nci\r\n"
OHTTP = b"Content-Type: message/ohttp-req\r\n"

_T = TypeVar("_T")


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    running = LocalSystem(
        tmp_path_factory.mktemp("faults-state"),
        boot_timeout=120,
        max_concurrency=LIMIT,
        runtime="echo",
        echo_delay=ECHO_DELAY,
        launcher=False,
        limits={"client_read_timeout": READ_TIMEOUT, "body_timeout": BODY_TIMEOUT, "linger": 0.2},
    )
    with running:
        yield running
    assert running.leftovers == [], "processes outlived the system"


# -- helpers --------------------------------------------------------------------------------------


def consumer(system: LocalSystem) -> Client:
    return Client(
        system.bridge_url,
        expect=system.expect_path,
        trust_local_root=system.root_pem_path,
        timeout=10,
    )


def words(count: int, tag: str) -> str:
    """A prompt the echo runtime answers word by word: ``count × ECHO_DELAY`` seconds."""
    return " ".join(f"{tag}{i}" for i in range(count))


def until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def active(system: LocalSystem) -> int:
    """Inference requests the enclave is working on (health ``active``; -1: no answer)."""
    return int(system.health().get("active", -1))


def gauge(system: LocalSystem, name: str) -> float:
    with urllib.request.urlopen(f"{system.bridge_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    return float(text.split(f"\n{name} ")[1].split()[0])


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (the peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def exchange(
    system: LocalSystem,
    data: bytes,
    *,
    unix: bool = False,
    trickle: bytes = b"",
    every: float = 0.2,
    timeout: float = 10.0,
) -> tuple[bytes, float]:
    """Send ``data`` on a new connection to the bridge (through the consumer's tap, or with
    ``unix`` straight to the parent's socket), then ``trickle`` one byte every ``every`` seconds
    until the bridge answers or closes. Returns the answer's status line (``b""``: closed without
    one) and the seconds it took; fails the test if the bridge neither answers nor closes within
    ``timeout`` seconds."""
    if unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: Any = str(system.bridge_address.path)
    else:
        sock = socket.socket()
        address = ("127.0.0.1", system.taps[TAP_BRIDGE].listen.port)
    started = time.monotonic()
    with sock:
        sock.settimeout(timeout)
        sock.connect(address)
        with contextlib.suppress(OSError):  # the bridge may close before taking it all
            sock.sendall(data)
            for byte in trickle:
                sock.settimeout(every)
                try:
                    sock.recv(1, socket.MSG_PEEK)
                    break  # an answer, or the end of the connection
                except TimeoutError:
                    sock.sendall(bytes([byte]))
        sock.settimeout(timeout)
        answer = b""
        try:
            while b"\r\n" not in answer:
                piece = sock.recv(4096)
                if not piece:
                    break
                answer += piece
        except TimeoutError:
            raise AssertionError(f"neither an answer nor a close in {timeout} s: a hang") from None
        except OSError:
            pass  # reset: closed without (the rest of) an answer
    return answer.split(b"\r\n", 1)[0] if b"\r\n" in answer else b"", time.monotonic() - started


def oversized_chunked(system: LocalSystem) -> tuple[bytes, float]:
    """A chunked body past the cap (17 MiB sent), straight to the parent's socket (the consumer's
    tap would keep a copy)."""
    piece = b"100000\r\n" + b"y" * MIB + b"\r\n"
    head = INFER + OHTTP + b"Transfer-Encoding: chunked\r\n\r\n"
    return exchange(system, head + piece * 17, unix=True)


def code_of(status_line: bytes) -> str:
    """``"413"`` of ``HTTP/1.1 413 Request Entity Too Large``; ``"closed"`` for no answer."""
    parts = status_line.split(b" ", 2)
    return parts[1].decode(errors="replace") if len(parts) > 1 else "closed"


def garbage_for(system: LocalSystem) -> bytes:
    """Not an encapsulated request, though it names the enclave's current key id (another id
    would be answered 422)."""
    return bytes([int(system.health()["key_id"])]) + b"\xff" * 599


def is_truncation_of(text: str, whole: str) -> bool:
    return whole.startswith(text) and text != whole


def run_all(calls: list[Callable[[], _T]], *, workers: int, timeout: float) -> list[_T]:
    """Run every call in a pool; each must finish within ``timeout`` seconds (never a hang)."""
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(call) for call in calls]
        _, pending = wait(futures, timeout=timeout)
        assert not pending, f"{len(pending)} of {len(futures)} calls still running: a hang"
        return [future.result() for future in futures]


def require_same_measurements(system: LocalSystem) -> None:
    if localsystem.fresh_measurements() != system.measurements:  # a shared checkout being edited
        pytest.skip("the enclave's code changed since the key was made: a new enclave gets no key")


@contextlib.contextmanager
def instead_of_tap(
    system: LocalSystem, name: str, relay: FlakyKms | CuttingRelay
) -> Iterator[None]:
    """``relay`` listens where the tap ``name`` did (the enclave's side), for the duration."""
    tap = system.taps[name]
    system.run(tap.close())
    system.run(relay.start(tap.listen))
    try:
        yield
    finally:
        system.run(relay.close())
        system.run(tap.start())


# -- 7. concurrency over the limit ---------------------------------------------------------------


def test_concurrency_over_the_limit_gets_429_with_retry_after_not_a_queue(
    system: LocalSystem,
) -> None:
    held = words(40, "held")  # 2 s each
    with consumer(system) as client:
        client.attest()
        streams = [client.generate(held, stream=True, max_tokens=64) for _ in range(LIMIT)]
        assert until(lambda: active(system) == LIMIT)
        refused: list[tuple[int, float | None, float]] = []
        for _ in range(6):
            started = time.monotonic()
            with pytest.raises(ServerBusy) as caught:
                client.generate("one more", max_tokens=4)
            refused.append(
                (caught.value.status, caught.value.retry_after, time.monotonic() - started)
            )
        busy_while_held = active(system)
        answers = run_all([s.completion for s in streams], workers=LIMIT, timeout=30)
    assert busy_while_held == LIMIT  # the refused requests never reached the enclave
    assert [(status, retry) for status, retry, _ in refused] == [(429, 1.0)] * 6
    assert max(elapsed for _, _, elapsed in refused) < 1.5  # answered at once, not queued
    assert [a.text for a in answers] == [held] * LIMIT  # the held ones were not disturbed
    assert until(lambda: active(system) == 0)


# -- 6. a flood of oversized or malformed bodies --------------------------------------------------


def test_flood_of_oversized_and_malformed_bodies_is_refused_quickly_within_memory_bounds(
    system: LocalSystem,
) -> None:
    garbage = garbage_for(system)
    quick: dict[str, tuple[bytes, str]] = {
        "declared oversized": (
            INFER + OHTTP + b"Content-Length: 104857600\r\n\r\n" + b"x" * 1024,
            "413",
        ),
        "wrong media type": (
            INFER + b"Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
            "415",
        ),
        "not an encapsulated request": (
            INFER + OHTTP + f"Content-Length: {len(garbage)}\r\n\r\n".encode() + garbage,
            "400",
        ),
        "empty body": (INFER + OHTTP + b"Content-Length: 0\r\n\r\n", "400"),
        "negative length": (INFER + OHTTP + b"Content-Length: -1\r\n\r\n", "400"),
        "bad chunk size": (INFER + OHTTP + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "400"),
        "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", "400"),
    }
    parent = system.parent_pid
    resident_before = memory_kib(parent, "VmRSS")
    flood = [lambda case=case: (case, *exchange(system, quick[case][0])) for case in quick] * 4
    flood += [lambda: ("chunked oversized", *oversized_chunked(system))] * 3
    served: list[str] = []

    def normal_requests() -> None:
        with consumer(system) as client:
            for i in range(6):
                served.append(client.generate(words(3, f"n{i}-"), max_tokens=8).text)

    normal = threading.Thread(target=normal_requests)
    normal.start()
    answers = run_all(flood, workers=6, timeout=60)
    normal.join(30)
    peak_growth = memory_kib(parent, "VmHWM") - resident_before
    resident_growth = memory_kib(parent, "VmRSS") - resident_before

    for case, status, elapsed in answers:
        if case == "chunked oversized":
            assert code_of(status) == "413", (case, status)
        else:
            assert code_of(status) == quick[case][1], (case, status)
            assert elapsed < 2.0, (case, elapsed)
    assert served == [words(3, f"n{i}-") for i in range(6)]  # normal requests went on
    # the bridge holds at most (uploads + inference slots) bodies of at most 16 MiB each
    assert peak_growth < (UPLOADS + LIMIT) * MAX_BODY // 1024
    assert resident_growth < 64 * 1024, f"{resident_growth} KiB still held after the flood"
    assert gauge(system, "nci_bridge_uploads_in_flight") == 0
    assert until(lambda: active(system) == 0)


# -- 5. slow clients, vanishing clients -----------------------------------------------------------


def test_slowloris_headers_and_bodies_are_cut_off_and_free_their_slots(
    system: LocalSystem,
) -> None:
    """Headers trickled a byte at a time are cut off at the read deadline (counted from the
    connection's start), bodies trickled a byte at a time get 408 at the body deadline; while
    they hold upload slots, a normal request is served, and every slot is free afterwards."""
    headers = INFER + b"Content-Type: message/ohttp-req\r\nX-Padding: " + b"a" * 200
    body_head = INFER + OHTTP + b"Content-Length: 1000\r\n\r\n"
    slow = [lambda: ("headers", *exchange(system, b"", trickle=headers))] * 4
    slow += [lambda: ("body", *exchange(system, body_head, trickle=b"b" * 1000))] * 4
    with ThreadPoolExecutor(len(slow)) as pool:
        futures = [pool.submit(call) for call in slow]
        time.sleep(0.5)
        uploading = gauge(system, "nci_bridge_uploads_in_flight")
        with consumer(system) as client:
            text = client.generate("served meanwhile", max_tokens=4).text
        answers = [future.result(timeout=30) for future in futures]
    for kind, status, elapsed in answers:
        if kind == "headers":
            assert status == b"", status  # closed without an answer
            assert READ_TIMEOUT - 0.1 < elapsed < READ_TIMEOUT + 2, elapsed
        else:
            assert status.startswith(b"HTTP/1.1 408 "), status
            assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 2, elapsed
    assert uploading == 4  # the slow bodies held upload slots, never inference slots
    assert text == "served meanwhile"
    assert gauge(system, "nci_bridge_uploads_in_flight") == 0
    assert gauge(system, "nci_bridge_inference_in_flight") == 0


def test_client_vanishing_mid_request_or_mid_stream_stops_the_generation(
    system: LocalSystem,
) -> None:
    """A consumer that leaves, before its answer or in the middle of its stream: the bridge
    frees its slot and cancels its stream in the enclave, which stops generating at once (health
    ``active`` back to 0 long before the 5 s the answer would take; nothing counted served)."""
    long = words(100, "gone")
    with consumer(system) as client:
        attestation = client.attest()
        served = int(system.health()["served"])
        # (a) mid-request: the whole request sent, the connection closed before the answer
        request = build_request(long, max_tokens=100)
        body, _ = encapsulate_request(attestation.key_config, http_request(request))
        head = INFER + OHTTP + f"Content-Length: {len(body)}\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", system.taps[TAP_BRIDGE].listen.port)) as s:
            s.sendall(head + body)
            assert until(lambda: active(system) == 1, timeout=5)
            left = time.monotonic()
        stopped_mid_request = until(lambda: active(system) == 0, timeout=5)
        took_mid_request = time.monotonic() - left
        # (b) mid-stream: three pieces read, then the connection closed
        stream = client.generate(long, stream=True, max_tokens=100)
        pieces = [next(stream) for _ in range(3)]
        stream.close()
        left = time.monotonic()
        stopped_mid_stream = until(lambda: active(system) == 0, timeout=5)
        took_mid_stream = time.monotonic() - left
    assert stopped_mid_request
    assert took_mid_request < 2.0  # its answer would have taken 5 s
    assert stopped_mid_stream
    assert took_mid_stream < 2.0
    assert "".join(pieces) == "gone0 gone1 gone2 "
    assert int(system.health()["served"]) == served
    assert gauge(system, "nci_bridge_inference_in_flight") == 0


# -- 8. exactly one outcome per request, the parent crashing in the middle -------------------------


def test_mixed_burst_with_a_parent_crash_has_exactly_one_outcome_per_request(
    system: LocalSystem,
) -> None:
    """Normal and streamed requests, consumers that vanish, oversized, malformed, mistyped and
    slow bodies, sent over 1.6 seconds while the parent is killed and started again: every
    request ends, within its deadlines, in a complete and exact answer or a typed error, and
    never in a shorter answer taken for the whole."""
    garbage = garbage_for(system)
    client = consumer(system)
    client.attest()
    served_before = int(system.health()["served"])

    def single(i: int) -> str:
        text = words(4, f"s{i}-")
        completion = client.generate(text, max_tokens=8)
        assert (completion.text, completion.finish_reason) == (text, "stop"), "wrong answer"
        return "complete"

    def streamed(i: int) -> str:
        text = words(20, f"t{i}-")
        completion = client.generate(text, stream=True, max_tokens=32).completion()
        assert (completion.text, completion.finish_reason) == (text, "stop"), "wrong answer"
        return "complete"

    def vanishing(i: int) -> str:
        with client.generate(words(40, f"v{i}-"), stream=True, max_tokens=64) as stream:
            next(stream)
        return "left"

    def raw(data: bytes, trickle: bytes = b"") -> Callable[[int], str]:
        def call(i: int) -> str:
            return code_of(exchange(system, data, trickle=trickle)[0])

        return call

    kinds: dict[str, tuple[Callable[[int], str], set[str]]] = {
        "single": (single, {"complete"}),
        "streamed": (streamed, {"complete"}),
        "vanishing": (vanishing, {"left"}),
        "oversized": (raw(INFER + OHTTP + b"Content-Length: 99999999\r\n\r\n"), {"413"}),
        "malformed": (
            raw(INFER + OHTTP + f"Content-Length: {len(garbage)}\r\n\r\n".encode() + garbage),
            {"400"},
        ),
        "mistyped": (
            raw(INFER + b"Content-Type: text/plain\r\nContent-Length: 1\r\n\r\nx"),
            {"415"},
        ),
        "slow body": (raw(INFER + OHTTP + b"Content-Length: 100\r\n\r\n", b"z" * 100), {"408"}),
    }
    # typed failures any request may meet while the parent is down or at its limits
    typed = {"ServerBusy", "ServerUnavailable", "TransportError", "ResponseInvalid", "closed"}
    plan = ["single", "streamed", "single", "vanishing", "oversized", "single", "malformed"]
    plan += ["streamed", "mistyped", "single", "slow body"]
    plan = plan * 3  # 33 requests

    def job(index: int, kind: str) -> Callable[[], tuple[str, str, float]]:
        def call() -> tuple[str, str, float]:
            time.sleep(index * 0.05)  # over 1.6 s: before, during and after the crash
            started = time.monotonic()
            try:
                outcome = kinds[kind][0](index)
            except ConsumerError as exc:
                outcome = type(exc).__name__
            return kind, outcome, time.monotonic() - started

        return call

    crashed: list[int | BaseException] = []

    def crash() -> None:
        time.sleep(0.5)
        try:
            crashed.append(system.restart_parent())
        except BaseException as exc:
            crashed.append(exc)

    crasher = threading.Thread(target=crash)
    crasher.start()
    try:
        outcomes = run_all([job(i, k) for i, k in enumerate(plan)], workers=12, timeout=90)
    finally:
        crasher.join()
    assert [type(c) for c in crashed] == [int], crashed
    system.wait_ready(timeout=60)
    with client:
        after = client.generate("after the burst", max_tokens=8).text

    assert len(outcomes) == len(plan)
    for kind, outcome, elapsed in outcomes:
        assert outcome in kinds[kind][1] | typed, (kind, outcome)
        # the consumers' own read deadline is 10 s: no outcome waited for it (no hang)
        assert elapsed < 8, (kind, elapsed)
    completed = [o for _, o, _ in outcomes if o == "complete"]
    assert completed, "nothing was answered"
    assert {o for _, o, _ in outcomes} & typed, "the crash failed nothing: was it in the burst?"
    assert after == "after the burst"
    assert until(lambda: active(system) == 0)
    # every completion the consumers saw is one the enclave counted (some it finished were lost
    # with the parent: those consumers got a typed error instead)
    assert int(system.health()["served"]) - served_before >= len(completed) + 1


# -- 4. the parent restarts while the enclave lives -----------------------------------------------


def test_parent_crash_and_restart_under_a_living_enclave_keeps_its_key(
    system: LocalSystem,
) -> None:
    """``nci parent run`` is killed (SIGKILL) in the middle of a stream and started again: the
    stream fails typed, the enclave stops working on it, the new parent's link reconnects and
    sends the credentials again, and consumers go on with the key they attested: same enclave
    process, same OHTTP key, no new attestation."""
    long = words(100, "p")
    with consumer(system) as client:
        attested = client.attest()
        enclave, key_id = system.enclave_pid(), int(system.health()["key_id"])
        credentials_sent = system.enclave_log.read_text().count("credentials received")
        stream = client.generate(long, stream=True, max_tokens=100)
        pieces = [next(stream) for _ in range(2)]
        old_parent = system.parent_pid
        new_parent = system.restart_parent()
        with pytest.raises((ResponseInvalid, TransportError)):
            pieces += list(stream)
        assert stream.finish_reason is None
        system.wait_ready(timeout=60)
        stopped = until(lambda: active(system) == 0, timeout=5)
        asked = bytes(system.taps[TAP_BRIDGE].captured).count(b"GET /v1/attestation")
        completion = client.generate("after the parent restart", max_tokens=8)
        asked_after = bytes(system.taps[TAP_BRIDGE].captured).count(b"GET /v1/attestation")
    assert new_parent != old_parent
    assert is_truncation_of("".join(pieces), long)
    assert stopped  # the dropped connection cancelled its stream in the enclave
    assert (system.enclave_pid(), int(system.health()["key_id"])) == (enclave, key_id)
    assert completion.text == "after the parent restart"
    assert completion.attestation is attested  # the cached attestation still holds
    assert asked_after == asked
    assert system.enclave_log.read_text().count("credentials received") > credentials_sent


# -- 1. (with 2 and 3) the enclave is killed mid-stream -----------------------------------------


def test_enclave_killed_mid_stream_fails_that_request_typed_and_consumers_reattest(
    system: LocalSystem,
) -> None:
    """SIGKILL to the enclave in the middle of a stream: that request fails typed (its final
    chunk never came), a request meanwhile gets 503 with Retry-After, the launcher starts a new
    enclave, and the consumer re-attests by itself (the new process has a new key).

    The new enclave's boot meets two more faults on its way: KMS refuses its first connection
    (fault 2: retried, bounded), and its bundle stream is cut in the middle of chunk 5 (fault 3:
    it resumes from chunk 5, the last verified one being 4)."""
    require_same_measurements(system)
    long = words(100, "k")
    kms = FlakyKms(system.taps[TAP_KMS].upstream, fail=1)
    bundles = CuttingRelay(system.taps[TAP_BUNDLES].upstream, cut_at=5)
    with consumer(system) as client:
        old = client.attest()
        old_pid = system.enclave_pid()
        stream = client.generate(long, stream=True, max_tokens=100)
        pieces = [next(stream) for _ in range(3)]
        with instead_of_tap(system, TAP_KMS, kms), instead_of_tap(system, TAP_BUNDLES, bundles):
            system.kill_enclave()
            with pytest.raises(ResponseInvalid):
                pieces += list(stream)
            with pytest.raises(ServerUnavailable) as down:
                client.generate("while it restarts", max_tokens=4)
            system.wait_ready(timeout=120, restarted=True)
        completion = client.generate("after the restart", max_tokens=8)
    assert stream.finish_reason is None
    assert is_truncation_of("".join(pieces), long)
    assert (down.value.status, down.value.retry_after) == (503, 5.0)
    assert system.enclave_pid() != old_pid
    assert completion.text == "after the restart"
    assert completion.attestation.key_config != old.key_config  # re-attested, new key
    assert bundles.delivered_before_cut == [5]
    assert [r.from_chunk for r in bundles.requests][-2:] == [0, 5]
    assert 2 <= kms.connections <= 12  # the refused one, then bounded retries
    assert "bundle stream broke after 5 verified chunks" in system.enclave_log.read_text()
