"""``nci demo``: the whole system, locally, on the embedded defaults.

Today it is the attestation round trip: the enclave side asks the emulated NSM for a document that
binds a consumer's nonce and the enclave's public key; the consumer side reproduces the expected
measurements from the enclave's source, verifies the document against them and prints the report;
then two forgeries are shown refused. Later issues grow it into key release, sealed weights and
encrypted inference.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from attestation import _measure
from attestation.emulator import EmulatedNsm, default_state_dir
from attestation.nsm import NsmClient
from attestation.policy import Nonce, Policy
from attestation.report import AuditReport, audit
from attestation.roots import TrustRoot

__all__ = ["add_parser", "run_demo"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("demo", help="run the system locally on the embedded defaults")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="local state folder (default: $NCI_STATE_DIR or ./.nci)",
    )
    parser.set_defaults(handler=lambda args, out, err: run_demo(args.state_dir, out))


def run_demo(state_dir: Path | None, out: TextIO) -> int:
    state_dir = state_dir if state_dir is not None else default_state_dir()
    say = _Printer(out)

    say.step("enclave", f"boot the emulated NSM (local CA kept in {state_dir / 'nsm'})")
    nsm = EmulatedNsm(state_dir=state_dir)
    client = NsmClient(nsm)
    description = client.describe_nsm()
    say.detail(f"module {description.module_id}, {description.max_pcrs} PCRs, {description.digest}")

    say.step("enclave", "generate the request-encryption key (X25519) it will attest")
    enclave_key = x25519.X25519PrivateKey.generate()
    public_key = enclave_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    say.step("consumer", "reproduce the expected measurements from the enclave's source code")
    expected = _measure.application_measurements()
    for index, value in expected.items():
        say.detail(f"PCR{index} = {value.hex()}")

    nonce = Nonce.random()
    say.step("consumer", f"challenge the enclave with a fresh nonce {nonce.hex()[:16]}…")
    document = client.attestation(nonce=nonce.value, public_key=public_key)
    say.step("enclave", f"NSM signs an attestation document ({len(document)} bytes)")

    say.step("consumer", "verify: chain to the local root, signature, PCRs, nonce, age, key")
    roots = [TrustRoot.aws_nitro_g1(), TrustRoot.local(nsm.root_pem)]
    policy = Policy.expect(
        expected, nonce=nonce, max_age=timedelta(minutes=5), public_key=public_key
    )
    report = audit(document, roots=roots, now=datetime.now(UTC), policy=policy)
    say.report(report)

    say.step("attacker", "flip one bit of the attested public key (a man in the middle)")
    index = document.index(public_key) + len(public_key) - 1
    forged = document[:index] + bytes([document[index] ^ 1]) + document[index + 1 :]
    say.report(audit(forged, roots=roots, now=datetime.now(UTC), policy=policy), brief=True)

    say.step("attacker", "present the emulator's document to a verifier that trusts only AWS")
    aws_only = audit(
        document, roots=[TrustRoot.aws_nitro_g1()], now=datetime.now(UTC), policy=policy
    )
    say.report(aws_only, brief=True)

    ok = report.valid and not _valid(forged, roots, policy) and not aws_only.valid
    out.write(
        "\ndemo: the genuine document was accepted and both forgeries refused\n"
        if ok
        else "\ndemo: FAILED, an outcome differs from the expected one\n"
    )
    return 0 if ok else 1


def _valid(document: bytes, roots: list[TrustRoot], policy: Policy) -> bool:
    return audit(document, roots=roots, now=datetime.now(UTC), policy=policy).valid


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._count = 0

    def step(self, who: str, text: str) -> None:
        self._count += 1
        self._out.write(f"\n({self._count}) {who:<8} {text}\n")

    def detail(self, text: str) -> None:
        self._out.write(f"             {text}\n")

    def report(self, report: AuditReport, *, brief: bool = False) -> None:
        for check in report.checks:
            if brief and check.ok:
                continue
            mark = "ok  " if check.ok else "FAIL"
            self.detail(f"[{mark}] {check.name:<12} {check.detail}")
        for note in report.notes:
            self.detail(f"NOTE: {note}")
        verdict = "ACCEPTED" if report.valid else f"REFUSED ({type(report.error).__name__})"
        self.detail(f"=> {verdict}")
