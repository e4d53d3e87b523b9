"""How much does verifying an attestation document cost beyond its unavoidable cryptography?

Baseline, measured in the same run: the five ECDSA P-384 verifications any verifier must do for a
real Nitro document (four certificate signatures in the chain and the COSE signature). The ratio
``verify_over_crypto`` is our full ``verify()`` (strict CBOR parse, field rules, chain constraints,
policy) divided by that baseline: near 1 means the checks cost little beyond the crypto.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attestation import Policy, TrustRoot, verify

DOC = (
    Path(__file__).resolve().parent.parent / "tests" / "assets" / "attestation" / "nitro-doc-1.cbor"
)


def _interleaved(
    a: Callable[[], object], b: Callable[[], object], *, rounds: int = 15, calls: int = 20
) -> tuple[float, float]:
    """Median seconds per call of ``a`` and ``b``, measured in alternating rounds so that load
    from elsewhere on the machine weighs on both alike."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for fn, out in ((a, samples[0]), (b, samples[1])):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out.append((time.perf_counter() - start) / calls)
    return statistics.median(samples[0]), statistics.median(samples[1])


def run() -> dict[str, float]:
    raw = DOC.read_bytes()
    protected, _, payload, signature = cbor2.loads(raw)
    body = cbor2.loads(payload)
    certs = [x509.load_der_x509_certificate(d) for d in [*body["cabundle"], body["certificate"]]]
    now = datetime.fromtimestamp(body["timestamp"] / 1000, tz=UTC) + timedelta(seconds=1)
    policy = Policy.expect({i: body["pcrs"][i] for i in (0, 1, 2)})
    roots = [TrustRoot.aws_nitro_g1()]
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    der_signature = encode_dss_signature(
        int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    )
    leaf_key = certs[-1].public_key()
    assert isinstance(leaf_key, ec.EllipticCurvePublicKey)

    def crypto_only() -> None:
        for issuer, subject in itertools.pairwise(certs):
            subject.verify_directly_issued_by(issuer)
        leaf_key.verify(der_signature, to_be_signed, ec.ECDSA(hashes.SHA384()))

    def full_verify() -> None:
        verify(raw, roots=roots, now=now, policy=policy)

    crypto, full = _interleaved(crypto_only, full_verify)
    return {
        "crypto_baseline_ms": round(crypto * 1000, 3),
        "verify_ms": round(full * 1000, 3),
        "verify_over_crypto": round(full / crypto, 3),
        "verifications_per_second": round(1 / full, 1),
    }
