"""The SDK against a fake bridge: it answers when everything verifies, and refuses every attack."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from consumer import AsyncClient, AsyncStream, Client, Completion, Stream
from consumer.errors import (
    AttestationFailed,
    ConfigError,
    InvalidRequest,
    ResponseInvalid,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    StaleKey,
    TransportError,
)
from tests.consumer.fakeserver import (
    MANIFEST_SHA256,
    MEASUREMENTS,
    MODEL_ID,
    OHTTP_KEY_PROBLEM,
    OTHER_MEASUREMENTS,
    FakeBridge,
    expect_yaml,
    tiny_png,
)

PROMPT = "what shape is this"
ANSWER = "WHAT SHAPE IS THIS (0 image(s))"

Serve = Callable[[web.Application], str]


def client(url: str, bridge: FakeBridge, expect: Path, **kwargs: object) -> Client:
    return Client(url, expect=expect, trust_local_root=bridge.root_pem_path, timeout=10, **kwargs)  # type: ignore[arg-type]


def ask(c: Client, stream: bool) -> Completion:
    """A whole completion, through a stream or one response."""
    return c.generate(PROMPT, stream=True).completion() if stream else c.generate(PROMPT)


# --- It works ------------------------------------------------------------------------------------


def test_verifies_and_answers_plain(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    with client(url, bridge, expect_file) as c:
        completion = c.generate(PROMPT, images=[("image/png", tiny_png())], max_tokens=16)
    assert completion.text == "WHAT SHAPE IS THIS (1 image(s))"
    assert completion.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 4
    assert bridge.received[0].images[0].data == tiny_png()
    assert bridge.received[0].params.max_tokens == 16
    attestation = completion.attestation
    assert (attestation.model_id, attestation.manifest_sha256) == (MODEL_ID, MANIFEST_SHA256)
    assert attestation.key_id == bridge.key_id
    assert not attestation.is_nitro_hardware
    assert dict(attestation.pcrs)[0] == MEASUREMENTS[0]
    assert bridge.hits == ["GET /v1/attestation", "POST /v1/infer"]


def test_verifies_and_answers_streamed(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    with client(url, bridge, expect_file) as c, c.generate(PROMPT, stream=True) as stream:
        assert isinstance(stream, Stream)
        pieces = list(stream)
        assert stream.finish_reason == "stop"
        assert stream.usage is not None
    assert len(pieces) == 6
    assert "".join(pieces) == ANSWER
    assert bridge.received[0].params.stream


def test_stream_yields_each_piece_as_it_arrives(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.hold = threading.Event()  # the enclave stops after its first piece
    with client(url, bridge, expect_file) as c, c.generate(PROMPT, stream=True) as stream:
        assert next(stream) == "WHAT"
        assert stream.finish_reason is None
        bridge.knobs.hold.set()
        assert "".join(stream) == ANSWER.removeprefix("WHAT")
        assert stream.finish_reason == "stop"


def test_stream_completion_collects_the_whole_answer(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    with client(url, bridge, expect_file) as c:
        completion = c.generate(PROMPT, stream=True).completion()
    assert isinstance(completion, Completion)
    assert completion.text == ANSWER


def test_reads_images_from_files(
    url: str, bridge: FakeBridge, expect_file: Path, tmp_path: Path
) -> None:
    image = tmp_path / "shape.png"
    image.write_bytes(tiny_png())
    with client(url, bridge, expect_file) as c:
        c.generate(PROMPT, images=[image, str(image)])
    assert [i.media_type for i in bridge.received[0].images] == ["image/png", "image/png"]


def test_caches_the_attestation_by_key_id(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    with client(url, bridge, expect_file) as c:
        c.generate(PROMPT)
        c.generate(PROMPT, stream=True).completion()
        assert c.cached_attestation(bridge.key_id) is not None
    assert bridge.hits.count("GET /v1/attestation") == 1
    assert bridge.infer_count == 2


def test_attests_again_once_the_cached_document_is_older_than_max_age(
    tmp_path: Path, serve: Serve, expect_file: Path
) -> None:
    now = [datetime.now(UTC)]
    bridge = FakeBridge(tmp_path / "state", clock=lambda: now[0])
    url = serve(bridge.app())
    with client(url, bridge, expect_file, clock=lambda: now[0]) as c:
        first = c.generate(PROMPT).attestation
        now[0] += timedelta(minutes=6)
        second = c.generate(PROMPT).attestation
    assert second.timestamp - first.timestamp >= timedelta(minutes=6)
    assert bridge.hits.count("GET /v1/attestation") == 2


def test_async_client_verifies_and_answers_both_modes(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    async def scenario() -> tuple[Completion, list[str], Completion]:
        async with AsyncClient(
            url, expect=expect_file, trust_local_root=bridge.root_pem_path, timeout=10
        ) as c:
            plain = await c.generate(PROMPT)
            stream = await c.generate(PROMPT, stream=True)
            assert isinstance(stream, AsyncStream)
            async with stream:
                pieces = [piece async for piece in stream]
            collected = await (await c.generate(PROMPT, stream=True)).completion()
            return plain, pieces, collected

    plain, pieces, collected = asyncio.run(scenario())
    assert plain.text == "".join(pieces) == collected.text == ANSWER
    assert bridge.hits.count("GET /v1/attestation") == 1


# --- Attestation attacks: nothing is sent --------------------------------------------------------


def test_refuses_to_send_to_an_enclave_with_other_measurements(
    url: str, bridge: FakeBridge, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(expect_yaml(OTHER_MEASUREMENTS))
    with client(url, bridge, other) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "MeasurementMismatch"
    assert bridge.infer_count == 0


def test_refuses_a_document_with_another_nonce(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.nonce = b"\x42" * 32
    with client(url, bridge, expect_file) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "NonceMismatch"
    assert bridge.infer_count == 0


def test_refuses_a_replayed_document(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    with client(url, bridge, expect_file) as c:
        genuine = c.attest().verified.document.raw
    bridge.knobs.replay_document = genuine  # fresh, authentic, for another consumer's nonce
    with client(url, bridge, expect_file) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "NonceMismatch"
    assert bridge.infer_count == 0


def test_refuses_a_document_older_than_max_age(
    tmp_path: Path, serve: Serve, expect_file: Path
) -> None:
    old = FakeBridge(tmp_path / "state", clock=lambda: datetime.now(UTC) - timedelta(minutes=10))
    url = serve(old.app())
    with client(url, old, expect_file) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "StaleDocument"
    assert old.infer_count == 0
    with client(url, old, expect_file, max_age=timedelta(minutes=15)) as c:
        assert c.generate(PROMPT).text == ANSWER


def test_refuses_a_debug_mode_document(nsm_state: Path, serve: Serve, expect_file: Path) -> None:
    debug = FakeBridge(nsm_state, debug_mode=True)
    url = serve(debug.app())
    with client(url, debug, expect_file) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "DebugModeDocument"
    assert debug.infer_count == 0


def test_refuses_a_key_config_not_bound_to_the_document(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.public_key = bytes(32)  # the document names another key than user_data's
    with client(url, bridge, expect_file) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == "KeyBindingMismatch"
    assert bridge.infer_count == 0


def test_refuses_an_emulator_document_unless_its_root_is_named(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    with (
        Client(url, expect=expect_file, timeout=10) as c,
        pytest.raises(AttestationFailed) as caught,
    ):
        c.generate(PROMPT)
    assert caught.value.reason == "ChainInvalid"
    assert bridge.infer_count == 0


def test_refuses_to_start_with_expectations_that_pin_only_the_kernel(
    url: str, bridge: FakeBridge, tmp_path: Path
) -> None:
    # /tmp/review/pcr_partial.py: PCR1 is the same for every image one nitro-cli builds, so an
    # enclave running another image (OTHER_MEASUREMENTS: PCR0 differs) would match it
    kernel_only = tmp_path / "kernel.yaml"
    kernel_only.write_text(expect_yaml({1: OTHER_MEASUREMENTS[1]}))
    with pytest.raises(ConfigError, match=r"PCR0 \(the whole enclave image\) or PCR8"):
        client(url, bridge, kernel_only)
    parent_only = {3: b"\x33" * 48, 4: b"\x44" * 48}
    with pytest.raises(ConfigError, match="pins only PCR3, PCR4"):
        AsyncClient(url, expect=parent_only, trust_local_root=bridge.root_pem_path)
    assert bridge.hits == []


@pytest.mark.parametrize(
    ("pin", "reason"),
    [
        ({"expect_model_id": "another-model"}, "ModelMismatch"),
        ({"expect_manifest_sha256": bytes(32)}, "ManifestMismatch"),
        ({"expect_manifest_sha256": "00" * 32}, "ManifestMismatch"),
    ],
    ids=["model", "manifest", "manifest as hex"],
)
def test_refuses_an_enclave_serving_another_model_or_bundle(
    url: str, bridge: FakeBridge, expect_file: Path, pin: dict[str, object], reason: str
) -> None:
    with client(url, bridge, expect_file, **pin) as c, pytest.raises(AttestationFailed) as caught:
        c.generate(PROMPT)
    assert caught.value.reason == reason

    async def scenario() -> None:
        async with AsyncClient(
            url, expect=expect_file, trust_local_root=bridge.root_pem_path, timeout=10, **pin
        ) as c:
            await c.generate(PROMPT)

    with pytest.raises(AttestationFailed) as caught:
        asyncio.run(scenario())
    assert caught.value.reason == reason
    assert bridge.infer_count == 0


def test_answers_when_the_pinned_model_and_bundle_match(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    pins = {"expect_model_id": MODEL_ID, "expect_manifest_sha256": MANIFEST_SHA256}
    with client(url, bridge, expect_file, **pins) as c:
        completion = c.generate(PROMPT)
    assert completion.text == ANSWER
    assert completion.attestation.model_pinned
    assert completion.attestation.manifest_pinned


@pytest.mark.parametrize(
    "pin",
    [
        {"expect_model_id": ""},
        {"expect_manifest_sha256": b"short"},
        {"expect_manifest_sha256": "xy"},
    ],
    ids=["empty model", "short digest", "not hex"],
)
def test_refuses_to_start_with_an_unusable_pin(expect_file: Path, pin: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        Client("http://127.0.0.1:1", expect=expect_file, **pin)  # type: ignore[arg-type]


# --- Key rotation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_stale_key_attests_again_then_succeeds(
    url: str, bridge: FakeBridge, expect_file: Path, stream: bool
) -> None:
    with client(url, bridge, expect_file) as c:
        first = c.attest()
        bridge.knobs.rotate_key_on_infer = 1  # the enclave restarted with a new key
        completion = ask(c, stream)
        assert c.cached_attestation(first.key_id) is None
    assert completion.text == ANSWER
    assert completion.attestation.key_id == bridge.key_id != first.key_id
    assert bridge.hits == ["GET /v1/attestation", "POST /v1/infer"] * 2


def test_stale_key_after_attesting_again_is_raised(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.rotate_key_on_infer = 2
    with client(url, bridge, expect_file) as c, pytest.raises(StaleKey) as caught:
        c.generate(PROMPT)
    assert caught.value.status == 422
    assert caught.value.problem["type"] == OHTTP_KEY_PROBLEM
    assert bridge.hits.count("GET /v1/attestation") == 2


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_key_id_collision_after_an_enclave_restart_re_attests_once(
    url: str, bridge: FakeBridge, expect_file: Path, stream: bool
) -> None:
    with client(url, bridge, expect_file) as c:
        first = c.attest()
        bridge.restart_with_same_key_id()  # cached key id still known; its key is gone: 400
        completion = ask(c, stream)
        assert c.cached_attestation(first.key_id) is completion.attestation
        ask(c, stream)  # the new attestation is cached and used
    assert completion.text == ANSWER
    assert completion.attestation.key_id == first.key_id
    assert completion.attestation.key_config == bridge.key_config != first.key_config
    assert bridge.hits == ["GET /v1/attestation", "POST /v1/infer"] * 2 + ["POST /v1/infer"]


def test_key_id_collision_failing_again_after_attesting_is_raised(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    with client(url, bridge, expect_file) as c:
        c.attest()
        bridge.knobs.infer_status = 400
        with pytest.raises(ServerError) as caught:
            c.generate(PROMPT)
    assert caught.value.status == 400
    assert bridge.hits == ["GET /v1/attestation", "POST /v1/infer"] * 2


def test_malformed_answer_under_a_fresh_attestation_is_not_retried(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.infer_status = 400  # the attestation was made for this request: no key mix-up
    with client(url, bridge, expect_file) as c, pytest.raises(ServerError) as caught:
        c.generate(PROMPT)
    assert caught.value.status == 400
    assert bridge.hits == ["GET /v1/attestation", "POST /v1/infer"]


def test_key_id_collision_after_an_enclave_restart_async(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    async def scenario() -> tuple[str, int]:
        async with AsyncClient(
            url, expect=expect_file, trust_local_root=bridge.root_pem_path, timeout=10
        ) as c:
            await c.attest()
            bridge.restart_with_same_key_id()
            stream = await c.generate(PROMPT, stream=True)
            text = (await stream.completion()).text
            bridge.restart_with_same_key_id()
            bridge.knobs.infer_status = 400  # and this time it fails again after re-attesting
            with pytest.raises(ServerError) as caught:
                await c.generate(PROMPT)
            return text, caught.value.status

    assert asyncio.run(scenario()) == (ANSWER, 400)
    attest_then_infer = ["GET /v1/attestation", "POST /v1/infer"]
    assert bridge.hits == attest_then_infer * 2 + ["POST /v1/infer"] + attest_then_infer


# --- Padding: the parent sees size classes, not lengths -------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_request_length_does_not_reveal_the_prompt_length(
    url: str, bridge: FakeBridge, expect_file: Path, stream: bool
) -> None:
    prompts = ["hi", "what shape is this " * 15, "what shape is this " * 30]
    with client(url, bridge, expect_file) as c:
        for prompt in prompts:
            c.generate(prompt, stream=True).completion() if stream else c.generate(prompt)
    short, long, longer = bridge.request_sizes
    assert short == long  # 2 and 285 characters: one size class (512 bytes of BHTTP)
    assert longer > long  # 570 characters: the next class
    assert [r.prompt for r in bridge.received] == prompts  # the enclave's decoder took the zeros


def test_request_length_does_not_reveal_the_image_size(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    png = tiny_png()
    images = [("image/png", png), ("image/png", png + bytes(250)), ("image/png", png + bytes(700))]
    with client(url, bridge, expect_file) as c:
        for image in images:
            c.generate(PROMPT, images=[image])
    small, larger, largest = bridge.request_sizes
    assert small == larger  # 250 bytes more, one size class
    assert largest > larger
    assert [r.images[0].data for r in bridge.received] == [data for _, data in images]


def test_opens_padded_responses(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    with client(url, bridge, expect_file) as c:
        texts = [c.generate(p).text for p in ("hi", "what shape is this " * 5)]
    assert texts[0] == "HI (0 image(s))"
    assert len(texts[1]) > 4 * len(texts[0])
    assert bridge.response_sizes[0] == bridge.response_sizes[1]  # one size class on the wire


# --- Response attacks: nothing unauthenticated is returned ----------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_rejects_a_response_sealed_for_another_request(
    url: str, bridge: FakeBridge, expect_file: Path, stream: bool
) -> None:
    bridge.knobs.swap_context = True
    with client(url, bridge, expect_file) as c, pytest.raises(ResponseInvalid):
        ask(c, stream)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_rejects_a_tampered_response_byte(
    url: str, bridge: FakeBridge, expect_file: Path, stream: bool
) -> None:
    bridge.knobs.tamper = True
    with client(url, bridge, expect_file) as c, pytest.raises(ResponseInvalid):
        ask(c, stream)


@pytest.mark.parametrize("knob", ["truncate", "abort"])
def test_truncated_stream_is_an_error_not_a_complete_answer(
    url: str, bridge: FakeBridge, expect_file: Path, knob: str
) -> None:
    setattr(bridge.knobs, knob, True)
    received: list[str] = []
    with client(url, bridge, expect_file) as c:
        stream = c.generate(PROMPT, stream=True)
        with pytest.raises(ResponseInvalid):
            received.extend(stream)
        assert stream.finish_reason is None
        # what arrived was shown as it came, but the answer is never taken as complete
        assert 0 < len(received) <= 6
        with pytest.raises(ResponseInvalid):
            c.generate(PROMPT, stream=True).completion()


def test_truncated_stream_is_an_error_for_the_async_client(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.truncate = True

    async def scenario() -> None:
        async with AsyncClient(
            url, expect=expect_file, trust_local_root=bridge.root_pem_path, timeout=10
        ) as c:
            stream = await c.generate(PROMPT, stream=True)
            await stream.completion()

    with pytest.raises(ResponseInvalid):
        asyncio.run(scenario())


def test_rejects_the_end_piece_in_a_non_final_chunk(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.end_early = True
    with client(url, bridge, expect_file) as c, pytest.raises(ResponseInvalid, match="non-final"):
        list(c.generate(PROMPT, stream=True))


def test_rejects_a_response_of_the_wrong_media_type(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.content_type = "application/json"
    with client(url, bridge, expect_file) as c, pytest.raises(ResponseInvalid, match="content"):
        c.generate(PROMPT)


# --- Server and transport errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, ServerBusy),
        (503, ServerUnavailable),
        (500, ServerError),
        (413, ServerError),
        (400, ServerError),
    ],
)
def test_server_errors_are_typed(
    url: str, bridge: FakeBridge, expect_file: Path, status: int, error: type[ServerError]
) -> None:
    bridge.knobs.infer_status = status
    bridge.knobs.retry_after = "3"
    with client(url, bridge, expect_file) as c, pytest.raises(error) as caught:
        c.generate(PROMPT)
    assert type(caught.value) is error
    assert caught.value.status == status
    assert caught.value.retry_after == 3.0
    assert caught.value.problem["title"] == f"fake error {status}"


def test_attestation_unavailable_is_typed(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    bridge.knobs.attestation_status = 503
    with client(url, bridge, expect_file) as c, pytest.raises(ServerUnavailable):
        c.attest()


def test_nothing_listening_is_a_transport_error(bridge: FakeBridge, expect_file: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with (
        client(f"http://127.0.0.1:{port}", bridge, expect_file) as c,
        pytest.raises(TransportError),
    ):
        c.attest()


def test_invalid_requests_are_refused_before_anything_is_sent(
    url: str, bridge: FakeBridge, expect_file: Path, tmp_path: Path
) -> None:
    text = tmp_path / "not-an-image.txt"
    text.write_text("hello")
    with client(url, bridge, expect_file) as c:
        for bad in (
            lambda: c.generate("x" * 20000),
            lambda: c.generate(PROMPT, images=[text]),
            lambda: c.generate(PROMPT, images=[tmp_path / "missing.png"]),
            lambda: c.generate(PROMPT, images=[("image/gif", b"GIF89a")]),
            lambda: c.generate(PROMPT, max_tokens=0),
            lambda: c.generate(PROMPT, temperature=3.0),
        ):
            with pytest.raises(InvalidRequest):
                bad()
    assert bridge.hits == []


@pytest.mark.parametrize(
    "bad_url", ["ftp://host/", "http://", "http://host/?q=1", "http://user:pw@host/", 42]
)
def test_refuses_a_bad_url(bad_url: object, expect_file: Path) -> None:
    with pytest.raises(ConfigError):
        Client(bad_url, expect=expect_file)  # type: ignore[arg-type]


def test_refuses_to_start_without_usable_expectations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        Client("http://127.0.0.1:1", expect=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError):
        Client("http://127.0.0.1:1", expect={0: b"short"})
    with pytest.raises(ConfigError):
        Client("http://127.0.0.1:1", expect=MEASUREMENTS, max_age=timedelta(0))
