"""The sealed-bundle format: manifest rules, chunk AEAD, and the attacks it must stop.

Bundles here are built in memory with the protocol API alone; ``tests/assets/bundle/`` holds the
checked-in vectors (``tests/assets/generate_bundle_vectors.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.bundle import (
    ALIGNMENT,
    MAX_MANIFEST_SIZE,
    TAG_SIZE,
    BundleLayout,
    Manifest,
    chunk_aad,
    chunk_nonce,
    derive_bundle_key,
    open_chunk,
    open_chunk_into,
    seal_chunk,
)
from protocol.errors import BundleIntegrityError, ConfigError, MalformedBundle

VECTORS = Path(__file__).resolve().parent.parent / "assets" / "bundle"
DATA_KEY = hashlib.sha256(b"test data key").digest()
BUNDLE_A = bytes.fromhex("0a" * 16)
BUNDLE_B = bytes.fromhex("0b" * 16)
MODEL = "acme/tiny:1"
PAYLOAD = hashlib.sha256(b"x").digest() * (3 * 4096 // 32) + b"tail" * 25  # 4 chunks of 4096
CONFIG = b'{"hidden_size": 32}'


@dataclass(frozen=True)
class Bundle:
    """What the parent hands the enclave: manifest bytes and a stream of sealed chunks."""

    manifest: bytes
    chunks: tuple[bytes, ...]
    data_key: bytes = DATA_KEY


def make_manifest(
    bundle_id: bytes = BUNDLE_A, *, size: int = len(PAYLOAD), **fields: Any
) -> Manifest:
    layout = BundleLayout.plan([("w", "U8", [size], size)], [("config.json", len(CONFIG))])
    args: dict[str, Any] = {
        "bundle_id": bundle_id,
        "model_id": MODEL,
        "model_config": {"hidden_size": 32, "eps": 1e-6, "tags": ["a", None, True]},
        "kms_key_id": "arn:aws:kms:us-east-1:123456789012:key/abc",
        "encrypted_data_key": b"\x01\x02\x03",
        "encryption_context": {"nci:model": MODEL, "nci:bundle": bundle_id.hex()},
        "chunk_size": 4096,
        "layout": layout,
    }
    args.update(fields)
    return Manifest.create(**args)


def plaintext(manifest: Manifest) -> bytes:
    """The plaintext stream: the tensor, zero padding to the file's offset, the file."""
    return PAYLOAD.ljust(manifest.files[0].offset, b"\x00") + CONFIG


def make_bundle(bundle_id: bytes = BUNDLE_A, data_key: bytes = DATA_KEY) -> Bundle:
    manifest = make_manifest(bundle_id)
    plain = plaintext(manifest)
    key = derive_bundle_key(data_key, bundle_id)
    chunks = []
    for i in range(manifest.chunk_count):
        start, end = manifest.chunk_plain_range(i)
        chunks.append(seal_chunk(key, manifest.digest, i, manifest.is_final(i), plain[start:end]))
    return Bundle(manifest.raw, tuple(chunks), data_key)


def read_stream(bundle: Bundle) -> bytes:
    """The enclave's view: parse the manifest, open chunks in stream order; the last chunk the
    parent sends is opened as final, so the stream's own shape is what the AEAD must vouch for."""
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(bundle.data_key, manifest.bundle_id)
    out = bytearray()
    for i, sealed in enumerate(bundle.chunks):
        out += open_chunk(key, manifest.digest, i, i == len(bundle.chunks) - 1, sealed)
    return bytes(out)


def edit(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    value = cbor2.loads(raw)
    change(value)
    return cbor2.dumps(value, canonical=True)


def flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def flip_chunk(i: int, at: int) -> Callable[[Bundle], Bundle]:
    def attack(b: Bundle) -> Bundle:
        chunks = list(b.chunks)
        chunks[i] = flip(chunks[i], at)
        return replace(b, chunks=tuple(chunks))

    return attack


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Bundle], Bundle]:
    return lambda b: replace(b, manifest=edit(b.manifest, change))


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def change(m: dict[str, Any]) -> None:
        target: Any = m
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return change


def _model_id_and_context(m: dict[str, Any]) -> None:
    m["model_id"] = "acme/tiny:2"
    m["encryption_context"]["nci:model"] = "acme/tiny:2"


def _chunk_size_and_count(m: dict[str, Any]) -> None:
    m["chunk_size"] = 8192
    m["chunk_count"] = -(-m["plaintext_size"] // 8192)


def _move_tensor(m: dict[str, Any]) -> None:
    # the tensor 64 bytes later, the stream 64 bytes longer: every rule still holds
    m["files"] = []
    m["tensors"][0]["offset"] = ALIGNMENT
    m["plaintext_size"] = ALIGNMENT + m["tensors"][0]["length"]
    m["chunk_count"] = -(-m["plaintext_size"] // m["chunk_size"])


def _move_file(m: dict[str, Any]) -> None:
    m["files"][0]["offset"] += ALIGNMENT
    m["plaintext_size"] += ALIGNMENT


def _swap_from_other_bundle(b: Bundle) -> Bundle:
    other = make_bundle(BUNDLE_B)  # same model, same key id, even the same data key
    return replace(b, chunks=(b.chunks[0], other.chunks[1], *b.chunks[2:]))


def _name_flip(b: Bundle) -> Bundle:
    at = b.manifest.find(b"config.json")
    return replace(b, manifest=flip(b.manifest, at + 1))  # "cOnfig.json": still parses


def _id_edit_only(m: dict[str, Any]) -> None:
    m["model_id"] = "acme/tiny:2"


ATTACKS: list[Any] = [
    pytest.param(_name_flip, BundleIntegrityError, id="bit_flip_in_manifest"),
    pytest.param(lambda b: replace(b, manifest=flip(b.manifest, 0)), MalformedBundle,
                 id="bit_flip_in_manifest_head"),
    pytest.param(flip_chunk(0, 0), BundleIntegrityError, id="bit_flip_in_first_chunk"),
    pytest.param(flip_chunk(1, 2000), BundleIntegrityError, id="bit_flip_in_middle_chunk"),
    pytest.param(flip_chunk(3, 5), BundleIntegrityError, id="bit_flip_in_last_chunk"),
    pytest.param(flip_chunk(2, 4096 + 3), BundleIntegrityError, id="bit_flip_in_tag"),
    pytest.param(lambda b: replace(b, chunks=b.chunks[:-1]), BundleIntegrityError,
                 id="truncated_stream_drops_last_chunk"),
    pytest.param(lambda b: replace(b, chunks=(*b.chunks, b.chunks[1])), BundleIntegrityError,
                 id="extra_chunk_appended"),
    pytest.param(lambda b: replace(b, chunks=(b.chunks[0], b.chunks[2], b.chunks[1], b.chunks[3])),
                 BundleIntegrityError, id="two_chunks_reordered"),
    pytest.param(_swap_from_other_bundle, BundleIntegrityError,
                 id="chunk_swapped_from_other_bundle_of_same_model"),
    pytest.param(edit_manifest(_set(("tensors", 0, "offset"), ALIGNMENT)), MalformedBundle,
                 id="tensor_offset_edit_overlapping_file"),
    pytest.param(edit_manifest(_move_tensor), BundleIntegrityError,
                 id="tensor_offset_edit_that_parses"),
    pytest.param(edit_manifest(_move_file), BundleIntegrityError,
                 id="file_offset_edit_that_parses"),
    pytest.param(edit_manifest(_set(("tensors", 0, "offset"), 1)), MalformedBundle,
                 id="tensor_offset_edit_misaligned"),
    pytest.param(edit_manifest(_chunk_size_and_count), BundleIntegrityError,
                 id="chunk_size_edit_that_parses"),
    pytest.param(edit_manifest(_set(("chunk_size",), 8192)), MalformedBundle,
                 id="chunk_size_edit_breaking_chunk_count"),
    pytest.param(edit_manifest(_model_id_and_context), BundleIntegrityError,
                 id="model_id_edit_with_matching_context"),
    pytest.param(edit_manifest(_id_edit_only), MalformedBundle,
                 id="model_id_edit_breaking_context"),
    pytest.param(edit_manifest(_set(("encryption_context", "tenant"), "evil")),
                 BundleIntegrityError, id="encryption_context_edit"),
    pytest.param(edit_manifest(_set(("encryption_context", "nci:bundle"), "00" * 16)),
                 MalformedBundle, id="encryption_context_names_other_bundle"),
    pytest.param(lambda b: replace(b, data_key=bytes(32)), BundleIntegrityError,
                 id="wrong_data_key"),
]  # fmt: skip


def test_round_trip_in_memory() -> None:
    bundle = make_bundle()
    assert read_stream(bundle) == plaintext(Manifest.from_cbor(bundle.manifest))


@pytest.mark.parametrize(("attack", "error"), ATTACKS)
def test_rejects_tampered_bundle(
    attack: Callable[[Bundle], Bundle], error: type[Exception]
) -> None:
    with pytest.raises(error):
        read_stream(attack(make_bundle()))


def test_rejects_chunk_opened_with_wrong_final_flag() -> None:
    bundle = make_bundle()
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(DATA_KEY, BUNDLE_A)
    last = manifest.chunk_count - 1
    assert open_chunk(key, manifest.digest, last, True, bundle.chunks[last])
    with pytest.raises(BundleIntegrityError, match=f"chunk {last}: authentication failed"):
        open_chunk(key, manifest.digest, last, False, bundle.chunks[last])
    with pytest.raises(BundleIntegrityError, match="chunk 0: authentication failed"):
        open_chunk(key, manifest.digest, 0, True, bundle.chunks[0])


def test_open_chunk_into_writes_plaintext_in_place() -> None:
    bundle = make_bundle()
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(DATA_KEY, BUNDLE_A)
    out = bytearray(manifest.plaintext_size)
    for i, sealed in enumerate(bundle.chunks):
        start, end = manifest.chunk_plain_range(i)
        open_chunk_into(
            key, manifest.digest, i, manifest.is_final(i), sealed, memoryview(out)[start:end]
        )
    assert bytes(out) == plaintext(manifest)


def test_open_chunk_into_wipes_the_buffer_when_authentication_fails() -> None:
    bundle = make_bundle()
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(DATA_KEY, BUNDLE_A)
    out = bytearray(b"\xff" * manifest.chunk_size)
    tampered = flip(bundle.chunks[0], 4096)  # the tag: decrypt_into has written every byte
    with pytest.raises(BundleIntegrityError, match="chunk 0: authentication failed"):
        open_chunk_into(key, manifest.digest, 0, False, tampered, memoryview(out))
    assert out == bytes(len(out))
    out[:] = b"\xff" * len(out)
    with pytest.raises(BundleIntegrityError):  # the wrong final flag, same rule
        open_chunk_into(key, manifest.digest, 0, True, bundle.chunks[0], memoryview(out))
    assert out == bytes(len(out))


def test_open_chunk_into_refuses_a_buffer_of_the_wrong_size() -> None:
    bundle = make_bundle()
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(DATA_KEY, BUNDLE_A)
    with pytest.raises(BundleIntegrityError, match="do not fit"):
        open_chunk_into(key, manifest.digest, 0, False, bundle.chunks[0], memoryview(bytearray(5)))
    with pytest.raises(ConfigError, match="writable"):
        open_chunk_into(key, manifest.digest, 0, False, bundle.chunks[0], memoryview(bytes(4096)))


def test_open_chunk_into_fills_a_typed_buffer() -> None:
    bundle = make_bundle()
    manifest = Manifest.from_cbor(bundle.manifest)
    key = derive_bundle_key(DATA_KEY, BUNDLE_A)
    words = memoryview(bytearray(4096)).cast("I")  # e.g. a tensor's storage seen as 32-bit words
    open_chunk_into(key, manifest.digest, 0, False, bundle.chunks[0], words)
    assert words.tobytes() == plaintext(manifest)[:4096]


def test_layout_helpers_match_the_format() -> None:
    manifest = make_manifest()
    assert manifest.chunk_count == 4
    assert manifest.chunk_plain_range(3) == (3 * 4096, manifest.plaintext_size)
    assert manifest.sealed_offset(2) == 2 * (4096 + TAG_SIZE)
    assert manifest.sealed_chunk_size(0) == 4096 + TAG_SIZE
    assert manifest.sealed_chunk_size(3) == manifest.plaintext_size - 3 * 4096 + TAG_SIZE
    assert manifest.sealed_size == manifest.plaintext_size + 4 * TAG_SIZE
    assert manifest.files[0].offset % ALIGNMENT == 0
    assert manifest.to_cbor() == manifest.raw
    assert manifest.digest == hashlib.sha256(manifest.raw).digest()
    with pytest.raises(MalformedBundle, match="chunk index 4"):
        manifest.chunk_plain_range(4)


def test_nonce_and_aad_layout() -> None:
    assert chunk_nonce(0) == bytes(12)
    assert chunk_nonce(258) == bytes(4) + (258).to_bytes(8, "big")
    digest = bytes(range(32))
    assert chunk_aad(digest, 1, True) == digest + (1).to_bytes(8, "big") + b"\x01"
    assert chunk_aad(digest, 1, False)[-1:] == b"\x00"


def test_each_bundle_id_gives_its_own_key() -> None:
    assert derive_bundle_key(DATA_KEY, BUNDLE_A) != derive_bundle_key(DATA_KEY, BUNDLE_B)
    with pytest.raises(MalformedBundle, match="data key is 16 bytes"):
        derive_bundle_key(bytes(16), BUNDLE_A)


def test_manifest_keeps_model_config_read_only() -> None:
    manifest = make_manifest()
    assert manifest.model_config["eps"] == 1e-6
    assert manifest.model_config["tags"] == ("a", None, True)
    with pytest.raises(TypeError):
        manifest.model_config["eps"] = 1.0  # type: ignore[index]


# -- the checked-in vectors ---------------------------------------------------------------------


def test_vectors_open_to_the_recorded_tensors() -> None:
    vectors = json.loads((VECTORS / "vectors.json").read_text())
    manifest = Manifest.from_cbor((VECTORS / "manifest.cbor").read_bytes())
    chunks = (VECTORS / "chunks.bin").read_bytes()
    assert len(chunks) == manifest.sealed_size
    assert manifest.digest.hex() == vectors["manifest_sha256"]
    key = derive_bundle_key(bytes.fromhex(vectors["data_key"]), manifest.bundle_id)
    assert key.hex() == vectors["bundle_key"]
    assert chunk_aad(manifest.digest, 0, False).hex() == vectors["chunk0_aad"]
    plain = b"".join(
        open_chunk(
            key,
            manifest.digest,
            i,
            manifest.is_final(i),
            chunks[manifest.sealed_offset(i) :][: manifest.sealed_chunk_size(i)],
        )
        for i in range(manifest.chunk_count)
    )
    for entry, expected in zip(manifest.tensors, vectors["tensors"], strict=True):
        data = plain[entry.offset : entry.offset + entry.length]
        assert hashlib.sha256(data).hexdigest() == expected["sha256"], entry.name
    for file, expected in zip(manifest.files, vectors["files"], strict=True):
        data = plain[file.offset : file.offset + file.length]
        assert hashlib.sha256(data).hexdigest() == expected["sha256"], file.name
    assert {t.dtype for t in manifest.tensors} == {"F32", "BF16", "I8"}


# -- the manifest parser ------------------------------------------------------------------------


def _raw(change: Callable[[dict[str, Any]], None]) -> bytes:
    return edit(make_manifest().raw, change)


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.pop(key)


def _dup_tensor(m: dict[str, Any]) -> None:
    empty = {"name": "w", "dtype": "U8", "shape": [0], "offset": m["files"][0]["offset"]}
    m["tensors"].append(dict(empty, length=0))


def _files_first(m: dict[str, Any]) -> None:
    m["files"][0]["offset"] = 0


def _float_in(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda m: m.__setitem__(key, float(m[key]))


def _canonical_head(raw: bytes) -> bytes:
    # version 1 written as 0x18 0x01 (a two-byte head): same value, not the shortest form
    at = raw.find(b"\x67version\x01")
    return raw[: at + 8] + b"\x18\x01" + raw[at + 9 :]


def _unsorted(raw: bytes) -> bytes:
    value = cbor2.loads(raw)
    return cbor2.dumps(dict(reversed(list(value.items()))))


def _indefinite(raw: bytes) -> bytes:
    value = cbor2.loads(raw)
    items = sorted(value.items(), key=lambda kv: cbor2.dumps(kv[0]))
    body = b"".join(
        cbor2.dumps(k, canonical=True) + cbor2.dumps(v, canonical=True) for k, v in items
    )
    return b"\xbf" + body + b"\xff"


def _duplicate_key(raw: bytes) -> bytes:
    # replace the map head's count with count + 1 and repeat the "files" entry
    value = cbor2.loads(raw)
    assert raw[0] == 0xA0 + len(value)
    extra = cbor2.dumps("files") + cbor2.dumps([])
    return bytes([raw[0] + 1]) + raw[1:] + extra


MALFORMED: list[Any] = [
    pytest.param(b"", id="empty"),
    pytest.param(b"\xa0", id="empty_map"),
    pytest.param(cbor2.dumps([1, 2]), id="not_a_map"),
    pytest.param(_raw(_delete("files")), id="missing_key"),
    pytest.param(_raw(_set(("extra",), 1)), id="unknown_key"),
    pytest.param(_raw(_set(("format",), "other")), id="wrong_format"),
    pytest.param(_raw(_set(("version",), 2)), id="version_2"),
    pytest.param(_raw(_set(("version",), True)), id="version_bool"),
    pytest.param(_raw(_set(("bundle_id",), b"\x00" * 15)), id="bundle_id_15_bytes"),
    pytest.param(_raw(_set(("model_id",), "bad id!")), id="model_id_characters"),
    pytest.param(_raw(_set(("model_id",), "")), id="model_id_empty"),
    pytest.param(_raw(_set(("model_config",), [])), id="model_config_not_map"),
    pytest.param(_raw(_set(("model_config", "blob"), b"\x00")), id="model_config_bytes"),
    pytest.param(_raw(_set(("kms_key_id",), "")), id="kms_key_id_empty"),
    pytest.param(_raw(_set(("encrypted_data_key",), b"")), id="encrypted_data_key_empty"),
    pytest.param(_raw(_set(("encrypted_data_key",), "text")), id="encrypted_data_key_text"),
    pytest.param(_raw(lambda m: m["encryption_context"].pop("nci:model")), id="context_no_model"),
    pytest.param(_raw(_set(("encryption_context", "k"), 1)), id="context_value_int"),
    pytest.param(_raw(_set(("chunk_size",), 5000)), id="chunk_size_not_power_of_two"),
    pytest.param(_raw(_set(("chunk_size",), 2048)), id="chunk_size_too_small"),
    pytest.param(_raw(_set(("chunk_size",), 2**27)), id="chunk_size_too_large"),
    pytest.param(_raw(_float_in("chunk_size")), id="chunk_size_float"),
    pytest.param(_raw(_set(("plaintext_size",), 0)), id="plaintext_size_zero"),
    pytest.param(_raw(_set(("plaintext_size",), -1)), id="plaintext_size_negative"),
    pytest.param(_raw(_set(("chunk_count",), 5)), id="chunk_count_inconsistent"),
    pytest.param(_raw(_set(("tensors", 0, "dtype"), "F8_E4M3")), id="tensor_dtype_unknown"),
    pytest.param(_raw(_set(("tensors", 0, "length"), 10)), id="tensor_length_not_numel"),
    pytest.param(_raw(_set(("tensors", 0, "shape"), [-1])), id="tensor_shape_negative"),
    pytest.param(_raw(_set(("tensors", 0, "name"), "")), id="tensor_name_empty"),
    pytest.param(_raw(_set(("tensors", 0, "offset"), 2**20)), id="tensor_past_plaintext"),
    pytest.param(_raw(_set(("tensors", 0, "extra"), 1)), id="tensor_unknown_key"),
    pytest.param(_raw(_dup_tensor), id="tensor_name_repeated"),
    pytest.param(_raw(_files_first), id="file_overlaps_tensor"),
    pytest.param(_raw(_set(("files", 0, "name"), "../escape")), id="file_name_dotdot"),
    pytest.param(_raw(_set(("files", 0, "name"), "/etc/passwd")), id="file_name_absolute"),
    pytest.param(_raw(_set(("files", 0, "name"), "a//b")), id="file_name_empty_part"),
    pytest.param(_raw(_set(("files", 0, "name"), "a\\b")), id="file_name_backslash"),
    pytest.param(make_manifest().raw + b"\x00", id="trailing_byte"),
    pytest.param(_canonical_head(make_manifest().raw), id="non_canonical_integer_head"),
    pytest.param(_unsorted(make_manifest().raw), id="non_canonical_key_order"),
    pytest.param(_indefinite(make_manifest().raw), id="non_canonical_indefinite_map"),
    pytest.param(_duplicate_key(make_manifest().raw), id="duplicate_key"),
    pytest.param(b"\xc1" + make_manifest().raw, id="tagged"),
    pytest.param(_raw(_set(("model_config", "when"), cbor2.CBORTag(1, 0))), id="tag_in_config"),
    pytest.param(_raw(_set(("model_config", "x"), float("nan"))), id="nan_in_config"),
    pytest.param(make_manifest().raw[:-3], id="truncated"),
    pytest.param(b"\x81" * 100 + b"\x00", id="nested_too_deeply"),
    pytest.param(bytes(MAX_MANIFEST_SIZE + 1), id="oversized"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_rejects_malformed_manifest(data: bytes) -> None:
    with pytest.raises(MalformedBundle):
        Manifest.from_cbor(data)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_raw(_dup_tensor), r"tensors\[1\]\.name repeats"),
        (_raw(_files_first), r"files\[0\]\.offset 0 overlaps"),
        (_raw(_set(("chunk_count",), 5)), "chunk_count 5 is not ceil"),
        (_raw(_set(("tensors", 0, "offset"), 1)), "not 64-byte aligned"),
        (_raw(_set(("files", 0, "name"), "../x")), r"files\[0\]\.name must be a relative path"),
        (_duplicate_key(make_manifest().raw), "duplicate map key"),
        (make_manifest().raw + b"\x00", "1 trailing bytes"),
    ],
)
def test_malformed_manifest_message_names_the_field_and_rule(data: bytes, message: str) -> None:
    with pytest.raises(MalformedBundle, match=message):
        Manifest.from_cbor(data)


def test_error_messages_carry_no_key_material() -> None:
    raw = _raw(_set(("encrypted_data_key",), b"\xaa" * 7000))
    with pytest.raises(MalformedBundle) as caught:
        Manifest.from_cbor(raw)
    assert "aaaa" not in str(caught.value).lower()


def test_canonical_manifest_parses_back_identically() -> None:
    manifest = make_manifest()
    again = Manifest.from_cbor(manifest.raw)
    assert again == manifest
    assert again.tensors == manifest.tensors
    assert again.encryption_context["nci:bundle"] == BUNDLE_A.hex()


def test_non_canonical_encoding_is_refused_even_when_the_value_is_the_same() -> None:
    raw = make_manifest().raw
    for variant in (_canonical_head(raw), _unsorted(raw), _indefinite(raw)):
        assert cbor2.loads(variant) == cbor2.loads(raw)
        with pytest.raises(MalformedBundle, match="deterministic encoding"):
            Manifest.from_cbor(variant)


def test_layout_plan_refuses_size_that_is_not_numel_times_itemsize() -> None:
    with pytest.raises(MalformedBundle, match="product"):
        BundleLayout.plan([("w", "F32", [3], 10)])
    with pytest.raises(MalformedBundle, match="dtype"):
        BundleLayout.plan([("w", "F8", [3], 3)])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_malformed_bundle(data: bytes) -> None:
    with contextlib.suppress(MalformedBundle):
        Manifest.from_cbor(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_mutated_manifest_raises_only_malformed_bundle(position: int, value: int) -> None:
    raw = bytearray(make_manifest().raw)
    raw[position % len(raw)] = value
    with contextlib.suppress(MalformedBundle):
        Manifest.from_cbor(bytes(raw))
