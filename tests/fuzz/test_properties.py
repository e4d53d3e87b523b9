"""Hostile input everywhere: one property per fuzz target (tests/fuzz/targets.py), named after the
attack. Each feeds its target arbitrary bytes and mutated seeds and asserts that it accepts the
input or raises only its own typed error; the targets' own checks (split-invariance of the chunked
readers, the agreement of the two frame readers, no plaintext left behind by a refused chunk) come
along. ``python -m tests.fuzz`` runs the same targets for longer (docs/fuzzing.md).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz import seeds
from tests.fuzz.mutate import mutate
from tests.fuzz.runner import run_target
from tests.fuzz.targets import TARGETS, Target, split

_COVERED: set[str] = set()

# (max_examples, deadline in ms): generous deadlines, as the machine is shared
FAST: Final = (60, 1000)
MEDIUM: Final = (30, 3000)
SLOW: Final = (12, 5000)


def _inputs(name: str) -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, the seeds themselves, and seeds through the fuzzer's mutator."""

    def from_seeds() -> st.SearchStrategy[bytes]:
        target = TARGETS[name]
        corpus = [bytes(s) for s in target.seeds()]
        for seed in corpus:  # imports and caches happen here, not inside a timed example
            target.test_one_input(seed)
        # at most 64 KiB: the long inputs that hunt for slow cases are the runner's business
        mutated = st.builds(
            lambda seed, rng: mutate(seed, rng, corpus, max_size=min(target.max_size, 1 << 16)),
            st.sampled_from(corpus),
            st.randoms(use_true_random=False),
        )
        return st.sampled_from(corpus) | mutated

    return st.binary(max_size=512) | st.deferred(from_seeds)


def _fuzz(name: str, profile: tuple[int, int]) -> Callable[[Callable[[bytes], None]], object]:
    _COVERED.add(name)
    examples, deadline = profile

    def decorate(test: Callable[[bytes], None]) -> object:
        return settings(
            max_examples=examples,
            deadline=deadline,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )(given(_inputs(name))(test))

    return decorate


def _only_typed_errors(name: str, data: bytes) -> None:
    """Accepted, or refused with one of the target's own errors; anything else fails the test."""
    TARGETS[name].test_one_input(data)


# --- Attestation documents ------------------------------------------------------------------------


@_fuzz("attestation_document", FAST)
def test_arbitrary_bytes_as_an_attestation_document_raise_only_malformed_document(
    data: bytes,
) -> None:
    _only_typed_errors("attestation_document", data)


@_fuzz("attestation_verify", SLOW)
def test_mutated_nitro_documents_fail_verification_only_with_attestation_errors(
    data: bytes,
) -> None:
    _only_typed_errors("attestation_verify", data)


@_fuzz("attestation_audit", MEDIUM)
def test_the_auditors_report_never_raises_on_a_hostile_document(data: bytes) -> None:
    _only_typed_errors("attestation_audit", data)


# --- Frames and control payloads ------------------------------------------------------------------


@_fuzz("frame_header", FAST)
def test_arbitrary_bytes_as_a_frame_header_raise_only_frame_error(data: bytes) -> None:
    _only_typed_errors("frame_header", data)


@_fuzz("frame_stream", MEDIUM)
def test_a_hostile_frame_stream_gives_both_readers_the_same_frames_or_typed_errors(
    data: bytes,
) -> None:
    _only_typed_errors("frame_stream", data)


@_fuzz("frame_error_payload", FAST)
def test_a_hostile_error_payload_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("frame_error_payload", data)


@_fuzz("frame_bundle_request", FAST)
def test_a_hostile_bundle_request_payload_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("frame_bundle_request", data)


@_fuzz("frame_bundle_chunk", FAST)
def test_a_hostile_bundle_chunk_payload_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("frame_bundle_chunk", data)


@_fuzz("frame_bundle_end", FAST)
def test_a_hostile_bundle_end_payload_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("frame_bundle_end", data)


@_fuzz("control_health", FAST)
def test_a_forged_health_pong_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("control_health", data)


@_fuzz("control_credentials", FAST)
def test_forged_credentials_raise_only_frame_error(data: bytes) -> None:
    _only_typed_errors("control_credentials", data)


@_fuzz("control_infer_request", FAST)
def test_a_hostile_infer_request_payload_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("control_infer_request", data)


@_fuzz("control_nonce", FAST)
def test_a_hostile_attestation_nonce_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("control_nonce", data)


@_fuzz("control_user_data", FAST)
def test_hostile_user_data_raises_only_frame_error(data: bytes) -> None:
    _only_typed_errors("control_user_data", data)


# --- Oblivious HTTP -------------------------------------------------------------------------------


@_fuzz("ohttp_key_config", FAST)
def test_a_hostile_key_configuration_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("ohttp_key_config", data)


@_fuzz("ohttp_key_configs", FAST)
def test_a_hostile_key_configuration_list_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("ohttp_key_configs", data)


@_fuzz("ohttp_request", MEDIUM)
def test_a_hostile_encapsulated_request_raises_only_ohttp_errors(data: bytes) -> None:
    _only_typed_errors("ohttp_request", data)


@_fuzz("ohttp_response", MEDIUM)
def test_a_hostile_encapsulated_response_raises_only_ohttp_errors(data: bytes) -> None:
    _only_typed_errors("ohttp_response", data)


@_fuzz("ohttp_chunked_request", MEDIUM)
def test_a_hostile_chunked_request_cut_anywhere_raises_the_same_ohttp_error(data: bytes) -> None:
    _only_typed_errors("ohttp_chunked_request", data)


@_fuzz("ohttp_chunked_response", MEDIUM)
def test_a_hostile_chunked_response_cut_anywhere_raises_the_same_ohttp_error(data: bytes) -> None:
    _only_typed_errors("ohttp_chunked_response", data)


@_fuzz("enclave_infer_request", MEDIUM)
def test_a_hostile_infer_request_through_the_enclave_path_raises_only_typed_errors(
    data: bytes,
) -> None:
    _only_typed_errors("enclave_infer_request", data)


# --- Binary HTTP and the inner CBOR ---------------------------------------------------------------


@_fuzz("bhttp_request", FAST)
def test_arbitrary_bytes_as_a_bhttp_request_raise_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("bhttp_request", data)


@_fuzz("bhttp_response", FAST)
def test_arbitrary_bytes_as_a_bhttp_response_raise_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("bhttp_response", data)


@_fuzz("inference_request_body", FAST)
def test_a_hostile_inference_request_body_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("inference_request_body", data)


@_fuzz("inference_http_request", FAST)
def test_a_hostile_decapsulated_request_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("inference_http_request", data)


@_fuzz("inference_response_body", FAST)
def test_a_hostile_inference_response_body_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("inference_response_body", data)


@_fuzz("inference_stream_piece", FAST)
def test_a_hostile_streamed_piece_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("inference_stream_piece", data)


@_fuzz("inference_http_response", FAST)
def test_a_hostile_decapsulated_response_raises_only_malformed_message(data: bytes) -> None:
    _only_typed_errors("inference_http_response", data)


# --- The sealed bundle ----------------------------------------------------------------------------


@_fuzz("bundle_manifest", FAST)
def test_a_hostile_manifest_raises_only_malformed_bundle(data: bytes) -> None:
    _only_typed_errors("bundle_manifest", data)


@_fuzz("bundle_chunk", FAST)
def test_a_tampered_chunk_raises_only_bundle_errors_and_leaves_no_plaintext(data: bytes) -> None:
    _only_typed_errors("bundle_chunk", data)


# --- Images, CMS, the consumer --------------------------------------------------------------------


@_fuzz("image_png", MEDIUM)
def test_a_hostile_png_raises_only_invalid_input(data: bytes) -> None:
    _only_typed_errors("image_png", data)


@_fuzz("image_jpeg", MEDIUM)
def test_a_hostile_jpeg_raises_only_invalid_input(data: bytes) -> None:
    _only_typed_errors("image_jpeg", data)


@_fuzz("keyrelease_envelope", MEDIUM)
def test_a_hostile_kms_envelope_raises_only_malformed_envelope(data: bytes) -> None:
    _only_typed_errors("keyrelease_envelope", data)


@_fuzz("consumer_user_data", FAST)
def test_hostile_user_data_is_refused_by_the_consumer_only_as_attestation_failed(
    data: bytes,
) -> None:
    _only_typed_errors("consumer_user_data", data)


@_fuzz("consumer_attestation", SLOW)
def test_hostile_user_data_in_a_signed_document_is_refused_only_as_attestation_failed(
    data: bytes,
) -> None:
    _only_typed_errors("consumer_attestation", data)


@_fuzz("consumer_response", MEDIUM)
def test_a_hostile_answer_is_refused_only_as_response_invalid(data: bytes) -> None:
    _only_typed_errors("consumer_response", data)


@_fuzz("consumer_stream", MEDIUM)
def test_a_hostile_streamed_answer_cut_anywhere_is_refused_only_as_response_invalid(
    data: bytes,
) -> None:
    _only_typed_errors("consumer_stream", data)


@_fuzz("consumer_error_answer", FAST)
def test_a_hostile_error_answer_from_the_bridge_never_raises(data: bytes) -> None:
    _only_typed_errors("consumer_error_answer", data)


# --- The harness itself ---------------------------------------------------------------------------


def test_every_target_has_a_property_test() -> None:
    assert set(TARGETS) == _COVERED


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_accepts_a_seed_and_raises_only_its_errors_on_the_others(name: str) -> None:
    target = TARGETS[name]
    accepted = 0
    for seed in target.seeds():
        try:
            target.function(seed)
            accepted += 1
        except target.allowed:
            pass
    assert accepted, f"{name}: no seed is accepted"


def test_the_runner_runs_seeds_then_mutations_and_finds_nothing_on_sound_parsers() -> None:
    for name in ("frame_header", "bhttp_request", "control_health"):
        result = run_target(name, TARGETS[name], cases=200, rng=random.Random(name), alarm=False)
        assert result.cases == 200
        assert result.typed + result.accepted == 200
        assert result.accepted >= len(TARGETS[name].seeds())
        assert not result.findings


def test_the_runner_reports_an_escaping_exception_and_a_slow_case() -> None:
    def parser(data: bytes) -> None:
        if data[:1] == b"\x00":
            raise ValueError("a crash")  # not the allowed type
        if data[:1] == b"\x01":
            busy = 0
            for i in range(2_000_000):  # about 0.1 s: slower than the limit below
                busy += i
        if len(data) > 3:
            raise KeyError(len(data))  # allowed

    target = Target(parser, (KeyError,), lambda: [b"\x00", b"\x01", b"\x02", b"abcd"], "a test")
    result = run_target("crashy", target, cases=4, rng=random.Random(0), time_limit=0.01)
    kinds = sorted(f.kind for f in result.findings)
    assert kinds == ["exception", "slow"]
    crash = next(f for f in result.findings if f.kind == "exception")
    assert crash.data == b"\x00"
    assert "ValueError: a crash" in crash.detail
    assert "test_properties.py" in crash.location
    assert (result.typed, result.accepted) == (1, 1)


def test_probes_sit_exactly_at_the_size_caps() -> None:
    from enclave.keyrelease import MAX_ENVELOPE_SIZE
    from protocol.inference import MAX_IMAGE_BYTES

    assert seeds.IMAGE_CAP == MAX_IMAGE_BYTES
    for probe in (*seeds.png_probes(), *seeds.jpeg_probes()):
        assert MAX_IMAGE_BYTES - 16 < len(probe) <= MAX_IMAGE_BYTES
    (envelope,) = seeds.envelope_probes()
    assert MAX_ENVELOPE_SIZE - 2 <= len(envelope) <= MAX_ENVELOPE_SIZE


def test_the_mutator_is_deterministic_and_bounded() -> None:
    seed = bytes(range(200))
    first = [mutate(seed, random.Random(n), [seed], max_size=256) for n in range(200)]
    again = [mutate(seed, random.Random(n), [seed], max_size=256) for n in range(200)]
    assert first == again
    assert all(len(m) <= 256 for m in first)
    assert len(set(first)) > 150


def test_split_cuts_the_stream_where_its_first_byte_says() -> None:
    stream, parts = split(b"\x07" + bytes(range(100)))
    assert stream == bytes(range(100))
    assert b"".join(parts) == stream
    assert split(b"\x07" + bytes(range(100))) == (stream, parts)
    assert split(b"") == (b"", [])
