"""Seal, publish and inspect: round trips, hostile model folders, the local KMS and moto S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from attestation.roots import TrustRoot
from kms_policy.localkms import LocalKms, LocalKmsConfig
from nci.cli import main
from protocol.bundle import Manifest, derive_bundle_key, open_chunk
from protocol.errors import MalformedBundle
from provider import inspect, publish, seal
from provider.errors import ConfigError, InvalidModel, KmsError, PublishError
from provider.seal import CHUNKS_NAME, MANIFEST_NAME, seal_with_data_key
from tests.assets import generate_bundle_vectors as vectors
from tests.assets.generate_bundle_vectors import write_safetensors
from tests.localaws import (
    KEYS,
    aws_client,
    create_weights_key,
)

DATA_KEY = hashlib.sha256(b"provider test data key").digest()
BUNDLE_ID = bytes(range(16))


def rand(label: str, size: int) -> bytes:
    return vectors.stream(label, size)


def tensors(prefix: str) -> dict[str, tuple[str, list[int], bytes]]:
    """float32, bfloat16, float16 and int8 tensors of awkward sizes (padding between them)."""
    return {
        f"{prefix}.f32": ("F32", [7, 33], rand(f"{prefix}f32", 7 * 33 * 4)),
        f"{prefix}.bf16": ("BF16", [1000], rand(f"{prefix}bf16", 2000)),
        f"{prefix}.f16": ("F16", [3, 5, 7], rand(f"{prefix}f16", 210)),
        f"{prefix}.i8": ("I8", [4099], rand(f"{prefix}i8", 4099)),
    }


def sharded_model(root: Path) -> tuple[Path, dict[str, bytes], dict[str, bytes]]:
    """A Hugging Face-style folder: two shards, an index, a config and tokenizer files."""
    root.mkdir()
    first, second = tensors("model.layers.0"), tensors("model.layers.1")
    write_safetensors(root / "model-00001-of-00002.safetensors", first, {"format": "pt"})
    write_safetensors(root / "model-00002-of-00002.safetensors", second)
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    files = {
        "config.json": json.dumps({"hidden_size": 32, "rms_norm_eps": 1e-5}).encode(),
        "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {"vocab": {"a": 0}}}',
        "tokenizer/special_tokens_map.json": b"{}",
        "README.md": b"# tiny\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / ".gitattributes").write_text("*.safetensors filter=lfs\n")  # hidden: skipped
    expected = {name: data for name, (_, _, data) in (first | second).items()}
    return root, expected, files


def open_bundle(folder: Path, data_key: bytes = DATA_KEY) -> tuple[Manifest, bytes]:
    """Decrypt every chunk as the enclave would, and return the plaintext stream."""
    manifest = Manifest.from_cbor((folder / MANIFEST_NAME).read_bytes())
    sealed = (folder / CHUNKS_NAME).read_bytes()
    assert len(sealed) == manifest.sealed_size
    key = derive_bundle_key(data_key, manifest.bundle_id)
    plain = b"".join(
        open_chunk(
            key,
            manifest.digest,
            i,
            manifest.is_final(i),
            sealed[manifest.sealed_offset(i) :][: manifest.sealed_chunk_size(i)],
        )
        for i in range(manifest.chunk_count)
    )
    return manifest, plain


def seal_locally(model: Path, out: Path, **options: Any) -> Manifest:
    args: dict[str, Any] = {
        "data_key": DATA_KEY,
        "encrypted_data_key": b"blob",
        "bundle_id": BUNDLE_ID,
        "kms_key_id": "alias/test",
        "model_id": "acme/tiny:1",
        "out": out,
        "chunk_size": 4096,
    }
    args.update(options)
    return seal_with_data_key(model, **args)


# -- round trips --------------------------------------------------------------------------------


def test_round_trip_single_safetensors_file(tmp_path: Path) -> None:
    data = tensors("w")
    write_safetensors(tmp_path / "model.safetensors", data)
    manifest = seal_locally(tmp_path / "model.safetensors", tmp_path / "bundle")
    again, plain = open_bundle(tmp_path / "bundle")
    assert again == manifest
    assert [t.name for t in manifest.tensors] == list(data)
    for entry in manifest.tensors:
        dtype, shape, raw = data[entry.name]
        assert (entry.dtype, list(entry.shape)) == (dtype, shape)
        assert plain[entry.offset : entry.offset + entry.length] == raw
    assert manifest.files == ()
    assert dict(manifest.model_config) == {}
    assert sorted(p.name for p in (tmp_path / "bundle").iterdir()) == [CHUNKS_NAME, MANIFEST_NAME]


def test_round_trip_sharded_folder_with_index_config_and_tokenizer(tmp_path: Path) -> None:
    model, expected, files = sharded_model(tmp_path / "model")
    seen: list[tuple[int, int]] = []
    manifest = seal_locally(model, tmp_path / "bundle", progress=lambda d, t: seen.append((d, t)))
    _, plain = open_bundle(tmp_path / "bundle")
    assert {t.name for t in manifest.tensors} == set(expected)
    for entry in manifest.tensors:
        assert plain[entry.offset : entry.offset + entry.length] == expected[entry.name]
    assert sorted(f.name for f in manifest.files) == sorted(files)
    for file in manifest.files:
        assert plain[file.offset : file.offset + file.length] == files[file.name]
    assert manifest.model_config["rms_norm_eps"] == 1e-5
    assert seen[-1] == (manifest.plaintext_size, manifest.plaintext_size)
    assert len(seen) == manifest.chunk_count


def test_padding_between_entries_is_zero(tmp_path: Path) -> None:
    model, _, _ = sharded_model(tmp_path / "model")
    manifest = seal_locally(model, tmp_path / "bundle")
    _, plain = open_bundle(tmp_path / "bundle")
    ranges = [(t.offset, t.length) for t in manifest.tensors]
    ranges += [(f.offset, f.length) for f in manifest.files]
    position = 0
    for offset, length in ranges:
        assert plain[position:offset] == bytes(offset - position)
        position = offset + length
    assert position == manifest.plaintext_size == len(plain)


def test_two_seals_of_one_model_differ_only_by_key_and_id(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    a = seal_locally(tmp_path / "m.safetensors", tmp_path / "a")
    b = seal_locally(tmp_path / "m.safetensors", tmp_path / "b", bundle_id=b"\x01" * 16)
    assert a.digest != b.digest
    assert (tmp_path / "a" / CHUNKS_NAME).read_bytes() != (
        tmp_path / "b" / CHUNKS_NAME
    ).read_bytes()


def test_vectors_regenerate_identically(tmp_path: Path) -> None:
    vectors.generate(tmp_path)
    for name in (MANIFEST_NAME, CHUNKS_NAME, "vectors.json"):
        assert (tmp_path / name).read_bytes() == (vectors.HERE / name).read_bytes(), name


# -- hostile or unfit models --------------------------------------------------------------------


def _pickle_next_to_safetensors(root: Path) -> Path:
    write_safetensors(root / "model.safetensors", tensors("w"))
    (root / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 pickle")
    return root


def _truncated(root: Path) -> Path:
    write_safetensors(root / "model.safetensors", tensors("w"))
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[:-10])
    return root


def _header(root: Path, header: dict[str, Any], body: bytes) -> Path:
    text = json.dumps(header).encode()
    (root / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + body)
    return root


def _overlapping(root: Path) -> Path:
    a = {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]}
    b = {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}
    return _header(root, {"a": a, "b": b}, bytes(12))


def _hole(root: Path) -> Path:
    return _header(root, {"a": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, bytes(8))


def _unknown_dtype(root: Path) -> Path:
    return _header(
        root, {"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)
    )


def _wrong_size(root: Path) -> Path:
    return _header(root, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}, bytes(4))


def _huge_header(root: Path) -> Path:
    (root / "model.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    return root


def _duplicate_json_key(root: Path) -> Path:
    text = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}, "a": {}}'
    (root / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\x00")
    return root


def _escaping_symlink(root: Path) -> Path:
    write_safetensors(root / "model.safetensors", tensors("w"))
    outside = root.parent / "secret.txt"
    outside.write_text("not part of the model")
    (root / "tokenizer.json").symlink_to(outside)
    return root


def _index_mismatch(root: Path) -> Path:
    write_safetensors(root / "model.safetensors", tensors("w"))
    index = {"weight_map": {"w.f32": "model.safetensors", "ghost": "model.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    return root


def _no_weights(root: Path) -> Path:
    (root / "config.json").write_text("{}")
    return root


def _bad_config(root: Path) -> Path:
    write_safetensors(root / "model.safetensors", tensors("w"))
    (root / "config.json").write_text('{"eps": NaN}')
    return root


def _same_tensor_in_two_shards(root: Path) -> Path:
    write_safetensors(root / "a.safetensors", tensors("w"))
    write_safetensors(root / "b.safetensors", tensors("w"))
    return root


HOSTILE_MODELS: list[Any] = [
    pytest.param(_pickle_next_to_safetensors, "pickle", id="pickle_bin_next_to_safetensors"),
    pytest.param(_truncated, "past the", id="truncated_safetensors"),
    pytest.param(_overlapping, "overlaps", id="header_offsets_overlap"),
    pytest.param(_hole, "hole", id="header_offsets_leave_a_hole"),
    pytest.param(_unknown_dtype, "F8_E4M3", id="dtype_outside_format_v1"),
    pytest.param(_wrong_size, "numel", id="offsets_not_numel_times_itemsize"),
    pytest.param(_huge_header, "exceeds", id="header_size_over_cap"),
    pytest.param(_duplicate_json_key, "JSON", id="duplicate_key_in_header"),
    pytest.param(_escaping_symlink, "out of the model folder", id="symlink_escaping_folder"),
    pytest.param(_index_mismatch, "ghost", id="index_names_missing_tensor"),
    pytest.param(_no_weights, "no .safetensors", id="folder_without_weights"),
    pytest.param(_bad_config, "config.json", id="config_with_nan"),
    pytest.param(_same_tensor_in_two_shards, "in both", id="tensor_in_two_shards"),
]


@pytest.mark.parametrize(("build", "message"), HOSTILE_MODELS)
def test_rejects_unfit_model(tmp_path: Path, build: Any, message: str) -> None:
    root = tmp_path / "model"
    root.mkdir()
    model = build(root)
    with pytest.raises(InvalidModel, match=message):
        seal_locally(model, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_rejects_pickle_file_given_directly(tmp_path: Path) -> None:
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidModel, match=r"(?i)weights only through safetensors"):
        seal_locally(tmp_path / "model.pt", tmp_path / "bundle")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chunk_size": 5000}, "chunk_size"),
        ({"model_id": "bad id"}, "model_id"),
        ({"extra_context": {"nci:model": "x"}}, "reserved"),
    ],
)
def test_rejects_bad_settings_before_any_work(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    with pytest.raises(ConfigError, match=message):
        seal_locally(tmp_path / "m.safetensors", tmp_path / "bundle", **options)


def test_refuses_to_overwrite_a_bundle(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    seal_locally(tmp_path / "m.safetensors", tmp_path / "bundle")
    with pytest.raises(ConfigError, match="already exists"):
        seal_locally(tmp_path / "m.safetensors", tmp_path / "bundle")


# -- the local KMS and moto S3 ------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_kms() -> Iterator[LocalKms]:
    config = LocalKmsConfig(principals=KEYS, trusted_roots=(TrustRoot.aws_nitro_g1(),))
    with LocalKms(config) as server:
        yield server


def aws(service: str, kms: LocalKms, access_key: str = "AKIAPROVIDER") -> Any:
    return aws_client(kms, access_key, service)


@pytest.fixture(scope="module")
def key_arn(local_kms: LocalKms) -> str:
    return str(create_weights_key(local_kms)["Arn"])


@pytest.fixture(scope="module")
def bucket(local_kms: LocalKms) -> str:
    aws("s3", local_kms).create_bucket(Bucket="acme-models")
    return "acme-models"


def test_seal_with_kms_and_publish_to_s3(
    tmp_path: Path, local_kms: LocalKms, key_arn: str, bucket: str
) -> None:
    model, _, _ = sharded_model(tmp_path / "model")
    manifest = seal(
        model,
        kms_client=aws("kms", local_kms),
        kms_key_id=key_arn,
        model_id="acme/tiny:1",
        out=tmp_path / "bundle",
        extra_context={"tenant": "acme"},
    )
    assert manifest.kms_key_id == key_arn
    assert dict(manifest.encryption_context) == {
        "nci:model": "acme/tiny:1",
        "nci:bundle": manifest.bundle_id.hex(),
        "tenant": "acme",
    }
    s3 = aws("s3", local_kms)
    keys = publish(tmp_path / "bundle", f"s3://{bucket}/tiny/1/", s3_client=s3)
    assert keys == ["tiny/1/manifest.cbor", "tiny/1/chunks.bin"]
    for key, name in zip(keys, (MANIFEST_NAME, CHUNKS_NAME), strict=True):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert body == (tmp_path / "bundle" / name).read_bytes()
    summary = inspect(tmp_path / "bundle")
    assert summary["kms_key_id"] == key_arn
    assert summary["chunks_bin"]["complete"] is True
    assert manifest.encrypted_data_key.hex() not in json.dumps(summary)


def test_publish_uses_multipart_upload_for_large_chunks(
    tmp_path: Path, local_kms: LocalKms, bucket: str
) -> None:
    size = 9 * 1024 * 1024
    write_safetensors(tmp_path / "m.safetensors", {"w": ("U8", [size], os.urandom(size))})
    seal_locally(tmp_path / "m.safetensors", tmp_path / "bundle", chunk_size=1024 * 1024)
    s3 = aws("s3", local_kms)
    seen: list[int] = []
    keys = publish(tmp_path / "bundle", f"s3://{bucket}/big", s3_client=s3,
                   progress=lambda d, t: seen.append(d))  # fmt: skip
    head = s3.head_object(Bucket=bucket, Key=keys[1])
    assert head["ETag"].strip('"').endswith("-2")  # two parts: a multipart upload
    body = s3.get_object(Bucket=bucket, Key=keys[1])["Body"].read()
    assert (
        hashlib.sha256(body).digest()
        == hashlib.sha256((tmp_path / "bundle" / CHUNKS_NAME).read_bytes()).digest()
    )
    assert seen[-1] == head["ContentLength"] + (tmp_path / "bundle" / MANIFEST_NAME).stat().st_size


def test_kms_refusal_is_a_kms_error_and_writes_nothing(
    tmp_path: Path, local_kms: LocalKms, key_arn: str
) -> None:
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    with pytest.raises(KmsError, match="AccessDeniedException"):
        seal(
            tmp_path / "m.safetensors",
            kms_client=aws("kms", local_kms, "AKIAOTHER"),
            kms_key_id=key_arn,
            model_id="acme/tiny:1",
            out=tmp_path / "bundle",
        )
    assert not (tmp_path / "bundle").exists()


def test_publish_refuses_incomplete_bundle(
    tmp_path: Path, local_kms: LocalKms, bucket: str
) -> None:
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    seal_locally(tmp_path / "m.safetensors", tmp_path / "bundle")
    chunks = tmp_path / "bundle" / CHUNKS_NAME
    chunks.write_bytes(chunks.read_bytes()[:-1])
    with pytest.raises(PublishError, match="promises"):
        publish(tmp_path / "bundle", f"s3://{bucket}/x", s3_client=aws("s3", local_kms))
    with pytest.raises(ConfigError, match="bucket"):
        publish(tmp_path / "bundle", "s3://A_B/x", s3_client=aws("s3", local_kms))


def test_inspect_summarises_without_the_encrypted_key() -> None:
    summary = inspect((vectors.HERE / MANIFEST_NAME).read_bytes())
    assert summary["tensors"]["by_dtype"]["BF16"] == {"count": 1, "bytes": 6144}
    assert summary["encrypted_data_key"]["length"] == len(vectors.ENCRYPTED_DATA_KEY)
    assert vectors.ENCRYPTED_DATA_KEY.hex() not in json.dumps(summary)
    with pytest.raises(MalformedBundle):
        inspect(b"\xa0")


# -- the command line ---------------------------------------------------------------------------


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    return main(list(argv), out=out, err=err), out.getvalue(), err.getvalue()


def test_cli_seal_inspect_publish(
    tmp_path: Path,
    local_kms: LocalKms,
    key_arn: str,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPROVIDER")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it caches an earlier test's credentials
    write_safetensors(tmp_path / "m.safetensors", tensors("w"))
    status, out, err = run(
        "provider", "seal", str(tmp_path / "m.safetensors"), "--kms-key", key_arn,
        "--model-id", "acme/tiny:1", "--out", str(tmp_path / "bundle"), "--chunk-size", "4096",
        "--context", "tenant=acme", "--endpoint-url", local_kms.endpoint_url, "--json",
    )  # fmt: skip
    assert status == 0, err
    assert json.loads(out)["encryption_context"]["tenant"] == "acme"
    assert "sealing: 100%" in err
    status, out, _ = run("provider", "inspect", str(tmp_path / "bundle"))
    assert status == 0
    assert "encrypted data key:" in out
    status, out, err = run(
        "provider", "publish", str(tmp_path / "bundle"), f"s3://{bucket}/cli",
        "--endpoint-url", local_kms.endpoint_url,
    )  # fmt: skip
    assert status == 0, err
    assert out.splitlines() == [f"s3://{bucket}/cli/manifest.cbor", f"s3://{bucket}/cli/chunks.bin"]


def test_cli_errors_are_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the CLI has no built-in region
    (tmp_path / "model.bin").write_bytes(b"\x80")
    status, _, err = run(
        "provider", "seal", str(tmp_path / "model.bin"), "--kms-key", "k", "--model-id", "m",
        "--out", str(tmp_path / "b"),
    )  # fmt: skip
    assert status == 2
    assert "pickle" in err
    assert "Traceback" not in err
    status, _, err = run("provider", "inspect", str(tmp_path / "missing"))
    assert status == 2
    assert "cannot read" in err
