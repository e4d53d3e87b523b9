"""Strict decoding and deterministic encoding of CBOR, for documents that cross a trust boundary.

cbor2 is a general decoder: it turns tags into dates, big numbers and shared (even cyclic)
references, silently ignores bytes after the first item, and accepts duplicate map keys by default.
None of that is legitimate in our documents, so :func:`strict_loads` decodes exactly one item that
fills the input, with no tags, no duplicate keys, no simple values other than true/false/null, text
map keys, and a nesting limit (RFC 8949 §5.3: a decoder used in a security context must be strict
about validity). Floats are allowed only when the caller asks (the manifest's ``model_config``
holds JSON values), and then only finite ones.

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

__all__ = ["CborRejected", "canonical_dumps", "strict_loads"]


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


def strict_loads(data: bytes, *, max_depth: int, floats: bool = False) -> object:
    """Decode the single CBOR item that is exactly ``data``.

    ``data`` is untrusted. Raises only :class:`CborRejected`: for malformed CBOR, trailing bytes,
    tags, duplicate map keys, non-text map keys, simple values other than true/false/null, floats
    (unless ``floats``; NaN and infinities always), or nesting deeper than ``max_depth``.
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


def canonical_dumps(value: object) -> bytes:
    """RFC 8949 §4.2.1 core deterministic encoding of a plain value (see the module docstring).

    Raises :class:`CborRejected` if the value cannot be encoded (an unsupported type).
    """
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBORError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise CborRejected(f"cannot encode: {type(exc).__name__}") from None
