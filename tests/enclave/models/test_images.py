"""Consumers' images decoded inside the enclave: every hostile file is a typed refusal, every
legitimate PNG/JPEG mode becomes 8-bit RGB."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage

from enclave.models.images import (
    JPEG_SIGNATURE,
    MAX_JPEG_SCANS,
    PNG_SIGNATURE,
    declared_size,
    decode_image,
    to_tensor,
)
from enclave.models.runtime import InvalidInput
from protocol.inference import Image

CAPS = {"max_bytes": 4 * 1024 * 1024, "max_pixels": 1024 * 1024}


def raw(media_type: str, data: bytes) -> Image:
    """An Image that skipped the protocol's own checks (as a buggy or hostile caller could)."""
    image = object.__new__(Image)
    object.__setattr__(image, "media_type", media_type)
    object.__setattr__(image, "data", data)
    return image


def encode(image: PILImage.Image, fmt: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def rgb(width: int = 24, height: int = 16, seed: int = 0) -> PILImage.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PILImage.fromarray(pixels)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A few dozen bytes declaring a ``width``×``height`` 8-bit RGB image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        PNG_SIGNATURE
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", idat)
        + png_chunk(b"IEND", b"")
    )


def bomb_jpeg(width: int, height: int) -> bytes:
    """A JPEG header whose SOF0 declares ``width``×``height`` (no scan data to speak of)."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return JPEG_SIGNATURE[:2] + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


# ---------------------------------------------------------------------------- legitimate images


def test_decodes_rgb_png_exactly() -> None:
    source = rgb()
    out = decode_image(Image("image/png", encode(source)), **CAPS)
    assert out.mode == "RGB"
    assert out.size == (24, 16)
    assert np.array_equal(np.asarray(out), np.asarray(source))


def test_decodes_jpeg() -> None:
    out = decode_image(Image("image/jpeg", encode(rgb(), "JPEG", quality=95)), **CAPS)
    assert out.mode == "RGB"
    assert out.size == (24, 16)


def test_decodes_16_bit_greyscale_png_to_its_high_byte() -> None:
    wide = np.arange(0, 65536, 256, dtype=np.uint16).reshape(16, 16)  # 0, 256, …, 65280
    data = encode(PILImage.fromarray(wide))
    assert PILImage.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(Image("image/png", data), **CAPS))
    assert np.array_equal(out[..., 0], (wide >> 8).astype(np.uint8))
    assert np.array_equal(out[..., 0], out[..., 2])


def test_decodes_palette_png_with_transparency_over_black() -> None:
    palette = PILImage.new("P", (4, 4), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    data = encode(palette, transparency=0)  # palette entry 0 (red) is fully transparent
    out = np.asarray(decode_image(Image("image/png", data), **CAPS))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[1, 1].tolist() == [0, 255, 0]


def test_decodes_rgba_png_over_black() -> None:
    pixels = np.zeros((2, 2, 4), dtype=np.uint8)
    pixels[0, 0] = (200, 100, 50, 255)
    pixels[0, 1] = (200, 100, 50, 0)
    out = np.asarray(decode_image(Image("image/png", encode(PILImage.fromarray(pixels))), **CAPS))
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_decodes_cmyk_jpeg() -> None:
    data = encode(PILImage.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert PILImage.open(io.BytesIO(data)).mode == "CMYK"
    out = np.asarray(decode_image(Image("image/jpeg", data), **CAPS))
    assert out.shape == (8, 8, 3)
    assert out[4, 4, 0] > 200
    assert out[4, 4, 1] < 60


def test_decodes_greyscale_and_bilevel() -> None:
    for mode in ("L", "1", "LA"):
        out = decode_image(Image("image/png", encode(PILImage.new(mode, (5, 3)))), **CAPS)
        assert out.mode == "RGB"
        assert out.size == (5, 3)


def test_declared_size_reads_png_and_jpeg_headers() -> None:
    assert declared_size(encode(rgb(7, 5)), "image/png") == (7, 5)
    assert declared_size(encode(rgb(7, 5), "JPEG"), "image/jpeg") == (7, 5)
    # EXIF and ICC segments before the frame header are skipped
    exif = PILImage.Exif()
    exif[0x010E] = "x" * 5000
    data = encode(rgb(9, 4), "JPEG", exif=exif.tobytes())
    assert declared_size(data, "image/jpeg") == (9, 4)


def test_to_tensor_is_float_in_unit_range_and_resizes() -> None:
    image = rgb(40, 30)
    tensor = to_tensor(image)
    assert tensor.shape == (3, 30, 40)
    assert tensor.is_contiguous()
    assert tensor.dtype == torch.float32
    assert float(tensor.min()) >= 0.0
    assert float(tensor.max()) <= 1.0
    assert torch.equal(
        tensor[:, 0, 0] * 255, torch.tensor(image.getpixel((0, 0)), dtype=torch.float)
    )
    assert to_tensor(image, 32).shape == (3, 32, 32)


# ---------------------------------------------------------------------------- hostile images

HOSTILE = {
    "empty": raw("image/png", b""),
    "wrong_signature_gif_as_png": raw("image/png", b"GIF89a" + bytes(40)),
    "wrong_signature_bmp_as_jpeg": raw("image/jpeg", b"BM" + bytes(60)),
    "media_type_mismatch_png_declared_jpeg": raw("image/jpeg", encode(rgb())),
    "media_type_mismatch_jpeg_declared_png": raw("image/png", encode(rgb(), "JPEG")),
    "unsupported_media_type_gif": raw("image/gif", b"GIF89a" + bytes(40)),
    "signature_only_png": raw("image/png", PNG_SIGNATURE),
    "signature_only_jpeg": raw("image/jpeg", JPEG_SIGNATURE),
    "truncated_png": raw("image/png", encode(rgb(64, 64))[:200]),
    "truncated_jpeg_header": raw("image/jpeg", encode(rgb(64, 64), "JPEG")[:300]),
    "truncated_jpeg_scan": raw("image/jpeg", encode(rgb(64, 64), "JPEG")[:-200]),
    "truncated_jpeg_missing_eoi": raw("image/jpeg", encode(rgb(64, 64), "JPEG")[:-2]),
    "png_zero_width": raw("image/png", bomb_png(0, 10)),
    "png_zero_height": raw("image/png", bomb_png(10, 0)),
    "jpeg_zero_height": raw("image/jpeg", bomb_jpeg(10, 0)),
    "png_without_ihdr_first": raw("image/png", PNG_SIGNATURE + png_chunk(b"tEXt", b"a\x00b") * 3),
    "jpeg_scan_before_frame_header": raw("image/jpeg", b"\xff\xd8\xff\xda\x00\x02" + bytes(20)),
    "jpeg_garbage_between_segments": raw("image/jpeg", b"\xff\xd8\xff\xe0\x00\x04ab" + b"xx"),
    "png_corrupt_pixel_data": raw("image/png", bomb_png(16, 16)),
    "decompression_bomb_png": raw("image/png", bomb_png(100_000, 100_000)),
    "decompression_bomb_jpeg": raw("image/jpeg", bomb_jpeg(65_535, 65_535)),
    "animated_png": raw(
        "image/png",
        encode(rgb(8, 8), save_all=True, append_images=[rgb(8, 8, 1), rgb(8, 8, 2)]),
    ),
    "multi_frame_jpeg_mpo": raw(
        "image/jpeg", encode(rgb(8, 8), "MPO", save_all=True, append_images=[rgb(8, 8, 1)])
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_rejects_hostile_image(case: str) -> None:
    with pytest.raises(InvalidInput):
        decode_image(HOSTILE[case], **CAPS)


def test_rejects_image_over_the_byte_cap() -> None:
    data = encode(rgb(64, 64))
    with pytest.raises(InvalidInput, match="bytes"):
        decode_image(Image("image/png", data), max_bytes=len(data) - 1, max_pixels=10**6)


def test_rejects_image_over_the_pixel_cap() -> None:
    with pytest.raises(InvalidInput, match="pixels"):
        decode_image(Image("image/png", encode(rgb(64, 64))), max_bytes=10**6, max_pixels=4095)


def test_rejects_decompression_bomb_before_pillow_sees_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoder(*args: object, **kwargs: object) -> None:
        raise AssertionError("Pillow was handed a decompression bomb")

    monkeypatch.setattr(PILImage, "open", no_decoder)
    for image in (HOSTILE["decompression_bomb_png"], HOSTILE["decompression_bomb_jpeg"]):
        with pytest.raises(InvalidInput, match="pixels"):
            decode_image(image, **CAPS)


def test_rejects_decompression_bomb_through_pillows_own_check_too() -> None:
    # a pixel cap set far too high: Pillow's own limit (DecompressionBombError) still refuses
    with pytest.raises(InvalidInput, match="decoder allows"):
        decode_image(HOSTILE["decompression_bomb_png"], max_bytes=10**6, max_pixels=10**12)


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """``(marker, start, end)`` of every segment (a scan with its entropy-coded data)."""
    pos, out = 2, []
    while pos < len(data):
        code = data[pos + 1]
        if code == 0xD9:
            out.append((code, pos, pos + 2))
            break
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if code == 0xDA:
            while not (
                data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7
            ):
                end += 1
        out.append((code, pos, end))
        pos = end
    return out


def scan_bomb_jpeg(side: int, repeats: int) -> bytes:
    """The reviewer's file (/tmp/review/jpeg_scans.py): a progressive greyscale JPEG whose last AC
    refinement scan is repeated ``repeats`` times; each copy is a few bytes, and each makes the
    decoder pass over the whole image again."""
    data = encode(PILImage.new("L", (side, side), 128), "JPEG", progressive=True, quality=90)
    scans = [data[s:e] for code, s, e in _segments(data) if code == 0xDA]
    last = scans[-1]
    assert last[5 + 2 * last[4]] > 0  # Ss > 0: an AC scan
    eoi = data.rfind(b"\xff\xd9")
    return data[:eoi] + last * repeats + data[eoi:]


def test_rejects_progressive_jpeg_scan_bomb() -> None:
    # 6 scans of its own + 1000 copies: 32 KiB that cost 7 s to decode at 2048x2048
    bomb = Image("image/jpeg", scan_bomb_jpeg(512, 1000))
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode_image(bomb, max_bytes=4 << 20, max_pixels=4096 * 4096)
    assert time.perf_counter() - started < 0.05  # refused before Pillow decodes anything
    # up to the cap, repeated scans are still a (slow, but bounded) valid file
    within = Image("image/jpeg", scan_bomb_jpeg(64, MAX_JPEG_SCANS - 6))
    assert decode_image(within, **CAPS).size == (64, 64)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decodes_progressive_jpeg(mode: str) -> None:
    data = encode(rgb(64, 48).convert(mode), "JPEG", progressive=True)
    assert 1 < data.count(b"\xff\xda") <= MAX_JPEG_SCANS
    assert decode_image(Image("image/jpeg", data), **CAPS).size == (64, 48)


@pytest.mark.parametrize(
    "frame",
    [0xC3, 0xC5, 0xC9, 0xCA, 0xCB, 0xCD],
    ids=[
        "lossless",
        "hierarchical",
        "arithmetic",
        "arithmetic_progressive",
        "arithmetic_lossless",
        "arithmetic_hierarchical",
    ],
)
def test_rejects_jpeg_coding_other_than_huffman_sof0_to_sof2(frame: int) -> None:
    data = bytearray(encode(rgb(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 1] = frame
    with pytest.raises(InvalidInput, match="Huffman-coded"):
        decode_image(raw("image/jpeg", bytes(data)), **CAPS)


def test_rejects_jpeg_arithmetic_conditioning_table() -> None:
    data = encode(rgb(16, 16), "JPEG")
    dac = b"\xff\xcc\x00\x04\x00\x11"
    with pytest.raises(InvalidInput, match="Huffman-coded"):
        decode_image(raw("image/jpeg", data[:2] + dac + data[2:]), **CAPS)


def test_errors_never_quote_image_bytes() -> None:
    secret = b"SECRET-PIXELS-" * 4
    data = PNG_SIGNATURE + png_chunk(b"IHDR", secret[:13]) + secret
    with pytest.raises(InvalidInput) as caught:
        decode_image(raw("image/png", data), **CAPS)
    assert "SECRET" not in str(caught.value)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    media_type=st.sampled_from(["image/png", "image/jpeg"]),
    body=st.binary(max_size=300),
    mutate=st.integers(min_value=0, max_value=400),
)
def test_arbitrary_bytes_raise_only_invalid_input(
    media_type: str, body: bytes, mutate: int
) -> None:
    # a valid file with a stretch overwritten by random bytes, or random bytes after a signature
    base = encode(rgb(8, 8), "PNG" if media_type == "image/png" else "JPEG")
    cut = min(mutate, len(base))
    for data in (base[:cut] + body + base[cut + len(body) :], base[:8] + body):
        try:
            out = decode_image(raw(media_type, data), **CAPS)
        except InvalidInput:
            continue
        assert out.mode == "RGB"


# ---------------------------------------------------------------------------- marker floods
# Pillow walks markers, fill bytes and PNG chunks outside the compressed data in Python: 4 MiB of
# them cost seconds of enclave CPU per image (4.4 to 7.6 s for a JPEG, 2.4 s for a PNG; found by
# tests/fuzz). They are refused by counting, before Pillow sees the bytes.

_FLOOD = 4 * 1024 * 1024 - 4096


@pytest.mark.parametrize(
    "filler",
    [b"\xff\xe0\x00\x02", b"\xff\xfe\x00\x02", b"\xff\xd0", b"\xff"],
    ids=["empty-APP0", "empty-COM", "RST0", "fill-bytes"],
)
def test_rejects_jpeg_marker_flood_before_pillow_walks_it(filler: bytes) -> None:
    jpeg = encode(rgb(16, 16), "JPEG")
    bomb = jpeg[:2] + filler * (_FLOOD // len(filler)) + jpeg[2:]
    with pytest.raises(InvalidInput):
        decode_image(raw("image/jpeg", bomb), **CAPS)


def test_rejects_png_chunk_flood_before_pillow_walks_it() -> None:
    png = encode(rgb(8, 8))
    empty = png_chunk(b"prVt", b"")
    head = len(PNG_SIGNATURE) + 25  # signature and IHDR
    bomb = png[:head] + empty * (_FLOOD // len(empty)) + png[head:]
    with pytest.raises(InvalidInput):
        decode_image(raw("image/png", bomb), **CAPS)
