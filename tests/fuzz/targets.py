"""One fuzz target per parser that reads bytes from the other side of a trust boundary.

A target is ``target_x(data: bytes) -> None``: it hands ``data`` to the parser as the real caller
does (the enclave, the parent, the consumer) and lets only that parser's own typed errors
propagate (returning means the input was accepted). Anything else that escapes, an
``AssertionError`` from a property a target checks on the way, a case slower than its time limit
or a ``MemoryError`` is a finding. :data:`TARGETS` registers each one with the errors it may
raise, its seed corpus (valid inputs from real data: :mod:`tests.fuzz.seeds`), a per-input time
limit, the largest input worth generating, and probes (inputs crafted to be slow).

Targets take a single ``bytes`` argument, so each is an atheris/libFuzzer ``TestOneInput``:
``Target.test_one_input`` swallows the allowed errors and lets every other exception crash the
fuzzer (docs/fuzzing.md shows the five lines). Inputs that need more than bytes take it from the
bytes themselves: the chunked readers cut ``data[1:]`` where ``data[0]`` says (the split a hostile
parent chooses) and check that the outcome does not depend on it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from attestation import AttestationDocument, Policy, audit, verify
from attestation.errors import (
    ChainInvalid,
    MalformedDocument,
    PolicyViolation,
    SignatureInvalid,
)
from attestation.policy import MaxAge
from attestation.verify import authenticate
from consumer.errors import AttestationFailed, ResponseInvalid
from protocol.bhttp import decode_request, decode_response
from protocol.bundle import BundleLayout, Manifest, open_chunk_into
from protocol.control import Credentials, Health, InferMode, InferRequest, UserData, check_nonce
from protocol.errors import (
    BundleIntegrityError,
    DecapsulationError,
    FrameError,
    MalformedBundle,
    MalformedMessage,
    TransportError,
    UnknownKeyId,
)
from protocol.frames import (
    BundleChunk,
    BundleEnd,
    BundleRequest,
    ConnectionClosed,
    ErrorPayload,
    Frame,
    FrameType,
    decode_header,
    read_frame,
    recv_frame,
)
from protocol.inference import (
    decode_request_body,
    decode_response_body,
    decode_stream_piece,
    parse_http_request,
    parse_http_response,
)
from protocol.ohttp import (
    KeyConfig,
    chunked_request_reader,
    decapsulate_request,
    parse_key_configs,
)
from tests.fuzz import seeds

__all__ = ["TARGETS", "Target", "split"]

_FALLBACK_NOW: Final = datetime(2026, 1, 1, tzinfo=UTC)
_READ_TIMEOUT: Final = 1.0  # seconds, for the frame readers: the whole input is already there


Errors = tuple[type[Exception], ...]


@dataclass(frozen=True)
class Target:
    """A fuzz target: ``function`` may raise only :attr:`allowed`; ``seeds()`` are valid inputs,
    ``probes()`` hostile ones built to be slow (the runner runs both before mutating).

    ``errors`` is the tuple of allowed types, or a function returning it where importing them
    is costly (the image decoder's module imports torch).
    """

    function: Callable[[bytes], None]
    errors: Errors | Callable[[], Errors]
    seeds: Callable[[], Sequence[bytes]]
    attack: str  # what the bytes are and who sends them, for reports and test names
    time_limit: float = 1.0  # seconds per input
    max_size: int = 1 << 16  # the largest input the runner generates
    # crafted worst cases within the size caps (too slow for the property tests: the runner only)
    probes: Callable[[], Sequence[bytes]] = tuple

    @property
    def allowed(self) -> Errors:
        return self.errors() if callable(self.errors) else self.errors

    def test_one_input(self, data: bytes) -> None:
        """atheris/libFuzzer entry point: the allowed errors are the parser doing its job."""
        with contextlib.suppress(*self.allowed):
            self.function(data)


def _first_error(steps: Iterable[Callable[[], object]], allowed: Errors) -> None:
    """Run every step; re-raise the first allowed error once all have run (one input exercises
    every entry point, and the typed-error count stays one per input)."""
    first: Exception | None = None
    for step in steps:
        try:
            step()
        except allowed as exc:
            first = first or exc
    if first is not None:
        raise first


def split(data: bytes) -> tuple[bytes, list[bytes]]:
    """``(stream, parts)``: ``data[1:]`` cut at up to 8 places that ``data[0]`` seeds."""
    if not data:
        return b"", []
    stream = data[1:]
    rng = random.Random(data[0])
    cuts = sorted(rng.randint(0, len(stream)) for _ in range(rng.randint(0, 8)))
    return stream, [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def _split_seeds(streams: Callable[[], Sequence[bytes]]) -> Callable[[], Sequence[bytes]]:
    def make() -> Sequence[bytes]:
        return [bytes([n]) + s for s in streams() for n in (0, 7, 200)]

    return make


def _same_outcome(
    name: str, run: Callable[[Sequence[bytes]], object], stream: bytes, parts: Sequence[bytes]
) -> None:
    """Run the reader on the whole stream and on ``parts``: the result (the plaintexts, or the
    error's type) must be the same. Re-raises the split run's error."""
    outcomes: list[tuple[Exception | None, object]] = []
    for pieces in ([stream], parts):
        try:
            outcomes.append((None, run(pieces)))
        except Exception as exc:
            outcomes.append((exc, None))
    (whole_error, whole), (split_error, split_out) = outcomes
    if type(whole_error) is not type(split_error):
        raise AssertionError(
            f"{name}: one feed gives {type(whole_error).__name__}, split feeds give "
            f"{type(split_error).__name__}"
        ) from (split_error or whole_error)
    if split_error is not None:
        raise split_error
    if whole != split_out:
        raise AssertionError(f"{name}: split feeds give other plaintexts than one feed")


# --- Attestation documents ------------------------------------------------------------------------

_VERIFY_ERRORS: Final = (MalformedDocument, SignatureInvalid, ChainInvalid, PolicyViolation)


def _document_seeds() -> Sequence[bytes]:
    return (*seeds.real_documents(), *seeds.synthetic_documents())


def target_attestation_document(data: bytes) -> None:
    AttestationDocument.from_cbor(data)


def target_attestation_verify(data: bytes) -> None:
    # verified just after the document's own time, so that mutations get past the validity check
    stamp = AttestationDocument.from_cbor(data).timestamp
    now = stamp + timedelta(seconds=1) if stamp.year < 9999 else stamp
    roots = seeds.attestation_roots()
    policy = Policy(seeds.expected_measurements())
    _first_error(
        (
            lambda: verify(data, roots=roots, now=now, policy=policy),
            lambda: authenticate(data, roots=roots, now=now, max_age=timedelta(minutes=5)),
        ),
        _VERIFY_ERRORS,
    )


def target_attestation_audit(data: bytes) -> None:
    report = audit(
        data,
        roots=seeds.attestation_roots(),
        now=_FALLBACK_NOW,
        policy=Policy(seeds.expected_measurements(), extra=(MaxAge(timedelta(minutes=5)),)),
        at_document_time=True,
    )
    if report.valid != all(check.ok for check in report.checks):
        raise AssertionError("the audit report's verdict disagrees with its checks")
    json.dumps(report.to_json())  # what `nci audit --json` prints


# --- Frames and control payloads ------------------------------------------------------------------


def target_frame_header(data: bytes) -> None:
    decode_header(data)


_PAYLOAD_DECODERS: Final[dict[FrameType, Callable[[bytes], object]]] = {
    FrameType.HEALTH_PONG: Health.decode,
    FrameType.ERROR: ErrorPayload.decode,
    FrameType.ATTESTATION_REQUEST: check_nonce,
    FrameType.INFER_REQUEST: InferRequest.decode,
    FrameType.BUNDLE_REQUEST: BundleRequest.decode,
    FrameType.BUNDLE_CHUNK: BundleChunk.decode,
    FrameType.BUNDLE_END: BundleEnd.decode,
    FrameType.CREDENTIALS: Credentials.decode,
}


@functools.cache
def _loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    atexit.register(loop.close)
    return loop


async def _read_frames_async(data: bytes) -> tuple[list[Frame], Exception | None]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    frames: list[Frame] = []
    while True:
        try:
            frames.append(await read_frame(reader, timeout=_READ_TIMEOUT))
        except ConnectionClosed:
            return frames, None
        except (FrameError, TransportError) as exc:
            return frames, exc


def _read_frames_blocking(data: bytes) -> tuple[list[Frame], Exception | None]:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(data)
        ours.shutdown(socket.SHUT_WR)
        frames: list[Frame] = []
        while True:
            try:
                frames.append(recv_frame(theirs, timeout=_READ_TIMEOUT))
            except ConnectionClosed:
                return frames, None
            except (FrameError, TransportError) as exc:
                return frames, exc


def target_frame_stream(data: bytes) -> None:
    """A byte stream from the other end of the control connection: frames until the end, each
    payload through its decoder. The asyncio and the blocking reader must agree."""
    frames, error = _loop().run_until_complete(_read_frames_async(data))
    blocking, blocking_error = _read_frames_blocking(data)
    if frames != blocking or type(error) is not type(blocking_error):
        raise AssertionError("read_frame and recv_frame disagree on the same bytes")
    steps = [
        functools.partial(_PAYLOAD_DECODERS[f.type], f.payload)
        for f in frames
        if f.type in _PAYLOAD_DECODERS
    ]
    if error is not None:
        steps.append(functools.partial(_raise, error))
    _first_error(steps, (FrameError, TransportError))


def _raise(error: Exception) -> None:
    raise error


def target_frame_error_payload(data: bytes) -> None:
    ErrorPayload.decode(data)


def target_frame_bundle_request(data: bytes) -> None:
    BundleRequest.decode(data)


def target_frame_bundle_chunk(data: bytes) -> None:
    BundleChunk.decode(data)


def target_frame_bundle_end(data: bytes) -> None:
    BundleEnd.decode(data)


def target_control_health(data: bytes) -> None:
    Health.decode(data)


def target_control_credentials(data: bytes) -> None:
    Credentials.decode(data)


def target_control_infer_request(data: bytes) -> None:
    InferRequest.decode(data)


def target_control_nonce(data: bytes) -> None:
    check_nonce(data)


def target_control_user_data(data: bytes) -> None:
    UserData.decode(data)


# --- Oblivious HTTP -------------------------------------------------------------------------------

_SERVER_ERRORS: Final = (MalformedMessage, UnknownKeyId, DecapsulationError)
_CLIENT_ERRORS: Final = (MalformedMessage, DecapsulationError)


def target_ohttp_key_config(data: bytes) -> None:
    KeyConfig.from_bytes(data).suite()


def target_ohttp_key_configs(data: bytes) -> None:
    parse_key_configs(data)


def _server_keys() -> dict[int, tuple[bytes, bytes]]:
    rfc = seeds.RFC9458
    return {
        1: (bytes.fromhex(str(rfc["private_key"])), bytes.fromhex(str(rfc["key_config"]))),
        7: (seeds.SERVER_KEY, seeds.SERVER_KEY_CONFIG),
    }


def target_ohttp_request(data: bytes) -> None:
    """A server holding two keys (the RFC 9458 example's, id 1, and the vectors', id 7) picks the
    one the request names, as a server rotating keys would."""
    private_key, key_config = _server_keys()[1 if data[:1] == b"\x01" else 7]
    decapsulate_request(private_key, key_config, data)


def _ohttp_request_seeds() -> Sequence[bytes]:
    return (bytes.fromhex(str(seeds.RFC9458["encapsulated_request"])), *seeds.ohttp_requests())


def target_ohttp_response(data: bytes) -> None:
    seeds.ohttp_client().decapsulate_response(data)


def _ohttp_response_seeds() -> Sequence[bytes]:
    rfc = bytes.fromhex(str(seeds.RFC9458["encapsulated_response"]))  # another exchange's
    return (*seeds.ohttp_responses(), rfc)


def _feed_all(reader: Any, parts: Sequence[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for part in parts:
        out.extend(reader.feed(part))
    out.append(reader.close())
    return out


def target_ohttp_chunked_request(data: bytes) -> None:
    stream, parts = split(data)

    def run(pieces: Sequence[bytes]) -> list[bytes]:
        return _feed_all(chunked_request_reader(seeds.SERVER_KEY, seeds.SERVER_KEY_CONFIG), pieces)

    _same_outcome("chunked request", run, stream, parts)


def target_ohttp_chunked_response(data: bytes) -> None:
    stream, parts = split(data)

    def run(pieces: Sequence[bytes]) -> list[bytes]:
        return _feed_all(seeds.chunked_client().chunked_response_reader(), pieces)

    _same_outcome("chunked response", run, stream, parts)


def target_enclave_infer_request(data: bytes) -> None:
    """An INFER_REQUEST payload through the enclave's steps (enclave/_job.py): the mode byte,
    decapsulation with its key, the BHTTP request and its body, the stream flag against the
    mode."""
    request = InferRequest.decode(data)
    if request.mode is InferMode.SINGLE:
        plaintext, _ = decapsulate_request(
            seeds.SERVER_KEY, seeds.SERVER_KEY_CONFIG, request.message
        )
    else:
        reader = chunked_request_reader(seeds.SERVER_KEY, seeds.SERVER_KEY_CONFIG)
        plaintext = b"".join(_feed_all(reader, [request.message]))
    inference = parse_http_request(plaintext)
    if inference.params.stream != (request.mode is InferMode.CHUNKED):
        raise MalformedMessage("the stream flag disagrees with the mode (the enclave's rule)")


# --- Binary HTTP and the inner CBOR ---------------------------------------------------------------


def target_bhttp_request(data: bytes) -> None:
    decode_request(data).header("content-type")


def target_bhttp_response(data: bytes) -> None:
    decode_response(data).header("content-type")


def target_inference_request_body(data: bytes) -> None:
    decode_request_body(data)


def target_inference_http_request(data: bytes) -> None:
    parse_http_request(data)


def target_inference_response_body(data: bytes) -> None:
    decode_response_body(data)


def target_inference_stream_piece(data: bytes) -> None:
    decode_stream_piece(data)


def target_inference_http_response(data: bytes) -> None:
    parse_http_response(data)


# --- The sealed bundle ----------------------------------------------------------------------------


def target_bundle_manifest(data: bytes) -> None:
    Manifest.from_cbor(data)


@functools.cache
def _manifest_seeds() -> Sequence[bytes]:
    bundle_id = bytes(range(16))
    other = Manifest.create(
        bundle_id=bundle_id,
        model_id="fuzz/model:2",
        model_config={"layers": [1, 2.5, None, True, {"name": "x"}], "eps": 1e-6},
        kms_key_id="alias/nci-fuzz",
        encrypted_data_key=b"\x01" * 184,
        encryption_context={"nci:model": "fuzz/model:2", "nci:bundle": bundle_id.hex()},
        chunk_size=4096,
        layout=BundleLayout.plan(
            [("w", "F32", (2, 3), 24), ("b", "BF16", (5000,), 10000)],
            [("config.json", 10), ("tokenizer/vocab.txt", 3)],
        ),
    )
    return seeds.bundle_manifest(), other.raw


_UNTOUCHED: Final = 0x5A


def target_bundle_chunk(data: bytes) -> None:
    """A BUNDLE_CHUNK payload as the enclave opens it (enclave/unlock.py): the index, the range
    the manifest gives it, then AES-GCM straight into the model's buffer. A refused chunk must
    leave nothing in the buffer, and only the genuine chunk may open."""
    vectors = seeds.bundle_vectors()
    manifest = vectors.manifest
    chunk = BundleChunk.decode(data)
    start, end = manifest.chunk_plain_range(chunk.index)
    out = bytearray([_UNTOUCHED]) * (end - start)
    try:
        open_chunk_into(
            vectors.bundle_key,
            manifest.digest,
            chunk.index,
            manifest.is_final(chunk.index),
            memoryview(data)[8:],
            memoryview(out),
        )
    except BundleIntegrityError:
        if out.count(0) != len(out) and out.count(_UNTOUCHED) != len(out):
            raise AssertionError("a refused chunk left bytes in the buffer") from None
        raise
    if chunk.sealed != vectors.chunks[chunk.index]:
        raise AssertionError("a chunk other than the genuine one authenticated")


# --- Images ---------------------------------------------------------------------------------------


def _decode_image(media_type: str, data: bytes) -> None:
    from enclave.models.builtin import MAX_IMAGE_PIXELS
    from enclave.models.images import decode_image
    from protocol.inference import MAX_IMAGE_BYTES, Image

    # An Image that skipped the protocol's own checks (signature, size): decode_image repeats them.
    image = object.__new__(Image)
    object.__setattr__(image, "media_type", media_type)
    object.__setattr__(image, "data", data)
    decoded = decode_image(image, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS)
    if decoded.mode != "RGB":
        raise AssertionError(f"decode_image returned mode {decoded.mode}, not RGB")


def target_image_png(data: bytes) -> None:
    _decode_image("image/png", data)


def target_image_jpeg(data: bytes) -> None:
    _decode_image("image/jpeg", data)


@functools.cache
def _invalid_input() -> Errors:
    from enclave.models.runtime import InvalidInput

    return (InvalidInput,)


# --- CMS from KMS ---------------------------------------------------------------------------------


def target_keyrelease_envelope(data: bytes) -> None:
    from enclave.keyrelease import unwrap_ciphertext_for_recipient

    unwrap_ciphertext_for_recipient(data, seeds.recipient_key())


@functools.cache
def _malformed_envelope() -> Errors:
    from enclave.errors import MalformedEnvelope

    return (MalformedEnvelope,)


# --- The consumer ---------------------------------------------------------------------------------


def target_consumer_user_data(data: bytes) -> None:
    from consumer.attest import parse_user_data

    parse_user_data(data)


def target_consumer_attestation(data: bytes) -> None:
    """``data`` as the ``user_data`` of a genuine, signed document (the NSM signs whatever the
    enclave hands it), verified by the consumer with its pins."""
    from consumer.attest import verify_attestation

    verify_attestation(
        seeds.consumer_document(data[:1024]),
        nonce=seeds.CONSUMER_NONCE,
        measurements=seeds.consumer_measurements(),
        roots=[seeds.consumer_root()],
        now=seeds.SYNTHETIC_NOW + timedelta(seconds=1),
        model_id=seeds.MODEL_ID,
        manifest_sha256=seeds.MANIFEST_SHA256,
    )


def target_consumer_response(data: bytes) -> None:
    from consumer._core import Exchange
    from protocol.ohttp import MEDIA_TYPE_REQUEST, MEDIA_TYPE_RESPONSE

    exchange = Exchange(
        seeds.consumer_attestation(),
        MEDIA_TYPE_REQUEST,
        MEDIA_TYPE_RESPONSE,
        b"",
        seeds.ohttp_client(),
    )
    exchange.open(data)


def target_consumer_stream(data: bytes) -> None:
    from consumer._core import MAX_STREAM, PieceReader

    stream, parts = split(data)

    def run(pieces: Sequence[bytes]) -> tuple[list[str], object]:
        reader = PieceReader(seeds.chunked_client().chunked_response_reader(max_size=MAX_STREAM))
        texts = [text for piece in pieces for text in reader.feed(piece)]
        return texts, reader.close()

    _same_outcome("consumer stream", run, stream, parts)


_STATUSES: Final = (400, 408, 413, 422, 429, 500, 503)


def target_consumer_error_answer(data: bytes) -> None:
    """An error answer from the bridge: ``Retry-After`` ‖ LF ‖ problem+json body. Turning it into
    a typed error must never raise, and what it shows carries no control characters."""
    from consumer._core import status_error

    retry_after, _, body = data.partition(b"\n")
    headers = {
        "Content-Type": "application/problem+json",
        "Retry-After": retry_after.decode("latin-1"),
    }
    error = status_error(_STATUSES[len(data) % len(_STATUSES)], headers, body)
    if not str(error).isprintable():
        raise AssertionError("an error message quotes control characters from the parent")


# --- The registry ---------------------------------------------------------------------------------


TARGETS: Final[dict[str, Target]] = {
    # attestation documents (from the parent, the network)
    "attestation_document": Target(
        target_attestation_document,
        (MalformedDocument,),
        _document_seeds,
        "arbitrary bytes as an attestation document",
        max_size=20_000,
    ),
    "attestation_verify": Target(
        target_attestation_verify,
        _VERIFY_ERRORS,
        _document_seeds,
        "mutated Nitro documents through verify and authenticate",
        time_limit=2.0,
        max_size=20_000,
    ),
    "attestation_audit": Target(
        target_attestation_audit,
        (),
        _document_seeds,
        "mutated Nitro documents through the auditor's report",
        time_limit=2.0,
        max_size=20_000,
    ),
    # frames on the control connection and the bundle stream (parent ↔ enclave)
    "frame_header": Target(
        target_frame_header, (FrameError,), seeds.frame_header_seeds, "a frame header"
    ),
    "frame_stream": Target(
        target_frame_stream,
        (FrameError, TransportError),
        seeds.frame_stream_seeds,
        "a byte stream of frames",
    ),
    "frame_error_payload": Target(
        target_frame_error_payload,
        (FrameError,),
        lambda: [e.encode() for e in seeds.ERRORS],
        "an ERROR payload",
    ),
    "frame_bundle_request": Target(
        target_frame_bundle_request,
        (FrameError,),
        lambda: [r.encode() for r in seeds.BUNDLE_REQUESTS],
        "a BUNDLE_REQUEST payload",
    ),
    "frame_bundle_chunk": Target(
        target_frame_bundle_chunk,
        (FrameError,),
        seeds.bundle_chunk_payloads,
        "a BUNDLE_CHUNK payload",
    ),
    "frame_bundle_end": Target(
        target_frame_bundle_end,
        (FrameError,),
        lambda: [e.encode() for e in seeds.BUNDLE_ENDS],
        "a BUNDLE_END payload",
    ),
    "control_health": Target(
        target_control_health,
        (FrameError,),
        lambda: [h.encode() for h in seeds.HEALTH],
        "a HEALTH_PONG payload",
    ),
    "control_credentials": Target(
        target_control_credentials,
        (FrameError,),
        lambda: [c.encode() for c in seeds.CREDENTIALS],
        "a CREDENTIALS payload",
    ),
    "control_infer_request": Target(
        target_control_infer_request,
        (FrameError,),
        seeds.infer_request_seeds,
        "an INFER_REQUEST payload",
    ),
    "control_nonce": Target(
        target_control_nonce, (FrameError,), lambda: seeds.NONCES, "an ATTESTATION_REQUEST nonce"
    ),
    "control_user_data": Target(
        target_control_user_data,
        (FrameError,),
        seeds.user_data_seeds,
        "a document's user_data",
    ),
    # Oblivious HTTP (consumer ↔ enclave, through the parent)
    "ohttp_key_config": Target(
        target_ohttp_key_config,
        (MalformedMessage,),
        seeds.key_config_seeds,
        "an OHTTP key configuration",
    ),
    "ohttp_key_configs": Target(
        target_ohttp_key_configs,
        (MalformedMessage,),
        seeds.key_config_list_seeds,
        "an application/ohttp-keys list",
    ),
    "ohttp_request": Target(
        target_ohttp_request, _SERVER_ERRORS, _ohttp_request_seeds, "an encapsulated request"
    ),
    "ohttp_response": Target(
        target_ohttp_response, _CLIENT_ERRORS, _ohttp_response_seeds, "an encapsulated response"
    ),
    "ohttp_chunked_request": Target(
        target_ohttp_chunked_request,
        _SERVER_ERRORS,
        _split_seeds(seeds.chunked_requests),
        "a chunked request, cut anywhere",
    ),
    "ohttp_chunked_response": Target(
        target_ohttp_chunked_response,
        _CLIENT_ERRORS,
        _split_seeds(seeds.chunked_responses),
        "a chunked response, cut anywhere",
    ),
    "enclave_infer_request": Target(
        target_enclave_infer_request,
        (FrameError, *_SERVER_ERRORS),
        seeds.infer_request_seeds,
        "an INFER_REQUEST through the enclave's request path",
    ),
    # Binary HTTP and the inner CBOR (after decapsulation)
    "bhttp_request": Target(
        target_bhttp_request, (MalformedMessage,), seeds.bhttp_request_seeds, "a BHTTP request"
    ),
    "bhttp_response": Target(
        target_bhttp_response,
        (MalformedMessage,),
        seeds.bhttp_response_seeds,
        "a BHTTP response",
    ),
    "inference_request_body": Target(
        target_inference_request_body,
        (MalformedMessage,),
        seeds.request_body_seeds,
        "an inference request body",
    ),
    "inference_http_request": Target(
        target_inference_http_request,
        (MalformedMessage,),
        seeds.bhttp_request_seeds,
        "a decapsulated inference request",
    ),
    "inference_response_body": Target(
        target_inference_response_body,
        (MalformedMessage,),
        seeds.response_body_seeds,
        "an inference response body",
    ),
    "inference_stream_piece": Target(
        target_inference_stream_piece,
        (MalformedMessage,),
        seeds.piece_seeds,
        "a streamed piece",
    ),
    "inference_http_response": Target(
        target_inference_http_response,
        (MalformedMessage,),
        seeds.bhttp_response_seeds,
        "a decapsulated inference response",
    ),
    # the sealed bundle (from S3, through the parent)
    "bundle_manifest": Target(
        target_bundle_manifest, (MalformedBundle,), _manifest_seeds, "a bundle manifest"
    ),
    "bundle_chunk": Target(
        target_bundle_chunk,
        (FrameError, MalformedBundle, BundleIntegrityError),
        seeds.bundle_chunk_payloads,
        "a sealed chunk",
    ),
    # consumers' images (inside the enclave)
    "image_png": Target(
        target_image_png,
        _invalid_input,
        seeds.png_seeds,
        "a consumer's PNG",
        time_limit=2.0,  # a legitimate image at the pixel cap decodes in 0.3 to 0.5 s
        max_size=seeds.IMAGE_CAP + 1,
        probes=seeds.png_probes,
    ),
    "image_jpeg": Target(
        target_image_jpeg,
        _invalid_input,
        seeds.jpeg_seeds,
        "a consumer's JPEG",
        time_limit=2.0,  # a legitimate image at the pixel cap decodes in 0.3 to 0.5 s
        max_size=seeds.IMAGE_CAP + 1,
        probes=seeds.jpeg_probes,
    ),
    # CMS from KMS (through the parent's relay)
    "keyrelease_envelope": Target(
        target_keyrelease_envelope,
        _malformed_envelope,
        seeds.envelopes,
        "a CiphertextForRecipient envelope",
        time_limit=2.0,
        max_size=8192,
        probes=seeds.envelope_probes,
    ),
    # the consumer's side (answers from the parent)
    "consumer_user_data": Target(
        target_consumer_user_data,
        (AttestationFailed,),
        seeds.user_data_seeds,
        "a document's user_data, at the consumer",
    ),
    "consumer_attestation": Target(
        target_consumer_attestation,
        (AttestationFailed,),
        seeds.user_data_seeds,
        "user_data in a signed document, at the consumer",
        time_limit=2.0,
        max_size=1024,
    ),
    "consumer_response": Target(
        target_consumer_response,
        (ResponseInvalid,),
        _ohttp_response_seeds,
        "an answer, at the consumer",
    ),
    "consumer_stream": Target(
        target_consumer_stream,
        (ResponseInvalid,),
        _split_seeds(seeds.chunked_responses),
        "a streamed answer, cut anywhere, at the consumer",
    ),
    "consumer_error_answer": Target(
        target_consumer_error_answer,
        (),
        seeds.problem_seeds,
        "an error answer from the bridge",
    ),
}
