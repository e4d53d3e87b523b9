"""Regenerate ``chunked-synthetic.json``: a chunked OHTTP exchange made with fixed keys and nonce.

    python -m tests.assets.ohttp.generate_chunked

There are no official test vectors for draft-ietf-ohai-chunked-ohttp; these pin this project's
implementation (``protocol/ohttp.py``) so that any change to its bytes is seen.
``tests/protocol/test_ohttp.py`` checks that regenerating gives the same file. Test keys only.
"""

from __future__ import annotations

import json
from pathlib import Path

from protocol.ohttp import (
    chunked_request_reader,
    encapsulate_chunked_request,
    generate_key_config,
)

OUT = Path(__file__).resolve().parent / "chunked-synthetic.json"

# The RFC 9458 Appendix A server key and client ephemeral key: public test values.
PRIVATE_KEY = bytes.fromhex("3c168975674b2fa8e465970b79c8dcf09f1c741626480bd4c6162fc5b6a98e1a")
EPHEMERAL_KEY = bytes.fromhex("bc51d5e930bda26589890ac7032f70ad12e4ecb37abb1b65b1256c9c48999c73")
RESPONSE_NONCE = bytes(range(32))  # max(Nn, Nk) for AES-256-GCM, the default suite
KEY_ID = 7
REQUEST_CHUNKS = (b"\x00\x04POST\x05https", b"\x00\x09/v1/infer")
REQUEST_FINAL = b""
RESPONSE_CHUNKS = (b"\x01\x40\xc8", b"hello, ")
RESPONSE_FINAL = b"world"


def build() -> dict[str, object]:
    """The vectors, as written to ``chunked-synthetic.json``."""
    _, key_config = generate_key_config(KEY_ID, private_key=PRIVATE_KEY)
    writer, _client = encapsulate_chunked_request(key_config, ephemeral_private_key=EPHEMERAL_KEY)
    request_parts = [writer.chunk(c) for c in REQUEST_CHUNKS] + [writer.final(REQUEST_FINAL)]

    reader = chunked_request_reader(PRIVATE_KEY, key_config)
    for part in request_parts:
        reader.feed(part)
    reader.close()
    response_writer = reader.context.chunked_response(response_nonce=RESPONSE_NONCE)
    response_parts = [response_writer.chunk(c) for c in RESPONSE_CHUNKS]
    response_parts.append(response_writer.final(RESPONSE_FINAL))
    return {
        "source": "synthetic: tests/assets/ohttp/generate_chunked.py",
        "format": "draft-ietf-ohai-chunked-ohttp-06",
        "private_key": PRIVATE_KEY.hex(),
        "key_config": key_config.hex(),
        "ephemeral_private_key": EPHEMERAL_KEY.hex(),
        "request_chunks": [c.hex() for c in REQUEST_CHUNKS],
        "request_final": REQUEST_FINAL.hex(),
        "encapsulated_request_parts": [p.hex() for p in request_parts],
        "response_nonce": RESPONSE_NONCE.hex(),
        "response_chunks": [c.hex() for c in RESPONSE_CHUNKS],
        "response_final": RESPONSE_FINAL.hex(),
        "encapsulated_response_parts": [p.hex() for p in response_parts],
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> None:
    OUT.write_text(render())


if __name__ == "__main__":
    main()
