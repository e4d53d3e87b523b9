"""The enclave's boot, across its real edges: the local KMS (moto) behind a relay on a unix socket,
the parent's bundle streamer on another, the emulated NSM, and the control connection on a third.

Each test plays the parent: it serves the sealed bundle and the KMS relay, connects to the
enclave's control address, sends the parent role's credentials and watches health. The runtime is
a stand-in (the echo runtime over the unlocked tiny model) except in the built-in model test.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
import torch

from attestation import _measure
from attestation.emulator import EmulatedNsm
from attestation.policy import Nonce, Policy
from attestation.roots import TrustRoot
from attestation.verify import verify
from enclave.boot import BOOT_ERROR_CODES, boot_error_code, serve
from enclave.boot import run as run_enclave
from enclave.config import MAX_CONFIG_SIZE, EnclaveConfig, InvalidConfig, load_config, parse_config
from enclave.errors import EnclaveError, KeyReleaseDenied, KeyReleaseUnavailable
from enclave.kmsforward import KmsForwarder
from enclave.server import EchoRuntime
from enclave.unlock import UnlockedModel
from kms_policy.localkms import LocalKms, LocalKmsConfig
from parent.bundlesource import FolderSource
from parent.streamer import BundleStreamer
from protocol.control import Credentials, Health, InferMode
from protocol.errors import BundleIntegrityError, TransportError
from protocol.frames import Frame, FrameType, recv_frame, send_frame
from protocol.inference import Image, StreamDelta, StreamEnd
from protocol.ohttp import generate_key_config
from protocol.transport import VMADDR_CID_ANY, Address, connect, parse_address
from provider import seal
from tests.assets import generate_bundle_vectors as tiny
from tests.enclave.test_server import (
    Parent,
    consumer_request,
    error_of,
    single_response,
    streamed_pieces,
)
from tests.localaws import KEYS, aws_client, create_weights_key

MODEL_ID = "nci-test/tiny:1"
PARENT = Credentials("AKIAPARENT", "local-secret-7c1e", "", "")


@dataclass
class World:
    nsm_state: Path
    kms: LocalKms
    key_arn: str
    bundle: Path
    manifest_sha256: bytes
    root_pem: bytes


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("boot")
    nsm = EmulatedNsm(state_dir=root / "state")
    config = LocalKmsConfig(
        principals=KEYS,
        trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(nsm.root_pem)),
    )
    with LocalKms(config) as kms:
        key = create_weights_key(kms)
        manifest = seal(
            tiny.write_model(root / "model"),
            kms_client=aws_client(kms, "AKIAPROVIDER"),
            kms_key_id=key["KeyId"],
            model_id=MODEL_ID,
            out=root / "bundle",
            chunk_size=4096,
        )
        yield World(root / "state", kms, key["Arn"], root / "bundle", manifest.digest, nsm.root_pem)


@pytest.fixture
def sockets() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="nci-boot-"))  # unix socket paths are short
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def config_value(world: World, sockets: Path, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "control": f"unix://{sockets}/enclave.sock",
        "bundle_streamer": f"unix://{sockets}/bundles.sock",
        "kms_relay": f"unix://{sockets}/kms.sock",
        "kms_endpoint": "http://127.0.0.1:{port}",
        "region": "us-east-1",
        "bundle": "tiny",
        "model_id": MODEL_ID,
        "kms_key_arn": world.key_arn,
        "manifest_sha256": None,
        "nsm": f"emulated:{world.nsm_state}",
        "max_concurrency": 2,
        "threads": 1,
    }
    value.update(changes)
    return value


def config_for(world: World, sockets: Path, **changes: Any) -> EnclaveConfig:
    return parse_config(json.dumps(config_value(world, sockets, **changes)).encode())


class Loader:
    """Stands in for load_runtime: keeps the unlocked model, serves the echo runtime."""

    def __init__(self, fail: bool = False) -> None:
        self.models: list[UnlockedModel] = []
        self.threads: int | None = None
        self.fail = fail

    def __call__(self, model: UnlockedModel, *, threads: int | None = None) -> EchoRuntime:
        if self.fail:
            raise EnclaveError("config.json has no model_type")
        self.models.append(model)
        self.threads = threads
        return EchoRuntime()


@dataclass
class Booting:
    parent: Parent
    stop: asyncio.Event
    task: asyncio.Task[bool]

    async def health(self) -> Health:
        return await self.parent.health()

    async def settled(self, timeout: float = 30) -> Health:
        """Health once the boot is ready or failed."""
        async with asyncio.timeout(timeout):
            while True:
                health = await self.health()
                if health.state != "booting":
                    return health
                await asyncio.sleep(0.02)


class ClosingRelay:
    """A relay that accepts and closes at once: KMS unreachable behind the parent."""

    def __init__(self) -> None:
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()


@contextlib.asynccontextmanager
async def booting(
    world: World,
    config: EnclaveConfig,
    *,
    relay: str | ClosingRelay = "kms",
    **boot_options: Any,
) -> AsyncIterator[Booting]:
    """The parent's services, the enclave's serve() as a task, and a control connection."""
    async with contextlib.AsyncExitStack() as stack:
        streamer = BundleStreamer(config.bundle_streamer, {"tiny": FolderSource(world.bundle)})
        await stack.enter_async_context(streamer)
        relay_path = config.kms_relay.path
        assert relay_path is not None
        if isinstance(relay, ClosingRelay):
            server = await asyncio.start_unix_server(relay.handle, relay_path)
            stack.push_async_callback(_closed, server)
        elif relay == "kms":
            kms = parse_address(world.kms.endpoint_url.replace("http://", "tcp://"))
            await stack.enter_async_context(KmsForwarder(kms, listen=config.kms_relay))
        stop = asyncio.Event()
        boot_options.setdefault("backoff", 0.01)
        task = asyncio.create_task(serve(config, stop=stop, **boot_options))
        parent = await _connect(config.control, task)
        try:
            yield Booting(parent, stop, task)
        finally:
            await parent.close()
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)


async def _closed(server: asyncio.AbstractServer) -> None:
    server.close()


async def _connect(address: Address, task: asyncio.Task[bool]) -> Parent:
    for _ in range(500):
        if task.done():
            task.result()
            raise AssertionError("serve() ended before listening")
        try:
            return await Parent.connect(address)
        except TransportError:
            await asyncio.sleep(0.01)
    raise AssertionError("the enclave never listened")


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 60))


# --- The boot ---------------------------------------------------------------------------------


def test_boots_through_every_step_and_serves_a_consumer(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loader = Loader()
    config = config_for(world, sockets)
    nonce = Nonce.random()

    async def scenario() -> tuple[Health, Health, Frame, list[Frame], Any, bool]:
        async with booting(world, config, load_runtime=loader) as enclave:
            waiting = await enclave.health()
            while waiting.step < 2:
                waiting = await enclave.health()
            await enclave.parent.send(PARENT.frame())
            ready = await enclave.settled()
            document = await enclave.parent.ask(
                Frame(FrameType.ATTESTATION_REQUEST, 3, nonce.value)
            )
            fields = cbor2.loads(verify_document(world, document.payload, nonce).user_data)
            consumer = consumer_request(fields["ohttp_key_config"], mode=InferMode.CHUNKED)
            await enclave.parent.send(consumer.frame(5))
            frames = await enclave.parent.until_end(5)
            enclave.stop.set()
            ok = await enclave.task
            return waiting, ready, document, frames, consumer, ok

    caplog.set_level(logging.DEBUG)
    waiting, ready, document, frames, consumer, ok = run(scenario())
    assert (waiting.state, waiting.step, waiting.name) == ("booting", 2, "credentials")
    assert (ready.state, ready.step, ready.error) == ("ready", 6, "")
    assert ok
    # the unlocked tensors are the provider's, and the runtime got the configured threads
    (model,) = loader.models
    for name, data in tiny.tensor_bytes().items():
        assert model.tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes() == data
    assert loader.threads == 1
    # the attestation names the model and the exact bundle it unlocked
    fields = cbor2.loads(verify_document(world, document.payload, nonce).user_data)
    assert (fields["model_id"], fields["manifest_sha256"]) == (MODEL_ID, world.manifest_sha256)
    pieces = streamed_pieces(consumer, frames)
    assert isinstance(pieces[-1], StreamEnd)
    assert "".join(p.text for p in pieces if isinstance(p, StreamDelta)).startswith("SECRET")
    # the log tells the steps, never the credentials or the content
    for step in ("1/6: nsm", "2/6: credentials", "3/6: key release", "4/6: model", "5/6", "6/6"):
        assert f"boot step {step}" in caplog.text
    assert PARENT.secret_access_key not in caplog.text
    assert "SECRET" not in caplog.text


def verify_document(world: World, document: bytes, nonce: Nonce) -> Any:
    policy = Policy.expect(
        _measure.application_measurements(), nonce=nonce, max_age=timedelta(minutes=1)
    )
    return verify(
        document, roots=[TrustRoot.local(world.root_pem)], now=datetime.now(UTC), policy=policy
    )


def test_pinned_manifest_digest_boots(world: World, sockets: Path) -> None:
    config = config_for(world, sockets, manifest_sha256=world.manifest_sha256.hex())

    async def scenario() -> Health:
        async with booting(world, config, load_runtime=Loader()) as enclave:
            await enclave.parent.send(PARENT.frame())
            return await enclave.settled()

    assert run(scenario()).ready


def test_kms_unreachable_is_retried_a_few_times_then_failed(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    relay = ClosingRelay()
    config = config_for(world, sockets)

    async def scenario() -> tuple[Health, str, bool]:
        async with booting(
            world, config, relay=relay, load_runtime=Loader(), attempts=3, kms_attempts=1
        ) as enclave:
            await enclave.parent.send(PARENT.frame())
            health = await enclave.settled()
            # still up: health answers, consumers hear not_ready
            _, key_config = generate_key_config(1)
            refused = error_of(await enclave.parent.ask(consumer_request(key_config).frame(2)))
            return health, refused, enclave.task.done()

    caplog.set_level(logging.INFO)
    health, refused, ended = run(scenario())
    assert (health.state, health.step, health.name) == ("failed", 3, "key release and unlock")
    assert health.error == "kms_unavailable"
    assert relay.connections == 3  # one KMS connection per attempt, then no more
    assert refused == "not_ready"
    assert not ended  # a failed enclave stays up to report it
    assert caplog.text.count("key release attempt") == 2
    assert "boot step 3 (key release and unlock) failed: kms_unavailable" in caplog.text
    assert PARENT.secret_access_key not in caplog.text


def test_missing_kms_relay_fails_and_exits_when_configured_to(world: World, sockets: Path) -> None:
    config = config_for(world, sockets, exit_on_failure=True)

    async def scenario() -> tuple[bool, bool]:
        async with booting(
            world, config, relay="none", load_runtime=Loader(), attempts=2, kms_attempts=1
        ) as enclave:
            await enclave.parent.send(PARENT.frame())
            ok = await asyncio.wait_for(enclave.task, 30)  # returns without being stopped
            return ok, enclave.stop.is_set()

    assert run(scenario()) == (False, False)


def test_modified_enclave_image_is_denied_the_key_without_retries(
    world: World, sockets: Path, caplog: pytest.LogCaptureFixture
) -> None:
    changed = dict(_measure.application_measurements())
    changed[0] = _measure.extend(changed[0], b"a backdoored enclave image")
    rogue = EmulatedNsm(state_dir=world.nsm_state, measurements=changed)
    config = config_for(world, sockets)

    async def scenario() -> Health:
        async with booting(world, config, nsm=rogue, load_runtime=Loader()) as enclave:
            await enclave.parent.send(PARENT.frame())
            return await enclave.settled()

    caplog.set_level(logging.INFO)
    health = run(scenario())
    assert (health.state, health.error) == ("failed", "key_release_denied")
    assert "key release attempt" not in caplog.text
    assert "KeyReleaseDenied AccessDeniedException" in caplog.text


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"model_id": "nci-test/other:1"}, "bundle_refused"),
        ({"manifest_sha256": "00" * 32}, "bundle_refused"),
        ({"bundle": "absent"}, "bundle_refused"),
    ],
    ids=["other_model", "other_bundle_digest", "unknown_bundle"],
)
def test_refuses_a_bundle_it_is_not_pinned_to(
    world: World, sockets: Path, change: dict[str, Any], code: str
) -> None:
    config = config_for(world, sockets, **change)

    async def scenario() -> Health:
        async with booting(world, config, load_runtime=Loader()) as enclave:
            await enclave.parent.send(PARENT.frame())
            return await enclave.settled()

    assert (run(scenario()).error) == code


def test_runtime_refusing_the_weights_fails_the_model_load(world: World, sockets: Path) -> None:
    config = config_for(world, sockets)

    async def scenario() -> Health:
        async with booting(world, config, load_runtime=Loader(fail=True)) as enclave:
            await enclave.parent.send(PARENT.frame())
            return await enclave.settled()

    health = run(scenario())
    assert (health.state, health.step, health.name, health.error) == (
        "failed",
        4,
        "model load",
        "model_invalid",
    )


def test_no_credentials_in_time_fails_step_two(world: World, sockets: Path) -> None:
    config = config_for(world, sockets)

    async def scenario() -> Health:
        async with booting(
            world, config, load_runtime=Loader(), credentials_timeout=0.1
        ) as enclave:
            return await enclave.settled()

    health = run(scenario())
    assert (health.step, health.error) == (2, "credentials_timeout")


@pytest.mark.parametrize(
    ("error", "step", "code"),
    [
        (KeyReleaseDenied("no", code="AccessDeniedException"), 3, "key_release_denied"),
        (KeyReleaseUnavailable("later"), 3, "kms_unavailable"),
        (BundleIntegrityError("chunk 2"), 3, "bundle_integrity"),
        (TransportError("refused"), 3, "transport"),
        (ValueError("bad shape"), 4, "model_invalid"),
        (ValueError("bad"), 5, "internal"),
        (RuntimeError("?"), 3, "internal"),
    ],
)
def test_boot_errors_map_to_health_codes(error: Exception, step: int, code: str) -> None:
    assert boot_error_code(error, step) == code
    assert code in BOOT_ERROR_CODES


# --- The built-in model, end to end -----------------------------------------------------------


@pytest.fixture(scope="module")
def builtin_world(world: World, tmp_path_factory: pytest.TempPathFactory) -> World:
    builtin = pytest.importorskip("enclave.models.builtin")
    root = tmp_path_factory.mktemp("builtin")
    manifest = seal(
        builtin.write_builtin_model_folder(root / "model"),
        kms_client=aws_client(world.kms, "AKIAPROVIDER"),
        kms_key_id=world.key_arn,
        model_id=builtin.BUILTIN_MODEL_ID,
        out=root / "bundle",
    )
    return World(
        world.nsm_state, world.kms, world.key_arn, root / "bundle", manifest.digest, world.root_pem
    )


def shapes_png() -> Image:
    from PIL import Image as PILImage

    from enclave.models import shapes

    scene = shapes.sample_scene(random.Random(7), "train")
    pixels = (shapes.render(scene).transpose(1, 2, 0) * 255).astype("uint8")
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, format="PNG")
    return Image("image/png", out.getvalue())


def test_boots_the_sealed_builtin_model_and_answers(builtin_world: World, sockets: Path) -> None:
    config = config_for(builtin_world, sockets, model_id="anymal-shapes")

    async def scenario() -> tuple[Health, Any, list[Frame]]:
        async with booting(builtin_world, config) as enclave:
            await enclave.parent.send(PARENT.frame())
            health = await enclave.settled(timeout=60)
            assert health.ready, health
            nonce = Nonce.random()
            document = await enclave.parent.ask(
                Frame(FrameType.ATTESTATION_REQUEST, 3, nonce.value)
            )
            fields = cbor2.loads(verify_document(builtin_world, document.payload, nonce).user_data)
            consumer = consumer_request(
                fields["ohttp_key_config"],
                prompt="what shape is in the top left ?",
                images=(shapes_png(),),
                max_tokens=8,
            )
            await enclave.parent.send(consumer.frame(5))
            return health, consumer, await enclave.parent.until_end(5)

    _, consumer, frames = run(scenario())
    response = single_response(consumer, frames)
    assert response.text.strip()
    assert 1 <= response.usage.completion_tokens <= 8


# --- The entry point: run() until SIGTERM --------------------------------------------------------


def test_run_boots_answers_health_and_stops_cleanly_on_sigterm(world: World, sockets: Path) -> None:
    """``run`` (behind ``python -m enclave`` and ``nci enclave run``) in this process: a parent
    thread waits for the control socket, reads health (step 2: waiting for credentials), then sends
    SIGTERM to the process."""
    config = config_for(world, sockets)
    seen: list[Health] = []

    def parent() -> None:
        try:
            for _ in range(1000):
                with contextlib.suppress(TransportError):
                    sock = connect(config.control, timeout=5)
                    break
                time.sleep(0.01)
            with sock:
                for _ in range(1000):
                    send_frame(sock, Frame(FrameType.HEALTH_PING, 1, b""))
                    seen.append(Health.decode(recv_frame(sock).payload))
                    if seen[-1].step == 2:
                        break
                    time.sleep(0.01)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=parent)
    thread.start()
    status = run_enclave(config)
    thread.join(10)
    assert status == 0
    assert (seen[-1].state, seen[-1].step, seen[-1].name) == ("booting", 2, "credentials")


def test_entry_point_refuses_a_bad_config(
    sockets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from enclave.__main__ import main as enclave_main

    path = sockets / "enclave.json"
    path.write_text("{}")
    assert enclave_main(["--config", str(path)]) == 2
    assert "InvalidConfig" in capsys.readouterr().err


# --- The configuration ---------------------------------------------------------------------------


def test_parses_the_contracts_example(world: World, sockets: Path) -> None:
    config = config_for(world, sockets, manifest_sha256="ab" * 32, threads=None)
    assert config.control == parse_address(f"unix://{sockets}/enclave.sock")
    assert config.manifest_sha256 == bytes([0xAB]) * 32
    assert config.emulated_nsm_state == world.nsm_state
    assert config.threads is None
    assert not config.exit_on_failure
    assert config.kms_endpoint_url(4242) == "http://127.0.0.1:4242"


def test_aws_shaped_config(world: World, sockets: Path) -> None:
    config = config_for(
        world,
        sockets,
        control="vsock://ANY:5000",
        bundle_streamer="vsock://3:5001",
        kms_relay="vsock://3:5002",
        kms_endpoint="https://kms.us-east-1.amazonaws.com:{port}",
        nsm="device",
    )
    assert config.control == Address("vsock", cid=VMADDR_CID_ANY, port=5000)
    assert config.emulated_nsm_state is None
    assert config.kms_endpoint_url(8443) == "https://kms.us-east-1.amazonaws.com:8443"


BAD_CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown_key": ({"debug": True}, "debug"),
    "bad_address": ({"control": "unix://relative.sock"}, "control"),
    "tcp_without_port": ({"kms_relay": "tcp://127.0.0.1"}, "kms_relay"),
    "address_not_text": ({"bundle_streamer": 5}, "bundle_streamer"),
    "endpoint_without_port": (
        {"kms_endpoint": "https://kms.us-east-1.amazonaws.com"},
        "kms_endpoint",
    ),
    "endpoint_with_path": ({"kms_endpoint": "http://127.0.0.1:{port}/x"}, "kms_endpoint"),
    "bad_region": ({"region": "US-EAST-1"}, "region"),
    "key_in_another_region": ({"region": "eu-west-1"}, "kms_key_arn"),
    "key_id_not_arn": ({"kms_key_arn": "alias/weights"}, "kms_key_arn"),
    "bundle_with_space": ({"bundle": "a b"}, "bundle"),
    "model_id_too_long": ({"model_id": "m" * 129}, "model_id"),
    "digest_upper_case": ({"manifest_sha256": "AB" * 32}, "manifest_sha256"),
    "digest_short": ({"manifest_sha256": "ab" * 31}, "manifest_sha256"),
    "nsm_relative": ({"nsm": "emulated:state"}, "nsm"),
    "nsm_other": ({"nsm": "/dev/nsm"}, "nsm"),
    "concurrency_zero": ({"max_concurrency": 0}, "max_concurrency"),
    "concurrency_bool": ({"max_concurrency": True}, "max_concurrency"),
    "concurrency_float": ({"max_concurrency": 2.0}, "max_concurrency"),
    "threads_string": ({"threads": "2"}, "threads"),
    "exit_flag_int": ({"exit_on_failure": 1}, "exit_on_failure"),
}


@pytest.mark.parametrize(("change", "key"), BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_rejects_config_naming_the_key(
    world: World, sockets: Path, change: dict[str, Any], key: str
) -> None:
    with pytest.raises(InvalidConfig) as caught:
        config_for(world, sockets, **change)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)


def test_rejects_config_missing_a_key(world: World, sockets: Path) -> None:
    value = config_value(world, sockets)
    del value["kms_relay"]
    with pytest.raises(InvalidConfig) as caught:
        parse_config(json.dumps(value).encode())
    assert caught.value.key == "kms_relay"


@pytest.mark.parametrize(
    "data",
    [
        b"[]",
        b"{",
        b"\xff{}",
        b'{"control": NaN}',
        b'{"region": "a", "region": "b"}',
        b"[" * 100_000,
        b" " * (MAX_CONFIG_SIZE + 1),
    ],
    ids=["array", "truncated", "not_utf8", "nan", "duplicate_key", "deep", "oversized"],
)
def test_rejects_config_files_that_are_not_one_json_object(data: bytes) -> None:
    with pytest.raises(InvalidConfig):
        parse_config(data)


def test_load_config_reads_the_file(world: World, sockets: Path) -> None:
    path = sockets / "enclave.json"
    path.write_text(json.dumps(config_value(world, sockets)))
    assert load_config(path) == config_for(world, sockets)
    with pytest.raises(InvalidConfig):
        load_config(sockets / "absent.json")


def test_cli_refuses_a_bad_config(sockets: Path) -> None:
    from nci.cli import main

    path = sockets / "enclave.json"
    path.write_text('{"control": "unix:///x.sock"}')
    err = io.StringIO()
    assert main(["enclave", "run", "--config", str(path)], out=io.StringIO(), err=err) == 2
    assert "InvalidConfig" in err.getvalue()
