"""An OpenAI-compatible proxy on loopback that attests and encrypts transparently.

Unmodified OpenAI clients talk plain HTTP to the proxy on the consumer's own machine; the proxy
talks only Oblivious HTTP to the bridge, through an :class:`~consumer.client.AsyncClient`, so every
request is encrypted to an attested enclave (cached attestation, re-attested when the key changes
or the document is older than ``max_age``) and every answer authenticates under its own request's
key. Nothing leaves the machine in clear.

Routes (the subset of the OpenAI API the enclave can answer):

- ``GET /v1/models``, ``GET /v1/models/{id}``: the attested model id;
- ``POST /v1/chat/completions``: ``messages`` with text and ``image_url`` content parts. The
  prompt is the text of the user messages, joined by newlines (other roles are not sent: the
  enclave's model takes one question and its images). Images must be ``data:image/png;base64,…``
  or ``data:image/jpeg;base64,…`` URLs: the proxy never fetches a URL. ``stream: true`` answers
  with Server-Sent Events in the ``chat.completion.chunk`` shape ending with ``data: [DONE]``;
  otherwise one ``chat.completion`` object with ``usage``.

Errors use the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``. A stream
that fails after it started ends with an ``error`` event and no ``[DONE]``, which OpenAI clients
raise as an error: a truncated or altered answer is never passed off as complete.

Only loopback addresses are served unless ``allow_remote``; then any host on the network can use
the proxy (and the enclave) as the consumer. Requests must be JSON (``Content-Type:
application/json``) and, without ``allow_remote``, name a loopback ``Host``: a web page cannot
drive the proxy through the browser.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

from aiohttp import web

from consumer.attest import Attestation
from consumer.client import AsyncClient, AsyncStream, Completion
from consumer.errors import (
    AttestationFailed,
    ConfigError,
    ConsumerError,
    InvalidRequest,
    ResponseInvalid,
    ServerBusy,
    ServerError,
    ServerUnavailable,
    StaleKey,
    TransportError,
)
from protocol.errors import OhttpError
from protocol.inference import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES,
    MAX_TOKENS,
    Image,
    InferenceRequest,
    Params,
)

__all__ = [
    "MAX_BODY",
    "ChatRequest",
    "ProxyServer",
    "check_listen_host",
    "create_app",
    "parse_chat_request",
    "parse_listen",
]

log = logging.getLogger(__name__)

# Four 4 MiB images in base64 (4/3) plus the text and the JSON around it.
MAX_BODY: Final = 24 * 1024 * 1024
MAX_MESSAGES: Final = 256
_MAX_DATA_URL: Final = 4 * ((MAX_IMAGE_BYTES + 2) // 3) + 64
_MEDIA_TYPES: Final = {
    "image/png": "image/png",
    "image/jpeg": "image/jpeg",
    "image/jpg": "image/jpeg",
}
_ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_UNSUPPORTED: Final = ("tools", "functions", "tool_choice", "function_call", "audio")
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost."})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _ApiError(Exception):
    """An answer in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        retry: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.retry = retry
        self.retry_after = retry_after

    def body(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        headers: dict[str, str] = {}
        if self.retry is not None:  # the OpenAI clients honour it instead of guessing
            headers["x-should-retry"] = "true" if self.retry else "false"
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(int(self.retry_after), 0))
        return web.json_response(self.body(), status=self.status, headers=headers)


def _bad(message: str, *, param: str | None = None, code: str | None = None) -> _ApiError:
    return _ApiError(400, message, param=param, code=code, retry=False)


# --- The request: OpenAI chat JSON → an inference request (pure) ---------------------------------


@dataclass(frozen=True)
class ChatRequest:
    """What the proxy takes from a chat completion request."""

    model: str | None
    request: InferenceRequest
    include_usage: bool

    @property
    def stream(self) -> bool:
        return self.request.params.stream


def parse_chat_request(body: object) -> ChatRequest:
    """Read an OpenAI chat completion request (``body`` is the decoded JSON from the local
    caller). Raises ``_ApiError`` (400) naming the field; never quotes content."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    for name in _UNSUPPORTED:
        if body.get(name) not in (None, [], {}):
            raise _bad(f"{name} is not supported by this model", param=name)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model must be a string", param="model")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):
        raise _bad("only n = 1 is supported", param="n")
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise _bad("only the text response format is supported", param="response_format")
    if body.get("logprobs"):
        raise _bad("logprobs are not supported", param="logprobs")
    prompt, images = _prompt(body.get("messages"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("stream must be true or false", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("stream_options must be an object", param="stream_options")
        include_usage = options.get("include_usage") is True
    try:
        params = Params(
            max_tokens=_max_tokens(body),
            temperature=_number(body, "temperature", Params.temperature),
            top_p=_number(body, "top_p", Params.top_p),
            stop=_stop(body.get("stop")),
            stream=stream,
        )
        request = InferenceRequest(prompt=prompt, images=tuple(images), params=params)
    except OhttpError as exc:
        raise _bad(str(exc)) from None
    return ChatRequest(model=model, request=request, include_usage=include_usage)


def _max_tokens(body: Mapping[str, object]) -> int:
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= MAX_TOKENS:
            raise _bad(f"{name} must be an integer in 1..{MAX_TOKENS}", param=name)
        return value
    return Params.max_tokens


def _number(body: Mapping[str, object], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"{name} must be a number", param=name)
    return float(value)


def _stop(value: object) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise _bad("stop must be a string or a list of strings", param="stop")


def _prompt(messages: object) -> tuple[str, list[Image]]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise _bad(f"at most {MAX_MESSAGES} messages", param="messages")
    texts: list[str] = []
    images: list[Image] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise _bad(f"{where}.role is not a known role", param=f"{where}.role")
        if role != "user":
            continue  # the enclave's model takes one question: only the user's words are sent
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of parts", param=where)
        for j, part in enumerate(content):
            text, image = _part(part, f"{where}.content[{j}]")
            if text is not None:
                texts.append(text)
            if image is not None:
                if len(images) == MAX_IMAGES:
                    raise _bad(f"at most {MAX_IMAGES} images", param="messages")
                images.append(image)
    if not texts and not images:
        raise _bad("no user message with text or an image", param="messages")
    return "\n".join(texts), images


def _part(part: object, where: str) -> tuple[str | None, Image | None]:
    if not isinstance(part, dict):
        raise _bad(f"{where} must be an object", param=where)
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise _bad(f"{where}.text must be a string", param=where)
        return text, None
    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise _bad(f"{where}.image_url.url must be a string", param=where)
        return None, _data_url_image(url, where)
    raise _bad(f"{where}: content parts of type {str(kind)[:32]!r} are not supported", param=where)


def _data_url_image(url: str, where: str) -> Image:
    """An image from a ``data:`` URL (RFC 2397). The proxy never fetches: other URLs are refused,
    so no request leaves the machine outside the encrypted channel."""
    scheme = url[:16].split(":", 1)[0].lower() if ":" in url[:16] else ""
    if scheme != "data":
        raise _bad(
            f"{where}: the proxy never fetches image URLs ({scheme or 'no'} scheme); pass the "
            "image inline as a data:image/png;base64,… or data:image/jpeg;base64,… URL",
            param=where,
            code="image_url_not_data",
        )
    if len(url) > _MAX_DATA_URL:
        raise _bad(f"{where}: the image is larger than {MAX_IMAGE_BYTES} bytes", param=where)
    header, comma, payload = url[5:].partition(",")
    fields = [f.strip().lower() for f in header.split(";")]
    if not comma or fields[-1] != "base64" or fields[0] not in _MEDIA_TYPES:
        raise _bad(
            f"{where}: expected data:image/png;base64,… or data:image/jpeg;base64,…",
            param=where,
        )
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
        return Image(_MEDIA_TYPES[fields[0]], data)  # type: ignore[arg-type]  # a MediaType
    except (binascii.Error, ValueError):
        raise _bad(f"{where}: the image data is not valid base64", param=where) from None
    except OhttpError as exc:
        raise _bad(f"{where}: {exc}", param=where) from None


# --- The answers ---------------------------------------------------------------------------------


def _usage(completion_tokens: int, prompt_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _attestation_headers(attestation: Attestation) -> dict[str, str]:
    return {
        "X-NCI-Model": attestation.model_id,
        "X-NCI-Key-Id": str(attestation.key_id),
        "X-NCI-Manifest-Sha256": attestation.manifest_sha256.hex(),
        "X-NCI-Nitro-Hardware": "true" if attestation.is_nitro_hardware else "false",
    }


def _completion_body(completion: Completion, completion_id: str, created: int) -> dict[str, object]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": completion.attestation.model_id,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": completion.text, "refusal": None},
                "finish_reason": completion.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(completion.usage.completion_tokens, completion.usage.prompt_tokens),
    }


def _sse(value: object) -> bytes:
    return b"data: " + json.dumps(value, separators=(",", ":")).encode() + b"\n\n"


async def _stream_answer(
    request: web.Request, chat: ChatRequest, stream: AsyncStream
) -> web.StreamResponse:
    completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    model = stream.attestation.model_id

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return _sse(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
        )

    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            **_attestation_headers(stream.attestation),
        }
    )
    async with stream:
        await response.prepare(request)
        await response.write(chunk({"role": "assistant", "content": ""}))
        try:
            async for piece in stream:
                await response.write(chunk({"content": piece}))
        except ConsumerError as exc:
            # After the status line, an error is an event: OpenAI clients raise on it. No [DONE].
            log.warning("stream refused: %s", type(exc).__name__)
            await response.write(_sse(_api_error(exc).body()))
            await response.write_eof()
            return response
        await response.write(chunk({}, stream.finish_reason))
        if chat.include_usage and stream.usage is not None:
            usage = _usage(stream.usage.completion_tokens, stream.usage.prompt_tokens)
            await response.write(
                _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    return response


def _api_error(exc: ConsumerError) -> _ApiError:
    """The OpenAI-shaped answer for a consumer error (messages carry no content)."""
    message = str(exc)
    if isinstance(exc, InvalidRequest):
        return _bad(message)
    if isinstance(exc, AttestationFailed):
        return _ApiError(502, message, kind="attestation_failed", code=exc.reason, retry=False)
    if isinstance(exc, ResponseInvalid):
        return _ApiError(502, message, kind="response_invalid", retry=False)
    if isinstance(exc, ServerBusy):
        return _ApiError(
            429, message, kind="rate_limit_error", code="busy", retry_after=exc.retry_after
        )
    if isinstance(exc, ServerUnavailable):
        return _ApiError(
            503, message, kind="service_unavailable", retry=True, retry_after=exc.retry_after
        )
    if isinstance(exc, StaleKey):
        return _ApiError(502, message, kind="upstream_error", code="stale_key", retry=True)
    if isinstance(exc, ServerError):
        if exc.status == 413:
            return _ApiError(413, message, code="too_large", retry=False)
        return _ApiError(502, message, kind="upstream_error", code=str(exc.status), retry=False)
    if isinstance(exc, TransportError):
        return _ApiError(502, message, kind="upstream_unreachable", retry=True)
    return _ApiError(500, "proxy misconfiguration", kind="server_error", retry=False)


# --- The application -----------------------------------------------------------------------------


def _host_is_loopback(host: str) -> bool:
    name = host.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def create_app(
    client: AsyncClient, *, allow_remote: bool = False, max_body: int = MAX_BODY
) -> web.Application:
    """The proxy's aiohttp application over ``client`` (which it does not close)."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if not allow_remote and not _host_is_loopback(request.url.host or ""):
                raise _ApiError(
                    403,
                    "the Host header must name a loopback address",
                    kind="permission_error",
                    retry=False,
                )
            return await handler(request)
        except _ApiError as exc:
            return exc.response()
        except ConsumerError as exc:
            log.warning("request refused: %s", type(exc).__name__)
            return _api_error(exc).response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            return _ApiError(exc.status, exc.reason, kind=kind, retry=False).response()
        except (ConnectionError, OSError):
            raise  # the local caller went away: nothing to answer
        except Exception as exc:  # noqa: BLE001  (the boundary: an OpenAI-shaped 500, no traceback)
            log.error("internal error: %s", type(exc).__name__)
            return _ApiError(500, "internal error", kind="server_error", retry=False).response()

    async def models(request: web.Request) -> web.StreamResponse:
        attestation = await client.attestation()
        return web.json_response(
            {"object": "list", "data": [_model(attestation)]},
            headers=_attestation_headers(attestation),
        )

    async def model(request: web.Request) -> web.StreamResponse:
        attestation = await client.attestation()
        if request.match_info["model"] != attestation.model_id:
            raise _not_this_model(attestation)
        return web.json_response(_model(attestation), headers=_attestation_headers(attestation))

    async def chat(request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            raise _ApiError(415, "the request body must be application/json", retry=False)
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):
            raise _bad("the request body is not valid JSON") from None
        parsed = parse_chat_request(body)
        attestation = await client.attestation()
        if parsed.model is not None and parsed.model != attestation.model_id:
            raise _not_this_model(attestation)
        answer = await client.send(parsed.request)
        if isinstance(answer, AsyncStream):
            return await _stream_answer(request, parsed, answer)
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        return web.json_response(
            _completion_body(answer, completion_id, created),
            headers=_attestation_headers(answer.attestation),
        )

    app = web.Application(client_max_size=max_body, middlewares=[errors])
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _model(attestation: Attestation) -> dict[str, object]:
    return {
        "id": attestation.model_id,
        "object": "model",
        "created": int(attestation.timestamp.timestamp()),
        "owned_by": "nci-enclave",
    }


def _not_this_model(attestation: Attestation) -> _ApiError:
    return _ApiError(
        404,
        f"the attested enclave serves the model {attestation.model_id!r} only",
        code="model_not_found",
        param="model",
        retry=False,
    )


# --- Serving -------------------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → ``(host, port)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def check_listen_host(host: str, *, allow_remote: bool) -> None:
    """Refuse to listen beyond loopback unless ``allow_remote``: the proxy speaks in clear."""
    if allow_remote:
        return
    if not _host_is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host}: the proxy serves plaintext prompts and answers, "
            "so it listens on loopback only (127.0.0.1, ::1) unless --allow-remote"
        )


class ProxyServer:
    """The proxy listening on ``host:port`` (``port`` 0 picks a free one); ``async with``."""

    def __init__(
        self,
        client: AsyncClient,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allow_remote: bool = False,
        max_body: int = MAX_BODY,
    ) -> None:
        check_listen_host(host, allow_remote=allow_remote)
        self._app = create_app(client, allow_remote=allow_remote, max_body=max_body)
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        """Start listening; return the base URL (``http://HOST:PORT``)."""
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {self._host}:{self._port}: {exc.strerror}"
            ) from None
        self._runner = runner
        port = runner.addresses[0][1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
