"""The NSM API: byte-exact CBOR as aws-nitro-enclaves-nsm-api encodes it, strict decoding of hostile
bytes, the typed client, and the /dev/nsm ioctl exercised against a fake kernel.

Expected encodings are derived by hand from RFC 8949 and serde's externally tagged enum layout
(src/api/mod.rs): ``0x6b`` is a text string of 11 bytes, ``0xa1`` a map of one pair, ``0x58 0x30``
a byte string of 48 bytes, ``0xf5``/``0xf6`` true/null.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Callable
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation import nsm
from attestation.emulator import EmulatedNsm
from attestation.errors import NsmError, NsmTransportError
from attestation.nsm import (
    NSM_IOCTL_RAW,
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
    NsmClient,
    NsmDevice,
    PcrState,
    Request,
    Response,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


PCR_A = bytes(range(48))
PCR_B = bytes(range(48, 96))

# -- requests: (name, value, hand-derived CBOR) ----------------------------------------------------

REQUEST_VECTORS: list[tuple[str, Request, bytes]] = [
    ("DescribeNSM", DescribeNsmRequest(), h("6b") + b"DescribeNSM"),
    ("GetRandom", GetRandomRequest(), h("69") + b"GetRandom"),
    (
        "DescribePCR index 0",
        DescribePcrRequest(index=0),
        h("a1 6b") + b"DescribePCR" + h("a1 65") + b"index" + h("00"),
    ),
    (
        "DescribePCR index 300 (uint16 argument)",
        DescribePcrRequest(index=300),
        h("a1 6b") + b"DescribePCR" + h("a1 65") + b"index" + h("19 012c"),
    ),
    (
        "ExtendPCR",
        ExtendPcrRequest(index=16, data=b"\x01\x02\x03"),
        h("a1 69") + b"ExtendPCR" + h("a2 65") + b"index" + h("10 64") + b"data" + h("43 010203"),
    ),
    (
        "LockPCR",
        LockPcrRequest(index=16),
        h("a1 67") + b"LockPCR" + h("a1 65") + b"index" + h("10"),
    ),
    (
        "LockPCRs",
        LockPcrsRequest(range=32),
        h("a1 68") + b"LockPCRs" + h("a1 65") + b"range" + h("18 20"),
    ),
    (
        "Attestation without fields: three nulls in declaration order",
        AttestationRequest(),
        h("a1 6b")
        + b"Attestation"
        + h("a3 69")
        + b"user_data"
        + h("f6 65")
        + b"nonce"
        + h("f6 6a")
        + b"public_key"
        + h("f6"),
    ),
    (
        "Attestation with all fields",
        AttestationRequest(user_data=b"u", nonce=b"n", public_key=b"k"),
        h("a1 6b")
        + b"Attestation"
        + h("a3 69")
        + b"user_data"
        + h("41 75 65")
        + b"nonce"
        + h("41 6e 6a")
        + b"public_key"
        + h("41 6b"),
    ),
]


@pytest.mark.parametrize(
    ("value", "encoded"),
    [pytest.param(v, e, id=name) for name, v, e in REQUEST_VECTORS],
)
def test_request_encoding_is_byte_exact(value: Request, encoded: bytes) -> None:
    assert encode_request(value) == encoded
    assert decode_request(encoded) == value


def test_attestation_request_accepts_absent_optional_fields_as_serde_does() -> None:
    encoded = h("a1 6b") + b"Attestation" + h("a1 65") + b"nonce" + h("42 6e6e")
    assert decode_request(encoded) == AttestationRequest(nonce=b"nn")


# -- responses ----------------------------------------------------------------------------------

RESPONSE_VECTORS: list[tuple[str, Response, bytes]] = [
    (
        "DescribePCR",
        DescribePcrResponse(lock=True, data=PCR_A),
        h("a1 6b")
        + b"DescribePCR"
        + h("a2 64")
        + b"lock"
        + h("f5 64")
        + b"data"
        + h("58 30")
        + PCR_A,
    ),
    (
        "ExtendPCR",
        ExtendPcrResponse(data=PCR_B),
        h("a1 69") + b"ExtendPCR" + h("a1 64") + b"data" + h("58 30") + PCR_B,
    ),
    ("LockPCR", LockPcrResponse(), h("67") + b"LockPCR"),
    ("LockPCRs", LockPcrsResponse(), h("68") + b"LockPCRs"),
    (
        "DescribeNSM",
        DescribeNsmResponse(
            version_major=1,
            version_minor=0,
            version_patch=0,
            module_id="i-1234-enc5678",
            max_pcrs=32,
            locked_pcrs=(0, 1),
            digest="SHA384",
        ),
        h("a1 6b")
        + b"DescribeNSM"
        + h("a7 6d")
        + b"version_major"
        + h("01 6d")
        + b"version_minor"
        + h("00 6d")
        + b"version_patch"
        + h("00 69")
        + b"module_id"
        + h("6e")
        + b"i-1234-enc5678"
        + h("68")
        + b"max_pcrs"
        + h("18 20 6b")
        + b"locked_pcrs"
        + h("82 00 01 66")
        + b"digest"
        + h("66")
        + b"SHA384",
    ),
    (
        "Attestation",
        AttestationResponse(document=h("8440a04040")),
        h("a1 6b") + b"Attestation" + h("a1 68") + b"document" + h("45 8440a04040"),
    ),
    (
        "GetRandom",
        GetRandomResponse(random=bytes(32)),
        h("a1 69") + b"GetRandom" + h("a1 66") + b"random" + h("58 20") + bytes(32),
    ),
    ("Error", ErrorResponse("InvalidIndex"), h("a1 65") + b"Error" + h("6c") + b"InvalidIndex"),
]


@pytest.mark.parametrize(
    ("value", "encoded"),
    [pytest.param(v, e, id=name) for name, v, e in RESPONSE_VECTORS],
)
def test_response_encoding_is_byte_exact(value: Response, encoded: bytes) -> None:
    assert encode_response(value) == encoded
    assert decode_response(encoded) == value


@pytest.mark.parametrize("code", nsm.ERROR_CODES)
def test_decodes_every_error_code(code: str) -> None:
    assert decode_response(cbor2.dumps({"Error": code})) == ErrorResponse(code)


# -- hostile responses: one table, one exception type ----------------------------------------------

GOOD_EXTEND = RESPONSE_VECTORS[1][2]


def describe_nsm(**changes: object) -> bytes:
    """A DescribeNSM response, well-formed but for ``changes``."""
    body: dict[str, object] = {
        "version_major": 1,
        "version_minor": 0,
        "version_patch": 0,
        "module_id": "m",
        "max_pcrs": 32,
        "locked_pcrs": [0, 1],
        "digest": "SHA384",
    }
    body.update(changes)
    return cbor2.dumps({"DescribeNSM": body})


def test_describe_nsm_helper_is_well_formed() -> None:
    assert isinstance(decode_response(describe_nsm()), DescribeNsmResponse)


HOSTILE_RESPONSES: list[tuple[str, bytes]] = [
    ("empty input", b""),
    ("trailing bytes", GOOD_EXTEND + b"\x00"),
    ("a second item", GOOD_EXTEND + GOOD_EXTEND),
    (
        "duplicate field",
        h("a1 69")
        + b"ExtendPCR"
        + h("a2 64")
        + b"data"
        + h("58 30")
        + PCR_A
        + h("64")
        + b"data"
        + h("58 30")
        + PCR_B,
    ),
    ("duplicate variant", h("a2") + (h("65") + b"Error" + h("6c") + b"InvalidIndex") * 2),
    ("two variants", cbor2.dumps({"LockPCR": None, "Error": "InvalidIndex"})),
    ("unknown variant", cbor2.dumps({"Reboot": {}})),
    ("unknown unit variant", cbor2.dumps("Reboot")),
    ("unit variant with a body", cbor2.dumps({"LockPCR": {}})),
    ("struct variant without body", cbor2.dumps("ExtendPCR")),
    ("unknown field", cbor2.dumps({"ExtendPCR": {"data": PCR_A, "extra": 1}})),
    ("missing field", cbor2.dumps({"DescribePCR": {"data": PCR_A}})),
    ("body not a map", cbor2.dumps({"ExtendPCR": [PCR_A]})),
    ("lock as integer", cbor2.dumps({"DescribePCR": {"lock": 1, "data": PCR_A}})),
    ("PCR as text", cbor2.dumps({"ExtendPCR": {"data": "00" * 48}})),
    ("PCR of 47 bytes", cbor2.dumps({"ExtendPCR": {"data": bytes(47)}})),
    ("unknown error code", cbor2.dumps({"Error": "Rebooted"})),
    ("error code as integer", cbor2.dumps({"Error": 1})),
    ("empty document", cbor2.dumps({"Attestation": {"document": b""}})),
    ("random as null", cbor2.dumps({"GetRandom": {"random": None}})),
    ("integer map key", cbor2.dumps({1: "LockPCR"})),
    ("byte-string map key", cbor2.dumps({b"Error": "InvalidIndex"})),
    ("top-level array", cbor2.dumps(["LockPCR"])),
    ("top-level integer", h("00")),
    ("float where a u16 belongs", describe_nsm(version_major=1.0)),
    ("version over u16", describe_nsm(version_major=70_000)),
    ("module_id empty", describe_nsm(module_id="")),
    ("digest unknown", describe_nsm(digest="MD5")),
    ("unsorted locked_pcrs", describe_nsm(locked_pcrs=[1, 0])),
    ("repeated locked PCR", describe_nsm(locked_pcrs=[1, 1])),
    ("negative locked PCR", describe_nsm(locked_pcrs=[-1])),
    ("deeply nested arrays", h("81") * 10_000 + h("00")),
    ("deeply nested maps", (h("a1 61") + b"a") * 500 + h("00")),
    ("byte string claiming 2^64-1 bytes", h("5b ffffffffffffffff")),
    ("array claiming 2^32 items", h("9b 0000000100000000")),
    ("truncated byte string", h("a1 69") + b"GetRandom" + h("a1 66") + b"random" + h("58 20 00")),
    ("larger than the response buffer", cbor2.dumps({"GetRandom": {"random": bytes(12_300)}})),
    ("tagged response", h("d8 18") + cbor2.dumps(cbor2.dumps("LockPCR"))),
    ("date tag in a field", cbor2.dumps({"GetRandom": {"random": cbor2.CBORTag(1, 0)}})),
    ("bignum tag in a field", h("a1 65") + b"Error" + h("c2 41 01")),
    ("self-referencing shared value", h("d8 1c 81 d8 1d 00")),
    ("undefined", h("f7")),
    ("simple value", h("f0")),
    ("invalid UTF-8 text", h("a1 65") + b"Error" + h("62 ff fe")),
    ("break outside indefinite item", h("ff")),
]


@pytest.mark.parametrize("data", [pytest.param(d, id=name) for name, d in HOSTILE_RESPONSES])
def test_rejects_hostile_response(data: bytes) -> None:
    with pytest.raises(NsmError) as caught:
        decode_response(data)
    assert caught.value.code == "InvalidResponse"


def test_rejects_response_with_trailing_bytes() -> None:
    with pytest.raises(NsmError, match="trailing"):
        decode_response(GOOD_EXTEND + b"\x00")


def test_rejects_response_with_duplicate_keys() -> None:
    data = dict(HOSTILE_RESPONSES)["duplicate field"]
    with pytest.raises(NsmError, match="duplicate map key"):
        decode_response(data)


def test_rejects_response_that_is_not_bytes() -> None:
    with pytest.raises(NsmError):
        decode_response(bytearray(GOOD_EXTEND))  # type: ignore[arg-type]


# -- hostile requests ---------------------------------------------------------------------------

HOSTILE_REQUESTS: list[tuple[str, bytes, str]] = [
    ("empty input", b"", "InvalidArgument"),
    ("trailing bytes", encode_request(GetRandomRequest()) + b"\x00", "InvalidArgument"),
    ("unknown operation", cbor2.dumps("Reboot"), "InvalidOperation"),
    ("unknown struct operation", cbor2.dumps({"Reboot": {"now": True}}), "InvalidOperation"),
    ("index over u16", cbor2.dumps({"DescribePCR": {"index": 65536}}), "InvalidArgument"),
    ("negative index", cbor2.dumps({"DescribePCR": {"index": -1}}), "InvalidArgument"),
    ("index as boolean", cbor2.dumps({"DescribePCR": {"index": True}}), "InvalidArgument"),
    (
        "extend data as text",
        cbor2.dumps({"ExtendPCR": {"index": 16, "data": "x"}}),
        "InvalidArgument",
    ),
    ("unknown field", cbor2.dumps({"LockPCR": {"index": 16, "force": True}}), "InvalidArgument"),
    ("missing field", cbor2.dumps({"ExtendPCR": {"index": 16}}), "InvalidArgument"),
    ("unit operation with body", cbor2.dumps({"GetRandom": {}}), "InvalidArgument"),
    ("struct operation without body", cbor2.dumps("LockPCRs"), "InvalidArgument"),
    ("nonce as integer", cbor2.dumps({"Attestation": {"nonce": 5}}), "InvalidArgument"),
    (
        "duplicate nonce",
        h("a1 6b") + b"Attestation" + h("a2") + (h("65") + b"nonce" + h("f6")) * 2,
        "InvalidArgument",
    ),
    (
        "tag in a field",
        cbor2.dumps({"LockPCR": {"index": cbor2.CBORTag(2, b"\x01")}}),
        "InvalidArgument",
    ),
    (
        "larger than 4096 bytes",
        cbor2.dumps({"ExtendPCR": {"index": 16, "data": bytes(4096)}}),
        "InputTooLarge",
    ),
]


@pytest.mark.parametrize(
    ("data", "code"), [pytest.param(d, c, id=name) for name, d, c in HOSTILE_REQUESTS]
)
def test_rejects_hostile_request(data: bytes, code: str) -> None:
    with pytest.raises(NsmError) as caught:
        decode_request(data)
    assert caught.value.code == code


# -- property: arbitrary bytes raise only our errors ---------------------------------------------


@given(st.binary(max_size=512))
def test_decode_response_raises_only_nsm_error_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(NsmError):  # anything else fails the test
        decode_response(data)


@given(st.binary(max_size=512))
def test_decode_request_raises_only_nsm_error_on_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(NsmError):  # anything else fails the test
        decode_request(data)


_PLAIN = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=64)
    | st.sampled_from(["DescribePCR", "ExtendPCR", "Error", "data", "index", "lock", "LockPCR"])
    | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["data", "index", "lock", "random", "Error", "x"]), inner, max_size=4
        )
        | st.dictionaries(
            st.sampled_from(["DescribePCR", "ExtendPCR", "GetRandom", "Attestation", "LockPCRs"]),
            inner,
            min_size=1,
            max_size=1,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=150)
@given(_PLAIN)
def test_decoders_raise_only_nsm_error_on_structured_cbor(value: object) -> None:
    data = cbor2.dumps(value)
    for decode in (decode_request, decode_response):
        with contextlib.suppress(NsmError):  # anything else fails the test
            decode(data)


@given(
    st.builds(
        AttestationRequest,
        user_data=st.none() | st.binary(max_size=64),
        nonce=st.none() | st.binary(max_size=64),
        public_key=st.none() | st.binary(max_size=64),
    )
    | st.builds(ExtendPcrRequest, index=st.integers(0, 0xFFFF), data=st.binary(max_size=64))
    | st.builds(LockPcrsRequest, range=st.integers(0, 0xFFFF))
)
def test_requests_round_trip(request_value: Request) -> None:
    assert decode_request(encode_request(request_value)) == request_value


def test_message_types_refuse_values_the_wire_cannot_carry() -> None:
    with pytest.raises(NsmError):
        DescribePcrRequest(index=65536)
    with pytest.raises(NsmError):
        ExtendPcrRequest(index=16, data="text")  # type: ignore[arg-type]
    with pytest.raises(NsmError):
        ErrorResponse("Rebooted")


# -- the typed client -------------------------------------------------------------------------


class CannedNsm:
    """An Nsm that records requests and answers with fixed bytes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[bytes] = []

    def process(self, request: bytes) -> bytes:
        self.requests.append(request)
        return self.answer


def test_client_sends_exact_bytes_and_returns_typed_values() -> None:
    canned = CannedNsm(encode_response(DescribePcrResponse(lock=False, data=PCR_A)))
    assert NsmClient(canned).describe_pcr(16) == PcrState(locked=False, value=PCR_A)
    assert canned.requests == [encode_request(DescribePcrRequest(index=16))]


def test_client_raises_the_error_code_the_nsm_answers() -> None:
    client = NsmClient(CannedNsm(encode_response(ErrorResponse("ReadOnlyIndex"))))
    with pytest.raises(NsmError) as caught:
        client.extend_pcr(0, b"x")
    assert caught.value.code == "ReadOnlyIndex"


def test_client_rejects_response_of_another_variant() -> None:
    client = NsmClient(CannedNsm(encode_response(GetRandomResponse(random=bytes(8)))))
    with pytest.raises(NsmError) as caught:
        client.attestation(nonce=b"n")
    assert caught.value.code == "InvalidResponse"


def test_client_rejects_malformed_response() -> None:
    client = NsmClient(CannedNsm(b"\xff\xff"))
    with pytest.raises(NsmError) as caught:
        client.get_random()
    assert caught.value.code == "InvalidResponse"


def test_client_refuses_request_over_4096_bytes_without_sending_it() -> None:
    canned = CannedNsm(b"")
    with pytest.raises(NsmError) as caught:
        NsmClient(canned).attestation(user_data=bytes(5000))
    assert caught.value.code == "InputTooLarge"
    assert canned.requests == []


def test_client_unit_operations() -> None:
    lock = CannedNsm(encode_response(LockPcrResponse()))
    NsmClient(lock).lock_pcr(16)
    lock_range = CannedNsm(encode_response(LockPcrsResponse()))
    NsmClient(lock_range).lock_pcrs(20)
    assert lock.requests == [encode_request(LockPcrRequest(index=16))]
    assert lock_range.requests == [encode_request(LockPcrsRequest(range=20))]
    description = RESPONSE_VECTORS[4][1]
    assert NsmClient(CannedNsm(RESPONSE_VECTORS[4][2])).describe_nsm() == description


# -- the ioctl --------------------------------------------------------------------------------


def test_ioctl_number_is_iowr_0x0a_0_struct_of_32_bytes() -> None:
    read_write, nsm_magic, nr, size = 3, 0x0A, 0, 32
    assert nsm.ioc(read_write, nsm_magic, nr, size) == 0xC0200A00
    assert (read_write << 30 | size << 16 | nsm_magic << 8 | nr) == 0xC0200A00
    assert NSM_IOCTL_RAW == 0xC0200A00


def test_message_struct_layout_matches_uapi_nsm_raw() -> None:
    message = nsm._NsmMessage
    assert ctypes.sizeof(message) == 32
    assert message.request.offset == 0
    assert message.response.offset == 16
    assert nsm._Iovec.iov_base.offset == 0
    assert nsm._Iovec.iov_len.offset == 8


class FakeKernel:
    """Plays the NSM driver: reads the request through the iovec pointers in the 32-byte argument
    (addr at offset 0, len at 8; response addr at 16, capacity at 24), writes a response with
    memmove and stores the length it reports at offset 24."""

    def __init__(
        self,
        answer: Callable[[bytes], bytes],
        *,
        reported_length: int | None = None,
        fail_errno: int | None = None,
        status: int = 0,
    ) -> None:
        self.answer = answer
        self.reported_length = reported_length
        self.fail_errno = fail_errno
        self.status = status
        self.calls: list[tuple[int, int, bool]] = []
        self.requests: list[bytes] = []
        self.capacities: list[int] = []

    def __call__(self, fd: int, request: int, arg: ctypes.Structure, mutate_flag: bool, /) -> int:
        self.calls.append((fd, request, mutate_flag))
        if self.fail_errno is not None:
            raise OSError(self.fail_errno, os.strerror(self.fail_errno))
        raw = (ctypes.c_uint8 * 32).from_buffer(arg)
        request_addr, request_len, response_addr, capacity = struct.unpack_from("=4Q", raw, 0)
        self.requests.append(ctypes.string_at(request_addr, request_len))
        self.capacities.append(capacity)
        response = self.answer(self.requests[-1])
        ctypes.memmove(response_addr, response, min(len(response), capacity))
        length = len(response) if self.reported_length is None else self.reported_length
        struct.pack_into("=Q", raw, 24, length)
        return self.status


@pytest.fixture
def device_path(tmp_path: Path) -> str:
    # A plain file stands in for /dev/nsm: the fake kernel never looks at the descriptor's target.
    path = tmp_path / "nsm"
    path.write_bytes(b"")
    return str(path)


def test_device_passes_request_and_returns_exactly_the_reported_bytes(device_path: str) -> None:
    answer = encode_response(GetRandomResponse(random=bytes(range(256))))
    kernel = FakeKernel(lambda _request: answer)
    with NsmDevice(device_path, ioctl=kernel) as device:
        assert device.process(encode_request(GetRandomRequest())) == answer
    assert kernel.requests == [encode_request(GetRandomRequest())]
    assert kernel.capacities == [NSM_RESPONSE_MAX_SIZE]
    ((_fd, number, mutate),) = kernel.calls
    assert number == 0xC0200A00
    assert mutate is True


def test_client_over_device_over_fake_kernel_backed_by_emulator(
    device_path: str, tmp_path: Path
) -> None:
    emulator = EmulatedNsm(state_dir=tmp_path / "state", measurements={})
    with NsmDevice(device_path, ioctl=FakeKernel(emulator.process)) as device:
        client = NsmClient(device)
        assert client.describe_nsm().max_pcrs == 32
        assert client.extend_pcr(16, b"x") == client.describe_pcr(16).value
        assert client.attestation(nonce=b"n")[0] == 0x84


def test_rejects_request_over_4096_bytes_before_the_kernel_sees_it(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: b"")
    with pytest.raises(NsmError) as caught:
        NsmDevice(device_path, ioctl=kernel).process(bytes(NSM_REQUEST_MAX_SIZE + 1))
    assert caught.value.code == "InputTooLarge"
    assert kernel.calls == []


def test_accepts_request_of_exactly_4096_bytes(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: encode_response(LockPcrResponse()))
    NsmDevice(device_path, ioctl=kernel).process(bytes(NSM_REQUEST_MAX_SIZE))
    assert len(kernel.requests[0]) == NSM_REQUEST_MAX_SIZE


def test_rejects_response_length_beyond_the_buffer(device_path: str) -> None:
    # The driver truncates a response that does not fit and reports its real length.
    kernel = FakeKernel(lambda _request: bytes(16), reported_length=NSM_RESPONSE_MAX_SIZE + 1)
    with pytest.raises(NsmError) as caught:
        NsmDevice(device_path, ioctl=kernel).process(b"\x00")
    assert caught.value.code == "BufferTooSmall"


def test_rejects_empty_response(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: b"", reported_length=0)
    with pytest.raises(NsmError) as caught:
        NsmDevice(device_path, ioctl=kernel).process(b"\x00")
    assert caught.value.code == "InvalidResponse"


def test_maps_emsgsize_to_input_too_large(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: b"", fail_errno=errno.EMSGSIZE)
    with pytest.raises(NsmError) as caught:
        NsmDevice(device_path, ioctl=kernel).process(b"\x00")
    assert caught.value.code == "InputTooLarge"
    assert not isinstance(caught.value, NsmTransportError)


def test_maps_other_ioctl_failures_to_transport_error(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: b"", fail_errno=errno.EIO)
    with pytest.raises(NsmTransportError):
        NsmDevice(device_path, ioctl=kernel).process(b"\x00")


def test_nonzero_ioctl_status_is_transport_error(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: encode_response(LockPcrResponse()), status=1)
    with pytest.raises(NsmTransportError):
        NsmDevice(device_path, ioctl=kernel).process(b"\x00")


def test_missing_device_is_transport_error_at_first_request(tmp_path: Path) -> None:
    device = NsmDevice(str(tmp_path / "absent"), ioctl=FakeKernel(lambda _request: b""))
    with pytest.raises(NsmTransportError, match="cannot open"):
        device.process(b"\x00")


def test_real_ioctl_call_reaches_the_kernel_and_maps_its_refusal() -> None:
    # /dev/null is not the NSM: the kernel answers ENOTTY, proving fcntl accepted our struct.
    with pytest.raises(NsmTransportError, match="ioctl failed") as caught:
        NsmDevice("/dev/null").process(encode_request(GetRandomRequest()))
    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOTTY


def _descriptor_of(device: NsmDevice) -> int | None:
    return device._fd


def test_device_opens_lazily_and_closes(device_path: str) -> None:
    kernel = FakeKernel(lambda _request: encode_response(LockPcrResponse()))
    device = NsmDevice(device_path, ioctl=kernel)
    assert _descriptor_of(device) is None
    with device:
        device.process(b"\x00")
        fd = _descriptor_of(device)
        assert fd is not None
        os.fstat(fd)
    assert _descriptor_of(device) is None
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)
    device.close()  # idempotent


# -- real hardware --------------------------------------------------------------------------------


@pytest.mark.nitro
@pytest.mark.skipif(os.environ.get("NCI_NITRO") != "1", reason="needs /dev/nsm (set NCI_NITRO=1)")
def test_real_nsm_answers_describe_random_and_attestation() -> None:
    with NsmDevice() as device:
        client = NsmClient(device)
        description = client.describe_nsm()
        assert description.max_pcrs == 32
        assert description.digest == "SHA384"
        assert set(range(16)) <= set(description.locked_pcrs)
        assert len(client.get_random()) > 0
        assert len(client.describe_pcr(0).value) == 48
        document = client.attestation(nonce=os.urandom(32))
        assert document[0] == 0x84
