"""Contracts every party shares: transport addresses, frames on the enclave transport, the
sealed-bundle format (Oblivious HTTP arrives with the request-path work).

Everything here is pure or a thin I/O layer, and imports nothing else of ours.
"""

from protocol.bundle import Manifest, open_chunk_into, seal_chunk
from protocol.frames import Frame, FrameType, read_frame, recv_frame, send_frame, write_frame
from protocol.transport import Address, connect, open_connection, parse_address, start_server

__all__ = [
    "Address",
    "Frame",
    "FrameType",
    "Manifest",
    "connect",
    "open_chunk_into",
    "open_connection",
    "parse_address",
    "read_frame",
    "recv_frame",
    "seal_chunk",
    "send_frame",
    "start_server",
    "write_frame",
]
