"""Consumers' images, decoded inside the enclave.

``image.data`` comes from a consumer (through the attested channel): it is hostile until decoded.
The procedure, in order, each step a typed :class:`~enclave.models.runtime.InvalidInput`:

1. the byte cap, and the declared media type: PNG or JPEG only, and the bytes must start with
   that format's signature (PNG §5.2; JPEG's SOI marker followed by a marker, ITU T.81 §B.1.1.2);
2. the declared width and height, read from the header by this module (PNG's IHDR, PNG §11.2.2;
   JPEG's first SOFn frame header, T.81 §B.2.2) and checked against the pixel cap *before* Pillow
   is given the bytes, so a decompression bomb (a tiny file that declares a huge image) never
   allocates its pixels; for JPEG, a walk over every marker segment up to EOI (T.81 §B.2) also
   refuses a scan bomb (a progressive file that repeats tiny scans, each of which makes the decoder
   pass over the whole image: 1000 scans of 16 bytes took 7 s for one 2048×2048 image), so at most
   :data:`MAX_JPEG_SCANS` scans, and any coding process but Huffman-coded baseline, extended
   sequential or progressive (SOF0..SOF2: what cameras and encoders write; arithmetic coding,
   lossless and hierarchical JPEG are rare and slow to decode);
3. Pillow opens the header lazily, restricted to the declared format; its own bomb check
   (``DecompressionBombError``, and ``DecompressionBombWarning`` where warnings are errors) and a
   disagreement with step 2 are refusals; animated or multi-frame files are refused;
4. the pixels are decoded (a truncated file is an error: ``LOAD_TRUNCATED_IMAGES`` stays off) and
   converted to 8-bit RGB: 16-bit samples are scaled down, palettes expanded, CMYK converted,
   transparency composited over black.

The result is a loaded RGB ``PIL.Image.Image``; :func:`to_tensor` turns one into the float tensor
the built-in model takes. Messages name the rule and never carry pixel data.
"""

from __future__ import annotations

import io
import re
import struct
from typing import Final

import numpy as np
import torch
from PIL import Image as PILImage

from enclave.models.runtime import InvalidInput
from protocol.inference import Image

__all__ = [
    "JPEG_SIGNATURE",
    "MAX_JPEG_FILL",
    "MAX_JPEG_MARKERS",
    "MAX_JPEG_SCANS",
    "MAX_PNG_CHUNKS",
    "MAX_PNG_IDAT",
    "PNG_SIGNATURE",
    "declared_size",
    "decode_image",
    "to_tensor",
]

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE: Final = b"\xff\xd8\xff"
_FORMATS: Final = {"image/png": ("PNG", PNG_SIGNATURE), "image/jpeg": ("JPEG", JPEG_SIGNATURE)}
# JPEG frame headers that carry the size: SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE: Final = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0..7: no length field
_SOS: Final = 0xDA
_SOI: Final = 0xD8
_EOI: Final = 0xD9
_PNG_MAX_SIDE: Final = 2**31 - 1  # PNG §11.2.2
MAX_JPEG_SCANS: Final = 32  # baseline has 1 scan per file, libjpeg's progressive script 10
# Pillow reads every marker, fill byte and PNG chunk outside the compressed data in Python
# (~10 µs each): 4 MiB of empty APP0 segments, of 0xFF fill bytes or of empty PNG chunks took 7 to
# 12 s to decode into an 8×8 image. Real files have tens of markers (at most 255 ICC segments),
# no fill bytes to speak of, and a few ancillary chunks besides their IDATs.
MAX_JPEG_MARKERS: Final = 1024  # outside the entropy-coded data, EOI included
MAX_JPEG_FILL: Final = 1024  # 0xFF fill bytes before markers, in all (T.81 §B.1.1.2)
MAX_PNG_CHUNKS: Final = 1024  # chunks other than IDAT
MAX_PNG_IDAT: Final = 65536  # IDAT chunks (encoders write one per 8 KiB or 64 KiB; some per row)
# SOF0 baseline, SOF1 extended sequential, SOF2 progressive, all Huffman-coded (T.81 Table B.1);
# the other frame types, DAC (arithmetic conditioning) and DHP/EXP (hierarchical) are refused.
_HUFFMAN_SOF: Final = frozenset({0xC0, 0xC1, 0xC2})
_REFUSED: Final = (_SOF - _HUFFMAN_SOF) | {0xCC, 0xDE, 0xDF}
# The end of entropy-coded data: a 0xFF (after any fill 0xFFs) that is neither a stuffed 0xFF00
# nor a restart marker RSTn (T.81 §B.1.1.5, §F.1.2.3).
_SCAN_END: Final = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
_FILL: Final = re.compile(rb"\xff*")  # a marker's 0xFF and its fill bytes, matched in C


def declared_size(data: bytes, media_type: str) -> tuple[int, int]:
    """``(width, height)`` as the header of ``data`` declares them, without decoding anything.

    Raises :class:`InvalidInput` when the header is missing, truncated or malformed.
    """
    if media_type == "image/png":
        return _png_size(data)
    if media_type == "image/jpeg":
        return _jpeg_size(data)
    raise InvalidInput("image media type must be image/png or image/jpeg")


def _png_size(data: bytes) -> tuple[int, int]:
    # signature (8) ‖ IHDR chunk: length (4) = 13, type "IHDR", width (4), height (4), …
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise InvalidInput("PNG must start with its IHDR chunk")
    width, height = struct.unpack_from(">II", data, 16)
    if not (0 < width <= _PNG_MAX_SIDE and 0 < height <= _PNG_MAX_SIDE):
        raise InvalidInput("PNG width and height must be 1..2^31-1")
    return width, height


def _jpeg_size(data: bytes) -> tuple[int, int]:
    # markers after SOI: 0xFF (fill 0xFFs allowed) then a code; segments carry a 2-byte length
    # that counts itself; the size is in the first SOFn: precision (1), height (2), width (2)
    pos = 2
    while True:
        if pos >= len(data) or data[pos] != 0xFF:
            raise InvalidInput("JPEG ends, or has no marker, before its frame header")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        if pos >= len(data):
            raise InvalidInput("JPEG ends before its frame header")
        code = data[pos]
        pos += 1
        if code in _STANDALONE:
            continue
        if code in (_SOS, _SOI, _EOI):
            raise InvalidInput("JPEG has no frame header before its scan data")
        if pos + 2 > len(data):
            raise InvalidInput("JPEG segment is truncated")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > len(data):
            raise InvalidInput("JPEG segment is truncated")
        if code in _SOF:
            if length < 7:
                raise InvalidInput("JPEG frame header is truncated")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            if width == 0 or height == 0:
                raise InvalidInput("JPEG width and height must be non-zero")
            return width, height
        pos += length


def _skip_fill(data: bytes, pos: int) -> int:
    """The position after the 0xFF bytes at ``pos`` (a marker's own and its fill bytes)."""
    match = _FILL.match(data, pos)
    return pos if match is None else match.end()


def _check_jpeg_segments(data: bytes) -> None:
    """Walk every marker segment of ``data`` (untrusted) up to EOI, decoding nothing: only
    Huffman-coded SOF0..SOF2 frames, at most :data:`MAX_JPEG_SCANS` scans, :data:`MAX_JPEG_MARKERS`
    markers and :data:`MAX_JPEG_FILL` fill bytes, nothing between segments, and an EOI at the end
    (T.81 §B.2)."""
    pos, scans, markers, fill, end = 2, 0, 0, 0, len(data)
    while True:
        if pos >= end or data[pos] != 0xFF:
            raise InvalidInput("JPEG has bytes outside its segments, or ends before EOI")
        run, pos = pos, _skip_fill(data, pos)
        fill += pos - run - 1
        markers += 1
        if markers > MAX_JPEG_MARKERS or fill > MAX_JPEG_FILL:
            raise InvalidInput(
                f"JPEG has more than {MAX_JPEG_MARKERS} markers or {MAX_JPEG_FILL} fill bytes "
                "outside its scan data"
            )
        if pos >= end:
            raise InvalidInput("JPEG ends before EOI")
        code = data[pos]
        pos += 1
        if code == _EOI:
            return
        if code in _STANDALONE:
            continue
        if code == _SOI:
            raise InvalidInput("JPEG has a second SOI marker before EOI")
        if code in _REFUSED:
            raise InvalidInput(
                "JPEG must be Huffman-coded baseline, extended or progressive (SOF0..SOF2); "
                "arithmetic-coded, lossless and hierarchical files are not accepted"
            )
        if pos + 2 > end:
            raise InvalidInput("JPEG segment is truncated")
        (length,) = struct.unpack_from(">H", data, pos)
        if length < 2 or pos + length > end:
            raise InvalidInput("JPEG segment is truncated")
        pos += length
        if code == _SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise InvalidInput(f"JPEG has more than {MAX_JPEG_SCANS} scans")
            # the entropy-coded data runs to the next marker: continue at its last 0xFF
            marker = _SCAN_END.search(data, pos)
            if marker is None:
                raise InvalidInput("JPEG ends inside its scan data")
            pos = marker.end() - 2


def _check_png_chunks(data: bytes) -> None:
    """Count the chunks of ``data`` (untrusted) up to IEND from their headers (PNG §5.3), decoding
    nothing: at most :data:`MAX_PNG_CHUNKS` besides IDAT and :data:`MAX_PNG_IDAT` IDAT chunks.
    A truncated or garbled chunk stream is left to Pillow, which refuses it."""
    pos, chunks, idat, end = 8, 0, 0, len(data)
    while pos + 8 <= end:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        if kind == b"IDAT":
            idat += 1
        else:
            chunks += 1
        if chunks > MAX_PNG_CHUNKS or idat > MAX_PNG_IDAT:
            raise InvalidInput(
                f"PNG has more than {MAX_PNG_CHUNKS} chunks besides IDAT, or {MAX_PNG_IDAT} IDAT "
                "chunks"
            )
        pos += 12 + length


def decode_image(image: Image, *, max_bytes: int, max_pixels: int) -> PILImage.Image:
    """Decode ``image`` (from a consumer: untrusted) into a loaded 8-bit RGB Pillow image."""
    data = image.data
    # (1) size, media type, signature
    if type(data) is not bytes:
        raise InvalidInput("image data must be bytes")
    if not data:
        raise InvalidInput("image is empty")
    if len(data) > max_bytes:
        raise InvalidInput(f"image is {len(data)} bytes; the maximum is {max_bytes}")
    if image.media_type not in _FORMATS:
        raise InvalidInput("image media type must be image/png or image/jpeg")
    pil_format, signature = _FORMATS[image.media_type]
    if not data.startswith(signature):
        raise InvalidInput(f"image does not start with the {pil_format} signature")
    # (2) the structure (markers, chunks, scans; the JPEG walk first, as it bounds the walk of
    # the size's), then the declared size against the pixel cap, before any decoder sees the bytes
    if image.media_type == "image/jpeg":
        _check_jpeg_segments(data)
    else:
        _check_png_chunks(data)
    width, height = declared_size(data, image.media_type)
    if width * height > max_pixels:
        raise InvalidInput(f"image is {width}×{height} pixels; the maximum is {max_pixels} pixels")
    # (3) Pillow reads the header lazily (no pixels yet); (4) then decodes and converts
    try:
        opened = PILImage.open(io.BytesIO(data), formats=[pil_format])
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise InvalidInput("image declares more pixels than the decoder allows") from None
    except Exception:  # noqa: BLE001 (hostile bytes: any decoder failure is the input's fault)
        raise InvalidInput(f"image is not a readable {pil_format} file") from None
    with opened:
        if opened.size != (width, height):
            raise InvalidInput("image header is ambiguous (two different sizes)")
        if getattr(opened, "n_frames", 1) != 1 or getattr(opened, "is_animated", False):
            raise InvalidInput("animated or multi-frame images are not accepted")
        try:
            opened.load()
            return _to_rgb(opened)
        except Exception:  # noqa: BLE001 (truncated or corrupt data, unusual modes)
            raise InvalidInput(f"image is not a decodable {pil_format} file") from None


def _to_rgb(image: PILImage.Image) -> PILImage.Image:
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I"):
        # 16-bit greyscale ("I;16", "I;16B", or "I" holding 0..65535): keep the high byte
        wide = np.asarray(image).astype(np.int64)
        narrow = np.clip(wide >> 8, 0, 255).astype(np.uint8)
        return PILImage.fromarray(narrow).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        black = PILImage.new("RGBA", rgba.size, (0, 0, 0, 255))
        return PILImage.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr


def to_tensor(image: PILImage.Image, size: int | None = None) -> torch.Tensor:
    """``image`` as a float32 tensor (3, H, W) in [0, 1]; resized (bicubic) to ``size``×``size``
    first when given and different."""
    rgb = image if image.mode == "RGB" else _to_rgb(image)
    if size is not None and rgb.size != (size, size):
        rgb = rgb.resize((size, size), PILImage.Resampling.BICUBIC)
    array = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3)
    chw = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
    return chw.float().div_(255.0)
