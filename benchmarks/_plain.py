"""The same model runtime behind plain HTTP: no encryption, no parent, no enclave hop.

Way (b) of ``benchmarks.load``: what serving the runtime over HTTP costs by itself, so that the
confidential path (way c) can be compared with it. ``python -m benchmarks._plain --runtime
model|echo [--echo-delay S] [--max-concurrency N] [--threads T]`` listens on a free loopback port,
prints ``port N`` on standard output once it serves, and runs until SIGTERM or SIGINT.

``POST /v1/generate`` takes JSON ``{"prompt": text, "images": [{"media_type": text, "data":
base64}], "max_tokens": int, "temperature": number, "stream": bool}`` and answers JSON ``{"text",
"finish_reason", "prompt_tokens", "completion_tokens"}``; streamed, a chunked body of one JSON
object per line, ``{"delta": text}`` per piece and the same end object last. It serves the way the
enclave does: generation runs in a pool of ``max_concurrency`` worker threads, a request beyond
that is answered 429 (never queued), pieces are handed from the worker to the event loop as they
are produced, and the loop is uvloop when it is installed. A refused input is 400, anything else
500; ``GET /healthz`` is 200.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import logging
import signal
import socket
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from enclave._echo import EchoRuntime, Generation, Runtime
from enclave.errors import EnclaveError
from protocol.errors import MalformedMessage
from protocol.inference import Image, MediaType, Params

__all__ = ["MAX_CONCURRENCY", "PlainServer", "build_runtime", "main"]

log = logging.getLogger("benchmarks.plain")

MAX_CONCURRENCY: Final = 64  # the enclave's cap (enclave.config)
_MEDIA_TYPES: Final[dict[str, MediaType]] = {"image/png": "image/png", "image/jpeg": "image/jpeg"}
_MAX_BODY: Final = 16 * 1024 * 1024 * 2  # the bridge's 16 MiB, base64-inflated


def build_runtime(kind: str, *, echo_delay: float = 0.0, threads: int | None = 1) -> Runtime:
    """The runtime the enclave would serve: ``"model"``, the built-in model loaded as the enclave
    loads it (``load_runtime`` on the built-in model folder's tensors), or ``"echo"``."""
    if kind == "echo":
        return EchoRuntime(delay=echo_delay)
    if kind != "model":
        raise ValueError(f"runtime must be model or echo, not {kind!r}")
    from benchmarks.model import _unlocked  # the built-in folder as the enclave holds it
    from enclave.models.builtin import write_builtin_model_folder
    from enclave.models.runtime import load_runtime

    with tempfile.TemporaryDirectory(prefix="nci-plain-") as scratch:
        unlocked = _unlocked(write_builtin_model_folder(Path(scratch) / "anymal"))
    return load_runtime(unlocked, threads=threads)


def _end(generation: Generation) -> dict[str, Any]:
    return {
        "finish_reason": generation.finish_reason,
        "prompt_tokens": generation.prompt_tokens,
        "completion_tokens": generation.completion_tokens,
    }


class _Refused(Exception):
    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


class PlainServer:
    """The aiohttp application around one runtime (module docstring)."""

    def __init__(self, runtime: Runtime, *, max_concurrency: int = MAX_CONCURRENCY) -> None:
        if not 1 <= max_concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"max_concurrency must be in 1..{MAX_CONCURRENCY}")
        self.runtime = runtime
        self.max_concurrency = max_concurrency
        self.active = 0
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="plain-infer")

    def app(self) -> web.Application:
        app = web.Application(client_max_size=_MAX_BODY)
        app.router.add_post("/v1/generate", self._generate)
        app.router.add_get("/healthz", self._health)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, app: web.Application) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ready", "active": self.active})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        try:
            prompt, images, params = _parse(await request.read())
            if self.active >= self.max_concurrency:
                raise _Refused(429, "busy")
        except _Refused as refused:
            return _problem(refused)
        self.active += 1
        try:
            if params.stream:
                return await self._streamed(request, prompt, images, params)
            return await self._single(prompt, images, params)
        except _Refused as refused:
            return _problem(refused)
        finally:
            self.active -= 1

    def _start(self, prompt: str, images: list[Image], params: Params) -> Generation:
        try:
            return self.runtime.generate(prompt, images, params)
        except EnclaveError:
            raise _Refused(400, "malformed") from None

    async def _single(self, prompt: str, images: list[Image], params: Params) -> web.Response:
        def work() -> dict[str, Any]:
            generation = self._start(prompt, images, params)
            text = "".join(generation)
            return {"text": text, **_end(generation)}

        try:
            answer = await asyncio.get_running_loop().run_in_executor(self._pool, work)
        except _Refused:
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: any failure is "internal"
            log.error("generation failed (%s)", type(exc).__name__)
            raise _Refused(500, "internal") from None
        return web.json_response(answer)

    async def _streamed(
        self, request: web.Request, prompt: str, images: list[Image], params: Params
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[bytes | _Refused | None] = asyncio.Queue()
        post: Callable[[bytes | _Refused | None], None] = queue.put_nowait

        def work() -> None:
            # as the enclave's worker: each piece handed to the loop as it is produced
            item: bytes | _Refused | None = None
            try:
                generation = self._start(prompt, images, params)
                for piece in generation:
                    loop.call_soon_threadsafe(post, _line({"delta": piece}))
                loop.call_soon_threadsafe(post, _line(_end(generation)))
            except _Refused as refused:
                item = refused
            except Exception as exc:  # noqa: BLE001 - the boundary
                log.error("generation failed (%s)", type(exc).__name__)
                item = _Refused(500, "internal")
            loop.call_soon_threadsafe(post, item)

        future = loop.run_in_executor(self._pool, work)
        first = await queue.get()
        if isinstance(first, _Refused):
            await future
            raise first
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        item: bytes | _Refused | None = first
        while isinstance(item, bytes):
            await response.write(item)
            item = await queue.get()
        await future
        if isinstance(item, _Refused):  # after the first piece: abort, the client sees no end
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response


def _line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode() + b"\n"


def _problem(refused: _Refused) -> web.Response:
    return web.json_response({"error": refused.code}, status=refused.status)


def _parse(body: bytes) -> tuple[str, list[Image], Params]:
    """The JSON request (from the load generator; checked all the same)."""
    try:
        value = json.loads(body)
        if not isinstance(value, dict):
            raise _Refused(400, "malformed")
        images = [
            Image(_MEDIA_TYPES[image["media_type"]], base64.b64decode(image["data"], validate=True))
            for image in value.get("images", [])
        ]
        params = Params(
            max_tokens=int(value["max_tokens"]),
            temperature=float(value.get("temperature", 1.0)),
            stream=bool(value.get("stream", False)),
        )
        prompt = value["prompt"]
        if not isinstance(prompt, str):
            raise _Refused(400, "malformed")
    except (ValueError, KeyError, TypeError, binascii.Error, MalformedMessage):
        raise _Refused(400, "malformed") from None
    return prompt, images, params


async def _serve(server: PlainServer) -> None:
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # loopback only, a free port
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"port {port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._plain", description=__doc__)
    parser.add_argument("--runtime", choices=("model", "echo"), default="model")
    parser.add_argument("--echo-delay", type=float, default=0.0, help="seconds per echoed piece")
    parser.add_argument("--max-concurrency", type=int, default=MAX_CONCURRENCY)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1, as the enclave)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    runtime = build_runtime(args.runtime, echo_delay=args.echo_delay, threads=args.threads)
    server = PlainServer(runtime, max_concurrency=args.max_concurrency)
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_serve(server))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
