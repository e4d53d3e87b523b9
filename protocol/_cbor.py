"""Strict decoding and deterministic encoding of CBOR, for documents that cross a trust boundary.

cbor2 is a general decoder: it turns tags into dates, big numbers and shared (even cyclic)
references, silently ignores bytes after the first item, and accepts duplicate map keys by default.
None of that is legitimate in our documents, so :func:`strict_loads` decodes exactly one item that
fills the input, with no tags, no duplicate keys, no simple values other than true/false/null, text
map keys, and a nesting limit (RFC 8949 §5.3: a decoder used in a security context must be strict
about validity). Floats are allowed only when the caller asks (the manifest's ``model_config``
holds JSON values), and then only finite ones.

Before cbor2 builds anything, a walk over the item heads (RFC 8949 §3) bounds the work: every
array or map may declare at most ``max_length`` entries (and no more than the bytes left could
hold), the whole input at most ``max_items`` data items, and nesting at most ``max_depth``. So a
16 MiB body of one-byte items is refused at its array header, without allocating, and the decoder
only ever sees inputs whose size in Python objects is bounded by the caller.

:func:`canonical_dumps` is RFC 8949 §4.2.1 core deterministic encoding, as cbor2 implements it with
``canonical=True``: shortest integer and length heads, definite lengths, map keys sorted by their
encoded bytes, floats in the shortest form that keeps their value.

(``attestation`` has a strict decoder of its own; ``protocol`` may not import it.)
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Final, NoReturn

import cbor2

__all__ = ["DEFAULT_MAX_ITEMS", "CborRejected", "canonical_dumps", "strict_loads"]


class CborRejected(Exception):
    """The bytes are not one plain CBOR item; callers turn this into their own error type.

    The message names the rule broken, never the content.
    """


def _reject_tag(*_args: object) -> NoReturn:
    raise CborRejected("CBOR tags are not allowed")


class _NoSemanticTags(Mapping[int, Callable[..., object]]):
    """A semantic-decoder table mapping every tag to a rejection, so that cbor2 never builds dates,
    big numbers, shared references or anything else from tagged input."""

    def __getitem__(self, tag: int) -> Callable[..., object]:
        return _reject_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_SEMANTIC_TAGS: Final = _NoSemanticTags()

# What cbor2 may raise on hostile input besides its own CBORError.
_DECODER_ERRORS: Final = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    EOFError,
    KeyError,
    IndexError,
    MemoryError,
)

# Library messages may quote content (a duplicate key's value): report only which rule broke.
_KNOWN_REASONS: Final = (
    ("duplicate", "duplicate map key"),
    ("nesting depth", "nested too deeply"),
    ("premature end", "truncated CBOR"),
    ("invalid", "invalid CBOR"),
)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "truncated CBOR"
    text = str(exc).lower()
    for needle, reason in _KNOWN_REASONS:
        if needle in text:
            return reason
    return f"not well-formed CBOR ({type(exc).__name__})"


def _check_plain(value: object, max_depth: int, floats: bool, depth: int = 0) -> None:
    """Integers, booleans, null, byte and text strings, arrays, maps with text keys, and finite
    floats when ``floats``; nothing else, and no deeper than ``max_depth`` (which also stops
    reference cycles)."""
    if depth > max_depth:
        raise CborRejected("nested too deeply")
    kind = type(value)
    if value is None or kind in (bool, int, bytes, str):
        return
    if kind is float:
        if not floats:
            raise CborRejected("floats are not allowed here")
        if not math.isfinite(value):  # type: ignore[arg-type]
            raise CborRejected("NaN and infinities are not allowed")
        return
    if isinstance(value, list) and kind is list:
        for item in value:
            _check_plain(item, max_depth, floats, depth + 1)
        return
    if isinstance(value, dict) and kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise CborRejected("map keys must be text strings")
            _check_plain(item, max_depth, floats, depth + 1)
        return
    raise CborRejected(f"a CBOR item decoding to {kind.__name__} is not allowed")


DEFAULT_MAX_ITEMS: Final = 1 << 18
"""The default bound on data items in one input (and on the entries of one array or map): far above
any document of ours (a manifest of a few thousand tensors is tens of thousands of items), far
below what a 16 MiB input of one-byte items would make (16 million Python objects)."""

_BREAK: Final = 0xFF


def strict_loads(
    data: bytes,
    *,
    max_depth: int,
    floats: bool = False,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_length: int | None = None,
) -> object:
    """Decode the single CBOR item that is exactly ``data``.

    ``data`` is untrusted. Raises only :class:`CborRejected`: for malformed CBOR, trailing bytes,
    tags, duplicate map keys, non-text map keys, simple values other than true/false/null, floats
    (unless ``floats``; NaN and infinities always), nesting deeper than ``max_depth``, more than
    ``max_items`` data items in all, or an array or map of more than ``max_length`` entries (by
    default ``max_items``). The counts are checked while walking the heads, before decoding.
    """
    if type(data) is not bytes:
        raise CborRejected(f"input is a {type(data).__name__}, not bytes")
    _walk(data, max_depth, max_items, max_items if max_length is None else max_length)
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_SEMANTIC_TAGS,
            max_depth=max_depth,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
        value = decoder.decode()
    except CborRejected:
        raise
    except _DECODER_ERRORS as exc:
        if isinstance(exc.__cause__, CborRejected):  # raised by our hooks, wrapped by cbor2
            raise CborRejected(str(exc.__cause__)) from None
        raise CborRejected(_reason(exc)) from None
    _check_plain(value, max_depth, floats)
    # cbor2 stops after one item: bytes after it would be smuggled past the parser, not ignored.
    if stream.tell() != len(data):
        raise CborRejected(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    return value


def _walk(data: bytes, max_depth: int, max_items: int, max_length: int) -> None:
    """Check the structure of ``data`` (untrusted) from its heads alone (RFC 8949 §3), building
    nothing: at most ``max_items`` items, containers of at most ``max_length`` entries that the
    remaining bytes could hold, nesting at most ``max_depth``, no tags, no reserved head values,
    one item then the end of the input. Strings are skipped by their length."""
    end = len(data)
    pos = items = 0
    # the open containers: [declared entries (-1: indefinite length), entries seen, is a map]
    stack: list[list[int]] = []
    while True:
        if pos >= end:
            raise CborRejected("truncated CBOR")
        initial = data[pos]
        pos += 1
        if initial == _BREAK:
            # (1) a break ends the innermost indefinite-length container (RFC 8949 §3.2.1)
            if not stack or stack[-1][0] != -1 or (stack[-1][2] and stack[-1][1] % 2):
                raise CborRejected("invalid CBOR (a break outside an indefinite-length item)")
            stack.pop()
        else:
            # (2) one data item: its head, then its content (strings) or its entries (containers)
            items += 1
            if items > max_items:
                raise CborRejected(f"more than {max_items} CBOR data items")
            if len(stack) > max_depth:
                raise CborRejected("nested too deeply")
            major, info = initial >> 5, initial & 0x1F
            if major == 6:
                raise CborRejected("CBOR tags are not allowed")
            argument, pos = _argument(data, pos, major, info)
            if major in (2, 3):
                pos, items = _skip_string(data, pos, major, argument, items, max_items)
            elif major in (4, 5):
                if argument == -1:  # indefinite length: entries until a break
                    stack.append([-1, 0, major == 5])
                    continue
                if argument > max_length:
                    raise CborRejected(f"an array or map of more than {max_length} entries")
                slots = 2 * argument if major == 5 else argument
                if slots > end - pos:  # every entry takes at least one byte
                    raise CborRejected("truncated CBOR")
                if argument:  # an empty definite container is complete at once
                    stack.append([slots, 0, major == 5])
                    continue
        # (3) an item is complete: count it in its container, closing every container it fills
        while stack:
            top = stack[-1]
            top[1] += 1
            if top[0] == -1:
                if top[1] > (2 * max_length if top[2] else max_length):
                    raise CborRejected(f"an array or map of more than {max_length} entries")
                break
            if top[1] < top[0]:
                break
            stack.pop()
        if not stack:
            break
    # cbor2 stops after one item: bytes after it would be smuggled past the parser, not ignored.
    if pos != end:
        raise CborRejected(f"{end - pos} trailing bytes after the CBOR item")


def _argument(data: bytes, pos: int, major: int, info: int) -> tuple[int, int]:
    """The head's argument (RFC 8949 §3.1) and the position after it; -1 for indefinite length."""
    if info < 24:
        return info, pos
    if info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise CborRejected("truncated CBOR")
        return int.from_bytes(data[pos : pos + size], "big"), pos + size
    if info == 31 and major in (2, 3, 4, 5):
        return -1, pos
    raise CborRejected("invalid CBOR (reserved additional information)")


def _skip_string(
    data: bytes, pos: int, major: int, length: int, items: int, max_items: int
) -> tuple[int, int]:
    """Skip a byte or text string; an indefinite-length one is definite chunks of the same major
    type up to a break, each counted as an item (RFC 8949 §3.2.3)."""
    end = len(data)
    if length >= 0:
        if length > end - pos:
            raise CborRejected("truncated CBOR")
        return pos + length, items
    while True:
        if pos >= end:
            raise CborRejected("truncated CBOR")
        initial = data[pos]
        pos += 1
        if initial == _BREAK:
            return pos, items
        items += 1
        if items > max_items:
            raise CborRejected(f"more than {max_items} CBOR data items")
        if initial >> 5 != major or initial & 0x1F == 31:
            raise CborRejected("invalid CBOR (a chunk of an indefinite-length string)")
        length, pos = _argument(data, pos, major, initial & 0x1F)
        if length > end - pos:
            raise CborRejected("truncated CBOR")
        pos += length


def canonical_dumps(value: object) -> bytes:
    """RFC 8949 §4.2.1 core deterministic encoding of a plain value (see the module docstring).

    Raises :class:`CborRejected` if the value cannot be encoded (an unsupported type).
    """
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CborRejected(f"cannot encode: {type(exc).__name__}") from None
