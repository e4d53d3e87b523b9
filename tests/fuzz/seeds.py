"""Fixed keys, contexts and seed inputs for the fuzz targets: real data wherever it exists.

Real: the Nitro documents (``tests/assets/attestation``), the RFC 9458 and RFC 9292 vectors, the
sealed-bundle vectors (``tests/assets/bundle``), the chunked OHTTP vectors, and the demo's own
shapes scenes. Synthetic, with fixed keys so that every run starts from the same bytes: the
emulator's documents (the synthetic vectors' CA, ``tests/assets/generate_synthetic.py``), the
inference bodies, frames, images and the CMS envelopes (to a fixed 2048-bit RSA key). Test keys
only. Also here: the probes, inputs at the size caps crafted to be slow.

Everything is built on first use, the costly parts kept (``functools.cache``): a run of one
target builds only what it needs (the image targets import torch; most others do not).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import struct
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives.asymmetric import rsa

from attestation import ExpectedMeasurements, Nonce, TrustRoot
from protocol.bundle import Manifest
from protocol.control import Credentials, Health, InferMode, InferRequest, UserData
from protocol.frames import (
    BundleChunk,
    BundleEnd,
    BundleRequest,
    ErrorPayload,
    Frame,
    FrameType,
    encode_frame,
)
from protocol.inference import (
    Image,
    InferenceRequest,
    InferenceResponse,
    Params,
    StreamDelta,
    StreamEnd,
    Usage,
    encode_request_body,
    encode_response_body,
    encode_stream_piece,
    http_request,
    http_response,
)
from protocol.ohttp import (
    ClientContext,
    chunked_request_reader,
    decapsulate_request,
    encapsulate_chunked_request,
    encapsulate_request,
    encode_key_configs,
    generate_key_config,
)

if TYPE_CHECKING:
    from attestation import EmulatedNsm
    from consumer.attest import Attestation

ASSETS: Final = Path(__file__).resolve().parent.parent / "assets"
H = bytes.fromhex


def _json(path: str) -> dict[str, object]:
    value: dict[str, object] = json.loads((ASSETS / path).read_text())
    return value


# --- Attestation ----------------------------------------------------------------------------------


@functools.cache
def real_documents() -> tuple[bytes, ...]:
    """The eight documents from Nitro hardware: production, debug-mode, one bad signature."""
    return tuple((ASSETS / "attestation" / f"nitro-doc-{n}.cbor").read_bytes() for n in range(1, 9))


@functools.cache
def synthetic_documents() -> tuple[bytes, ...]:
    """The emulator's documents (indefinite-length map, 1024-byte fields, user PCRs, debug)."""
    return tuple(sorted(p.read_bytes() for p in (ASSETS / "synthetic").glob("*.cbor")))


@functools.cache
def attestation_roots() -> tuple[TrustRoot, ...]:
    """The AWS Nitro root and the synthetic vectors' local root."""
    local = TrustRoot.local((ASSETS / "synthetic" / "local-root.pem").read_bytes())
    return TrustRoot.aws_nitro_g1(), local


@functools.cache
def expected_measurements() -> ExpectedMeasurements:
    """PCR0..2 of the three production documents and of the synthetic vectors: each accepted."""
    sets = []
    for n in (1, 3, 6):
        meta = _json(f"attestation/nitro-doc-{n}.json")
        sets.append({i: H(str(meta[f"pcr{i}"])) for i in (0, 1, 2)})
    synthetic = _json("synthetic/vectors.json")["measurements"]
    assert isinstance(synthetic, dict)
    sets.append({int(i): H(v) for i, v in synthetic.items()})
    return ExpectedMeasurements.of(*sets)


# --- OHTTP: the RFC 9458 exchange and the chunked vectors -----------------------------------------

RFC9458: Final = _json("ohttp/ohttp-rfc9458.json")
CHUNKED: Final = _json("ohttp/chunked-synthetic.json")
# The chunked vectors' server key (the RFC 9458 example's, with key id 7) and ephemeral key.
SERVER_KEY: Final = H(str(CHUNKED["private_key"]))
SERVER_KEY_CONFIG: Final = H(str(CHUNKED["key_config"]))
EPHEMERAL_KEY: Final = H(str(CHUNKED["ephemeral_private_key"]))
RESPONSE_NONCE: Final = bytes(range(32))


def sample_png(width: int = 8, height: int = 8, mode: str = "RGB", **options: object) -> bytes:
    """A small PNG with pixels from a fixed seed (Pillow only: no torch)."""
    from PIL import Image as PILImage

    rng = random.Random(f"{width}x{height} {mode}")
    if mode == "I;16":
        pixels = b"".join(struct.pack("<H", rng.randrange(1 << 16)) for _ in range(width * height))
        image = PILImage.frombytes("I;16", (width, height), pixels)
    else:
        bands = len(PILImage.new(mode, (1, 1)).getbands())
        image = PILImage.frombytes(mode, (width, height), rng.randbytes(width * height * bands))
    out = io.BytesIO()
    image.save(out, "PNG", **options)
    return out.getvalue()


def sample_jpeg(width: int = 8, height: int = 8, mode: str = "RGB", **options: object) -> bytes:
    from PIL import Image as PILImage

    rng = random.Random(f"jpeg {width}x{height} {mode}")
    bands = len(PILImage.new(mode, (1, 1)).getbands())
    image = PILImage.frombytes(mode, (width, height), rng.randbytes(width * height * bands))
    out = io.BytesIO()
    image.save(out, "JPEG", **options)
    return out.getvalue()


@functools.cache
def inference_requests() -> tuple[InferenceRequest, ...]:
    return (
        InferenceRequest("What shape is this?", (Image("image/png", sample_png()),)),
        InferenceRequest(
            "Describe both.",
            (Image("image/png", sample_png(4, 4)), Image("image/jpeg", sample_jpeg())),
            Params(max_tokens=64, temperature=0.7, top_p=0.9, stop=("\n", "END"), stream=True),
        ),
        InferenceRequest("", params=Params(max_tokens=1, temperature=0, top_p=1)),
        InferenceRequest("héllo ✓ " * 8, params=Params(stream=True)),
    )


@functools.cache
def inference_responses() -> tuple[InferenceResponse, ...]:
    return (
        InferenceResponse("A red circle.", "stop", Usage(12, 4)),
        InferenceResponse("", "length", Usage(0, 0)),
        InferenceResponse("ünïcode ✓ " * 40, "length", Usage(1 << 20, 4096)),
    )


@functools.cache
def stream_pieces() -> tuple[StreamDelta | StreamEnd, ...]:
    return (
        StreamDelta("A red"),
        StreamDelta(""),
        StreamDelta("x" * 200),
        StreamEnd("stop", Usage(12, 4)),
        StreamEnd("length", Usage(0, 4096)),
    )


@functools.cache
def rfc_client() -> ClientContext:
    """The client of the RFC 9458 Appendix A exchange (its ephemeral key)."""
    _, client = encapsulate_request(
        H(str(RFC9458["key_config"])),
        H(str(RFC9458["request"])),
        ephemeral_private_key=H(str(RFC9458["ephemeral_private_key"])),
    )
    return client


@functools.cache
def ohttp_requests() -> tuple[bytes, ...]:
    """Requests to :data:`SERVER_KEY`: each inference request, padded as the consumer pads it."""
    from protocol.bhttp import pad

    return tuple(
        encapsulate_request(
            SERVER_KEY_CONFIG, pad(http_request(r)), ephemeral_private_key=EPHEMERAL_KEY
        )[0]
        for r in inference_requests()
    )


@functools.cache
def ohttp_client() -> ClientContext:
    """The client context of :func:`ohttp_requests`'s first request (a fixed ephemeral key)."""
    _, client = encapsulate_request(SERVER_KEY_CONFIG, b"\x00", ephemeral_private_key=EPHEMERAL_KEY)
    return client


@functools.cache
def ohttp_responses() -> tuple[bytes, ...]:
    """Responses for :func:`ohttp_client`: each inference response, padded as the enclave pads."""
    _, server = decapsulate_request(SERVER_KEY, SERVER_KEY_CONFIG, ohttp_requests()[0])
    return tuple(
        server.encapsulate_response(http_response(r), response_nonce=RESPONSE_NONCE)
        for r in inference_responses()
    )


@functools.cache
def chunked_client() -> ClientContext:
    """The client context of the chunked vectors' request (and of :func:`chunked_requests`)."""
    _, client = encapsulate_chunked_request(SERVER_KEY_CONFIG, ephemeral_private_key=EPHEMERAL_KEY)
    return client


@functools.cache
def chunked_requests() -> tuple[bytes, ...]:
    """The chunked vectors' request, and a streamed inference request in one final chunk (as the
    consumer sends it)."""
    from protocol.bhttp import pad

    vector = b"".join(H(p) for p in CHUNKED["encapsulated_request_parts"])  # type: ignore[attr-defined]
    writer, _ = encapsulate_chunked_request(SERVER_KEY_CONFIG, ephemeral_private_key=EPHEMERAL_KEY)
    whole = writer.final(pad(http_request(inference_requests()[3])))
    writer, _ = encapsulate_chunked_request(SERVER_KEY_CONFIG, ephemeral_private_key=EPHEMERAL_KEY)
    parts = writer.chunk(b"\x00\x04POST") + writer.chunk(b"\x05https") + writer.final(b"\x00")
    return vector, whole, parts


@functools.cache
def chunked_responses() -> tuple[bytes, ...]:
    """The chunked vectors' response, and a streamed answer of padded pieces (deltas, then the
    end piece in the final chunk), both for :func:`chunked_client`."""
    vector = b"".join(H(p) for p in CHUNKED["encapsulated_response_parts"])  # type: ignore[attr-defined]
    reader = chunked_request_reader(SERVER_KEY, SERVER_KEY_CONFIG)
    reader.feed(chunked_requests()[1])
    reader.close()
    writer = reader.context.chunked_response(response_nonce=RESPONSE_NONCE)
    pieces = [p for p in stream_pieces() if isinstance(p, StreamDelta)]
    stream = b"".join(writer.chunk(encode_stream_piece(p)) for p in pieces)
    stream += writer.final(encode_stream_piece(StreamEnd("stop", Usage(12, 3))))
    return vector, stream


def key_config_seeds() -> tuple[bytes, ...]:
    rfc = H(str(RFC9458["key_config"]))
    _, other = generate_key_config(200, private_key=bytes(range(1, 33)))
    return rfc, SERVER_KEY_CONFIG, other


def key_config_list_seeds() -> tuple[bytes, ...]:
    configs = key_config_seeds()
    foreign = b"\x09\x00\x10" + bytes(65) + b"\x00\x04\x00\x01\x00\x01"  # a P-256 KEM: skipped
    listed = b"".join(len(c).to_bytes(2, "big") + c for c in (*configs, foreign))
    from protocol.ohttp import KeyConfig

    return listed, encode_key_configs([KeyConfig.from_bytes(configs[0])])


# --- Binary HTTP and the CBOR bodies --------------------------------------------------------------


def bhttp_request_seeds() -> tuple[bytes, ...]:
    examples = _json("ohttp/bhttp-rfc9292.json")["examples"]
    assert isinstance(examples, list)
    rfc = tuple(H(e["encoded"]) for e in examples if "method" in e)
    return (*rfc, *(http_request(r) for r in inference_requests()[:2]))


def bhttp_response_seeds() -> tuple[bytes, ...]:
    examples = _json("ohttp/bhttp-rfc9292.json")["examples"]
    assert isinstance(examples, list)
    rfc = tuple(H(e["encoded"]) for e in examples if "status" in e)
    return (*rfc, *(http_response(r) for r in inference_responses()[:2]))


def request_body_seeds() -> tuple[bytes, ...]:
    return tuple(encode_request_body(r) for r in inference_requests())


def response_body_seeds() -> tuple[bytes, ...]:
    return tuple(encode_response_body(r) for r in inference_responses())


def piece_seeds() -> tuple[bytes, ...]:
    return tuple(encode_stream_piece(p) for p in stream_pieces())


# --- Frames and control payloads ------------------------------------------------------------------

HEALTH: Final = (
    Health("ready", 6, 6, "ready", key_id=7, active=1, served=42),
    Health("booting", 3, 6, "key release and unlock"),
    Health("failed", 2, 6, "credentials", error="credentials_timeout"),
)
CREDENTIALS: Final = (
    Credentials("ASIAFUZZEXAMPLE00001", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "FQoG" * 64),
    Credentials("AKIAFUZZEXAMPLE00002", "secret", "", "2026-01-01T00:00:00Z"),
)
ERRORS: Final = (
    ErrorPayload("malformed", "the request was refused"),
    ErrorPayload("UnknownBundle", ""),
)
BUNDLE_REQUESTS: Final = (BundleRequest("anymal-shapes"), BundleRequest("nci-test/tiny:1", 2))
BUNDLE_ENDS: Final = (BundleEnd(3), BundleEnd(0))
NONCES: Final = (bytes(range(16)), bytes(range(32)), bytes(range(64)))


def infer_request_seeds() -> tuple[bytes, ...]:
    single = tuple(InferRequest(InferMode.SINGLE, r).encode() for r in ohttp_requests()[:2])
    chunked = InferRequest(InferMode.CHUNKED, chunked_requests()[1]).encode()
    return (*single, chunked)


@functools.cache
def frames() -> tuple[Frame, ...]:
    """One valid frame of every type, on a few streams."""
    return (
        Frame(FrameType.HEALTH_PING, 1, b""),
        *(Frame(FrameType.HEALTH_PONG, 1, h.encode()) for h in HEALTH),
        *(e.frame(2) for e in ERRORS),
        Frame(FrameType.ATTESTATION_REQUEST, 3, NONCES[1]),
        Frame(FrameType.ATTESTATION_RESPONSE, 3, synthetic_documents()[0]),
        Frame(FrameType.INFER_REQUEST, 5, infer_request_seeds()[0]),
        Frame(FrameType.INFER_RESPONSE_CHUNK, 5, ohttp_responses()[0]),
        Frame(FrameType.INFER_RESPONSE_END, 5, b""),
        *(r.frame() for r in BUNDLE_REQUESTS),
        Frame(FrameType.BUNDLE_MANIFEST, 0, bundle_manifest()),
        Frame(FrameType.BUNDLE_CHUNK, 0, bundle_chunk_payloads()[2]),
        *(e.frame() for e in BUNDLE_ENDS),
        Frame(FrameType.KMS_RELAY_OPEN, 9, b""),
        Frame(FrameType.KMS_RELAY_DATA, 9, b"POST / HTTP/1.1\r\n\r\n"),
        Frame(FrameType.KMS_RELAY_CLOSE, 9, b""),
        *(c.frame() for c in CREDENTIALS),
    )


def frame_header_seeds() -> tuple[bytes, ...]:
    return tuple(encode_frame(f)[:12] for f in frames())


def frame_stream_seeds() -> tuple[bytes, ...]:
    encoded = [encode_frame(f) for f in frames()]
    small = [e for e in encoded if len(e) < 1024]
    return b"".join(small), b"".join(encoded[:4]), encoded[0], b"".join(encoded)


# --- The sealed bundle ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleVectors:
    manifest: Manifest
    bundle_key: bytes
    chunks: tuple[bytes, ...]  # sealed, in order


@functools.cache
def bundle_vectors() -> BundleVectors:
    manifest = Manifest.from_cbor(bundle_manifest())
    vectors = _json("bundle/vectors.json")
    sealed = (ASSETS / "bundle" / "chunks.bin").read_bytes()
    chunks = tuple(
        sealed[manifest.sealed_offset(i) :][: manifest.sealed_chunk_size(i)]
        for i in range(manifest.chunk_count)
    )
    return BundleVectors(manifest, H(str(vectors["bundle_key"])), chunks)


def bundle_manifest() -> bytes:
    return (ASSETS / "bundle" / "manifest.cbor").read_bytes()


def bundle_chunk_payloads() -> tuple[bytes, ...]:
    """BUNDLE_CHUNK payloads (index u64 ‖ sealed chunk) of the vectors' three chunks."""
    return tuple(BundleChunk(i, c).encode() for i, c in enumerate(bundle_vectors().chunks))


# --- Images ---------------------------------------------------------------------------------------


@functools.cache
def png_seeds() -> tuple[bytes, ...]:
    """The demo's own shapes scenes (32×32 RGB, rendered as ``nci.demo.scene_png`` does: what
    consumers send the built-in model), and PNGs of the other colour types and bit depths."""
    from PIL import Image as PILImage

    from enclave.models import shapes

    def encode(image: PILImage.Image) -> bytes:
        out = io.BytesIO()
        image.save(out, "PNG")
        return out.getvalue()

    rng = shapes.scene_stream(3, "heldout")
    scenes = []
    for _ in range(2):
        pixels = shapes.render(shapes.sample_scene(rng, "heldout")).transpose(1, 2, 0)
        scenes.append(encode(PILImage.fromarray((pixels * 255).round().astype("uint8"))))
    palette = PILImage.frombytes("P", (6, 6), bytes(range(36)))
    palette.info["transparency"] = 3
    return (
        *scenes,
        sample_png(8, 8, "RGBA"),
        sample_png(8, 8, "L"),
        sample_png(8, 8, "LA"),
        sample_png(9, 7, "1"),
        sample_png(5, 5, "I;16"),
        sample_png(12, 12, "RGB", optimize=True),
        encode(palette),
    )


@functools.cache
def jpeg_seeds() -> tuple[bytes, ...]:
    return (
        sample_jpeg(16, 16),
        sample_jpeg(16, 16, progressive=True),
        sample_jpeg(8, 8, "L"),
        sample_jpeg(8, 8, "CMYK"),
        sample_jpeg(17, 9, quality=30, subsampling=2),
    )


IMAGE_CAP: Final = 4 * 1024 * 1024  # protocol.inference.MAX_IMAGE_BYTES (checked in the tests)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_probes() -> tuple[bytes, ...]:
    """4 MiB PNGs of an 8×8 image: empty private chunks before IDAT, after IDAT, and empty IDAT
    chunks (each is handled one by one, in Python, by the decoder)."""
    base = sample_png(8, 8)
    idat, iend = base.index(b"IDAT") - 4, base.index(b"IEND") - 4
    private, empty_idat = _png_chunk(b"abCd", b""), _png_chunk(b"IDAT", b"")
    places = ((idat, private), (iend, private), (idat, empty_idat))
    room = IMAGE_CAP - len(base)
    return tuple(base[:at] + chunk * (room // len(chunk)) + base[at:] for at, chunk in places)


def jpeg_probes() -> tuple[bytes, ...]:
    """4 MiB JPEGs of a 16×16 image: empty APP0 and COM segments, RST0 markers, and fill bytes
    before the first marker after SOI (T.81 §B.1.1.2 allows any number)."""
    base = sample_jpeg(16, 16)
    room = IMAGE_CAP - len(base)
    return tuple(
        base[:2] + unit * (room // len(unit)) + base[2:]
        for unit in (b"\xff\xe0\x00\x02", b"\xff\xfe\x00\x02", b"\xff\xd0", b"\xff")
    )


# --- CMS from KMS ---------------------------------------------------------------------------------

DATA_KEY: Final = bytes(range(100, 132))
# The primes of a 2048-bit RSA test key (e = 65537), fixed so that an input found by one run
# reproduces in another (the key's identifier is checked before anything is decrypted). They came
# from a Miller-Rabin search seeded with "nci fuzz recipient key": a test key, never a real one.
_RSA_P: Final = int(
    "d3d97097ba8269334923eb320d1a8464ab3fa7f252483363e96529c99e53ba7138a89835e4b4517cfde31bc3343104"
    "fe6d3a15fcb6c084559a7f1039bbc062f881d2b19691407aa0f9887f93ce0fb13e27bd9107a3b75112753651adf100"
    "1cb90a5ac2d08974c13efdf6f1588972514e8e3d8f39477ac1d620d96c4a974df533",
    16,
)
_RSA_Q: Final = int(
    "e81c69fbd2fa25c1cc2c638306c1ab8ac0cfafaac889a40a719bcf9e015f666a8ffc0a3c4d83bf92f2e90ca882c166"
    "53f15b6841861ccc3cbb4559637deed63887ed0637aa5ded6cde11029b9cd7f0d875136173a002b74b0d63e0fbcdd5"
    "98a3e45530b06c81005175aa80eae53cef7aef78198ef7b05059e3227ebb2feead4b",
    16,
)


@functools.cache
def recipient_key() -> rsa.RSAPrivateKey:
    """The enclave's RSA key for KMS Recipient envelopes, fixed (see :data:`_RSA_P`)."""
    e, p, q = 65537, _RSA_P, _RSA_Q
    d = rsa.rsa_recover_private_exponent(e, p, q)
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key()


@functools.cache
def envelopes() -> tuple[bytes, ...]:
    """CiphertextForRecipient envelopes as our KMS side writes them (streamed BER), to
    :func:`recipient_key`: a data key, and a 1-byte and 100-byte plaintext."""
    from enclave.keyrelease import public_key_der
    from kms_policy.recipient import envelope_for_recipient

    spki = public_key_der(recipient_key())

    def rng(size: int) -> bytes:
        return hashlib.sha256(f"nci fuzz cek/iv {size}".encode()).digest()[:size]

    return tuple(
        envelope_for_recipient(plaintext, spki, rng=rng)
        for plaintext in (DATA_KEY, b"\x01", bytes(100))
    )


def envelope_probes() -> tuple[bytes, ...]:
    """The data-key envelope with its encrypted content split into 64 KiB of empty BER chunks (a
    constructed OCTET STRING may hold any number of them: X.690 §8.7.3)."""
    from enclave.keyrelease import MAX_ENVELOPE_SIZE

    envelope = envelopes()[0]
    start = envelope.index(bytes.fromhex("a08004"))  # [0] IMPLICIT OCTET STRING, indefinite
    room = (MAX_ENVELOPE_SIZE - len(envelope)) // 2
    return (envelope[: start + 2] + b"\x04\x00" * room + envelope[start + 2 :],)


# --- The consumer ---------------------------------------------------------------------------------

SYNTHETIC_NOW: Final = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
CONSUMER_NONCE: Final = Nonce(bytes(range(32)))
MODEL_ID: Final = "anymal-shapes"
MANIFEST_SHA256: Final = hashlib.sha256(b"nci fuzz manifest").digest()


@functools.cache
def emulated_nsm() -> EmulatedNsm:
    """An emulator with the synthetic vectors' CA (fixed keys), clock and measurements."""
    from attestation import EmulatedNsm
    from attestation._localca import LocalCa
    from tests.assets.generate_synthetic import MEASUREMENTS, NOW, counter_rng, fixed_key

    assert NOW == SYNTHETIC_NOW
    ca = LocalCa.from_keys(
        fixed_key("root"),
        fixed_key("regional"),
        fixed_key("zonal"),
        fixed_key("instance"),
        now=NOW,
        rng=counter_rng("ca"),
    )
    return EmulatedNsm(
        ca=ca,
        leaf_key=fixed_key("leaf fuzz"),
        measurements=MEASUREMENTS,
        clock=lambda: NOW,
        rng=counter_rng("fuzz"),
    )


def user_data_seeds() -> tuple[bytes, ...]:
    return (
        UserData(SERVER_KEY_CONFIG, MODEL_ID, MANIFEST_SHA256).encode(),
        UserData(H(str(RFC9458["key_config"])), "m", bytes(32)).encode(),
    )


def consumer_document(user_data: bytes) -> bytes:
    """A document of :func:`emulated_nsm` for the consumer's nonce, binding the server's OHTTP
    public key and ``user_data`` (at most 1024 bytes, as the NSM allows)."""
    from attestation import NsmClient
    from protocol.ohttp import KeyConfig

    public_key = KeyConfig.from_bytes(SERVER_KEY_CONFIG).public_key
    return NsmClient(emulated_nsm()).attestation(
        nonce=CONSUMER_NONCE.value, public_key=public_key, user_data=user_data
    )


@functools.cache
def consumer_attestation() -> Attestation:
    """A verified attestation of :data:`SERVER_KEY`, as the consumer holds one."""
    from consumer.attest import verify_attestation

    return verify_attestation(
        consumer_document(user_data_seeds()[0]),
        nonce=CONSUMER_NONCE,
        measurements=consumer_measurements(),
        roots=[consumer_root()],
        now=SYNTHETIC_NOW + timedelta(seconds=1),
    )


@functools.cache
def consumer_root() -> TrustRoot:
    return TrustRoot.local(emulated_nsm().root_pem)


@functools.cache
def consumer_measurements() -> ExpectedMeasurements:
    from tests.assets.generate_synthetic import MEASUREMENTS

    return ExpectedMeasurements.of(MEASUREMENTS)


def problem_seeds() -> tuple[bytes, ...]:
    """Error answers from the bridge: ``Retry-After`` ‖ LF ‖ problem+json body."""
    return (
        b'5\n{"type": "https://iana.org/assignments/http-problem-types#ohttp-key", '
        b'"title": "key changed", "status": 422}',
        b'\n{"title": "busy", "code": "busy", "status": 429}',
        b"Wed, 21 Oct 2015 07:28:00 GMT\n{}",
        b"1e309\n[1, 2]",
    )
