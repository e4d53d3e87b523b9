"""``nci parent …``: the parent instance's services (untrusted: they move ciphertext only).

``nci parent run --config parent.yaml`` runs them all from one configuration
(:mod:`parent.config`): the sealed-bundle streamer and the KMS relay (the enclave needs both to
boot), the enclave launcher, the control link to the enclave with its credentials forwarder, and
the consumer-facing HTTP bridge. It prints one line per service with its address, runs until
SIGTERM or SIGINT, then stops them in the reverse order (the bridge first, the enclave last but
the services it boots from). ``--only bundles,kms_relay`` runs a subset (one systemd unit each,
all reading the same file; see ``deploy/systemd/``).

``nci parent check --config parent.yaml`` is the read-only preflight (:mod:`nci.preflight`).

``nci parent serve-bundles --listen ADDRESS --bundle NAME=SOURCE …`` serves sealed bundles to the
enclave: SOURCE is a bundle folder or ``s3://BUCKET/PREFIX``. It runs until interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from collections.abc import Callable, Collection, Coroutine
from pathlib import Path
from typing import Any, TextIO, TypeVar

from botocore.exceptions import BotoCoreError

from nci.preflight import add_check_parser
from parent.bridge import create_app, start_bridge
from parent.bundlesource import BundleSource, FolderSource, S3Source, s3_client_config
from parent.config import (
    SERVICES,
    AwsLauncherConfig,
    BundlesConfig,
    ParentConfig,
    load_config,
)
from parent.credentials import (
    CredentialsForwarder,
    CredentialSource,
    environment_credentials,
    session_credentials,
)
from parent.enclave_link import EnclaveLink
from parent.kms_relay import KmsRelay
from parent.launcher import Launcher, LocalLauncher, NitroCli, NitroLauncher
from parent.metrics import Registry
from parent.streamer import BundleStreamer
from protocol.errors import ConfigError, ProtocolError
from protocol.transport import Address, parse_address

_T = TypeVar("_T")

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = subparsers.add_parser("parent", help="the parent instance's services (operators)")
    commands = group.add_subparsers(dest="parent_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="run the bridge, KMS relay, bundle streamer, credentials forwarder and launcher",
    )
    run.add_argument(
        "--config", required=True, type=Path, metavar="FILE", help="the parent's YAML configuration"
    )
    run.add_argument(
        "--only",
        type=_service_list,
        metavar="SERVICES",
        help=f"comma-separated subset of {','.join(SERVICES)} (default: every configured one); "
        "bridge is the enclave control link, the credentials forwarder and the HTTP bridge",
    )
    run.set_defaults(handler=_run_parent)
    add_check_parser(commands)
    serve = commands.add_parser(
        "serve-bundles",
        help="serve sealed bundles to the enclave (ciphertext only) until interrupted",
    )
    serve.add_argument(
        "--listen",
        required=True,
        metavar="ADDRESS",
        help="enclave-facing address: vsock://CID:PORT on AWS, unix:///path locally",
    )
    serve.add_argument(
        "--bundle",
        action="append",
        required=True,
        metavar="NAME=SOURCE",
        help="a bundle folder or s3://BUCKET/PREFIX, under the name the enclave asks for",
    )
    serve.add_argument("--endpoint-url", help="S3 endpoint (the local moto server, for example)")
    serve.add_argument("--region", help="AWS region (default: the AWS environment's)")
    serve.set_defaults(handler=_serve_bundles)


def _serve_bundles(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        address = parse_address(args.listen)
        sources = {name: _source(spec, args) for name, spec in map(_pair, args.bundle)}
    except (ProtocolError, ValueError, OSError, BotoCoreError) as exc:
        print(f"nci parent serve-bundles: {exc}", file=err)
        return 2
    try:
        asyncio.run(_run(address, sources, out))
    except ProtocolError as exc:
        print(f"nci parent serve-bundles: {exc}", file=err)
        return 2
    return 0


async def _run(address: Address, sources: dict[str, BundleSource], out: TextIO) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signum, stop.set)
    async with BundleStreamer(address, sources):
        print(f"serving {', '.join(sorted(sources))} on {address}", file=out, flush=True)
        await stop.wait()


def _pair(item: str) -> tuple[str, str]:
    name, sep, spec = item.partition("=")
    if not sep or not name or not spec:
        raise ValueError(f"--bundle {item!r}: expected NAME=FOLDER or NAME=s3://BUCKET/PREFIX")
    return name, spec


def _source(spec: str, args: argparse.Namespace) -> BundleSource:
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"{spec!r}: expected s3://BUCKET/PREFIX")
        import boto3

        s3 = boto3.session.Session().client(
            "s3", endpoint_url=args.endpoint_url, region_name=args.region, config=s3_client_config()
        )
        return S3Source(s3, bucket, prefix.strip("/"))
    return FolderSource(Path(spec))


# -- nci parent run ----------------------------------------------------------------------------


def _service_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME[,NAME…] from {', '.join(SERVICES)}"
        )
    return names


def _run_parent(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    try:
        config = load_config(args.config)
        services = config.services(args.only)
    except ProtocolError as exc:
        print(f"nci parent run: {exc}", file=err)
        return 2
    try:
        _run_loop(run_services(config, out, services=services))
    except (ProtocolError, OSError, BotoCoreError) as exc:
        print(f"nci parent run: {exc}", file=err)
        return 2
    return 0


def _run_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """Run ``main`` on uvloop when it is installed (the parent's hot path), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def run_services(
    config: ParentConfig,
    out: TextIO,
    *,
    services: Collection[str] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Start the ``services`` of ``config`` (default: every configured one, see
    :meth:`ParentConfig.services`), announce each on ``out``, run until SIGTERM/SIGINT (or
    ``stop``), then stop them in reverse order."""
    selected = config.services(None if services is None else list(services))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)

    def announce(line: str) -> None:
        print(line, file=out, flush=True)

    registry = Registry()
    async with contextlib.AsyncExitStack() as stack:
        # (1) what the enclave boots from: sealed bundles and the way to KMS
        if config.bundles is not None and "bundles" in selected:
            sources = _bundle_sources(config.bundles)
            streamer = BundleStreamer(
                config.bundles.listen, sources, max_connections=config.bundles.max_connections
            )
            await stack.enter_async_context(streamer)
            _streamer_metrics(registry, streamer)
            announce(f"bundle streamer: {streamer.address} ({', '.join(sorted(sources))})")
        if config.kms_relay is not None and "kms_relay" in selected:
            relay_config = config.kms_relay
            relay = KmsRelay(
                relay_config.listen,
                relay_config.upstream,
                allowlist=relay_config.allowlist,
                max_connections=relay_config.max_connections,
                connect_timeout=relay_config.connect_timeout,
                idle_timeout=relay_config.idle_timeout,
            )
            await stack.enter_async_context(relay)
            _relay_metrics(registry, relay)
            announce(f"kms relay: {relay.listen} -> {relay.upstream}")
        # (2) the enclave itself
        if config.launcher is not None and "launcher" in selected:
            launcher = _launcher(config)
            await launcher.start()
            stack.push_async_callback(launcher.stop)
            registry.callback(
                "nci_enclave_restarts_total", "Times the launcher restarted the enclave.",
                "counter", lambda: [({}, launcher.restarts)],
            )  # fmt: skip
            announce(f"launcher: {launcher.describe()}")
        # (3) the control link, its credentials forwarder, then the consumers' HTTP bridge
        if "bridge" in selected:
            await _start_bridge(config, stack, registry, announce)
        await stop.wait()
        announce("stopping")


async def _start_bridge(
    config: ParentConfig,
    stack: contextlib.AsyncExitStack,
    registry: Registry,
    announce: Callable[[str], None],
) -> None:
    """The control link, the credentials forwarder (hooked to the link's (re)connects) and the
    HTTP bridge, last in and first out of ``stack``."""
    link = EnclaveLink(
        config.enclave_control,
        timeouts=config.link_timeouts,
        health_interval=config.health_interval,
    )
    forwarder: CredentialsForwarder | None = None
    if config.credentials_source != "none":
        source: CredentialSource = (
            environment_credentials if config.credentials_source == "env" else session_credentials
        )
        forwarder = CredentialsForwarder(link, source, refresh_interval=config.credentials_refresh)
    await stack.enter_async_context(link)
    announce(f"enclave link: {link.address}")
    if forwarder is not None:
        await stack.enter_async_context(forwarder)
        sent = forwarder
        registry.callback(
            "nci_credentials_sent_total", "CREDENTIALS frames sent to the enclave.",
            "counter", lambda: [({}, sent.sent)],
        )  # fmt: skip
        announce(f"credentials forwarder: {config.credentials_source}")
    app = create_app(link, config.limits, registry=registry)
    server = await start_bridge(app, config.bridge_listen, limits=config.limits)
    stack.push_async_callback(server.close)
    announce(f"bridge: {server.address}")


def _bundle_sources(config: BundlesConfig) -> dict[str, BundleSource]:
    sources: dict[str, BundleSource] = {}
    s3: Any = None
    for name, spec in config.sources.items():
        if spec.folder is not None:
            sources[name] = FolderSource(spec.folder)
            continue
        if s3 is None:
            import boto3

            s3 = boto3.session.Session().client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                config=s3_client_config(),
            )
        sources[name] = S3Source(s3, spec.s3_bucket or "", spec.s3_prefix)
    return sources


def _launcher(config: ParentConfig) -> Launcher:
    launcher = config.launcher
    if isinstance(launcher, AwsLauncherConfig):
        cli = NitroCli(
            launcher.eif_path,
            cpu_count=launcher.cpu_count,
            memory_mib=launcher.memory_mib,
            cid=launcher.cid,
            enclave_name=launcher.enclave_name,
        )
        return NitroLauncher(cli)
    if launcher is None:
        raise ConfigError("no launcher is configured")
    return LocalLauncher(
        launcher.enclave_config,
        grace=launcher.grace,
        backoff_max=launcher.backoff_max,
        log=launcher.log,
        verbose=launcher.verbose,
    )


def _streamer_metrics(registry: Registry, streamer: BundleStreamer) -> None:
    registry.callback(
        "nci_bundle_streams_total", "Sealed-bundle streams sent to the end.", "counter",
        lambda: [({}, streamer.served)],
    )  # fmt: skip
    registry.callback(
        "nci_bundle_connections", "Bundle streamer connections open.", "gauge",
        lambda: [({}, streamer.active_connections)],
    )  # fmt: skip


def _relay_metrics(registry: Registry, relay: KmsRelay) -> None:
    registry.callback(
        "nci_kms_relay_connections_total", "Connections relayed to KMS.", "counter",
        lambda: [({}, relay.connections)],
    )  # fmt: skip
    registry.callback(
        "nci_kms_relay_refused_total", "Connections refused (over the limit, upstream down).",
        "counter", lambda: [({}, relay.refused)],
    )  # fmt: skip
    registry.callback(
        "nci_kms_relay_bytes_total", "Bytes relayed, by direction.", "counter",
        lambda: [({"direction": "up"}, relay.bytes_up), ({"direction": "down"}, relay.bytes_down)],
        ("direction",),
    )  # fmt: skip
    registry.callback(
        "nci_kms_relay_connections", "Relay connections open.", "gauge",
        lambda: [({}, relay.active)],
    )  # fmt: skip
