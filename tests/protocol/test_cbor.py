"""The strict CBOR decoder: what it accepts, what it refuses, and that it bounds its work while
decoding (the item counts are checked on the heads, before cbor2 builds anything)."""

from __future__ import annotations

import contextlib
import time

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol._cbor import DEFAULT_MAX_ITEMS, CborRejected, canonical_dumps, strict_loads

PLAIN_VALUES: list[object] = [
    0,
    -1,
    2**64 - 1,
    -(2**64),
    True,
    None,
    b"",
    b"\x00" * 300,
    "",
    "é✓",
    [],
    {},
    [1, [2, [3]]],
    {"a": {"b": [b"x", "y", None]}},
    1.5,
]


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_round_trips_plain_values(value: object) -> None:
    assert strict_loads(canonical_dumps(value), max_depth=8, floats=True) == value


INDEFINITE = {
    "array": (b"\x9f\x01\x02\xff", [1, 2]),
    "map": (b"\xbf\x61a\x01\xff", {"a": 1}),
    "byte string": (b"\x5f\x41a\x42bc\xff", b"abc"),
    "text string": (b"\x7f\x61a\x60\xff", "a"),
    "nested": (b"\x9f\x9f\xff\x80\xff", [[], []]),
}


@pytest.mark.parametrize(("data", "value"), INDEFINITE.values(), ids=INDEFINITE.keys())
def test_accepts_indefinite_lengths(data: bytes, value: object) -> None:
    assert strict_loads(data, max_depth=4) == value


MALFORMED: dict[str, bytes] = {
    "empty": b"",
    "truncated integer": b"\x19\x01",
    "truncated string": b"\x45abc",
    "truncated array": b"\x82\x01",
    "array longer than the input": b"\x9a\x00\x01\x00\x00" + bytes(10),
    "map longer than the input": b"\xb9\x01\x00" + b"\x61a\x01",
    "unterminated indefinite array": b"\x9f\x01",
    "break alone": b"\xff",
    "break in a definite array": b"\x81\xff",
    "break after a map key": b"\xbf\x61a\xff",
    "indefinite integer": b"\x1f",
    "reserved additional information": b"\x1c",
    "text chunk in a byte string": b"\x5f\x61a\xff",
    "nested indefinite chunk": b"\x5f\x5f\xff\xff",
    "tag": b"\xc1\x01",
    "tag inside an array": b"\x81\xd8\x18\x41\x00",
    "trailing bytes": b"\x01\x02",
    "duplicate key": b"\xa2\x61a\x01\x61a\x02",
    "integer key": b"\xa1\x01\x02",
    "undefined": b"\xf7",
    "simple value": b"\xf8\x20",
    "too deep": b"\x81" * 9 + b"\x00",
    "float when not asked": b"\xf9\x3c\x00",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_rejects_malformed_or_non_plain_cbor(data: bytes) -> None:
    with pytest.raises(CborRejected):
        strict_loads(data, max_depth=8)


@pytest.mark.parametrize("item", [b"\xa0", b"\x80", b"\x00"], ids=["maps", "arrays", "zeros"])
def test_rejects_item_bomb_at_its_array_header(item: bytes) -> None:
    # 16 million one-byte items would be 16 million Python objects (the reviewer's 18 s, 1.1 GB)
    data = b"\x9a" + (16_000_000).to_bytes(4, "big") + item * 16_000_000
    started = time.perf_counter()
    with pytest.raises(CborRejected, match=f"more than {DEFAULT_MAX_ITEMS} entries"):
        strict_loads(data, max_depth=4)
    assert time.perf_counter() - started < 0.05


def test_rejects_item_bomb_spread_over_small_containers() -> None:
    # no container is long, but the total is: [[0, …×8]…×8]…: counted while walking
    data = cbor2.dumps([[[0] * 8] * 8] * 8)
    assert strict_loads(data, max_depth=4, max_items=1000, max_length=8)
    with pytest.raises(CborRejected, match="more than 100 CBOR data items"):
        strict_loads(data, max_depth=4, max_items=100, max_length=8)


def test_rejects_container_over_max_length() -> None:
    assert strict_loads(cbor2.dumps([0] * 8), max_depth=1, max_length=8) == [0] * 8
    for value in ([0] * 9, {str(i): i for i in range(9)}):
        with pytest.raises(CborRejected, match="more than 8 entries"):
            strict_loads(cbor2.dumps(value), max_depth=1, max_length=8)


def test_counts_entries_of_indefinite_containers() -> None:
    nine = b"\x9f" + bytes(9) + b"\xff"
    with pytest.raises(CborRejected, match="more than 8 entries"):
        strict_loads(nine, max_depth=1, max_length=8)
    chunks = b"\x5f" + b"\x41a" * 20 + b"\xff"
    with pytest.raises(CborRejected, match="more than 10 CBOR data items"):
        strict_loads(chunks, max_depth=1, max_items=10)


def test_large_strings_are_skipped_not_counted() -> None:
    data = cbor2.dumps({"data": bytes(8 * 1024 * 1024)})
    started = time.perf_counter()
    assert strict_loads(data, max_depth=1, max_items=3) == {"data": bytes(8 * 1024 * 1024)}
    assert time.perf_counter() - started < 0.5


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_raises_only_cbor_rejected_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(CborRejected):
        strict_loads(data, max_depth=4, floats=True, max_items=16, max_length=4)


PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(PLAIN)
def test_walk_agrees_with_the_decoder_on_plain_values(value: object) -> None:
    # whatever the shape, the walk accepts what the decoder accepts (nothing lost to the bounds)
    assert strict_loads(canonical_dumps(value), max_depth=32) == value
