"""Chunked Oblivious HTTP (draft-ietf-ohai-chunked-ohttp-06): the chunk framing and sealing.

Private to :mod:`protocol.ohttp`, which re-exports the public classes and documents the formats.
Here: the writers of both directions, the incremental chunk reader they share, the response reader,
and the response key schedule (RFC 9458 §4.4, which the chunked draft reuses with its own label).

A chunk is ``varint(len(ct)) ‖ ct``; the final chunk is ``varint(0) ‖ ct`` sealed with AAD
``"final"`` and runs to the end of the stream. A reader may cap the number of chunks: each costs an
AEAD open and some bookkeeping, so a stream of empty chunks must not buy unbounded CPU.
"""

from __future__ import annotations

from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from protocol import hpke
from protocol.bhttp import decode_varint, encode_varint
from protocol.errors import ConfigError, DecapsulationError, MalformedMessage
from protocol.hpke import Suite

__all__ = [
    "CHUNKED_RESPONSE_LABEL",
    "FINAL_AAD",
    "MAX_MESSAGE_SIZE",
    "ChunkReader",
    "ChunkedRequestWriter",
    "ChunkedResponseReader",
    "ChunkedResponseWriter",
    "check_bytes",
    "response_keys",
    "response_nonce_size",
]

CHUNKED_RESPONSE_LABEL: Final = b"message/bhttp chunked response"
FINAL_AAD: Final = b"final"
# A request carries at most a 16 MiB inference body plus its BHTTP headers.
MAX_MESSAGE_SIZE: Final = 17 * 1024 * 1024  # a whole message, or a whole chunked stream


def response_keys(
    context: hpke.SenderContext | hpke.RecipientContext,
    label: bytes,
    enc: bytes,
    response_nonce: bytes,
) -> tuple[bytes, bytes]:
    """``(key, nonce)`` of a response: RFC 9458 §4.4 steps 1-6 (the chunked draft changes only the
    export label)."""
    suite = context.suite
    secret = context.export(label, max(suite.nn, suite.nk))
    prk = hpke.extract(enc + response_nonce, secret)
    return hpke.expand(prk, b"key", suite.nk), hpke.expand(prk, b"nonce", suite.nn)


def response_nonce_size(suite: Suite) -> int:
    return max(suite.nn, suite.nk)


def _xor_counter(nonce: bytes, counter: int) -> bytes:
    # chunked draft, "Response Encapsulation": chunk_nonce = aead_nonce XOR I2OSP(counter, Nn)
    return bytes(a ^ b for a, b in zip(nonce, counter.to_bytes(len(nonce), "big"), strict=True))


def check_bytes(data: object, what: str, limit: int = MAX_MESSAGE_SIZE) -> bytes:
    if type(data) is not bytes:
        raise MalformedMessage(f"{what} must be bytes")
    if len(data) > limit:
        raise MalformedMessage(f"{what} is larger than {limit} bytes")
    return data


# --- Writers -------------------------------------------------------------------------------------


class ChunkedRequestWriter:
    """Seals a request chunk by chunk (media type ``message/ohttp-chunked-req``).

    The first output starts with the request header (``hdr ‖ enc``); send the outputs in order,
    then end the stream after :meth:`final`.
    """

    def __init__(self, context: hpke.SenderContext, header: bytes) -> None:
        self._context = context
        self._pending_header = header
        self._done = False

    def _emit(self, framed: bytes) -> bytes:
        if self._done:
            raise ConfigError("the chunked request is already finished")
        out, self._pending_header = self._pending_header + framed, b""
        return out

    def chunk(self, data: bytes) -> bytes:
        """A non-final chunk: ``varint(len(ct)) ‖ ct``."""
        ct = self._context.seal(b"", check_bytes(data, "chunk"))
        return self._emit(encode_varint(len(ct)) + ct)

    def final(self, data: bytes = b"") -> bytes:
        """The final chunk: ``varint(0) ‖ Seal(aad="final", data)``; nothing may follow it."""
        ct = self._context.seal(FINAL_AAD, check_bytes(data, "chunk"))
        out = self._emit(encode_varint(0) + ct)
        self._done = True
        return out


class ChunkedResponseWriter:
    """Seals a response chunk by chunk (``message/ohttp-chunked-res``).

    The first output starts with the response nonce; end the stream after :meth:`final`.
    """

    def __init__(self, suite: Suite, key: bytes, nonce: bytes, response_nonce: bytes) -> None:
        self._aead = suite.aead(key)
        self._nonce = nonce
        self._pending_header = response_nonce
        self._counter = 0
        self._done = False

    def _seal(self, data: bytes, aad: bytes) -> bytes:
        if self._done:
            raise ConfigError("the chunked response is already finished")
        ct = self._aead.encrypt(_xor_counter(self._nonce, self._counter), data, aad)
        self._counter += 1
        return ct

    def _emit(self, framed: bytes) -> bytes:
        out, self._pending_header = self._pending_header + framed, b""
        return out

    def chunk(self, data: bytes) -> bytes:
        """A non-final chunk: ``varint(len(ct)) ‖ ct``."""
        ct = self._seal(check_bytes(data, "chunk"), b"")
        return self._emit(encode_varint(len(ct)) + ct)

    def final(self, data: bytes = b"") -> bytes:
        """The final chunk: ``varint(0) ‖ ct`` sealed with AAD ``"final"``; nothing follows."""
        ct = self._seal(check_bytes(data, "chunk"), FINAL_AAD)
        self._done = True
        return self._emit(encode_varint(0) + ct)


# --- Readers -------------------------------------------------------------------------------------


class ChunkReader:
    """Incremental parser of ``prefix ‖ (varint(len) ‖ ct)… ‖ varint(0) ‖ final_ct``.

    Bytes arrive in any split; :meth:`feed` returns the plaintext of every chunk completed so far.
    The final chunk runs to the end of the stream, so only :meth:`close` (the transport says the
    stream ended) can open it. After any error the reader refuses further use.
    """

    def __init__(
        self, prefix_size: int, max_size: int, what: str, *, max_chunks: int | None = None
    ) -> None:
        if type(max_size) is not int or max_size <= 0:
            raise ConfigError("max_size must be a positive integer")
        if max_chunks is not None and (type(max_chunks) is not int or max_chunks <= 0):
            raise ConfigError("max_chunks must be a positive integer or None")
        self._prefix_size = prefix_size
        self._max_size = max_size
        self._max_chunks = max_chunks
        self._chunks = 0
        self._what = what
        self._buffer = bytearray()
        self._received = 0
        self._prefix_done = False
        self._in_final = False
        self._finished = False
        self._failed = False

    @property
    def finished(self) -> bool:
        """True only once the final chunk has authenticated."""
        return self._finished

    def _check_usable(self) -> None:
        if self._failed:
            raise ConfigError(f"this {self._what} reader already failed")
        if self._finished:
            raise MalformedMessage(f"{self._what}: data after the final chunk")

    def _on_prefix(self, prefix: bytes) -> None:
        raise NotImplementedError

    def _open(self, ct: bytes, final: bool) -> bytes:
        raise NotImplementedError

    def feed(self, data: bytes) -> list[bytes]:
        """Take the next bytes of the stream; return the plaintexts of the chunks they complete.

        ``data`` is untrusted (it arrives through the untrusted parent).
        """
        self._check_usable()
        if type(data) is not bytes:
            raise ConfigError("feed() takes bytes")
        try:
            return self._feed(data)
        except BaseException:
            self._failed = True
            raise

    def _feed(self, data: bytes) -> list[bytes]:
        self._received += len(data)
        if self._received > self._max_size:
            raise MalformedMessage(f"{self._what} is larger than {self._max_size} bytes")
        self._buffer += data
        out: list[bytes] = []
        if not self._prefix_done:
            if len(self._buffer) < self._prefix_size:
                return out
            self._on_prefix(bytes(self._buffer[: self._prefix_size]))
            del self._buffer[: self._prefix_size]
            self._prefix_done = True
        while not self._in_final:
            decoded = decode_varint(self._buffer)
            if decoded is None:
                break
            length, start = decoded
            # every chunk, the final one too, counts against the cap before it is opened
            self._chunks += 1
            if self._max_chunks is not None and self._chunks > self._max_chunks:
                raise MalformedMessage(f"{self._what}: more than {self._max_chunks} chunks")
            if length == 0:  # the final chunk indicator: the rest of the stream is the final chunk
                del self._buffer[:start]
                self._in_final = True
                break
            if length < 16:
                raise MalformedMessage(f"{self._what}: a chunk is shorter than the AEAD tag")
            if length > self._max_size:
                raise MalformedMessage(f"{self._what}: a chunk is larger than {self._max_size}")
            if len(self._buffer) < start + length:
                break
            ct = bytes(self._buffer[start : start + length])
            del self._buffer[: start + length]
            out.append(self._open(ct, final=False))
        return out

    def close(self) -> bytes:
        """The stream has ended: open the final chunk and return its plaintext.

        Raises :class:`DecapsulationError` if the stream ended before a final chunk authenticated
        (truncation), or if it does not authenticate.
        """
        self._check_usable()
        try:
            if not self._in_final:
                raise DecapsulationError(f"{self._what}: the stream ended before its final chunk")
            if len(self._buffer) < 16:
                raise DecapsulationError(f"{self._what}: the stream ended before its final chunk")
            plaintext = self._open(bytes(self._buffer), final=True)
        except BaseException:
            self._failed = True
            raise
        self._buffer.clear()
        self._finished = True
        return plaintext


class ChunkedResponseReader(ChunkReader):
    """Reads a chunked response (``message/ohttp-chunked-res``) for a :class:`ClientContext`:
    :meth:`feed` the stream as it arrives, then :meth:`close` when it ends."""

    def __init__(self, context: hpke.SenderContext, enc: bytes, max_size: int) -> None:
        super().__init__(response_nonce_size(context.suite), max_size, "response")
        self._context = context
        self._enc = enc
        self._counter = 0
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self._nonce = b""

    def _on_prefix(self, prefix: bytes) -> None:
        key, self._nonce = response_keys(self._context, CHUNKED_RESPONSE_LABEL, self._enc, prefix)
        self._aead = self._context.suite.aead(key)

    def _open(self, ct: bytes, final: bool) -> bytes:
        if self._aead is None:
            raise DecapsulationError("response: the stream ended before its final chunk")
        try:
            pt = self._aead.decrypt(
                _xor_counter(self._nonce, self._counter), ct, FINAL_AAD if final else b""
            )
        except InvalidTag:
            raise DecapsulationError("response: decryption failed") from None
        self._counter += 1
        return pt
