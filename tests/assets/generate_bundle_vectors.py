"""Generate the sealed-bundle test vectors in ``tests/assets/bundle/`` with a fixed key and id.

Run ``python -m tests.assets.generate_bundle_vectors [OUT_DIR]`` from the repository root. A tiny
model (three tensors of different dtypes and a ``config.json``, bytes from a counter-based hash
stream) is sealed by :func:`provider.seal.seal_with_data_key` with a fixed data key and bundle id
(KMS bypassed: the "encrypted data key" is a placeholder), chunk size 4096, so a rerun writes the
same bytes. ``tests/provider/test_seal.py`` regenerates them into a temporary folder and compares.

Files written: ``manifest.cbor``, ``chunks.bin`` and ``vectors.json`` (the key, the derived chunk
key, chunk 0's nonce and associated data, and the SHA-256 of every tensor and file plaintext).

:func:`write_safetensors` is also the tests' own minimal safetensors writer.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from protocol.bundle import DTYPE_SIZES, chunk_aad, chunk_nonce, derive_bundle_key
from provider.seal import CHUNKS_NAME, MANIFEST_NAME, seal_with_data_key

HERE = Path(__file__).resolve().parent / "bundle"
DATA_KEY = hashlib.sha256(b"nci bundle test vector: data key").digest()
BUNDLE_ID = hashlib.sha256(b"nci bundle test vector: bundle id").digest()[:16]
ENCRYPTED_DATA_KEY = b"nci test vector: placeholder for a KMS CiphertextBlob"
KMS_KEY_ID = "arn:aws:kms:us-east-1:123456789012:key/00000000-0000-4000-8000-000000000001"
MODEL_ID = "nci-test/tiny:1"
CHUNK_SIZE = 4096
CONFIG = {"model_type": "tiny", "hidden_size": 32, "rms_norm_eps": 1e-06, "vocab": 1000}
# name → (dtype, shape): 4096 + 6144 + 1000 bytes, so three chunks of 4096 (the last partial)
TENSORS: dict[str, tuple[str, tuple[int, ...]]] = {
    "embed.weight": ("F32", (32, 32)),
    "layers.0.proj.weight": ("BF16", (64, 48)),
    "head.scales": ("I8", (1000,)),
}


def stream(label: str, size: int) -> bytes:
    """Deterministic bytes: SHA-256 of ``label/counter``, concatenated."""
    blocks = (hashlib.sha256(f"{label}/{i}".encode()).digest() for i in range(-(-size // 32)))
    return b"".join(blocks)[:size]


def write_safetensors(
    path: Path,
    tensors: Mapping[str, tuple[str, Sequence[int], bytes]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A minimal safetensors writer: tensors in the given order, header padded to 8 bytes."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    position = 0
    for name, (dtype, shape, data) in tensors.items():
        assert len(data) == math.prod(shape) * DTYPE_SIZES[dtype], name
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [position, position + len(data)],
        }
        position += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as sink:
        sink.write(struct.pack("<Q", len(text)) + text)
        for _, _, data in tensors.values():
            sink.write(data)


def tensor_bytes() -> dict[str, bytes]:
    return {
        name: stream(f"tensor {name}", math.prod(shape) * DTYPE_SIZES[dtype])
        for name, (dtype, shape) in TENSORS.items()
    }


def write_model(folder: Path) -> Path:
    """The tiny model: one safetensors file and a config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    data = tensor_bytes()
    write_safetensors(
        folder / "model.safetensors",
        {name: (dtype, shape, data[name]) for name, (dtype, shape) in TENSORS.items()},
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(CONFIG, indent=2, sort_keys=True) + "\n")
    return folder


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        model = write_model(Path(scratch) / "model")
        bundle = Path(scratch) / "bundle"
        manifest = seal_with_data_key(
            model,
            data_key=DATA_KEY,
            encrypted_data_key=ENCRYPTED_DATA_KEY,
            bundle_id=BUNDLE_ID,
            kms_key_id=KMS_KEY_ID,
            model_id=MODEL_ID,
            out=bundle,
            chunk_size=CHUNK_SIZE,
        )
        for name in (MANIFEST_NAME, CHUNKS_NAME):
            shutil.copyfile(bundle / name, out / name)
        config_bytes = (model / "config.json").read_bytes()
    data = tensor_bytes()
    vectors = {
        "generator": "tests/assets/generate_bundle_vectors.py",
        "note": "fixed key and bundle id: test vectors only, never a real bundle",
        "data_key": DATA_KEY.hex(),
        "bundle_id": BUNDLE_ID.hex(),
        "bundle_key": derive_bundle_key(DATA_KEY, BUNDLE_ID).hex(),
        "encrypted_data_key": ENCRYPTED_DATA_KEY.hex(),
        "kms_key_id": KMS_KEY_ID,
        "model_id": MODEL_ID,
        "chunk_size": CHUNK_SIZE,
        "chunk_count": manifest.chunk_count,
        "plaintext_size": manifest.plaintext_size,
        "manifest_sha256": manifest.digest.hex(),
        "chunk0_nonce": chunk_nonce(0).hex(),
        "chunk0_aad": chunk_aad(manifest.digest, 0, manifest.chunk_count == 1).hex(),
        "tensors": [
            {
                "name": entry.name,
                "dtype": entry.dtype,
                "shape": list(entry.shape),
                "offset": entry.offset,
                "length": entry.length,
                "sha256": hashlib.sha256(data[entry.name]).hexdigest(),
            }
            for entry in manifest.tensors
        ],
        "files": [
            {
                "name": entry.name,
                "offset": entry.offset,
                "length": entry.length,
                "sha256": hashlib.sha256(config_bytes).hexdigest(),
            }
            for entry in manifest.files
        ],
    }
    (out / "vectors.json").write_text(json.dumps(vectors, indent=2) + "\n")


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
