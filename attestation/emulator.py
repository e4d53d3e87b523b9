"""The local NSM: the Nitro Security Module's request/response API, answered in-process.

:class:`EmulatedNsm` implements :class:`attestation.nsm.Nsm` exactly as the device does: encoded
request in, encoded response out, refusals as ``Error`` responses with the device's codes. It is
part of the product (local mode and the demo run on it), not a test double. Its attestation
documents are byte-compatible with AWS's and signed by a local CA chain
(:mod:`attestation._localca`) that verifiers accept only when told to trust the local root.

Documents. An untagged COSE_Sign1 array ``[protected, unprotected, payload, signature]`` with
protected header ``{1: -35}`` (ES384) as the bytes ``a1 01 38 22``, an empty unprotected map, and a
96-byte raw ``r ‖ s`` signature over the RFC 9052 §4.4 ``Sig_structure``. The payload map's keys
come in AWS's order: module_id, digest, timestamp, pcrs, certificate, cabundle, public_key,
user_data, nonce; absent optional fields are null (as in the real documents under
tests/assets/attestation). ``indefinite_payload=True`` encodes the payload map with indefinite
length, as newer AWS documents do.

PCRs (aws-nitro-enclaves-nsm-api nsm-test/src/bin/nsm-check.rs; AWS "Where to get an enclave's
measurements"):

- 0, 1, 2: measurements of the running application (:mod:`attestation._measure`), so that changing
  enclave code changes PCR0; or the ``measurements`` argument.
- 3: ``pcr_of(SHA384(role ARN))``, the parent instance's IAM role.
- 4: ``pcr_of(SHA384(instance id))``, the parent instance.
- 8: zero: the emulated image is not signed.
- ``debug_mode=True`` zeroes PCR0, 1, 2 and 8 as a debug-mode enclave shows them.

PCRs 0-15 are locked at boot; 16-31 start at zero and can be extended
(``PCR = SHA384(PCR ‖ data)``) and locked. A document carries PCRs 0-15, as real ones do, plus
every PCR of 16-31 that has been locked (QEMU's virtio-nsm, hw/virtio/virtio-nsm.c, also puts the
locked PCRs in the document): a locked user PCR is a stable measurement a verifier may pin, an
unlocked one could still change and is left out.

Limits. Requests over 4096 bytes answer ``InputTooLarge``, as do ``user_data``, ``nonce`` or
``public_key`` over 1024 bytes. ``ExtendPCR`` data has no limit of its own beyond the request size:
none is documented, and QEMU's device has none.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from attestation import _measure
from attestation._localca import DEFAULT_INSTANCE_ID, LocalCa, generate_key
from attestation.errors import ConfigError, NsmError
from attestation.nsm import (
    ATTESTATION_FIELD_MAX_SIZE,
    NSM_REQUEST_MAX_SIZE,
    NSM_RESPONSE_MAX_SIZE,
    AttestationRequest,
    AttestationResponse,
    DescribeNsmRequest,
    DescribeNsmResponse,
    DescribePcrRequest,
    DescribePcrResponse,
    ErrorResponse,
    ExtendPcrRequest,
    ExtendPcrResponse,
    GetRandomRequest,
    GetRandomResponse,
    LockPcrRequest,
    LockPcrResponse,
    LockPcrsRequest,
    LockPcrsResponse,
    Request,
    Response,
    decode_request,
    encode_response,
)

__all__ = [
    "DEFAULT_INSTANCE_ID",
    "DEFAULT_ROLE_ARN",
    "PROTECTED_HEADER",
    "EmulatedNsm",
    "LocalCa",
    "default_state_dir",
    "encode_payload",
    "sign_document",
]

DEFAULT_ROLE_ARN: Final = "arn:aws:iam::000000000000:role/nci-local-parent"
"""The IAM role PCR3 measures unless told otherwise."""

PROTECTED_HEADER: Final = bytes.fromhex("a1013822")
"""``{1: -35}``: COSE algorithm ES384 (RFC 9053 §2.1), byte for byte as AWS encodes it."""

MAX_PCRS: Final = 32
BOOT_LOCKED_PCRS: Final = 16  # PCRs [0, 16) are locked when the enclave boots
RANDOM_SIZE: Final = 256  # bytes per GetRandom, as the Nitro NSM (and QEMU's) returns
VERSION: Final = (1, 0, 0)
LEAF_MARGIN: Final = timedelta(minutes=10)
"""A leaf is renewed once it has less than this left: a verifier accepts a document for a few
minutes after its timestamp, so the leaf must outlive that."""

_PCR_LENGTH: Final = _measure.PCR_LENGTH
_ZERO_PCR: Final = bytes(_PCR_LENGTH)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_COORDINATE_SIZE: Final = 48  # P-384


def default_state_dir() -> Path:
    """The local state folder: ``$NCI_STATE_DIR``, else ``./.nci``."""
    return Path(os.environ.get("NCI_STATE_DIR") or ".nci")


def _utc_now() -> datetime:
    return datetime.now(UTC)


# -- the document -------------------------------------------------------------------------------


def encode_payload(fields: Mapping[str, object], *, indefinite: bool = False) -> bytes:
    """The payload map, keys in ``fields``' order; definite length (``0xa9``) or indefinite
    (``0xbf`` … ``0xff``)."""
    if not indefinite:
        return cbor2.dumps(dict(fields))
    items = b"".join(cbor2.dumps(key) + cbor2.dumps(value) for key, value in fields.items())
    return b"\xbf" + items + b"\xff"


def sign_document(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """An untagged COSE_Sign1 over ``payload``, signed ES384 with ``key``.

    Follows RFC 9052 §4.4: the signature is over ``Sig_structure = ["Signature1", protected,
    external_aad = h'', payload]``; RFC 9053 §2.1 puts it on the wire as ``r ‖ s``, each a 48-byte
    big-endian integer. Signing is deterministic (RFC 6979).
    """
    # (1) the Sig_structure, (2) ECDSA P-384 / SHA-384, (3) DER → raw r ‖ s, (4) the array.
    to_be_signed = cbor2.dumps(["Signature1", PROTECTED_HEADER, b"", payload])
    der = key.sign(to_be_signed, ec.ECDSA(hashes.SHA384(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(_COORDINATE_SIZE, "big") + s.to_bytes(_COORDINATE_SIZE, "big")
    return cbor2.dumps([PROTECTED_HEADER, {}, payload, signature])


def _timestamp_ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


# -- the emulator -------------------------------------------------------------------------------


class EmulatedNsm:
    """An in-process NSM with a local CA; see the module docstring for what it emulates.

    ``state_dir`` is the local state folder (default :func:`default_state_dir`); the CA lives in
    its ``nsm/`` subfolder and is shared by every process using that folder. For reproducible
    documents pass ``ca=LocalCa.from_keys(...)``, a fixed ``leaf_key``, a fixed ``clock`` and a
    deterministic ``rng`` (used for the module id, serial numbers and ``GetRandom``): the same
    requests then produce byte-identical documents. Thread-safe.
    """

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        ca: LocalCa | None = None,
        leaf_key: ec.EllipticCurvePrivateKey | None = None,
        measurements: Mapping[int, bytes] | None = None,
        role_arn: str = DEFAULT_ROLE_ARN,
        debug_mode: bool = False,
        indefinite_payload: bool = False,
        clock: Callable[[], datetime] = _utc_now,
        rng: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if ca is not None and state_dir is not None:
            raise ConfigError("give either state_dir or an in-memory ca, not both")
        self._clock = clock
        self._rng = rng
        self._indefinite_payload = indefinite_payload
        self._lock = threading.Lock()
        # (1) the CA: in memory, or shared through the state folder.
        if ca is None:
            folder = (state_dir if state_dir is not None else default_state_dir()) / "nsm"
            ca = LocalCa.open(folder, now=self._now(), rng=rng)
        self._ca = ca
        # (2) this enclave's identity and signing key.
        self._module_id = f"{ca.instance_id}-enc{rng(8).hex()}"
        self._leaf_key = leaf_key if leaf_key is not None else generate_key()
        if self._leaf_key.curve.name != ec.SECP384R1.name:
            raise ConfigError("the leaf key must be an EC P-384 private key")
        self._leaf: x509.Certificate | None = None
        # (3) the PCR bank as it stands when the enclave boots.
        self._pcrs = self._boot_pcrs(measurements, role_arn, ca.instance_id, debug_mode)
        self._locked = [index < BOOT_LOCKED_PCRS for index in range(MAX_PCRS)]

    @staticmethod
    def _boot_pcrs(
        measurements: Mapping[int, bytes] | None,
        role_arn: str,
        instance_id: str,
        debug_mode: bool,
    ) -> list[bytes]:
        pcrs = [_ZERO_PCR] * MAX_PCRS
        if measurements is None:
            measurements = _measure.application_measurements()
        pcrs[3] = _measure.pcr_of(hashlib.sha384(role_arn.encode()).digest())
        pcrs[4] = _measure.pcr_of(hashlib.sha384(instance_id.encode()).digest())
        for index, value in measurements.items():
            if type(index) is not int or not 0 <= index < BOOT_LOCKED_PCRS:
                raise ConfigError(f"measurements[{index!r}]: boot measurements are PCRs 0 to 15")
            if type(value) is not bytes or len(value) != _PCR_LENGTH:
                raise ConfigError(f"measurements[{index}] must be {_PCR_LENGTH} bytes (SHA384)")
            pcrs[index] = value
        if debug_mode:
            for index in (0, 1, 2, 8):
                pcrs[index] = _ZERO_PCR
        return pcrs

    # -- what verifiers need to trust it --

    @property
    def ca(self) -> LocalCa:
        return self._ca

    @property
    def module_id(self) -> str:
        return self._module_id

    @property
    def root_pem(self) -> bytes:
        return self._ca.root_pem

    @property
    def root_certificate_der(self) -> bytes:
        return self._ca.root_certificate_der

    @property
    def root_pem_path(self) -> Path | None:
        """The root certificate's file in the state folder; ``None`` with an in-memory CA."""
        return self._ca.root_pem_path

    # -- the Nsm protocol --

    def process(self, request: bytes) -> bytes:
        """Answer one encoded NSM request with one encoded response.

        ``request`` comes from the enclave application; anything malformed is answered with an
        ``Error`` response, never an exception, as the device does.
        """
        # (1) size, (2) strict parse, (3) the operation, (4) the response buffer's size.
        if len(request) > NSM_REQUEST_MAX_SIZE:
            return encode_response(ErrorResponse("InputTooLarge"))
        try:
            parsed = decode_request(bytes(request))
        except NsmError as exc:
            return encode_response(ErrorResponse(exc.code or "InvalidArgument"))
        with self._lock:
            response = self._answer(parsed)
        encoded = encode_response(response)
        if len(encoded) > NSM_RESPONSE_MAX_SIZE:
            return encode_response(ErrorResponse("BufferTooSmall"))
        return encoded

    def _answer(self, request: Request) -> Response:
        match request:
            case DescribePcrRequest(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                return DescribePcrResponse(lock=self._locked[index], data=self._pcrs[index])
            case ExtendPcrRequest(index=index, data=data):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if self._locked[index]:
                    return ErrorResponse("ReadOnlyIndex")
                self._pcrs[index] = _measure.extend(self._pcrs[index], data)
                return ExtendPcrResponse(data=self._pcrs[index])
            case LockPcrRequest(index=index):
                if index >= MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                if self._locked[index]:
                    return ErrorResponse("ReadOnlyIndex")
                self._locked[index] = True
                return LockPcrResponse()
            case LockPcrsRequest(range=range_):
                if range_ > MAX_PCRS:
                    return ErrorResponse("InvalidIndex")
                for index in range(range_):
                    self._locked[index] = True
                return LockPcrsResponse()
            case DescribeNsmRequest():
                major, minor, patch = VERSION
                return DescribeNsmResponse(
                    version_major=major,
                    version_minor=minor,
                    version_patch=patch,
                    module_id=self._module_id,
                    max_pcrs=MAX_PCRS,
                    locked_pcrs=tuple(i for i in range(MAX_PCRS) if self._locked[i]),
                    digest="SHA384",
                )
            case AttestationRequest():
                return self._attest(request)
            case GetRandomRequest():
                return GetRandomResponse(random=self._rng(RANDOM_SIZE))
        raise TypeError(f"{type(request).__name__} is not an NSM request")  # pragma: no cover

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ConfigError("the emulator's clock must return timezone-aware datetimes")
        return now.astimezone(UTC)

    def _leaf_certificate(self, now: datetime) -> x509.Certificate:
        """The leaf for ``now``, renewed when it nears its end or its issuer was renewed."""
        renewed_chain = self._ca.refresh(now)
        leaf = self._leaf
        if (
            leaf is None
            or renewed_chain
            or not leaf.not_valid_before_utc <= now
            or now + LEAF_MARGIN > leaf.not_valid_after_utc
        ):
            leaf = self._ca.issue_leaf(
                self._leaf_key.public_key(), module_id=self._module_id, now=now, rng=self._rng
            )
            self._leaf = leaf
        return leaf

    def _attest(self, request: AttestationRequest) -> Response:
        given = (request.user_data, request.nonce, request.public_key)
        if any(value is not None and len(value) > ATTESTATION_FIELD_MAX_SIZE for value in given):
            return ErrorResponse("InputTooLarge")
        # (1) the time and a leaf valid then, (2) the payload in AWS's key order, (3) the signature.
        now = self._now()
        leaf = self._leaf_certificate(now)
        pcrs = {
            index: self._pcrs[index]
            for index in range(MAX_PCRS)
            if index < BOOT_LOCKED_PCRS or self._locked[index]
        }
        fields: dict[str, object] = {
            "module_id": self._module_id,
            "digest": "SHA384",
            "timestamp": _timestamp_ms(now),
            "pcrs": pcrs,
            "certificate": _der(leaf),
            "cabundle": [_der(certificate) for certificate in self._ca.cabundle()],
            "public_key": request.public_key,
            "user_data": request.user_data,
            "nonce": request.nonce,
        }
        payload = encode_payload(fields, indefinite=self._indefinite_payload)
        return AttestationResponse(document=sign_document(payload, self._leaf_key))
