"""What does unlocking a sealed model cost over reading the same model unencrypted?

``python -m benchmarks.unlock --size-mb N [--chunk-size BYTES] [--rounds R] [--json]``

One run builds a random model of N MiB (float32 and bfloat16 tensors in one safetensors file),
seals it with :func:`provider.seal.seal_with_data_key` under a fixed random data key (no KMS), and
builds a *plaintext bundle* beside it: the same manifest, and a ``chunks.bin`` holding each
plaintext chunk followed by 16 zero bytes, so both are served in frames of identical sizes. Both
files are warm in the page cache. A real :class:`parent.streamer.BundleStreamer` serves them on a
``unix://`` socket from a separate process, like the parent. Every figure comes from that source.
With two CPUs or more, the parent and the loader are pinned to different CPUs (``cpu_pinning``),
as a Nitro enclave's vCPUs are its own.

Loads, each in a fresh process (so its peak resident memory is its own), interleaved
plaintext, sealed, plaintext, sealed ...; medians of the times:

``plaintext_read_s``
    The baseline: a client identical to the enclave's receive loop (same frames, same deadlines,
    same preallocated ``torch.empty`` storage, tensors as views of it), except that it copies
    ``sealed[:-16]`` into the tensor's slice instead of decrypting.
``sealed_load_s``
    The real :class:`enclave.unlock.Unlocker`: stream, verify and decrypt into the final tensors
    (the data key from a stand-in for KMS). ``load_ratio`` = sealed_load_s / plaintext_read_s;
    goal ≤ 1.1.
``peak_rss_delta_bytes``
    The sealed load's peak resident memory over the process's resident memory just before it
    (the peak is reset through ``/proc/self/clear_refs`` first, then read with ``getrusage``); the
    largest over the rounds. ``rss_over_model_bytes`` is what it holds beyond the model itself
    (``model_bytes``, the plaintext stream: tensors and their 64-byte alignment padding); goal
    ≤ 64 MiB. Part of that excess is ``rss_file_delta_bytes``: library code (OpenSSL, the frame
    and bundle code) that the freshly forked process faults in while it loads, not data.

Decryption alone, in this process, from the sealed chunks already in memory (plaintext GB/s,
1 GB = 10⁹ bytes, one thread; medians of interleaved passes):

``aead_ceiling_gbps``
    ``AESGCM.decrypt_into`` with one AESGCM object, nonces and associated data computed
    beforehand, every chunk into ONE warm chunk-sized buffer (it stays in the CPU cache).
``unlock_gbps``
    :func:`protocol.bundle.open_chunk_into` into freshly allocated tensor storage, as the enclave
    does. ``unlock_vs_ceiling`` = unlock_gbps / aead_ceiling_gbps.

What separates the two:

1. per-chunk overhead: :func:`open_chunk_into` creates an AESGCM object (a key schedule) for every
   chunk, builds its nonce and associated data, checks and casts the memoryviews.
   ``per_chunk_overhead_us`` measures it directly (``open_chunk_into`` minus a bare
   ``decrypt_into`` on a 4 KiB chunk, warm buffer, many calls); ``per_chunk_overhead_share`` is
   its part of the ceiling's time at this chunk size (a few microseconds against the hundreds a
   1 MiB chunk takes to decrypt; it grows as chunks shrink).
2. the destination (``unlock_pretouched_gbps``: ``open_chunk_into`` into tensor storage whose pages
   were written once already): the plaintext streams out to model-sized memory instead of
   landing in one cache-resident buffer.
3. first touch (``unlock_gbps``, fresh storage): every new 4 KiB page faults on its first write
   and the kernel zeroes it before the decryption fills it. ``first_touch_s`` is the difference
   between 3 and 2 for the whole model; the plaintext load pays it too, so it cancels in
   ``load_ratio``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import hashlib
import json
import multiprocessing
import os
import resource
import secrets
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from enclave.unlock import Unlocker, torch_dtype
from parent.bundlesource import FolderSource
from parent.streamer import BundleStreamer
from protocol.bundle import (
    DEFAULT_CHUNK_SIZE,
    DTYPE_SIZES,
    TAG_SIZE,
    Manifest,
    chunk_aad,
    chunk_nonce,
    derive_bundle_key,
    open_chunk,
    open_chunk_into,
    seal_chunk,
)
from protocol.frames import (
    BundleChunk,
    BundleEnd,
    BundleRequest,
    Frame,
    FrameType,
    recv_frame,
    send_frame,
)
from protocol.transport import Address, connect, parse_address
from provider.seal import CHUNKS_NAME, MANIFEST_NAME, seal_with_data_key

MIB: Final = 1024 * 1024
MODEL_ID: Final = "nci-bench/random:1"
KMS_KEY_ID: Final = "arn:aws:kms:us-east-1:000000000000:key/00000000-0000-4000-8000-00000000beef"
ENCRYPTED_DATA_KEY: Final = b"benchmark: no KMS; the data key is handed to the loader directly"
SEALED, PLAIN = "sealed", "plain"
TIMEOUT: Final = 60.0
LOAD_RATIO_GOAL: Final = 1.1
RSS_SLACK_GOAL: Final = 64 * MIB
_COLUMNS: Final = 1000  # rows of 1000 elements: tensor ends fall inside chunks, not on edges
_WRITE_PIECE: Final = 16 * MIB
# what the child processes need, imported once in the fork server (not this module itself: a child
# re-runs the main module by name, and would warn if it were already imported)
_PRELOAD: Final = [
    "torch",
    "numpy",
    "enclave.unlock",
    "parent.streamer",
    "parent.bundlesource",
    "provider.seal",
]


# -- the model and its two bundles ----------------------------------------------------------------


def _tensor_specs(total: int) -> list[tuple[str, str, tuple[int, int]]]:
    """About ``total`` bytes in eight tensors: float32 at the ends, bfloat16 in between."""
    names = [
        ("model.embed_tokens.weight", "F32"),
        *((f"model.layers.{i}.mlp.weight", "BF16") for i in range(6)),
        ("lm_head.weight", "F32"),
    ]
    share = total // len(names)
    return [
        (name, dtype, (max(1, share // (_COLUMNS * DTYPE_SIZES[dtype])), _COLUMNS))
        for name, dtype in names
    ]


def _write_model(path: Path, total: int, rng: np.random.Generator) -> None:
    """A safetensors file of random tensors, written in pieces (never the whole model in memory)."""
    header: dict[str, object] = {}
    sizes: list[int] = []
    position = 0
    for name, dtype, shape in _tensor_specs(total):
        size = shape[0] * shape[1] * DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        sizes.append(size)
        position += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as sink:
        sink.write(struct.pack("<Q", len(text)) + text)
        for size in sizes:
            while size:
                step = min(size, _WRITE_PIECE)
                sink.write(rng.bytes(step))
                size -= step


def _build_bundles(
    root: Path, size_mb: int, chunk_size: int, data_key: bytes, bundle_id: bytes
) -> Manifest:
    """``root/sealed`` (the real bundle) and ``root/plain`` (same manifest; each plaintext chunk
    followed by 16 zero bytes, so it is served in frames of the same sizes)."""
    model = root / "model.safetensors"
    _write_model(model, size_mb * MIB, np.random.default_rng())
    manifest = seal_with_data_key(
        model,
        data_key=data_key,
        encrypted_data_key=ENCRYPTED_DATA_KEY,
        bundle_id=bundle_id,
        kms_key_id=KMS_KEY_ID,
        model_id=MODEL_ID,
        out=root / SEALED,
        chunk_size=chunk_size,
    )
    model.unlink()
    plain = root / PLAIN
    plain.mkdir()
    shutil.copyfile(root / SEALED / MANIFEST_NAME, plain / MANIFEST_NAME)
    bundle_key = derive_bundle_key(data_key, bundle_id)
    digest = manifest.digest
    padding = bytes(TAG_SIZE)
    with (
        (root / SEALED / CHUNKS_NAME).open("rb") as source,
        (plain / CHUNKS_NAME).open("wb") as out,
    ):
        for index in range(manifest.chunk_count):
            sealed = source.read(manifest.sealed_chunk_size(index))
            final = manifest.is_final(index)
            out.write(open_chunk(bundle_key, digest, index, final, sealed))
            out.write(padding)
    for folder in (root / SEALED, plain):  # warm: both served from the page cache
        with (folder / CHUNKS_NAME).open("rb") as handle:
            while handle.read(_WRITE_PIECE):
                pass
    return manifest


# -- the parent: a real BundleStreamer in its own process ---------------------------------------


def _pinning() -> tuple[int, int] | None:
    """(parent CPU, loader CPU): two different CPUs this process may use, if it has two."""
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def _pin(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})


def _serve(
    socket_path: str, folders: dict[str, str], cpu: int | None, ready: Event, stop: Event
) -> None:
    """The parent process: stream the bundles on ``unix://socket_path`` until ``stop`` is set."""
    _pin(cpu)

    async def main() -> None:
        sources = {name: FolderSource(folder) for name, folder in folders.items()}
        async with BundleStreamer(parse_address(f"unix://{socket_path}"), sources):
            ready.set()
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def _stop(process: BaseProcess, stop: Event) -> None:
    stop.set()
    process.join(10)
    if process.exitcode is None:
        process.terminate()
        process.join()


# -- the loaders, each run in a fresh process ---------------------------------------------------


class _FixedKey:
    """Stands in for KMS: hands out the benchmark's data key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def decrypt(
        self,
        ciphertext_blob: bytes,
        *,
        encryption_context: Mapping[str, str],
        key_id: str | None = None,
    ) -> bytes:
        return self._key


def _allocate(size: int) -> tuple[torch.Tensor, memoryview]:
    """Tensor storage and a writable byte view of it, as ``enclave.unlock`` allocates it."""
    storage = torch.empty(size, dtype=torch.uint8)
    raw = (ctypes.c_char * size).from_address(storage.data_ptr())
    return storage, memoryview(raw).cast("B")


def _expect(frame: Frame, wanted: FrameType) -> None:
    if frame.type != wanted:
        raise RuntimeError(f"expected {wanted.name}, got {frame.type.name}")


def plaintext_load(address: Address, bundle: str) -> dict[str, torch.Tensor]:
    """The enclave's receive loop with a copy in place of ``open_chunk_into``: the baseline."""
    with connect(address, timeout=TIMEOUT) as sock:
        send_frame(sock, BundleRequest(bundle, 0).frame(), timeout=TIMEOUT)
        frame = recv_frame(sock, timeout=TIMEOUT)
        _expect(frame, FrameType.BUNDLE_MANIFEST)
        manifest = Manifest.from_cbor(frame.payload)
        storage, view = _allocate(manifest.plaintext_size)
        for index in range(manifest.chunk_count):
            frame = recv_frame(sock, timeout=TIMEOUT)
            _expect(frame, FrameType.BUNDLE_CHUNK)
            chunk = BundleChunk.decode(frame.payload)
            if chunk.index != index:
                raise RuntimeError(f"chunk {chunk.index} arrived where {index} was due")
            start, end = manifest.chunk_plain_range(index)
            view[start:end] = memoryview(chunk.sealed)[:-TAG_SIZE]
        frame = recv_frame(sock, timeout=TIMEOUT)
        _expect(frame, FrameType.BUNDLE_END)
        if BundleEnd.decode(frame.payload).chunk_count != manifest.chunk_count:
            raise RuntimeError("BUNDLE_END disagrees with the manifest")
    tensors = {}
    for entry in manifest.tensors:
        flat = storage[entry.offset : entry.offset + entry.length].view(torch_dtype(entry.dtype))
        tensors[entry.name] = flat.reshape(entry.shape)
    return tensors


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_file_bytes() -> int:
    """Resident file-backed pages (mostly library code), from ``/proc/self/status``."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> bool:
    """Reset the peak resident size (VmHWM, what ``ru_maxrss`` reports) to the current one."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _sample_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the first, middle and last 4 KiB of every tensor: both loads must agree."""
    digest = hashlib.sha256()
    for name, tensor in tensors.items():
        flat = tensor.reshape(-1).view(torch.uint8)
        middle = flat.numel() // 2
        digest.update(name.encode())
        for part in (flat[:4096], flat[middle : middle + 4096], flat[-4096:]):
            digest.update(part.numpy().tobytes())
    return digest.hexdigest()


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _load_once(
    kind: str, address_text: str, data_key: bytes, cpu: int | None, results: Connection
) -> None:
    """One timed load in a fresh process (forked from the preloaded fork server)."""
    _pin(cpu)
    address = parse_address(address_text)
    unlocker = Unlocker(
        address,
        _FixedKey(data_key),
        expected_model_id=MODEL_ID,
        expected_kms_key_id=KMS_KEY_ID,
        timeout=TIMEOUT,
        attempts=1,
    )

    def load() -> Mapping[str, torch.Tensor]:
        if kind == SEALED:
            return unlocker.load(SEALED).tensors
        return plaintext_load(address, PLAIN)

    reset = _reset_peak_rss()
    baseline = _rss_bytes() if reset else _max_rss_bytes()
    file_baseline = _rss_file_bytes()
    cpu_start = _cpu_s()
    start = time.perf_counter()
    tensors = load()
    elapsed = time.perf_counter() - start
    cpu_used = _cpu_s() - cpu_start
    peak = _max_rss_bytes()
    results.send(
        {
            "load_s": elapsed,
            "cpu_s": cpu_used,
            "peak_rss_delta_bytes": peak - baseline,
            "rss_after_delta_bytes": _rss_bytes() - baseline,
            "rss_file_delta_bytes": _rss_file_bytes() - file_baseline,
            "peak_reset": reset,
            "digest": _sample_digest(tensors),
        }
    )


def _child_load(
    context: ForkServerContext, kind: str, address: str, data_key: bytes, cpu: int | None
) -> dict[str, Any]:
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_load_once, args=(kind, address, data_key, cpu, send))
    child.start()
    send.close()
    try:
        result: dict[str, Any] = receive.recv()
    except EOFError:
        raise RuntimeError(f"the {kind} load failed (see its traceback above)") from None
    finally:
        child.join()
        receive.close()
    return result


# -- decryption alone, from ciphertext in memory ------------------------------------------------


def _decrypt_figures(
    folder: Path, manifest: Manifest, bundle_key: bytes, rounds: int
) -> dict[str, float]:
    """Median seconds of the decryption variants (see the module docstring)."""
    with (folder / CHUNKS_NAME).open("rb") as source:
        sealed = [source.read(manifest.sealed_chunk_size(i)) for i in range(manifest.chunk_count)]
    digest = manifest.digest
    count = manifest.chunk_count
    nonces = [chunk_nonce(i) for i in range(count)]
    finals = [manifest.is_final(i) for i in range(count)]
    aads = [chunk_aad(digest, i, finals[i]) for i in range(count)]
    ranges = [manifest.chunk_plain_range(i) for i in range(count)]
    aead = AESGCM(bundle_key)
    warm = memoryview(bytearray(manifest.chunk_size))
    touched, touched_view = _allocate(manifest.plaintext_size)
    touched.fill_(0)

    def ceiling() -> object:
        for nonce, chunk, aad in zip(nonces, sealed, aads, strict=True):
            aead.decrypt_into(nonce, chunk, aad, warm[: len(chunk) - TAG_SIZE])
        return None

    def into(view: memoryview) -> None:
        for index, chunk in enumerate(sealed):
            start, end = ranges[index]
            open_chunk_into(bundle_key, digest, index, finals[index], chunk, view[start:end])

    def pretouched() -> object:
        into(touched_view)
        return None

    def fresh() -> object:
        storage, view = _allocate(manifest.plaintext_size)
        into(view)
        return storage  # freed after the clock stops, as the enclave keeps it

    variants: dict[str, Callable[[], object]] = {
        "ceiling": ceiling,
        "pretouched": pretouched,
        "fresh": fresh,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):  # round 0 warms up and is not counted
        for name, function in variants.items():
            start = time.perf_counter()
            kept = function()
            elapsed = time.perf_counter() - start
            del kept
            if round_:
                samples[name].append(elapsed)
    figures = {name: statistics.median(times) for name, times in samples.items()}
    figures["per_chunk"] = _per_chunk_overhead_s(bundle_key, digest, rounds)
    return figures


def _per_chunk_overhead_s(bundle_key: bytes, digest: bytes, rounds: int) -> float:
    """Seconds :func:`open_chunk_into` spends per chunk beyond the bare ``decrypt_into``: both on
    one 4 KiB chunk (the smallest chunk size) into a warm buffer, many calls, interleaved."""
    size, calls = 4096, 2000
    sealed = seal_chunk(bundle_key, digest, 0, False, bytes(size))
    out = memoryview(bytearray(size))
    aead, nonce, aad = AESGCM(bundle_key), chunk_nonce(0), chunk_aad(digest, 0, False)
    bare: list[float] = []
    full: list[float] = []
    for _ in range(max(rounds, 5)):
        start = time.perf_counter()
        for _ in range(calls):
            aead.decrypt_into(nonce, sealed, aad, out)
        middle = time.perf_counter()
        for _ in range(calls):
            open_chunk_into(bundle_key, digest, 0, False, sealed, out)
        bare.append(middle - start)
        full.append(time.perf_counter() - middle)
    return (statistics.median(full) - statistics.median(bare)) / calls


# -- the run ------------------------------------------------------------------------------------


def _goal(met: bool, rule: str) -> str:
    return f"{rule} ({'met' if met else 'NOT met'})"


def run(
    size_mb: int = 256, chunk_size: int = DEFAULT_CHUNK_SIZE, rounds: int = 3
) -> dict[str, Any]:
    if size_mb < 1 or rounds < 1:
        raise ValueError("size_mb and rounds must be at least 1")
    # every child forks from a server that has already imported torch and the project, so a
    # fresh process per load costs milliseconds, not an interpreter start
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    data_key, bundle_id = secrets.token_bytes(32), secrets.token_bytes(16)
    pinning = _pinning()
    with tempfile.TemporaryDirectory(prefix="nci-bench-") as scratch:
        root = Path(scratch)
        socket_path = root / "parent.sock"
        address = f"unix://{socket_path}"
        ready, stop = context.Event(), context.Event()
        folders = {name: str(root / name) for name in (SEALED, PLAIN)}
        parent_cpu, loader_cpu = pinning if pinning is not None else (None, None)
        parent = context.Process(
            target=_serve, args=(str(socket_path), folders, parent_cpu, ready, stop), daemon=True
        )
        parent.start()  # its sources are read on request: it can start while the bundles build
        loads: dict[str, list[dict[str, Any]]] = {PLAIN: [], SEALED: []}
        try:
            manifest = _build_bundles(root, size_mb, chunk_size, data_key, bundle_id)
            if not ready.wait(60):
                raise RuntimeError("the bundle streamer process did not start")
            for _ in range(rounds):
                for kind in (PLAIN, SEALED):
                    loads[kind].append(_child_load(context, kind, address, data_key, loader_cpu))
        finally:
            _stop(parent, stop)
        digests = {result["digest"] for results in loads.values() for result in results}
        if len(digests) != 1:
            raise RuntimeError("the plaintext and the sealed loads delivered different bytes")
        bundle_key = derive_bundle_key(data_key, bundle_id)
        decrypt = _decrypt_figures(root / SEALED, manifest, bundle_key, rounds)

    size = manifest.plaintext_size
    plain_s = statistics.median(r["load_s"] for r in loads[PLAIN])
    sealed_s = statistics.median(r["load_s"] for r in loads[SEALED])
    peak = max(r["peak_rss_delta_bytes"] for r in loads[SEALED])
    plain_peak = max(r["peak_rss_delta_bytes"] for r in loads[PLAIN])
    ratio = sealed_s / plain_s

    def gbps(seconds: float) -> float:
        return round(size / seconds / 1e9, 3)

    return {
        "size_mb": size_mb,
        "model_bytes": size,
        "chunk_size": manifest.chunk_size,
        "chunk_count": manifest.chunk_count,
        "rounds": rounds,
        "cpu_pinning": (
            f"parent cpu {pinning[0]}, loader cpu {pinning[1]}" if pinning else "none (one CPU)"
        ),
        "plaintext_read_s": round(plain_s, 4),
        "sealed_load_s": round(sealed_s, 4),
        "plaintext_cpu_s": round(statistics.median(r["cpu_s"] for r in loads[PLAIN]), 4),
        "sealed_cpu_s": round(statistics.median(r["cpu_s"] for r in loads[SEALED]), 4),
        "load_ratio": round(ratio, 3),
        "load_ratio_goal": _goal(ratio <= LOAD_RATIO_GOAL, f"<= {LOAD_RATIO_GOAL}"),
        "plaintext_read_gbps": gbps(plain_s),
        "sealed_load_gbps": gbps(sealed_s),
        "peak_rss_delta_bytes": peak,
        "rss_over_model_bytes": peak - size,
        "peak_rss_goal": _goal(peak <= size + RSS_SLACK_GOAL, "<= model_bytes + 64 MiB"),
        "rss_file_delta_bytes": max(r["rss_file_delta_bytes"] for r in loads[SEALED]),
        "plaintext_peak_rss_delta_bytes": plain_peak,
        "peak_rss_reset": all(r["peak_reset"] for rs in loads.values() for r in rs),
        "aead_ceiling_gbps": gbps(decrypt["ceiling"]),
        "unlock_pretouched_gbps": gbps(decrypt["pretouched"]),
        "unlock_gbps": gbps(decrypt["fresh"]),
        "unlock_vs_ceiling": round(decrypt["ceiling"] / decrypt["fresh"], 3),
        "per_chunk_overhead_us": round(decrypt["per_chunk"] * 1e6, 2),
        "per_chunk_overhead_share": round(
            decrypt["per_chunk"] * manifest.chunk_count / decrypt["ceiling"], 4
        ),
        "first_touch_s": round(decrypt["fresh"] - decrypt["pretouched"], 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.unlock", description=__doc__)
    parser.add_argument("--size-mb", type=int, default=256, help="model size in MiB (256)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="bytes")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved load rounds (5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = run(args.size_mb, args.chunk_size, args.rounds)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
