"""Generate the synthetic attestation vectors in ``tests/assets/synthetic/`` with fixed keys.

Run ``python -m tests.assets.generate_synthetic [OUT_DIR]`` from the repository root. Everything is
deterministic: P-384 keys derived from fixed labels, a fixed clock, a counter-based "random" source
and RFC 6979 ECDSA, so a rerun writes the same bytes. ``test_synthetic_vectors.py`` regenerates the
vectors into a temporary folder and compares them with the checked-in ones.

The vectors cover what the real Nitro documents we have do not: an indefinite-length payload map,
1024-byte optional fields, a debug-mode document, and user PCRs extended and locked at run time.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation._localca import LocalCa
from attestation.emulator import EmulatedNsm
from attestation.nsm import NsmClient

HERE = Path(__file__).resolve().parent / "synthetic"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
# Fixed "application" measurements: the vectors must not change when the enclave's code does.
MEASUREMENTS = {i: hashlib.sha384(f"nci synthetic PCR{i}".encode()).digest() for i in (0, 1, 2)}
_ORDER = int(  # the order of the P-384 group (SEC 2 §2.5.1)
    "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF"
    "C7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973",
    16,
)


def fixed_key(label: str) -> ec.EllipticCurvePrivateKey:
    scalar = int.from_bytes(hashlib.sha512(f"nci test key {label}".encode()).digest()) % _ORDER
    return ec.derive_private_key(scalar or 1, ec.SECP384R1())


def counter_rng(label: str) -> Callable[[int], bytes]:
    state = {"counter": 0}

    def rng(size: int) -> bytes:
        out = b""
        while len(out) < size:
            state["counter"] += 1
            out += hashlib.sha256(f"{label}/{state['counter']}".encode()).digest()
        return out[:size]

    return rng


def _nsm(name: str, **options: Any) -> EmulatedNsm:
    rng = counter_rng(name)
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
        leaf_key=fixed_key(f"leaf {name}"),
        measurements=MEASUREMENTS,
        clock=lambda: NOW,
        rng=rng,
        **options,
    )


def build() -> dict[str, bytes]:
    """Every vector file's name and bytes."""
    files: dict[str, bytes] = {}
    cases: dict[str, Any] = {}

    def add(name: str, nsm: EmulatedNsm, description: str, **fields: bytes) -> None:
        document = NsmClient(nsm).attestation(**fields)
        files[f"{name}.cbor"] = document
        cases[name] = {
            "file": f"{name}.cbor",
            "description": description,
            "sha256": hashlib.sha256(document).hexdigest(),
            **{key: value.hex() for key, value in fields.items()},
        }

    add(
        "emulated-definite",
        _nsm("definite"),
        "definite-length payload map, 32-byte nonce, DER public key, short user_data",
        nonce=bytes(range(32)),
        public_key=fixed_key("enclave").public_key().public_bytes(*_spki()),
        user_data=b"nci synthetic vector",
    )
    add(
        "emulated-indefinite",
        _nsm("indefinite", indefinite_payload=True),
        "indefinite-length payload map (0xbf ... 0xff), as newer AWS documents are encoded",
        nonce=bytes(range(32, 64)),
    )
    add(
        "emulated-max-fields",
        _nsm("max-fields"),
        "public_key, user_data and nonce of 1024 bytes each, the maximum AWS allows",
        public_key=b"\x01" * 1024,
        user_data=b"\x02" * 1024,
        nonce=b"\x03" * 1024,
    )
    add(
        "emulated-debug",
        _nsm("debug", debug_mode=True),
        "debug-mode enclave: PCR0, 1, 2 and 8 zero, PCR3 and 4 populated",
        nonce=bytes(range(64, 96)),
    )
    locked = _nsm("user-pcr")
    client = NsmClient(locked)
    client.extend_pcr(16, b"nci synthetic user measurement")
    client.lock_pcr(16)
    add(
        "emulated-user-pcr",
        locked,
        "PCR16 extended with b'nci synthetic user measurement' then locked",
        nonce=bytes(range(96, 128)),
    )
    files["local-root.pem"] = _nsm("root").root_pem
    vectors = {
        "generator": "tests/assets/generate_synthetic.py",
        "time": NOW.isoformat(),
        "measurements": {str(i): v.hex() for i, v in MEASUREMENTS.items()},
        "root": "local-root.pem",
        "cases": cases,
    }
    files["vectors.json"] = (json.dumps(vectors, indent=2, sort_keys=True) + "\n").encode()
    return files


def _spki() -> tuple[serialization.Encoding, serialization.PublicFormat]:
    return serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (out / name).write_bytes(data)


if __name__ == "__main__":
    write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
