"""How good and how fast is the built-in model, and what does the runtime interface cost?

``python -m benchmarks.model [--samples N] [--seed S] [--rounds R] [--threads T] [--json]``

Every figure comes from the shipped weights (``enclave/models/weights/anymal-shapes.safetensors``)
loaded the way the enclave loads them: the built-in model folder's tensors and ``config.json``
(:func:`enclave.models.builtin.write_builtin_model_folder`) as an unlocked bundle, through
:func:`enclave.models.runtime.load_runtime`.

``accuracy``, ``accuracy_by_type``, ``accuracy_unseen``
    Exact match (greedy) on ``N`` fresh held-out questions (``enclave.models.train.evaluate``):
    overall, per question type, and on the questions about a held-out colour–shape combination.
``prefill_ms``
    Median time to read one question with its image: vision encoder, resampler and the LM over
    the prompt (visual tokens included), with a KV cache, up to the first logits.
``decode_tokens_per_s``
    One-token LM steps against that cache, filling the rest of the context, per second.
``runtime_vs_direct``
    The same greedy generations (``--rounds`` interleaved rounds over 50 questions) through
    ``load_runtime(...).generate`` (PNG bytes in: decode, checks, resize, stop handling, token
    counts) divided by :meth:`AnyMAL.stream` of the same loaded model called directly on the
    decoded tensors; medians of the round times. ``runtime_ms`` and ``direct_ms`` are the medians
    per generation.

One torch thread by default: at 4 M parameters intra-op parallelism does not pay, and on a shared
machine extra threads mostly measure the neighbours.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage

from enclave.models import _safetensors, shapes
from enclave.models.anymal import AnyMAL, KVCache
from enclave.models.builtin import BUILTIN_MODEL_ID, AnyMALRuntime, write_builtin_model_folder
from enclave.models.runtime import Runtime, load_runtime
from enclave.models.tokenizer import IMAGE, Tokenizer
from enclave.models.train import evaluate
from enclave.unlock import UnlockedModel
from protocol.bundle import CONTEXT_BUNDLE, CONTEXT_MODEL, BundleLayout, Manifest
from protocol.inference import Image, Params

_BUNDLE_ID = bytes(16)


def _unlocked(folder: Path) -> UnlockedModel:
    """The built-in folder as the enclave holds it after unlocking (no encryption: the manifest
    the provider's seal would write, the tensors and files in memory)."""
    tensors, _ = _safetensors.loads((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    files = {"config.json": (folder / "config.json").read_bytes()}
    layout = BundleLayout.plan(
        [(n, "F32", tuple(t.shape), t.numel() * 4) for n, t in sorted(tensors.items())],
        [(name, len(data)) for name, data in files.items()],
    )
    manifest = Manifest.create(
        bundle_id=_BUNDLE_ID,
        model_id=BUILTIN_MODEL_ID,
        model_config=config,
        kms_key_id="arn:aws:kms:us-east-1:123456789012:key/benchmark",
        encrypted_data_key=bytes(32),
        encryption_context={CONTEXT_MODEL: BUILTIN_MODEL_ID, CONTEXT_BUNDLE: _BUNDLE_ID.hex()},
        chunk_size=1 << 20,
        layout=layout,
    )
    return UnlockedModel(manifest, tensors, files)


def _png(scene: shapes.Scene) -> tuple[Image, torch.Tensor]:
    """``scene`` as PNG bytes, and as the tensor those bytes decode to."""
    array = (shapes.render(scene) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    out = io.BytesIO()
    PILImage.fromarray(array).save(out, "PNG")
    tensor = torch.from_numpy(array.transpose(2, 0, 1).copy()).float() / 255
    return Image("image/png", out.getvalue()), tensor


def _prefill_and_decode(model: AnyMAL, seed: int, n: int = 30) -> tuple[float, float]:
    """Median prefill seconds, and decode tokens per second (the LM with its KV cache)."""
    tok = Tokenizer()
    prefill: list[float] = []
    decode: list[float] = []
    with torch.inference_mode():
        for i, sample in enumerate(shapes.sample_qa(seed + 1, n + 1, "heldout")):
            image = torch.from_numpy(shapes.render(sample.scene))
            ids = [tok.bos, *tok.encode(f"{IMAGE} {sample.question}"), tok.sep]
            start = time.perf_counter()
            cache = KVCache()
            x = model.embed(torch.tensor([ids]), image[None], tok.image)
            logits = model.lm(x, cache)[0, -1]
            if i > 0:
                prefill.append(time.perf_counter() - start)
            steps = model.cfg.max_seq_len - cache.length
            token = int(logits.argmax())
            start = time.perf_counter()
            for _ in range(steps):
                logits = model.lm(model.lm.embed(torch.tensor([[token]])), cache)[0, -1]
                token = int(logits.argmax())
            if i > 0:  # the first one warms up
                decode.append(steps / (time.perf_counter() - start))
    return statistics.median(prefill), statistics.median(decode)


def _runtime_vs_direct(
    runtime: Runtime, model: AnyMAL, seed: int, rounds: int, n: int = 50
) -> dict[str, float]:
    tok = Tokenizer()
    samples = [(s.question, *_png(s.scene)) for s in shapes.sample_qa(seed + 2, n, "heldout")]
    params = Params(max_tokens=8, temperature=0.0)

    def through_runtime() -> list[str]:
        return [runtime.generate(q, [png], params).text() for q, png, _ in samples]

    def direct() -> list[str]:
        return ["".join(model.stream(tok, t, q, max_tokens=8)) for q, _, t in samples]

    if through_runtime() != direct():  # also a warm-up
        raise AssertionError("the runtime and the model disagree")
    times: dict[str, list[float]] = {"runtime": [], "direct": []}
    for r in range(rounds):
        order = (("runtime", through_runtime), ("direct", direct))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    runtime_s, direct_s = statistics.median(times["runtime"]), statistics.median(times["direct"])
    return {
        "runtime_vs_direct": round(runtime_s / direct_s, 3),
        "runtime_ms": round(runtime_s / n * 1000, 3),
        "direct_ms": round(direct_s / n * 1000, 3),
    }


def run(samples: int = 500, seed: int = 12345, rounds: int = 7, threads: int = 2) -> dict[str, Any]:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        unlocked = _unlocked(write_builtin_model_folder(Path(tmp) / "anymal"))
    runtime = load_runtime(unlocked, threads=threads)
    if not isinstance(runtime, AnyMALRuntime):
        raise TypeError(f"expected the built-in runtime, got {type(runtime).__name__}")
    model = (
        runtime.model
    )  # the model as the enclave loaded it; "direct" calls it without the runtime
    scores = evaluate(model, samples, seed)
    prefill_s, decode_tps = _prefill_and_decode(model, seed)
    return {
        "samples": samples,
        "threads": threads,
        "accuracy": round(scores["overall"], 4),
        "accuracy_by_type": {q: round(scores[q], 4) for q in shapes.QUESTION_TYPES if q in scores},
        "accuracy_unseen": round(scores.get("unseen", float("nan")), 4),
        "prefill_ms": round(prefill_s * 1000, 3),
        "decode_tokens_per_s": round(decode_tps, 1),
        **_runtime_vs_direct(runtime, model, seed, rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model", description=__doc__)
    parser.add_argument("--samples", type=int, default=500, help="held-out questions (500)")
    parser.add_argument("--seed", type=int, default=12345, help="held-out question seed")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (7)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    figures = run(args.samples, args.seed, args.rounds, args.threads)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"  {key:<32} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
