"""Type confusion in hostile manifests and safetensors headers: typed errors, never TypeError."""

from __future__ import annotations

import json
from pathlib import Path

import cbor2
import pytest

from protocol.bundle import Manifest
from protocol.errors import MalformedBundle
from provider.errors import InvalidModel
from provider.seal import seal_with_data_key

VECTORS = Path(__file__).resolve().parent.parent / "assets" / "bundle"


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, 7, None])
def test_manifest_with_unhashable_or_non_text_dtype_is_malformed(dtype: object) -> None:
    fields = cbor2.loads((VECTORS / "manifest.cbor").read_bytes())
    fields["tensors"][0]["dtype"] = dtype
    with pytest.raises(MalformedBundle, match="dtype"):
        Manifest.from_cbor(cbor2.dumps(fields, canonical=True))


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, 7, None])
def test_safetensors_with_unhashable_dtype_is_an_invalid_model(
    dtype: object, tmp_path: Path
) -> None:
    header = json.dumps({"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    model = tmp_path / "m.safetensors"
    model.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4)
    with pytest.raises(InvalidModel, match="dtype"):
        seal_with_data_key(
            model,
            data_key=b"\x01" * 32,
            encrypted_data_key=b"edk",
            bundle_id=b"\x02" * 16,
            kms_key_id="arn:aws:kms:us-east-1:123456789012:key/x",
            model_id="m/x:1",
            out=tmp_path / "bundle",
        )
