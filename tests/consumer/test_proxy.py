"""The OpenAI-compatible proxy: the unmodified `openai` client gets attested, encrypted answers."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import urllib3
from aiohttp import web

from consumer import AsyncClient
from consumer.errors import ConfigError
from consumer.proxy import (
    ProxyServer,
    _ApiError,
    check_listen_host,
    parse_chat_request,
    parse_listen,
)
from tests.consumer.fakeserver import (
    MODEL_ID,
    OTHER_MEASUREMENTS,
    FakeBridge,
    LoopThread,
    expect_yaml,
    tiny_png,
)

PNG_URL = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
Serve = Callable[[web.Application], str]


def start_proxy(
    loop_thread: LoopThread, url: str, bridge: FakeBridge, expect: Path, **options: object
) -> Iterator[str]:
    client = AsyncClient(url, expect=expect, trust_local_root=bridge.root_pem_path, timeout=10)
    server = ProxyServer(client, **options)  # type: ignore[arg-type]
    base = loop_thread.run(server.start())
    try:
        yield base
    finally:
        loop_thread.run(server.close())
        loop_thread.run(client.aclose())


@pytest.fixture
def proxy(
    loop_thread: LoopThread, url: str, bridge: FakeBridge, expect_file: Path
) -> Iterator[str]:
    yield from start_proxy(loop_thread, url, bridge, expect_file)


def openai_client(base: str, **options: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", **options)  # type: ignore[arg-type]


def question(*parts: dict[str, object]) -> list[dict[str, object]]:
    return [
        {"role": "system", "content": "You are a careful assistant."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "what shape is this"}, *parts],
        },
    ]


# --- It works ------------------------------------------------------------------------------------


def test_openai_client_streams_an_answer_about_a_png_data_url(
    proxy: str, bridge: FakeBridge
) -> None:
    client = openai_client(proxy)
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=question({"type": "image_url", "image_url": {"url": PNG_URL}}),  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=32,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "WHAT SHAPE IS THIS (1 image(s))"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens > 0
    assert all(c.model == MODEL_ID for c in chunks)
    received = bridge.received[0]
    assert received.prompt == "what shape is this"  # the user's words only
    assert received.images[0].data == tiny_png()
    assert received.params.stream
    assert received.params.max_tokens == 32


def test_openai_client_gets_a_whole_answer(proxy: str, bridge: FakeBridge) -> None:
    client = openai_client(proxy)
    completion = client.chat.completions.create(
        model=MODEL_ID,
        messages=question({"type": "image_url", "image_url": {"url": PNG_URL}}),  # type: ignore[arg-type]
        temperature=0,
    )
    assert completion.choices[0].message.content == "WHAT SHAPE IS THIS (1 image(s))"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert bridge.received[0].params.temperature == 0.0
    assert bridge.hits.count("GET /v1/attestation") == 1


def test_lists_the_attested_model(proxy: str) -> None:
    client = openai_client(proxy)
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_re_attests_on_a_stale_key(proxy: str, bridge: FakeBridge) -> None:
    client = openai_client(proxy)
    client.chat.completions.create(model=MODEL_ID, messages=question())  # type: ignore[arg-type]
    bridge.knobs.rotate_key_on_infer = 1
    completion = client.chat.completions.create(model=MODEL_ID, messages=question())  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "WHAT SHAPE IS THIS (0 image(s))"
    assert bridge.hits.count("GET /v1/attestation") == 2


def test_re_attests_after_a_key_id_collision(proxy: str, bridge: FakeBridge) -> None:
    client = openai_client(proxy, max_retries=0)
    client.chat.completions.create(model=MODEL_ID, messages=question())  # type: ignore[arg-type]
    bridge.restart_with_same_key_id()  # the cached key id is known again, its key is not: 400
    completion = client.chat.completions.create(model=MODEL_ID, messages=question())  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "WHAT SHAPE IS THIS (0 image(s))"
    assert bridge.hits.count("GET /v1/attestation") == 2
    assert bridge.infer_count == 3


def test_proxy_client_refuses_expectations_that_pin_only_the_kernel(
    url: str, bridge: FakeBridge
) -> None:
    with pytest.raises(ConfigError, match="PCR8"):
        AsyncClient(url, expect={1: OTHER_MEASUREMENTS[1]}, trust_local_root=bridge.root_pem_path)


# --- Refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https", "file"])
def test_refuses_remote_image_urls(
    proxy: str, bridge: FakeBridge, serve: Serve, scheme: str
) -> None:
    fetched: list[str] = []

    async def image(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.Response(body=tiny_png(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/shape.png", image)
    origin = serve(app)
    url = f"{origin}/shape.png" if scheme == "http" else f"{scheme}://example.com/shape.png"
    client = openai_client(proxy)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL_ID,
            messages=question({"type": "image_url", "image_url": {"url": url}}),  # type: ignore[arg-type]
        )
    assert "never fetches" in str(caught.value)
    assert fetched == []
    assert bridge.infer_count == 0


def test_refuses_another_model(proxy: str, bridge: FakeBridge) -> None:
    with pytest.raises(openai.NotFoundError):
        openai_client(proxy).chat.completions.create(model="gpt-4o", messages=question())  # type: ignore[arg-type]
    assert bridge.infer_count == 0


def test_attestation_failure_is_an_openai_error_and_nothing_is_sent(
    loop_thread: LoopThread, url: str, bridge: FakeBridge, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(expect_yaml(OTHER_MEASUREMENTS))
    for base in start_proxy(loop_thread, url, bridge, other):
        with pytest.raises(openai.APIStatusError) as caught:
            openai_client(base).chat.completions.create(model=MODEL_ID, messages=question())  # type: ignore[arg-type]
        assert caught.value.status_code == 502
        body = caught.value.body
        assert isinstance(body, dict)
        assert (body["type"], body["code"]) == ("attestation_failed", "MeasurementMismatch")
        assert "PCRs match none" in body["message"]
    assert bridge.hits == ["GET /v1/attestation"]  # x-should-retry: false, and no inference
    assert bridge.infer_count == 0


def test_truncated_stream_raises_in_the_openai_client(proxy: str, bridge: FakeBridge) -> None:
    bridge.knobs.truncate = True
    stream = openai_client(proxy).chat.completions.create(
        model=MODEL_ID,
        messages=question(),  # type: ignore[arg-type]
        stream=True,
    )
    with pytest.raises(openai.APIError, match="final chunk"):
        list(stream)


def test_bridge_busy_is_a_rate_limit_error(proxy: str, bridge: FakeBridge) -> None:
    bridge.knobs.infer_status = 429
    with pytest.raises(openai.RateLimitError):
        openai_client(proxy, max_retries=0).chat.completions.create(
            model=MODEL_ID,
            messages=question(),  # type: ignore[arg-type]
        )


def test_refuses_a_foreign_host_header_a_non_json_body_and_an_oversized_body(
    loop_thread: LoopThread, url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    http = urllib3.PoolManager(retries=False)
    for base in start_proxy(loop_thread, url, bridge, expect_file, max_body=4096):
        endpoint = f"{base}/v1/chat/completions"
        body = json.dumps({"model": MODEL_ID, "messages": question()}).encode()
        rebound = http.request(
            "POST",
            endpoint,
            body=body,
            headers={"Host": "attacker.example", "Content-Type": "application/json"},
        )
        assert rebound.status == 403
        as_form = http.request("POST", endpoint, body=body, headers={"Content-Type": "text/plain"})
        assert as_form.status == 415
        huge = http.request(
            "POST",
            endpoint,
            body=b'{"messages": "' + b"x" * 8192 + b'"}',
            headers={"Content-Type": "application/json"},
        )
        assert huge.status == 413
        assert json.loads(huge.data)["error"]["type"] == "invalid_request_error"
    assert bridge.hits == []


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "::", "example.com"])
def test_refuses_to_listen_beyond_loopback(
    host: str, bridge: FakeBridge, expect_file: Path
) -> None:
    client = AsyncClient("http://127.0.0.1:1", expect=expect_file)
    with pytest.raises(ConfigError, match="loopback"):
        ProxyServer(client, host=host)
    check_listen_host(host, allow_remote=True)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_listens_on_loopback(host: str) -> None:
    check_listen_host(host, allow_remote=False)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8000", "127.0.0.1", "127.0.0.1:x", "127.0.0.1:70000", ":80"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


# --- The chat request, unit by unit ---------------------------------------------------------------


def test_the_prompt_is_the_user_messages_text() -> None:
    chat = parse_chat_request(
        {
            "model": MODEL_ID,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": None},
                {"role": "user", "content": [{"type": "text", "text": "second"}]},
            ],
            "max_completion_tokens": 7,
            "stop": "END",
            "n": 1,
        }
    )
    assert chat.request.prompt == "first\nsecond"
    assert chat.request.params.max_tokens == 7
    assert chat.request.params.stop == ("END",)
    assert not chat.stream


HOSTILE_CHATS: dict[str, dict[str, object]] = {
    "no messages": {"messages": []},
    "messages not a list": {"messages": "hi"},
    "unknown role": {"messages": [{"role": "root", "content": "hi"}]},
    "only a system message": {"messages": [{"role": "system", "content": "hi"}]},
    "audio part": {
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    },
    "gif data url": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lG"}}
                ],
            }
        ]
    },
    "not base64": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}
                ],
            }
        ]
    },
    "a jpeg that is a png": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": PNG_URL.replace("png", "jpeg", 1)}}
                ],
            }
        ]
    },
    "five images": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": PNG_URL}}] * 5,
            }
        ]
    },
    "two choices": {"messages": [{"role": "user", "content": "hi"}], "n": 2},
    "tools": {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
    "json mode": {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_object"},
    },
    "too many tokens": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000},
    "temperature as text": {"messages": [{"role": "user", "content": "hi"}], "temperature": "0"},
    "stream as text": {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"},
    "prompt too long": {"messages": [{"role": "user", "content": "x" * 20000}]},
}


@pytest.mark.parametrize("body", HOSTILE_CHATS.values(), ids=HOSTILE_CHATS.keys())
def test_rejects_hostile_chat_requests(body: dict[str, object]) -> None:
    with pytest.raises(_ApiError) as caught:
        parse_chat_request(body)
    assert caught.value.status == 400
