"""A small structure-blind mutator: what ``python -m tests.fuzz`` and the property tests feed the
targets besides their seeds.

Every operator works on bytes and knows nothing of the formats except a dictionary of tokens that
are hostile in them: CBOR heads that declare huge or indefinite lengths, tags and NaN floats; QUIC
varints at their widest; DER long-form and indefinite lengths; JPEG markers and PNG chunk types.
Lengths are what parsers trust first, so "length-field tweaks" read 1, 2, 4 or 8 bytes anywhere as
a big-endian integer and write back a neighbour of it (±1, doubled, halved, 0, the maximum). Work
is what they bound last, so one operator repeats a short block to up to 4 MiB (many tiny
segments, fill bytes or chunks inside the size cap).

Most of what crosses our boundaries is CBOR (documents, manifests, bodies, control payloads), so
one operator is structure-aware: when the input is one CBOR item it decodes it, changes one node
(a value of another type or at a boundary, a key removed, added or of another type, an array
entry dropped or repeated; byte strings that hold CBOR themselves, as a COSE payload does, are
descended into) and encodes it again, canonically or not. That reaches the field rules behind the
decoder, which flipped bits mostly do not.

Deterministic: the same ``random.Random`` state gives the same output, so a run is reproducible
from its ``--seed``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Sequence
from typing import Any, Final

import cbor2

__all__ = ["TOKENS", "mutate", "random_bytes"]

_INTERESTING_8: Final = (0x00, 0x01, 0x17, 0x18, 0x1F, 0x3F, 0x40, 0x7F, 0x80, 0xC0, 0xFE, 0xFF)
_INTERESTING_INTS: Final = (
    0,
    1,
    2,
    15,
    16,
    17,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    4095,
    4096,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFF_FFFF,
    0x8000_0000,
    0xFFFF_FFFF,
    0x7FFF_FFFF_FFFF_FFFF,
    0xFFFF_FFFF_FFFF_FFFF,
)

TOKENS: Final[tuple[bytes, ...]] = (
    # CBOR (RFC 8949 §3): a 4 GiB byte string, a 2^64-entry array and map, indefinite-length
    # items, a break, tags (bignum, self-describe, shared reference), NaN and -0.0, undefined
    b"\x5a\xff\xff\xff\xff",
    b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xbb\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x5f\x41\x00\xff",
    b"\x9f\x9f\x9f\x9f",
    b"\xbf\x61a\x00\xff",
    b"\xff",
    b"\xc2\x49\x01\x00\x00\x00\x00\x00\x00\x00\x00",
    b"\xd9\xd9\xf7",
    b"\xd8\x1d\x00",
    b"\xf9\x7e\x00",
    b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\xf9\x80\x00",
    b"\xf7",
    b"\xf8\x20",
    b"\xa1\x61v\x01",
    b"\x3b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x1b\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x7a\xff\xff\xff\xff",
    b"\x62\xed\xa0",  # a text string holding a lone surrogate (invalid UTF-8)
    # QUIC varints (RFC 9000 §16): the widest and non-shortest encodings
    b"\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xc0\x00\x00\x00\x00\x00\x00\x00",
    b"\x80\x00\x00\x00",
    b"\x40\x00",
    # DER/BER (X.690): long-form and indefinite lengths, end-of-contents, an OID
    b"\x30\x84\xff\xff\xff\xff",
    b"\x30\x80",
    b"\x00\x00",
    b"\x04\x82\xff\xff",
    b"\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x03",
    b"\x02\x81\x00",
    # images: JPEG markers (SOF0..SOF3, DHT, SOS, EOI, RST0, APP0, DAC) and PNG chunk types
    b"\xff\xc0\x00\x11\x08\xff\xff\xff\xff\x03",
    b"\xff\xc2\x00\x11\x08",
    b"\xff\xc3",
    b"\xff\xcc",
    b"\xff\xc4",
    b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00",
    b"\xff\xd9",
    b"\xff\xd0",
    b"\xff\xe0\x00\x10JFIF\x00",
    b"IHDR",
    b"IDAT",
    b"IEND",
    b"PLTE",
    b"tRNS",
    b"acTL",
    b"iCCP",
    b"\x7f\xff\xff\xff",
    # frames: the magic and version, and text the CBOR maps expect
    b"NF\x01",
    b"ready",
    b"failed",
    b"\x00" * 16,
)

_Op = Callable[[bytearray, random.Random, Sequence[bytes]], None]


def _index(data: bytearray, rng: random.Random, *, end: bool = False) -> int:
    return rng.randint(0, len(data) if end else max(len(data) - 1, 0))


def _flip_bit(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    if data:
        data[_index(data, rng)] ^= 1 << rng.randrange(8)


def _set_byte(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    if data:
        value = rng.choice(_INTERESTING_8) if rng.random() < 0.5 else rng.randrange(256)
        data[_index(data, rng)] = value


def _arith(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    if data:
        i = _index(data, rng)
        data[i] = (data[i] + rng.choice((-1, 1)) * rng.randint(1, 16)) & 0xFF


def _length_tweak(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    """Read 1, 2, 4 or 8 bytes as a big-endian integer and write back a neighbour of it."""
    width = rng.choice((1, 2, 2, 4, 4, 8))
    if len(data) < width:
        return
    i = rng.randint(0, len(data) - width)
    value = int.from_bytes(data[i : i + width], "big")
    top = (1 << (8 * width)) - 1
    choices = (value + 1, value - 1, value * 2, value // 2, 0, top, value + len(data))
    data[i : i + width] = (rng.choice(choices) & top).to_bytes(width, "big")


def _set_int(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    width = rng.choice((2, 4, 8))
    if len(data) < width:
        return
    i = rng.randint(0, len(data) - width)
    value = rng.choice(_INTERESTING_INTS) & ((1 << (8 * width)) - 1)
    data[i : i + width] = value.to_bytes(width, "big")


def _truncate(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    del data[_index(data, rng, end=True) :]


def _delete(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    if data:
        i = _index(data, rng)
        del data[i : i + rng.randint(1, 32)]


def _insert(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    i = _index(data, rng, end=True)
    if rng.random() < 0.5:
        data[i:i] = bytes(rng.choice(_INTERESTING_8) for _ in range(rng.randint(1, 8)))
    else:
        data[i:i] = rng.randbytes(rng.randint(1, 32))


def _token(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    token = rng.choice(TOKENS)
    i = _index(data, rng, end=True)
    if rng.random() < 0.5:
        data[i:i] = token
    else:
        data[i : i + len(token)] = token


def _duplicate(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    if data:
        i = _index(data, rng)
        block = data[i : i + rng.randint(1, 64)]
        j = _index(data, rng, end=True)
        data[j:j] = block * rng.randint(1, 4)


def _repeat(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    """A short block repeated to up to 4 MiB in place: many tiny elements within a size
    cap (empty segments, fill bytes, zero-length chunks) is how parsers get slow."""
    if data:
        i = _index(data, rng)
        block = bytes(data[i : i + rng.choice((1, 1, 2, 4, 8, 12, 16))])
        count = rng.choice((16, 256, 4096, 1 << 16, 1 << 22)) // len(block)
        data[i:i] = block * count


def _splice(data: bytearray, rng: random.Random, others: Sequence[bytes]) -> None:
    if others:
        other = rng.choice(others)
        data[_index(data, rng, end=True) :] = other[rng.randint(0, len(other)) :]


def _nested(depth: int) -> object:
    value: object = 0
    for _ in range(depth):
        value = [value]
    return value


# Values that sit on a rule's boundary or break its type (cbor2 encodes each of them).
_CBOR_VALUES: Final[tuple[object, ...]] = (
    0,
    1,
    -1,
    23,
    24,
    255,
    256,
    4096,
    2**31,
    2**32,
    2**63,
    2**64 - 1,
    2**64,  # a bignum (tag 2)
    -(2**64),
    1.5,
    -0.0,
    1e308,
    float("nan"),
    float("inf"),
    True,
    False,
    None,
    cbor2.undefined,
    "",
    "x",
    "SHA384",
    "é✓",
    "a" * 257,
    "\x00\x1b[2J",
    b"",
    b"\x00",
    bytes(32),
    bytes(48),
    b"\xff" * 1025,
    [],
    [0] * 9,
    {},
    {"v": 1},
    {1: -35},
    _nested(40),
)

_NOT_CBOR: Final = object()


def _cbor_loads(data: bytes) -> Any:
    """The one CBOR item that is exactly ``data``, or :data:`_NOT_CBOR`."""
    if not data or len(data) > 1 << 16:
        return _NOT_CBOR
    stream = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError, MemoryError):
        return _NOT_CBOR
    return value if stream.tell() == len(data) else _NOT_CBOR


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [path]
    if isinstance(value, list):
        for index, item in enumerate(value):
            paths += _nodes(item, (*path, index))
    elif isinstance(value, dict):
        for key, item in value.items():
            paths += _nodes(item, (*path, key))
    return paths


def _mutate_value(value: Any, rng: random.Random, depth: int = 0) -> Any:
    """``value`` with one node changed."""
    paths = _nodes(value)
    path = rng.choice(paths)
    if not path:
        return _replace_node(value, rng, depth)
    parent = value
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = _replace_node(parent[path[-1]], rng, depth)
    return value


def _replace_node(node: Any, rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if isinstance(node, bytes) and depth < 2 and roll < 0.5:
        inner = _cbor_loads(node)
        if inner is not _NOT_CBOR:  # a byte string holding CBOR (a COSE payload, user_data)
            return _dumps(_mutate_value(inner, rng, depth + 1), rng, node)
    if isinstance(node, dict) and node and roll < 0.6:
        key = rng.choice(list(node))
        choice = rng.randrange(4)
        if choice == 0:
            del node[key]
        elif choice == 1:
            node[
                rng.choice((1, b"k", "zz", "pad", "v", key + "x" if isinstance(key, str) else 0))
            ] = rng.choice(_CBOR_VALUES)
        elif choice == 2 and isinstance(key, str):
            node[key.upper() if key != key.upper() else key + " "] = node.pop(key)
        else:
            node[key] = rng.choice(_CBOR_VALUES)
        return node
    if isinstance(node, list) and node and roll < 0.6:
        index = rng.randrange(len(node))
        choice = rng.randrange(3)
        if choice == 0:
            del node[index]
        elif choice == 1:
            node.insert(index, node[index])
        else:
            node.extend([node[index]] * rng.randint(1, 40))
        return node
    if isinstance(node, int) and not isinstance(node, bool) and roll < 0.7:
        return node + rng.choice((-1, 1, -node - 1, 2**32, 2**64))
    if isinstance(node, str) and roll < 0.7:
        return rng.choice((node[:-1], node + node[-1:] * rng.randint(1, 300), node.upper(), ""))
    if isinstance(node, bytes) and roll < 0.7:
        return rng.choice((node[:-1], node + b"\x00", node * 2, b""))
    return rng.choice(_CBOR_VALUES)


def _dumps(value: Any, rng: random.Random, fallback: bytes) -> bytes:
    try:
        return cbor2.dumps(value, canonical=rng.random() < 0.5)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError):
        return fallback


def _cbor(data: bytearray, rng: random.Random, _others: Sequence[bytes]) -> None:
    value = _cbor_loads(bytes(data))
    if value is not _NOT_CBOR:
        data[:] = _dumps(_mutate_value(value, rng), rng, bytes(data))


_OPS: Final[tuple[_Op, ...]] = (
    _flip_bit,
    _flip_bit,
    _set_byte,
    _arith,
    _length_tweak,
    _length_tweak,
    _set_int,
    _truncate,
    _delete,
    _insert,
    _token,
    _duplicate,
    _repeat,
    _splice,
    _cbor,
    _cbor,
    _cbor,
)


def mutate(
    seed: bytes, rng: random.Random, others: Sequence[bytes] = (), *, max_size: int = 1 << 16
) -> bytes:
    """``seed`` after 1 to 8 stacked mutations (bit flips, byte and integer overwrites,
    length-field tweaks, truncation, deletion, insertion, dictionary tokens, duplication, a block
    repeated to up to 4 MiB, splicing with one of ``others``, a change to one node of its
    CBOR), at most ``max_size`` bytes."""
    data = bytearray(seed)
    rounds = 1 << rng.randint(0, 3)
    while rounds > 0 or (data == seed and rounds > -16):  # an operator may change nothing
        rng.choice(_OPS)(data, rng, others)
        del data[max_size:]
        rounds -= 1
    return bytes(data)


def random_bytes(rng: random.Random, *, max_size: int = 1 << 16) -> bytes:
    """Fresh random bytes, mostly short (most parsers refuse early; a few long ones still come)."""
    limit = rng.choice((0, 16, 64, 256, 1024, 4096))
    return rng.randbytes(rng.randint(0, min(limit, max_size)))
