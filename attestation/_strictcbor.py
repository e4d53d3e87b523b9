"""Strict decoding of one CBOR item, for messages that cross a trust boundary.

cbor2 is a general decoder: it turns tags into dates, big numbers, shared (even cyclic) references,
silently ignores bytes after the first item, and accepts duplicate map keys by default. For the
NSM API none of that is legitimate, so this module decodes exactly one item that fills the input,
with no tags, no duplicate keys, no floats or simple values, text map keys and a small nesting
limit (RFC 8949 §5.3: a decoder used in a security context must be "strict" about validity).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Mapping
from typing import Final, NoReturn

import cbor2

__all__ = ["CborRejected", "strict_loads"]


class CborRejected(Exception):
    """The bytes are not one plain CBOR item; callers turn this into their own error type.

    The message names the rule broken, never the content.
    """


def _reject_tag(*_args: object) -> NoReturn:
    raise CborRejected("CBOR tags are not allowed")


class _NoSemanticTags(Mapping[int, Callable[..., object]]):
    """A semantic-decoder table mapping every tag to a rejection, so that cbor2 never builds dates,
    big numbers, shared references or anything else from tagged input. ``tag_hook`` covers the
    tags cbor2 does not know."""

    def __getitem__(self, tag: int) -> Callable[..., object]:
        return _reject_tag

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


_NO_SEMANTIC_TAGS: Final = _NoSemanticTags()

# What cbor2 may raise on hostile input besides its own CBORError (its C decoder builds Python
# objects and can surface their constructors' errors).
_DECODER_ERRORS: Final = (
    cbor2.CBORError,
    CborRejected,
    ValueError,
    TypeError,
    OverflowError,
    RecursionError,
    EOFError,
    KeyError,
    IndexError,
    MemoryError,
)


def _check_plain(value: object, max_depth: int, text_keys: bool, depth: int = 0) -> None:
    """Only unsigned and negative integers, booleans, null, byte and text strings, arrays, and maps
    with text keys (or integer keys too, unless ``text_keys``). Anything else (floats, simple
    values, undefined, objects built from tags) is rejected, as is nesting deeper than
    ``max_depth`` (which also stops reference cycles)."""
    if depth > max_depth:
        raise CborRejected("nested too deeply")
    if value is None or type(value) in (bool, int, bytes, str):
        return
    if type(value) is list:
        for item in value:
            _check_plain(item, max_depth, text_keys, depth + 1)
        return
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str and (text_keys or type(key) is not int):
                raise CborRejected(
                    "map keys must be text strings" if text_keys else "map keys must be text or int"
                )
            _check_plain(item, max_depth, text_keys, depth + 1)
        return
    raise CborRejected(f"a CBOR item decoding to {type(value).__name__} is not allowed")


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


def strict_loads(data: bytes, *, max_depth: int, text_keys: bool = True) -> object:
    """Decode the single CBOR item that is exactly ``data``.

    ``data`` is untrusted. Raises only :class:`CborRejected`: for malformed CBOR, trailing bytes,
    tags, duplicate map keys, non-text map keys (integer keys too when ``text_keys`` is false, as
    COSE headers and the attestation ``pcrs`` map need), floats and simple values, or nesting
    deeper than ``max_depth``.
    """
    if type(data) is not bytes:
        raise CborRejected(f"input is a {type(data).__name__}, not bytes")
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            tag_hook=_reject_tag,
            semantic_decoders=_NO_SEMANTIC_TAGS,
            max_depth=max_depth,
            allow_duplicate_keys=False,
            strict_hashable_types=text_keys,
        )
        value = decoder.decode()
        _check_plain(value, max_depth, text_keys)
    except CborRejected:
        raise
    except _DECODER_ERRORS as exc:
        if isinstance(exc.__cause__, CborRejected):  # raised by our hooks, wrapped by cbor2
            raise CborRejected(str(exc.__cause__)) from None
        raise CborRejected(_reason(exc)) from None
    # cbor2 stops after one item: bytes after it would be smuggled past the parser, not ignored.
    if stream.tell() != len(data):
        raise CborRejected(f"{len(data) - stream.tell()} trailing bytes after the CBOR item")
    return value
