"""The NSM emulator: AWS's document layout byte for byte, a correctly issued local chain, shared
state between processes, PCR semantics and error codes, debug mode, determinism, measurements.

Signatures are checked directly with ``cryptography`` (RFC 9052 §4.4 Sig_structure, r ‖ s → DER),
independently of the package's verifier.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import _measure
from attestation._localca import LocalCa
from attestation.emulator import DEFAULT_ROLE_ARN, EmulatedNsm, default_state_dir
from attestation.errors import ConfigError, NsmError
from attestation.nsm import (
    ErrorResponse,
    GetRandomRequest,
    NsmClient,
    decode_response,
    encode_request,
)

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets" / "attestation"
NOW = datetime(2026, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC)
MEASUREMENTS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
PAYLOAD_KEYS = [
    "module_id",
    "digest",
    "timestamp",
    "pcrs",
    "certificate",
    "cabundle",
    "public_key",
    "user_data",
    "nonce",
]


def fixed_key(label: str) -> ec.EllipticCurvePrivateKey:
    """A P-384 key from a label: a 256-bit scalar is always below the curve order."""
    scalar = int.from_bytes(hashlib.sha256(label.encode()).digest(), "big")
    return ec.derive_private_key(scalar, ec.SECP384R1())


def counter_rng() -> Callable[[int], bytes]:
    """Deterministic bytes: SHA-512 of a running counter."""
    state = {"counter": 0}

    def rng(size: int) -> bytes:
        out = b""
        while len(out) < size:
            state["counter"] += 1
            out += hashlib.sha512(state["counter"].to_bytes(8, "big")).digest()
        return out[:size]

    return rng


class Clock:
    """A settable clock."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def deterministic_nsm(**options: Any) -> EmulatedNsm:
    rng = counter_rng()
    ca = LocalCa.from_keys(
        fixed_key("root"),
        fixed_key("regional"),
        fixed_key("zonal"),
        fixed_key("instance"),
        now=NOW,
        rng=rng,
    )
    options.setdefault("measurements", MEASUREMENTS)
    return EmulatedNsm(ca=ca, leaf_key=fixed_key("leaf"), clock=Clock(NOW), rng=rng, **options)


def cose(document: bytes) -> list[Any]:
    parts = cbor2.loads(document)
    assert isinstance(parts, list)
    return parts


def payload_of(document: bytes) -> dict[str, Any]:
    payload = cbor2.loads(cose(document)[2])
    assert isinstance(payload, dict)
    return payload


def verify_signature(document: bytes) -> None:
    """RFC 9052 §4.4: ES384 over ["Signature1", protected, h'', payload] with the leaf's key."""
    protected, _unprotected, payload, signature = cose(document)
    leaf = x509.load_der_x509_certificate(payload_of(document)["certificate"])
    to_be_signed = cbor2.dumps(["Signature1", protected, b"", payload])
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    public_key = leaf.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def emulator(state_dir: Path) -> EmulatedNsm:
    return EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS)


# -- the document's bytes -------------------------------------------------------------------------


def test_document_has_the_aws_byte_layout(emulator: EmulatedNsm) -> None:
    document = NsmClient(emulator).attestation()
    # 0x84: untagged array of 4; 0x44 a1 01 38 22: protected {1: -35}; 0xa0: empty unprotected.
    assert document[:7] == bytes.fromhex("8444a1013822a0")
    protected, unprotected, payload, signature = cose(document)
    assert protected == bytes.fromhex("a1013822")
    assert unprotected == {}
    assert len(signature) == 96
    assert payload[0] == 0xA9  # a definite map of nine pairs
    fields = payload_of(document)
    assert list(fields) == PAYLOAD_KEYS
    assert fields["digest"] == "SHA384"
    assert re.fullmatch(r"i-[0-9a-f]{17}-enc[0-9a-f]{16}", fields["module_id"])
    assert list(fields["pcrs"]) == list(range(16))
    assert all(len(value) == 48 for value in fields["pcrs"].values())
    assert fields["public_key"] is None
    assert fields["user_data"] is None
    assert fields["nonce"] is None
    assert len(fields["cabundle"]) == 4


def test_document_prefix_matches_a_real_nitro_document(emulator: EmulatedNsm) -> None:
    real = (ASSETS / "nitro-doc-1.cbor").read_bytes()
    ours = NsmClient(emulator).attestation()
    # Same COSE header bytes, same payload map header, same first key.
    assert ours[:7] == real[:7]
    assert list(payload_of(ours)) == list(payload_of(real))
    assert cose(ours)[2][:11] == cose(real)[2][:11] == b"\xa9imodule_id"


def test_given_fields_are_byte_strings_in_the_document(emulator: EmulatedNsm) -> None:
    document = NsmClient(emulator).attestation(user_data=b"u" * 3, nonce=b"", public_key=b"k")
    fields = payload_of(document)
    assert (fields["user_data"], fields["nonce"], fields["public_key"]) == (b"uuu", b"", b"k")


def test_timestamp_is_the_clock_in_milliseconds() -> None:
    fields = payload_of(NsmClient(deterministic_nsm()).attestation())
    assert fields["timestamp"] == int(NOW.timestamp() * 1000)


def test_signature_verifies_with_the_leaf_key(emulator: EmulatedNsm) -> None:
    verify_signature(NsmClient(emulator).attestation(nonce=b"n" * 32))


def test_rejects_signature_over_tampered_payload(emulator: EmulatedNsm) -> None:
    protected, unprotected, payload, signature = cose(NsmClient(emulator).attestation())
    tampered = cbor2.dumps(
        [protected, unprotected, payload.replace(b"SHA384", b"SHA385"), signature]
    )
    with pytest.raises(InvalidSignature):
        verify_signature(tampered)


def test_indefinite_payload_is_bracketed_by_0xbf_and_0xff(state_dir: Path) -> None:
    emulator = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, indefinite_payload=True)
    document = NsmClient(emulator).attestation(nonce=b"n")
    payload = cose(document)[2]
    assert payload[0] == 0xBF
    assert payload[-1] == 0xFF
    assert list(payload_of(document)) == PAYLOAD_KEYS
    verify_signature(document)


# -- the chain ----------------------------------------------------------------------------------


def chain_of(document: bytes) -> list[x509.Certificate]:
    fields = payload_of(document)
    ders = [*fields["cabundle"], fields["certificate"]]
    return [x509.load_der_x509_certificate(der) for der in ders]


def test_chain_is_root_regional_zonal_instance_leaf_each_issued_by_the_previous(
    emulator: EmulatedNsm,
) -> None:
    root, regional, zonal, instance, leaf = chain_of(NsmClient(emulator).attestation())
    root.verify_directly_issued_by(root)
    regional.verify_directly_issued_by(root)
    zonal.verify_directly_issued_by(regional)
    instance.verify_directly_issued_by(zonal)
    leaf.verify_directly_issued_by(instance)
    assert root.public_bytes(Encoding.DER) == emulator.root_certificate_der


def test_chain_has_the_aws_constraints_and_algorithms(emulator: EmulatedNsm) -> None:
    chain = chain_of(NsmClient(emulator).attestation())
    path_lengths = [None, 2, 1, 0]
    for certificate, path_length in zip(chain[:4], path_lengths, strict=True):
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.critical
        assert constraints.value.ca
        assert constraints.value.path_length == path_length
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        assert usage.critical
        assert usage.value.key_cert_sign
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    for certificate in chain:
        assert certificate.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA384
        public_key = certificate.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        assert public_key.curve.name == "secp384r1"
    root, leaf = chain[0], chain[-1]
    root_usage = root.extensions.get_extension_for_class(x509.KeyUsage).value
    assert root_usage.crl_sign
    assert root_usage.digital_signature
    leaf_constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert leaf_constraints.critical
    assert not leaf_constraints.value.ca
    leaf_usage = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert not leaf_usage.critical
    assert leaf_usage.value.digital_signature
    lifetimes = [c.not_valid_after_utc - c.not_valid_before_utc for c in chain]
    assert lifetimes[0] > timedelta(days=29 * 365)
    assert lifetimes[1:] == [
        timedelta(days=30),
        timedelta(days=5),
        timedelta(days=1),
        timedelta(hours=3),
    ]
    assert "nci-local.nitro-enclaves" in root.subject.rfc4514_string()
    assert "nci local emulator" in leaf.subject.rfc4514_string()


def test_every_certificate_is_valid_at_the_document_time() -> None:
    document = NsmClient(deterministic_nsm()).attestation()
    for certificate in chain_of(document):
        assert certificate.not_valid_before_utc <= NOW <= certificate.not_valid_after_utc


# -- shared state ----------------------------------------------------------------------------------


def test_two_emulators_on_one_state_dir_share_the_root(state_dir: Path) -> None:
    first = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS)
    second = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS)
    assert first.root_pem == second.root_pem
    assert first.root_pem_path == second.root_pem_path == state_dir / "nsm" / "root.pem"
    assert first.root_pem_path is not None
    assert first.root_pem_path.read_bytes() == first.root_pem
    assert first.module_id != second.module_id  # two enclaves, one parent instance
    first_bundle = payload_of(NsmClient(first).attestation())["cabundle"]
    second_bundle = payload_of(NsmClient(second).attestation())["cabundle"]
    assert first_bundle == second_bundle


def test_state_folder_is_private(emulator: EmulatedNsm, state_dir: Path) -> None:
    folder = state_dir / "nsm"
    assert folder.stat().st_mode & 0o777 == 0o700
    files = list(folder.iterdir())
    assert {path.name for path in files} >= {"root.key", "root.pem", "instance.key"}
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o600, path.name


_CREATE_CA = """
import sys, time
from datetime import UTC, datetime
from pathlib import Path
from attestation._localca import LocalCa
folder, barrier = Path(sys.argv[1]), Path(sys.argv[2])
(barrier / f"ready-{sys.argv[3]}").touch()
while not (barrier / "go").exists():  # all processes create the state at the same moment
    time.sleep(0.0005)
ca = LocalCa.open(folder, now=datetime.now(UTC))
sys.stdout.write(ca.root_certificate_der.hex())
"""


@pytest.mark.slow
def test_concurrent_processes_creating_the_state_end_with_one_root(tmp_path: Path) -> None:
    folder, barrier = tmp_path / "nsm", tmp_path / "barrier"
    barrier.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_CA, str(folder), str(barrier), str(number)],
            stdout=subprocess.PIPE,
            env=environment,
            cwd=tmp_path,
        )
        for number in range(4)
    ]
    deadline = time.monotonic() + 20
    while len(list(barrier.glob("ready-*"))) < len(processes) and time.monotonic() < deadline:
        time.sleep(0.001)
    (barrier / "go").touch()
    roots = set()
    for process in processes:
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 0
        roots.add(output)
    assert len(roots) == 1
    on_disk = x509.load_pem_x509_certificate((folder / "root.pem").read_bytes())
    assert roots == {on_disk.public_bytes(Encoding.DER).hex().encode()}
    assert not [path for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_expired_intermediates_are_reissued_and_the_root_kept(state_dir: Path) -> None:
    clock = Clock(datetime.now(UTC))
    emulator = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, clock=clock)
    before = chain_of(NsmClient(emulator).attestation())
    clock.now += timedelta(days=2)  # the instance CA (one day) has expired
    later = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, clock=clock)
    after = chain_of(NsmClient(later).attestation())
    assert after[0] == before[0]
    assert after[3] != before[3]
    for certificate in after:
        assert certificate.not_valid_before_utc <= clock.now <= certificate.not_valid_after_utc
    after[4].verify_directly_issued_by(after[3])
    # The first emulator renews too, and finds the instance CA the second one wrote.
    renewed = chain_of(NsmClient(emulator).attestation())
    assert renewed[3] == after[3]


def test_in_memory_ca_renews_expired_intermediates() -> None:
    clock = Clock(NOW)
    emulator = EmulatedNsm(
        ca=LocalCa.from_keys(
            fixed_key("root"),
            fixed_key("regional"),
            fixed_key("zonal"),
            fixed_key("instance"),
            now=NOW,
        ),
        measurements=MEASUREMENTS,
        clock=clock,
    )
    clock.now = NOW + timedelta(days=40)  # beyond the regional CA's 30 days
    chain = chain_of(NsmClient(emulator).attestation())
    for issuer, subject in itertools.pairwise(chain):
        subject.verify_directly_issued_by(issuer)
        assert subject.not_valid_before_utc <= clock.now <= subject.not_valid_after_utc


def test_leaf_is_kept_then_renewed_before_it_expires(state_dir: Path) -> None:
    clock = Clock(datetime.now(UTC))
    client = NsmClient(EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, clock=clock))
    first = payload_of(client.attestation())["certificate"]
    clock.now += timedelta(hours=1)
    assert payload_of(client.attestation())["certificate"] == first
    clock.now += timedelta(hours=1, minutes=55)  # 5 minutes left: too little for a document
    document = client.attestation()
    assert payload_of(document)["certificate"] != first
    verify_signature(document)


def test_in_memory_ca_has_no_root_path() -> None:
    assert deterministic_nsm().root_pem_path is None


def test_default_state_dir_follows_nci_state_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NCI_STATE_DIR", str(tmp_path / "custom"))
    assert default_state_dir() == tmp_path / "custom"
    monkeypatch.delenv("NCI_STATE_DIR")
    assert default_state_dir() == Path(".nci")


def test_rejects_state_dir_together_with_an_in_memory_ca(state_dir: Path) -> None:
    ca = LocalCa.from_keys(
        fixed_key("root"), fixed_key("regional"), fixed_key("zonal"), fixed_key("instance"), now=NOW
    )
    with pytest.raises(ConfigError):
        EmulatedNsm(state_dir=state_dir, ca=ca)


def test_rejects_naive_clock(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="timezone"):
        EmulatedNsm(state_dir=state_dir, clock=lambda: datetime(2026, 1, 1))


def test_rejects_corrupt_state_file(state_dir: Path) -> None:
    EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS)
    (state_dir / "nsm" / "zonal.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=r"zonal\.key"):
        EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS)


# -- PCRs -----------------------------------------------------------------------------------------


def sha384(data: bytes) -> bytes:
    return hashlib.sha384(data).digest()


def test_boot_pcrs(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    pcrs = payload_of(client.attestation())["pcrs"]
    assert [pcrs[i] for i in (0, 1, 2)] == [MEASUREMENTS[i] for i in (0, 1, 2)]
    assert pcrs[3] == sha384(bytes(48) + sha384(DEFAULT_ROLE_ARN.encode()))
    assert pcrs[4] == sha384(bytes(48) + sha384(b"i-00000000000000000"))
    assert all(pcrs[i] == bytes(48) for i in range(5, 16))
    description = client.describe_nsm()
    assert (description.version_major, description.version_minor, description.version_patch) == (
        1,
        0,
        0,
    )
    assert description.max_pcrs == 32
    assert description.locked_pcrs == tuple(range(16))
    assert description.digest == "SHA384"
    assert description.module_id == emulator.module_id


def test_role_arn_sets_pcr3(state_dir: Path) -> None:
    role = "arn:aws:iam::123456789012:role/parent"
    emulator = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, role_arn=role)
    assert NsmClient(emulator).describe_pcr(3).value == sha384(bytes(48) + sha384(role.encode()))


def test_extend_and_lock_follow_the_nsm_rules(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    first = client.extend_pcr(16, b"abc")
    assert first == sha384(bytes(48) + b"abc")
    second = client.extend_pcr(16, b"def")
    assert second == sha384(first + b"def")
    state = client.describe_pcr(16)
    assert (state.locked, state.value) == (False, second)
    client.lock_pcr(16)
    assert client.describe_pcr(16).locked


@pytest.mark.parametrize(
    ("operation", "code"),
    [
        pytest.param(lambda c: c.extend_pcr(0, b"x"), "ReadOnlyIndex", id="extend boot PCR"),
        pytest.param(lambda c: c.lock_pcr(15), "ReadOnlyIndex", id="lock locked PCR"),
        pytest.param(lambda c: c.describe_pcr(32), "InvalidIndex", id="describe PCR 32"),
        pytest.param(lambda c: c.extend_pcr(32, b"x"), "InvalidIndex", id="extend PCR 32"),
        pytest.param(lambda c: c.extend_pcr(65535, b"x"), "InvalidIndex", id="extend PCR 65535"),
        pytest.param(lambda c: c.lock_pcr(32), "InvalidIndex", id="lock PCR 32"),
        pytest.param(lambda c: c.lock_pcrs(33), "InvalidIndex", id="lock range 33"),
        pytest.param(
            lambda c: c.attestation(nonce=bytes(1025)), "InputTooLarge", id="nonce of 1025"
        ),
        pytest.param(
            lambda c: c.attestation(user_data=bytes(1025)), "InputTooLarge", id="user_data of 1025"
        ),
        pytest.param(
            lambda c: c.attestation(public_key=bytes(1025)), "InputTooLarge", id="public_key 1025"
        ),
    ],
)
def test_refused_operations_answer_the_nsm_error_code(
    emulator: EmulatedNsm, operation: Callable[[NsmClient], object], code: str
) -> None:
    with pytest.raises(NsmError) as caught:
        operation(NsmClient(emulator))
    assert caught.value.code == code


def test_extending_a_locked_user_pcr_is_read_only(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    client.lock_pcr(20)
    with pytest.raises(NsmError) as caught:
        client.extend_pcr(20, b"x")
    assert caught.value.code == "ReadOnlyIndex"


def test_lock_pcrs_locks_the_range_from_zero(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    client.lock_pcr(17)
    client.lock_pcrs(20)  # locking already-locked PCRs in a range is not an error
    assert client.describe_nsm().locked_pcrs == tuple(range(20))
    client.lock_pcrs(32)
    assert client.describe_nsm().locked_pcrs == tuple(range(32))


def test_fields_of_1024_bytes_are_accepted(emulator: EmulatedNsm) -> None:
    document = NsmClient(emulator).attestation(
        user_data=bytes(1024), nonce=bytes(1024), public_key=bytes(1024)
    )
    verify_signature(document)


def test_document_carries_locked_user_pcrs_only(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    locked_value = client.extend_pcr(16, b"configuration")
    client.lock_pcr(16)
    client.extend_pcr(17, b"still changing")
    pcrs = payload_of(client.attestation())["pcrs"]
    assert list(pcrs) == [*range(16), 16]
    assert pcrs[16] == locked_value


def test_debug_mode_zeroes_pcr_0_1_2_and_8_only(state_dir: Path) -> None:
    emulator = EmulatedNsm(state_dir=state_dir, measurements=MEASUREMENTS, debug_mode=True)
    pcrs = payload_of(NsmClient(emulator).attestation())["pcrs"]
    assert [pcrs[i] for i in (0, 1, 2, 8)] == [bytes(48)] * 4
    assert pcrs[3] != bytes(48)
    assert pcrs[4] != bytes(48)


def test_rejects_measurement_of_wrong_length(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="48 bytes"):
        EmulatedNsm(state_dir=state_dir, measurements={0: bytes(32)})


def test_rejects_measurement_outside_boot_pcrs(state_dir: Path) -> None:
    with pytest.raises(ConfigError, match="0 to 15"):
        EmulatedNsm(state_dir=state_dir, measurements={16: bytes(48)})


# -- raw requests ----------------------------------------------------------------------------------


def test_request_over_4096_bytes_answers_input_too_large(emulator: EmulatedNsm) -> None:
    assert decode_response(emulator.process(bytes(4097))) == ErrorResponse("InputTooLarge")


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        pytest.param(b"\xff", "InvalidArgument", id="not CBOR"),
        pytest.param(
            encode_request(GetRandomRequest()) + b"\x00", "InvalidArgument", id="trailing"
        ),
        pytest.param(cbor2.dumps("Reboot"), "InvalidOperation", id="unknown operation"),
        pytest.param(cbor2.dumps({"LockPCR": {"index": "0"}}), "InvalidArgument", id="bad field"),
    ],
)
def test_malformed_request_is_answered_with_an_error_response(
    emulator: EmulatedNsm, request_bytes: bytes, code: str
) -> None:
    assert decode_response(emulator.process(request_bytes)) == ErrorResponse(code)


def test_get_random_returns_256_fresh_bytes(emulator: EmulatedNsm) -> None:
    client = NsmClient(emulator)
    first, second = client.get_random(), client.get_random()
    assert len(first) == len(second) == 256
    assert first != second


# -- determinism ------------------------------------------------------------------------------


def test_deterministic_mode_gives_byte_identical_documents() -> None:
    request = {"user_data": b"user", "nonce": b"nonce" * 4, "public_key": b"key"}
    first = NsmClient(deterministic_nsm()).attestation(**request)
    second = NsmClient(deterministic_nsm()).attestation(**request)
    assert first == second
    verify_signature(first)
    indefinite = NsmClient(deterministic_nsm(indefinite_payload=True)).attestation(**request)
    assert indefinite == NsmClient(deterministic_nsm(indefinite_payload=True)).attestation(
        **request
    )
    assert indefinite != first


# -- measurements -----------------------------------------------------------------------------


@pytest.fixture
def enclave_package(tmp_path: Path) -> Path:
    package = tmp_path / "src" / "enclave"
    (package / "runtime").mkdir(parents=True)
    (package / "__init__.py").write_text('"""Enclave."""\n')
    (package / "boot.py").write_text("def boot() -> None:\n    pass\n")
    (package / "runtime" / "model.py").write_text("WEIGHTS = 1\n")
    (package / "README.md").write_text("not measured\n")
    return package


def test_changing_enclave_code_changes_pcr0_and_pcr2(enclave_package: Path) -> None:
    before = _measure.measure_trees([enclave_package])
    (enclave_package / "boot.py").write_text("def boot() -> None:\n    leak()\n")
    after = _measure.measure_trees([enclave_package])
    assert after[0] != before[0]
    assert after[2] != before[2]
    assert after[1] == before[1]  # the runtime did not change


def test_measurement_is_stable_and_ignores_non_python_files(enclave_package: Path) -> None:
    before = _measure.measure_trees([enclave_package])
    (enclave_package / "README.md").write_text("changed\n")
    cache = enclave_package / "__pycache__"
    cache.mkdir()
    (cache / "boot.cpython-311.py").write_text("stale\n")
    assert _measure.measure_trees([enclave_package]) == before


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: (p / "extra.py").write_text(""), id="adding an empty file"),
        pytest.param(lambda p: (p / "boot.py").rename(p / "boot2.py"), id="renaming a file"),
        pytest.param(
            lambda p: (p / "runtime" / "model.py").rename(p / "model.py"), id="moving a file"
        ),
    ],
)
def test_any_change_to_the_tree_changes_pcr0(
    enclave_package: Path, change: Callable[[Path], object]
) -> None:
    before = _measure.measure_trees([enclave_package])
    change(enclave_package)
    assert _measure.measure_trees([enclave_package])[0] != before[0]


def test_file_boundaries_are_unambiguous(tmp_path: Path) -> None:
    # Same concatenated bytes, split differently between two files.
    one, two = tmp_path / "one" / "pkg", tmp_path / "two" / "pkg"
    one.mkdir(parents=True)
    two.mkdir(parents=True)
    (one / "a.py").write_text("xy")
    (one / "b.py").write_text("z")
    (two / "a.py").write_text("x")
    (two / "b.py").write_text("yz")
    assert _measure.measure_trees([one]) != _measure.measure_trees([two])


def test_package_name_is_measured(tmp_path: Path) -> None:
    for name in ("enclave", "parent"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "boot.py").write_text("x = 1\n")
    assert _measure.measure_trees([tmp_path / "enclave"]) != _measure.measure_trees(
        [tmp_path / "parent"]
    )


def test_pcrs_follow_the_eif_rule(enclave_package: Path) -> None:
    pcrs = _measure.measure_trees([enclave_package])
    runtime = _measure.runtime_description()
    assert pcrs[1] == sha384(bytes(48) + sha384(runtime))
    assert _measure.pcr_of(b"d" * 48) == _measure.extend(bytes(48), b"d" * 48)


def test_runtime_description_names_no_host_or_path() -> None:
    description = _measure.runtime_description()
    assert os.uname().nodename.encode() not in description
    assert str(REPO).encode() not in description
    assert sys.implementation.name.encode() in description


def test_emulator_pcr0_reflects_the_measured_code(enclave_package: Path, state_dir: Path) -> None:
    measured = _measure.measure_trees([enclave_package])
    emulator = EmulatedNsm(state_dir=state_dir, measurements=measured)
    assert payload_of(NsmClient(emulator).attestation())["pcrs"][0] == measured[0]


def test_default_measurements_cover_the_enclave_packages() -> None:
    measured = _measure.application_measurements()
    assert sorted(measured) == [0, 1, 2]
    assert all(len(value) == 48 for value in measured.values())
    assert _measure.application_measurements() == measured  # cached per process
    assert _measure.locate_package("attestation") == [REPO / "attestation"]


def test_unknown_package_cannot_be_measured() -> None:
    with pytest.raises(ConfigError):
        _measure.application_measurements(("nci_no_such_package_xyz",))


def test_emulator_defaults_to_measuring_the_running_code(state_dir: Path) -> None:
    emulator = EmulatedNsm(state_dir=state_dir)
    pcr0 = NsmClient(emulator).describe_pcr(0).value
    assert pcr0 == _measure.application_measurements()[0]
