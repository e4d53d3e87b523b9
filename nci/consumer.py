"""``nci consumer …``: ask an attested enclave, verify one, or serve OpenAI clients through one.

::

    nci consumer ask URL --expect FILE [--model-id ID] [--manifest-sha256 HEX]
                     [--trust-local-root PEM] [--max-age S] [--image PATH]...
                     [--max-tokens N] [--temperature T] [--top-p P] [--stop TEXT]... [--no-stream]
                     PROMPT
    nci consumer attest URL --expect FILE [--model-id ID] [--manifest-sha256 HEX] [...] [--json]
    nci consumer proxy URL --expect FILE --listen 127.0.0.1:PORT [--allow-remote] [...]

``--expect`` and ``--trust-local-root`` mean what they mean for ``nci audit verify``, except that
every accepted PCR set must pin the image (PCR0, or PCR8 for a signed image). ``--model-id`` and
``--manifest-sha256`` also pin the model and bundle the enclave attests to. ``ask``
streams the answer to standard output and says on standard error what was verified before
anything was sent. Exit status: 0 success; 1 refused (the attestation, the answer, or the bridge
refused); 2 usage, configuration, input or connection error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from consumer import AsyncClient, Attestation, Client
from consumer.errors import (
    AttestationFailed,
    ConfigError,
    ConsumerError,
    InvalidRequest,
    TransportError,
)
from consumer.proxy import ProxyServer, check_listen_host, parse_listen
from protocol.inference import Usage

__all__ = ["add_parser"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
_MAX_AGE_LIMIT = 365 * 86400.0
_MAX_PROMPT_INPUT = 64 * 1024


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser(
        "consumer", help="ask an attested enclave: prompts encrypted to it, answers verified"
    )
    commands = group.add_subparsers(dest="consumer_command", metavar="COMMAND", required=True)

    ask = commands.add_parser(
        "ask",
        help="attest the enclave, then send it an encrypted prompt and print the answer",
        description="Verify the enclave's attestation, encrypt the prompt to its attested key, "
        "and stream the answer to standard output. What was verified goes to standard error.",
    )
    _common(ask)
    ask.add_argument("prompt", metavar="PROMPT", help="the question ('-' reads standard input)")
    ask.add_argument(
        "--image", action="append", default=[], type=Path, metavar="PATH", help="PNG or JPEG"
    )
    ask.add_argument("--max-tokens", type=int, default=256, metavar="N")
    ask.add_argument("--temperature", type=float, default=1.0, metavar="T")
    ask.add_argument("--top-p", type=float, default=1.0, metavar="P")
    ask.add_argument("--stop", action="append", default=[], metavar="TEXT")
    ask.add_argument(
        "--no-stream", action="store_true", help="wait for the whole answer (one OHTTP response)"
    )
    ask.set_defaults(handler=_ask_command)

    attest = commands.add_parser(
        "attest",
        help="attest a running enclave with a fresh nonce and print what was verified",
    )
    _common(attest)
    attest.add_argument("--json", action="store_true", help="print one JSON object")
    attest.set_defaults(handler=_attest_command)

    proxy = commands.add_parser(
        "proxy",
        help="an OpenAI-compatible endpoint on loopback that attests and encrypts transparently",
        description="Serve POST /v1/chat/completions and GET /v1/models to OpenAI clients on "
        "this machine (base_url http://HOST:PORT/v1); every request is encrypted to the "
        "attested enclave. Runs until interrupted.",
    )
    _common(proxy)
    proxy.add_argument("--listen", required=True, metavar="HOST:PORT", help="e.g. 127.0.0.1:8000")
    proxy.add_argument(
        "--allow-remote",
        action="store_true",
        help="UNSAFE: listen beyond loopback; prompts and answers cross that network in clear",
    )
    proxy.set_defaults(handler=_proxy_command)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the bridge, e.g. http://127.0.0.1:8443")
    parser.add_argument(
        "--expect",
        type=Path,
        required=True,
        metavar="FILE",
        help="YAML/JSON with one or several accepted PCR sets (nitro-cli Measurements accepted); "
        "each must pin PCR0 or PCR8",
    )
    parser.add_argument(
        "--model-id",
        metavar="ID",
        help="refuse an enclave whose attested model id differs",
    )
    parser.add_argument(
        "--manifest-sha256",
        metavar="HEX",
        help="refuse an enclave whose attested bundle manifest digest differs",
    )
    parser.add_argument(
        "--trust-local-root",
        type=Path,
        metavar="PEM",
        help="also trust this local (emulator) root; such documents involve no Nitro hardware",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="maximum age of the attestation document (default: 300)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, metavar="SECONDS", help="connect and read deadline"
    )


def _max_age(args: argparse.Namespace) -> timedelta:
    if not 0 < args.max_age <= _MAX_AGE_LIMIT:
        raise ConfigError(
            f"--max-age must be a positive number of seconds, at most {_MAX_AGE_LIMIT:.0f}"
        )
    return timedelta(seconds=args.max_age)


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.url,
        expect=args.expect,
        expect_model_id=args.model_id,
        expect_manifest_sha256=args.manifest_sha256,
        max_age=_max_age(args),
        trust_local_root=args.trust_local_root,
        timeout=args.timeout,
    )


def _async_client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(
        args.url,
        expect=args.expect,
        expect_model_id=args.model_id,
        expect_manifest_sha256=args.manifest_sha256,
        max_age=_max_age(args),
        trust_local_root=args.trust_local_root,
        timeout=args.timeout,
    )


def _exit_status(exc: ConsumerError) -> int:
    if isinstance(exc, ConfigError | InvalidRequest | TransportError):
        return EXIT_USAGE
    return EXIT_REFUSED


def _describe(attestation: Attestation, url: str, err: TextIO) -> None:
    print(f"verified {url} before sending:", file=err)
    for line in attestation.describe():
        print(f"  {line}", file=err)


# --- ask -----------------------------------------------------------------------------------------


def _ask_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        prompt = _prompt(args.prompt)
        with _client(args) as client:
            return _ask(client, args, prompt, out, err)
    except ConsumerError as exc:
        print(f"nci consumer ask: {exc}", file=err)
        return _exit_status(exc)


def _ask(client: Client, args: argparse.Namespace, prompt: str, out: TextIO, err: TextIO) -> int:
    finish: str | None
    usage: Usage | None
    if args.no_stream:
        completion = client.generate(
            prompt,
            images=args.image,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop,
        )
        _describe(completion.attestation, client.url, err)
        out.write(completion.text + "\n")
        out.flush()
        finish, usage = completion.finish_reason, completion.usage
    else:
        stream = client.generate(
            prompt,
            images=args.image,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            stop=args.stop,
            stream=True,
        )
        with stream:
            _describe(stream.attestation, client.url, err)
            try:
                for piece in stream:
                    out.write(piece)
                    out.flush()
            except ConsumerError as exc:
                out.write("\n")
                out.flush()
                print(f"nci consumer ask: the answer above is INCOMPLETE, refused: {exc}", file=err)
                return _exit_status(exc)
            out.write("\n")
            out.flush()
            finish, usage = stream.finish_reason, stream.usage
    if usage is not None:
        print(
            f"finished: {finish}, {usage.prompt_tokens} prompt tokens, "
            f"{usage.completion_tokens} completion tokens",
            file=err,
        )
    return EXIT_OK


def _prompt(text: str) -> str:
    if text != "-":
        return text
    data = sys.stdin.buffer.read(_MAX_PROMPT_INPUT + 1)
    if len(data) > _MAX_PROMPT_INPUT:
        raise InvalidRequest(f"standard input is larger than {_MAX_PROMPT_INPUT} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("standard input is not UTF-8 text") from None


# --- attest --------------------------------------------------------------------------------------


def _attest_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        with _client(args) as client:
            attestation = client.attest()
    except AttestationFailed as exc:
        if args.json:
            error = {"type": exc.reason, "message": str(exc)}
            json.dump({"valid": False, "url": args.url, "error": error}, out, indent=2)
            out.write("\n")
        else:
            out.write(f"RESULT: REJECTED ({exc.reason}): {exc}\n")
        return EXIT_REFUSED
    except ConsumerError as exc:
        print(f"nci consumer attest: {exc}", file=err)
        return _exit_status(exc)
    if args.json:
        json.dump({**attestation.to_json(), "url": args.url}, out, indent=2)
        out.write("\n")
        return EXIT_OK
    checks = attestation.checks()
    width = max(len(name) for name, _ in checks)
    for name, detail in checks:
        out.write(f"[ok  ] {name:<{width}}  {detail}\n")
    for line in attestation.describe()[1:]:
        out.write(f"{line}\n")
    for index, value in sorted(attestation.pcrs.items()):
        out.write(f"PCR{index:<2}         {value.hex()}\n")
    if not attestation.is_nitro_hardware:
        out.write(
            "NOTE: this document chains to a LOCAL root: it was produced by the NSM emulator, "
            "not by Nitro hardware\n"
        )
    out.write("RESULT: VALID\n")
    return EXIT_OK


# --- proxy ---------------------------------------------------------------------------------------


def _proxy_command(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        host, port = parse_listen(args.listen)
        check_listen_host(host, allow_remote=args.allow_remote)
        client = _async_client(args)
    except ConsumerError as exc:
        print(f"nci consumer proxy: {exc}", file=err)
        return EXIT_USAGE
    if args.allow_remote:
        print(
            "WARNING: --allow-remote: anyone who reaches this address can use the enclave as you, "
            "and prompts and answers cross that network in clear",
            file=err,
        )
    try:
        asyncio.run(_serve(client, host, port, args.allow_remote, out, err))
    except ConsumerError as exc:
        print(f"nci consumer proxy: {exc}", file=err)
        return _exit_status(exc)
    return EXIT_OK


async def _serve(
    client: AsyncClient, host: str, port: int, allow_remote: bool, out: TextIO, err: TextIO
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with client:
        # attest once up front: a refused enclave stops the proxy before any caller relies on it
        _describe(await client.attest(), client.url, err)
        async with ProxyServer(client, host=host, port=port, allow_remote=allow_remote) as server:
            print(f"OpenAI-compatible proxy on {server.url}/v1 for {client.url}", file=out)
            out.flush()
            await stop.wait()
