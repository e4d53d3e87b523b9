"""Contracts every party shares: transport addresses, frames on the enclave transport, the
sealed-bundle format, and the confidential request format (HPKE, Oblivious HTTP with its chunked
variant, Binary HTTP, the versioned CBOR inference bodies).

Everything here is pure or a thin I/O layer, and imports nothing else of ours.
"""

from protocol.bundle import Manifest, open_chunk_into, seal_chunk
from protocol.frames import Frame, FrameType, read_frame, recv_frame, send_frame, write_frame
from protocol.inference import (
    InferenceRequest,
    InferenceResponse,
    http_request,
    parse_http_request,
)
from protocol.ohttp import (
    ClientContext,
    KeyConfig,
    ServerContext,
    chunked_request_reader,
    decapsulate_request,
    encapsulate_chunked_request,
    encapsulate_request,
    generate_key_config,
    parse_key_configs,
)
from protocol.transport import Address, connect, open_connection, parse_address, start_server

__all__ = [
    "Address",
    "ClientContext",
    "Frame",
    "FrameType",
    "InferenceRequest",
    "InferenceResponse",
    "KeyConfig",
    "Manifest",
    "ServerContext",
    "chunked_request_reader",
    "connect",
    "decapsulate_request",
    "encapsulate_chunked_request",
    "encapsulate_request",
    "generate_key_config",
    "http_request",
    "open_chunk_into",
    "open_connection",
    "parse_address",
    "parse_http_request",
    "parse_key_configs",
    "read_frame",
    "recv_frame",
    "seal_chunk",
    "send_frame",
    "start_server",
    "write_frame",
]
