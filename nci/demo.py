"""``nci demo``: the whole system, locally, on the embedded defaults.

1. Attestation: the enclave side asks the emulated NSM for a document that binds a consumer's nonce
   and the enclave's public key; the consumer reproduces the expected measurements from the
   enclave's source, verifies the document and prints the report; two forgeries are refused.
2. Key release: a local attestation-aware KMS (moto server); the provider creates a key whose
   policy pins the measured image and generates a data key; the parent's role is refused without
   attestation; the enclave gets the key through ``Recipient``; a modified image is refused.
3. Sealed weights: the provider seals a model and publishes it to S3 (moto); the parent streams
   the ciphertext to the enclave, which releases the key and decrypts into tensors; a bit flipped
   by the parent is caught before any tensor is handed out.

Later issues grow it into encrypted inference. No key or plaintext is ever printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

import boto3
import torch
from botocore.exceptions import BotoCoreError, ClientError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from attestation import _measure
from attestation.emulator import EmulatedNsm, default_state_dir
from attestation.errors import AttestationError
from attestation.nsm import NsmClient
from attestation.policy import Nonce, Policy
from attestation.report import AuditReport, audit
from attestation.roots import TrustRoot
from enclave.errors import EnclaveError, KeyReleaseDenied
from enclave.keyrelease import KeyRelease, kms_client_config
from enclave.unlock import Unlocker
from kms_policy import check, generate
from kms_policy.errors import KmsPolicyError
from kms_policy.localkms import LocalKms, LocalKmsConfig
from parent.bundlesource import FolderSource, S3Source
from parent.streamer import BundleStreamer
from protocol.errors import BundleIntegrityError, ProtocolError
from protocol.transport import parse_address
from provider import publish, seal
from provider.errors import ProviderError

__all__ = ["add_parser", "run_demo"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="run the system locally on the embedded defaults")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="local state folder (default: $NCI_STATE_DIR or ./.nci)",
    )
    parser.set_defaults(handler=lambda args, out, err: run_demo(args.state_dir, out, err))


def run_demo(state_dir: Path | None, out: TextIO, err: TextIO | None = None) -> int:
    """Run every step; a failure of any piece is one line on ``err`` and exit status 1."""
    state_dir = (state_dir if state_dir is not None else default_state_dir()).resolve()
    try:
        return _run(state_dir, out)
    except (
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


def _run(state_dir: Path, out: TextIO) -> int:
    say = _Printer(out)

    say.step("enclave", f"boot the emulated NSM (local CA kept in {state_dir / 'nsm'})")
    nsm = EmulatedNsm(state_dir=state_dir)
    client = NsmClient(nsm)
    description = client.describe_nsm()
    say.detail(f"module {description.module_id}, {description.max_pcrs} PCRs, {description.digest}")

    say.step("enclave", "generate the request-encryption key (X25519) it will attest")
    enclave_key = x25519.X25519PrivateKey.generate()
    public_key = enclave_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    say.step("consumer", "reproduce the expected measurements from the enclave's source code")
    expected = _measure.application_measurements()
    for index, value in expected.items():
        say.detail(f"PCR{index} = {value.hex()}")

    nonce = Nonce.random()
    say.step("consumer", f"challenge the enclave with a fresh nonce {nonce.hex()[:16]}…")
    document = client.attestation(nonce=nonce.value, public_key=public_key)
    say.step("enclave", f"NSM signs an attestation document ({len(document)} bytes)")

    say.step("consumer", "verify: chain to the local root, signature, PCRs, nonce, age, key")
    roots = [TrustRoot.aws_nitro_g1(), TrustRoot.local(nsm.root_pem)]
    policy = Policy.expect(
        expected, nonce=nonce, max_age=timedelta(minutes=5), public_key=public_key
    )
    report = audit(document, roots=roots, now=datetime.now(UTC), policy=policy)
    say.report(report)

    say.step("attacker", "flip one bit of the attested public key (a man in the middle)")
    index = document.index(public_key) + len(public_key) - 1
    forged = document[:index] + bytes([document[index] ^ 1]) + document[index + 1 :]
    say.report(audit(forged, roots=roots, now=datetime.now(UTC), policy=policy), brief=True)

    say.step("attacker", "present the emulator's document to a verifier that trusts only AWS")
    aws_only = audit(
        document, roots=[TrustRoot.aws_nitro_g1()], now=datetime.now(UTC), policy=policy
    )
    say.report(aws_only, brief=True)

    attested = report.valid and not _valid(forged, roots, policy) and not aws_only.valid
    released = _key_release(say, nsm, expected, state_dir)
    ok = attested and released
    out.write(
        "\ndemo: the genuine enclave was attested, got the data key and unlocked the sealed "
        "model; every forgery, tampering and unattested caller was refused\n"
        if ok
        else "\ndemo: FAILED, an outcome differs from the expected one\n"
    )
    return 0 if ok else 1


def _key_release(
    say: _Printer, nsm: EmulatedNsm, expected: dict[int, bytes], state_dir: Path
) -> bool:
    """Seal a data key under a key bound to the measured image; release it to the enclave only."""
    config = LocalKmsConfig(
        principals={access_key: arn for arn, access_key in _PRINCIPALS.items()},
        trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(nsm.root_pem)),
    )
    with LocalKms(config) as kms:
        say.step("kms", f"local attestation-aware KMS (moto server) on {kms.endpoint_url}")
        key_policy = generate(
            measurements=expected, role_arn=_ROLE, provider_arn=_PROVIDER, admin_arns=[_ADMIN]
        )
        key_id = _kms(kms, _ADMIN).create_key(Policy=key_policy.to_json())["KeyMetadata"]["KeyId"]
        say.step("provider", f"create KMS key {key_id} whose policy pins PCR0/1/2 of the image")
        lint = check(key_policy, expect=[expected], role_arn=_ROLE, provider_arn=_PROVIDER)
        say.step("auditor", f"lint the key policy: {'no error finding' if lint.ok else 'HOLES'}")
        for line in lint.can_decrypt:
            say.detail(line)

        sealed = _kms(kms, _PROVIDER).generate_data_key(
            KeyId=key_id, KeySpec="AES_256", EncryptionContext=_CONTEXT
        )
        blob, provider_key = sealed["CiphertextBlob"], sealed["Plaintext"]
        say.step("provider", f"GenerateDataKey: a 32-byte data key, sealed as {len(blob)} bytes")

        say.step("parent", "Decrypt without attestation, with the enclave's own IAM role")
        parent_denied = _denied(
            lambda: _kms(kms, _ROLE).decrypt(CiphertextBlob=blob, EncryptionContext=_CONTEXT)
        )
        say.detail("=> REFUSED (AccessDeniedException)" if parent_denied else "=> RELEASED (!)")

        say.step("enclave", "attest an RSA key and Decrypt with Recipient; unwrap the CMS envelope")
        release = KeyRelease(NsmClient(nsm), _kms(kms, _ROLE))
        enclave_key = release.decrypt(blob, encryption_context=_CONTEXT)
        same = hmac.compare_digest(enclave_key, provider_key)
        say.detail(
            f"=> {'RELEASED: the same data key the provider sealed' if same else 'WRONG KEY'}"
        )

        say.step("attacker", "a modified enclave image (PCR0 differs) asks for the same key")
        changed = dict(expected)
        changed[0] = _measure.extend(changed[0], b"a backdoor")
        rogue = EmulatedNsm(state_dir=state_dir, measurements=changed)
        rogue_denied = _denied(
            lambda: KeyRelease(NsmClient(rogue), _kms(kms, _ROLE)).decrypt(
                blob, encryption_context=_CONTEXT
            )
        )
        say.detail("=> REFUSED (AccessDeniedException)" if rogue_denied else "=> RELEASED (!)")
        unlocked = _sealed_weights(say, kms, key_id, nsm, state_dir)
    return lint.ok and parent_denied and same and rogue_denied and unlocked


def _sealed_weights(
    say: _Printer, kms: LocalKms, key_id: str, nsm: EmulatedNsm, state_dir: Path
) -> bool:
    """Seal a model, publish it to S3, stream it through the parent, unlock it in the enclave."""
    work = state_dir / "demo"
    shutil.rmtree(work, ignore_errors=True)
    model_dir = _demo_model(work / "model")
    say.step("provider", f"seal {model_dir.name}/ (safetensors + config) under a fresh data key")
    manifest = seal(
        model_dir,
        kms_client=_kms(kms, _PROVIDER),
        kms_key_id=key_id,
        model_id=_MODEL_ID,
        out=work / "bundle",
        chunk_size=64 * 1024,
    )
    say.detail(
        f"{len(manifest.tensors)} tensors, {manifest.plaintext_size} bytes in "
        f"{manifest.chunk_count} AES-256-GCM chunks"
    )
    s3 = _aws(kms, "s3", _PROVIDER)
    s3.create_bucket(Bucket=_BUCKET)
    publish(work / "bundle", f"s3://{_BUCKET}/demo/v1", s3_client=s3)
    say.step("provider", f"publish to s3://{_BUCKET}/demo/v1 (moto S3)")

    # a short socket path of its own: unix socket paths are limited to 107 bytes
    sockets = Path(tempfile.mkdtemp(prefix="nci-demo-"))
    address = parse_address(f"unix://{sockets}/parent.sock")
    tampered = _tampered_copy(work / "bundle", work / "tampered")
    sources = {
        "demo": S3Source(_aws(kms, "s3", _ROLE), _BUCKET, "demo/v1"),
        "tampered": FolderSource(tampered),
    }
    with _background(BundleStreamer(address, sources)), _removed(sockets):
        say.step("parent", f"stream the sealed bundle from S3 to the enclave on {address}")
        release = KeyRelease(NsmClient(nsm), _kms(kms, _ROLE))
        unlocker = Unlocker(
            address,
            release,
            expected_model_id=_MODEL_ID,
            expected_kms_key_id=manifest.kms_key_id,  # the enclave's configuration pins the key
            timeout=10,
        )
        model = unlocker.load("demo")
        expected = _original_tensors(model_dir)
        exact = all(
            hmac.compare_digest(
                model.tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes(), data
            )
            for name, data in expected.items()
        )
        say.step("enclave", "release the data key (attested), decrypt chunk by chunk into tensors")
        say.detail(
            f"=> {'UNLOCKED' if exact else 'WRONG BYTES'}: {len(model.tensors)} tensors, "
            f"identical to the provider's"
        )
        say.step("attacker", "the parent flips one bit of one sealed chunk")
        try:
            unlocker.load("tampered")
            refused = False
        except BundleIntegrityError as exc:
            refused = True
            say.detail(f"=> REFUSED (BundleIntegrityError: {exc}); no tensor was handed out")
    return exact and refused


_MODEL_ID = "nci-demo/tiny-vlm:1"
_BUCKET = "nci-demo-models"


def _aws(kms: LocalKms, service: str, principal: str) -> Any:
    return boto3.session.Session().client(
        service,
        endpoint_url=kms.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=_PRINCIPALS[principal],
        aws_secret_access_key="local-demo-secret",  # noqa: S106 (the local KMS checks no secret)
    )


def _demo_model(folder: Path) -> Path:
    """A small random model in safetensors, as a provider would have it."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "vision.patch_embed.weight": torch.randn(64, 48, generator=generator),
        "lm.embed.weight": torch.randn(256, 64, generator=generator).to(torch.bfloat16),
        "lm.head.weight": torch.randn(256, 64, generator=generator),
    }
    header: dict[str, Any] = {}
    offset, blobs = 0, []
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16"}[tensor.dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    (folder / "model.safetensors").write_bytes(
        len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs)
    )
    (folder / "config.json").write_text(json.dumps({"model_type": "nci-demo", "hidden": 64}))
    return folder


def _original_tensors(folder: Path) -> dict[str, bytes]:
    raw = (folder / "model.safetensors").read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    base = 8 + size
    return {
        name: raw[base + meta["data_offsets"][0] : base + meta["data_offsets"][1]]
        for name, meta in header.items()
    }


def _tampered_copy(bundle: Path, out: Path) -> Path:
    shutil.copytree(bundle, out)
    chunks = bytearray((out / "chunks.bin").read_bytes())
    chunks[len(chunks) // 2] ^= 0x01
    (out / "chunks.bin").write_bytes(bytes(chunks))
    return out


@contextlib.contextmanager
def _removed(folder: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _background(streamer: BundleStreamer) -> Iterator[None]:
    """Run the parent's streamer in its own event loop thread, as a separate service would."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nci-demo-parent", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(streamer.start(), loop).result(10)
        yield
    finally:
        asyncio.run_coroutine_threadsafe(streamer.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


_ACCOUNT = "123456789012"
_ROLE = f"arn:aws:iam::{_ACCOUNT}:role/nci-parent-instance"
_PROVIDER = f"arn:aws:iam::{_ACCOUNT}:role/nci-model-provider"
_ADMIN = f"arn:aws:iam::{_ACCOUNT}:role/nci-key-admin"
_PRINCIPALS = {_ROLE: "AKIANCIPARENT", _PROVIDER: "AKIANCIPROVIDER", _ADMIN: "AKIANCIADMIN"}
_CONTEXT = {"nci:model": "demo", "nci:bundle": "demo-0001"}


def _kms(kms: LocalKms, principal: str) -> Any:
    return boto3.client(
        "kms",
        endpoint_url=kms.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=_PRINCIPALS[principal],
        aws_secret_access_key="local-demo-secret",  # noqa: S106 (the local KMS checks no secret)
        config=kms_client_config(),
    )


def _denied(call: Callable[[], object]) -> bool:
    try:
        call()
    except KeyReleaseDenied:
        return True
    except ClientError as exc:
        return bool(exc.response["Error"]["Code"] == "AccessDeniedException")
    return False


def _valid(document: bytes, roots: list[TrustRoot], policy: Policy) -> bool:
    return audit(document, roots=roots, now=datetime.now(UTC), policy=policy).valid


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._count = 0

    def step(self, who: str, text: str) -> None:
        self._count += 1
        self._out.write(f"\n({self._count}) {who:<8} {text}\n")

    def detail(self, text: str) -> None:
        self._out.write(f"             {text}\n")

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
