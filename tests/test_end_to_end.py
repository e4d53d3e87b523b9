"""End to end, every piece real: the local KMS and moto S3 over loopback HTTP, the parent's
streamer on a unix socket, an emulated enclave that attests, releases the key and unlocks.

seal (provider) → publish to S3 (provider) → stream from S3 (parent) → key release + unlock
(enclave). The parent only ever holds ciphertext; a modified enclave image gets nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from attestation import _measure
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient
from attestation.roots import TrustRoot
from enclave.errors import KeyReleaseDenied
from enclave.keyrelease import KeyRelease
from enclave.unlock import Unlocker
from kms_policy.localkms import LocalKms, LocalKmsConfig
from parent.bundlesource import S3Source
from parent.streamer import BundleStreamer
from protocol.transport import parse_address
from provider import publish, seal
from tests.assets import generate_bundle_vectors as tiny
from tests.localaws import KEYS, aws_client, create_weights_key

BUCKET = "nci-sealed-models"
MODEL_ID = "nci-test/tiny:1"


def aws(kms: LocalKms, service: str, access_key: str) -> Any:
    return aws_client(kms, access_key, service)


@dataclass
class World:
    kms: LocalKms
    state: Path
    enclave: EmulatedNsm
    chunks_seen_by_parent: bytes
    parent_address: Any
    key_arn: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("e2e")
    enclave = EmulatedNsm(state_dir=root / "state")
    config = LocalKmsConfig(
        principals=KEYS,
        trusted_roots=(TrustRoot.aws_nitro_g1(), TrustRoot.local(enclave.root_pem)),
    )
    with LocalKms(config) as kms:
        # (1) the provider's key, bound to the measured enclave image
        key = create_weights_key(kms)
        # (2) seal and publish with the provider's own credentials
        model = tiny.write_model(root / "model")
        seal(
            model,
            kms_client=aws(kms, "kms", "AKIAPROVIDER"),
            kms_key_id=key["KeyId"],
            model_id=MODEL_ID,
            out=root / "bundle",
            chunk_size=4096,
        )
        s3 = aws(kms, "s3", "AKIAPROVIDER")
        s3.create_bucket(Bucket=BUCKET)
        publish(root / "bundle", f"s3://{BUCKET}/tiny/v1", s3_client=s3)
        # (3) the parent streams from S3 with its own credentials
        source = S3Source(aws(kms, "s3", "AKIAPARENT"), BUCKET, "tiny/v1")
        address = parse_address(f"unix://{root}/parent.sock")
        loop = asyncio.new_event_loop()
        streamer = BundleStreamer(address, {"tiny": source})
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        asyncio.run_coroutine_threadsafe(streamer.start(), loop).result(10)
        seen = (root / "bundle" / "chunks.bin").read_bytes()
        try:
            yield World(kms, root / "state", enclave, seen, address, key["Arn"])
        finally:
            asyncio.run_coroutine_threadsafe(streamer.close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


def test_attested_enclave_unlocks_the_model_published_to_s3(world: World) -> None:
    release = KeyRelease(NsmClient(world.enclave), aws(world.kms, "kms", "AKIAPARENT"))
    model = Unlocker(
        world.parent_address, release, expected_model_id=MODEL_ID, expected_kms_key_id=world.key_arn
    ).load("tiny")
    originals = tiny.tensor_bytes()
    for name, (_, shape) in tiny.TENSORS.items():
        tensor = model.tensors[name]
        assert tuple(tensor.shape) == shape
        assert tensor.reshape(-1).view(torch.uint8).numpy().tobytes() == originals[name]
    assert set(model.files) == {"config.json"}


def test_parent_holds_only_ciphertext(world: World) -> None:
    for name, data in tiny.tensor_bytes().items():
        assert data[:32] not in world.chunks_seen_by_parent, name


def test_modified_enclave_image_gets_no_key_and_no_model(world: World) -> None:
    changed = dict(_measure.application_measurements())
    changed[0] = _measure.extend(changed[0], b"a backdoored enclave image")
    rogue = EmulatedNsm(state_dir=world.state, measurements=changed)
    release = KeyRelease(NsmClient(rogue), aws(world.kms, "kms", "AKIAPARENT"))
    with pytest.raises(KeyReleaseDenied):
        Unlocker(
            world.parent_address,
            release,
            expected_model_id=MODEL_ID,
            expected_kms_key_id=world.key_arn,
        ).load("tiny")
