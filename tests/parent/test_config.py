"""The parent's YAML configuration (strict) and ``nci parent run`` built from it."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import nci.parent
import parent.config
from parent.bridge import BridgeLimits
from parent.config import (
    AwsLauncherConfig,
    LocalLauncherConfig,
    ParentConfig,
    load_config,
    parse_config,
)
from parent.enclave_link import LinkTimeouts
from protocol.control import Credentials
from protocol.errors import ConfigError
from protocol.transport import Address, parse_address
from tests.parent.fakeenclave import FakeEnclave

BUNDLE = Path(__file__).resolve().parent.parent / "assets" / "bundle"
MINIMAL = "bridge: {listen: 'tcp://127.0.0.1:8443'}\nenclave: {control: 'unix:///run/e.sock'}\n"


def docstring_example() -> str:
    """The example in parent/config.py's docstring, which must stay a valid configuration."""
    doc = parent.config.__doc__
    assert doc is not None
    return textwrap.dedent(doc.split("::\n\n", 1)[1])


def test_the_documented_example_parses_with_every_section(tmp_path: Path) -> None:
    config = parse_config(docstring_example(), base=tmp_path)
    assert config.bridge_listen == parse_address("tcp://0.0.0.0:8443")
    assert config.enclave_control == parse_address("vsock://16:5000")
    assert config.link_timeouts == LinkTimeouts()
    assert config.kms_relay is not None
    assert config.kms_relay.upstream == parse_address("tcp://kms.us-east-1.amazonaws.com:443")
    assert config.bundles is not None
    assert config.bundles.sources["anymal-shapes"].folder == tmp_path / "bundles/anymal-shapes"
    big = config.bundles.sources["big-model"]
    assert (big.s3_bucket, big.s3_prefix) == ("my-bucket", "sealed/big-model")
    assert config.credentials_source == "session"
    assert config.launcher == LocalLauncherConfig(
        tmp_path / "state/enclave.json", 10.0, 30.0, log=tmp_path / "state/enclave.log"
    )
    assert config.limits == BridgeLimits()
    assert config.deployment is not None
    assert sorted(config.deployment.expected) == [0, 1, 2]


def test_minimal_configuration_takes_the_defaults(tmp_path: Path) -> None:
    config = parse_config(MINIMAL, base=tmp_path)
    assert (config.kms_relay, config.bundles, config.launcher) == (None, None, None)
    assert config.credentials_source == "session"
    assert config.limits == BridgeLimits()


def test_upload_and_attestation_limits(tmp_path: Path) -> None:
    text = MINIMAL + "limits: {max_concurrency: 3, max_attestations: 2, body_timeout: 5}\n"
    limits = parse_config(text, base=tmp_path).limits
    assert (limits.upload_limit, limits.max_attestations, limits.body_timeout) == (6, 2, 5.0)
    text = MINIMAL + "limits: {max_concurrency: 3, max_uploads: 4}\n"
    assert parse_config(text, base=tmp_path).limits.upload_limit == 4


def test_aws_launcher_section(tmp_path: Path) -> None:
    text = MINIMAL + (
        "launcher:\n  aws: {eif_path: /opt/nci/enclave.eif, cpu_count: 2, memory_mib: 4096,"
        " cid: 16}\n"
    )
    assert parse_config(text, base=tmp_path).launcher == AwsLauncherConfig(
        Path("/opt/nci/enclave.eif"), 2, 4096, 16
    )


HEX = {n: f"{n:02x}" * 48 for n in (0xA0, 0xA1, 0xA2, 0xA8, 0xB0, 0xB1, 0xB2)}
KEY_ARN = "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"


def deployment(expected: str, extra: str = "") -> str:
    return MINIMAL + f"deployment:\n  key_id: {KEY_ARN}\n  expected: {{{expected}}}\n{extra}"


IMAGE_A = f"PCR0: '{HEX[0xA0]}', PCR1: '{HEX[0xA1]}', PCR2: '{HEX[0xA2]}'"
IMAGE_B = f"PCR0: '{HEX[0xB0]}', PCR1: '{HEX[0xB1]}', PCR2: '{HEX[0xB2]}'"


def test_deployment_section_pins_the_expected_measurements(tmp_path: Path) -> None:
    text = deployment(f"{IMAGE_A}, PCR8: '{HEX[0xA8]}'", f"  rollout: [{{{IMAGE_B}}}]\n")
    pinned = parse_config(text, base=tmp_path).deployment
    assert pinned is not None
    assert pinned.key_id == KEY_ARN
    assert pinned.expected == {i: bytes.fromhex(HEX[0xA0 + i]) for i in (0, 1, 2, 8)}
    assert pinned.rollout == ({i: bytes.fromhex(HEX[0xB0 + i]) for i in (0, 1, 2)},)
    assert parse_config(MINIMAL, base=tmp_path).deployment is None
    bare_id = deployment(IMAGE_A).replace(KEY_ARN, "mrk-1234abcd12ab34cd56ef1234567890ab")
    assert parse_config(bare_id, base=tmp_path).deployment is not None


BAD_DEPLOYMENTS = {
    "missing_pcr1": (
        deployment(f"PCR0: '{HEX[0xA0]}', PCR2: '{HEX[0xA2]}'"),
        "deployment.expected.PCR1 is required",
    ),
    "uppercase_hex": (
        deployment(IMAGE_A.replace(HEX[0xA1], HEX[0xA1].upper())),
        "deployment.expected.PCR1 must be 96 lowercase hex",
    ),
    "sha256_length": (
        deployment(IMAGE_A.replace(HEX[0xA2], HEX[0xA2][:64])),
        "deployment.expected.PCR2 must be 96 lowercase hex",
    ),
    "unquoted_number": (
        deployment(IMAGE_A.replace(f"'{HEX[0xA0]}'", "1" * 96)),
        "deployment.expected.PCR0 must be 96",
    ),
    "debug_mode_zeros": (
        deployment(IMAGE_A.replace(HEX[0xA0], "0" * 96)),
        "deployment.expected.PCR0 is all zero",
    ),
    "pcr3_not_an_image_pcr": (
        deployment(f"{IMAGE_A}, PCR3: '{HEX[0xB0]}'"),
        "unknown key deployment.expected.PCR3",
    ),
    "lowercase_pcr_name": (
        deployment(f"{IMAGE_A}, pcr8: '{HEX[0xA8]}'"),
        "unknown key deployment.expected.pcr8",
    ),
    "alias_not_a_key": (
        deployment(IMAGE_A).replace(KEY_ARN, "alias/nci"),
        "deployment.key_id must be a KMS key id or key ARN",
    ),
    "no_key_id": (
        MINIMAL + f"deployment:\n  expected: {{{IMAGE_A}}}\n",
        "deployment.key_id is required",
    ),
    "expected_a_list": (
        MINIMAL + f"deployment:\n  key_id: {KEY_ARN}\n  expected: ['{HEX[0xA0]}']\n",
        "deployment.expected must be a mapping",
    ),
    "rollout_not_a_list": (
        deployment(IMAGE_A, f"  rollout: {{{IMAGE_B}}}\n"),
        "deployment.rollout must be a list",
    ),
    "rollout_image_without_pcr2": (
        deployment(IMAGE_A, f"  rollout: [{{PCR0: '{HEX[0xB0]}', PCR1: '{HEX[0xB1]}'}}]\n"),
        r"deployment\.rollout\[0\]\.PCR2 is required",
    ),
    "unknown_deployment_key": (
        deployment(IMAGE_A, "  role: x\n"),
        "unknown key deployment.role",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_DEPLOYMENTS))
def test_rejects_bad_deployment_sections(tmp_path: Path, name: str) -> None:
    text, message = BAD_DEPLOYMENTS[name]
    with pytest.raises(ConfigError, match=message):
        parse_config(text, base=tmp_path)


@pytest.mark.parametrize(
    ("extra", "where"),
    [
        ("debug: true\n", "debug"),
        ("limits: {max_concurency: 4}\n", "limits.max_concurency"),
        ("credentials: {source: env, secret: x}\n", "credentials.secret"),
        ("launcher:\n  local: {enclave_config: e.json, command: [sh]}\n", "launcher.local.command"),
        (
            "kms_relay: {listen: 'unix:///k.sock', upstream: 'tcp://127.0.0.1:4566', tls: off}\n",
            "kms_relay.tls",
        ),
        (
            "bundles: {listen: 'unix:///b.sock', sources: {a: {folder: x}}, cache: 1}\n",
            "bundles.cache",
        ),
    ],
)
def test_rejects_unknown_keys(tmp_path: Path, extra: str, where: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown key {where}"):
        parse_config(MINIMAL + extra, base=tmp_path)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "bridge: {listen: 'tcp://127.0.0.1:8443', tls: true}\n"
            "enclave: {control: 'unix:///run/e.sock'}\n",
            "bridge.tls",
        ),
        (
            "bridge: {listen: 'tcp://127.0.0.1:8443'}\n"
            "enclave: {control: 'unix:///run/e.sock', timeouts: {conect: 1}}\n",
            "enclave.timeouts.conect",
        ),
        (
            MINIMAL + "bundles: {listen: 'unix:///b.sock', sources: {a: {folder: x, ttl: 1}}}\n",
            "folder",  # a source is exactly one of folder, s3
        ),
    ],
)
def test_rejects_unknown_keys_in_nested_sections(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        parse_config(text, base=tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "limits: {max_concurrency: 4}\nlimits: {max_concurrency: 9}\n", "duplicate"),
        (MINIMAL + "limits: {max_concurrency: true}\n", "limits.max_concurrency"),
        (MINIMAL + "limits: {max_concurrency: '8'}\n", "limits.max_concurrency"),
        (MINIMAL + "limits: {max_concurrency: 0}\n", "limits.max_concurrency"),
        (MINIMAL + "limits: {max_body_bytes: 99999999999}\n", "max_body_bytes"),
        (MINIMAL + "limits: {request_deadline: -1}\n", "limits.request_deadline"),
        (MINIMAL + "limits: {max_uploads: 0}\n", "limits.max_uploads"),
        (MINIMAL + "limits: {max_uploads: 2.5}\n", "limits.max_uploads"),
        (MINIMAL + "limits: {max_attestations: true}\n", "limits.max_attestations"),
        (MINIMAL + "limits: {max_attestations: null}\n", "limits.max_attestations"),
        (MINIMAL + "limits: {body_timeout: 0}\n", "limits.body_timeout"),
        (MINIMAL + "credentials: {source: magic}\n", "credentials.source"),
        (MINIMAL + "launcher: {local: {enclave_config: a}, aws: {eif_path: b}}\n", "exactly one"),
        (MINIMAL + "launcher: {}\n", "exactly one"),
        (
            MINIMAL + "bundles: {listen: 'unix:///b.sock', sources: {a: {folder: x, s3: y}}}\n",
            "folder",
        ),
        (MINIMAL + "bundles: {listen: 'unix:///b.sock', sources: {a: {s3: 'http://x'}}}\n", "s3"),
        (MINIMAL + "bundles: {listen: 'unix:///b.sock', sources: {}}\n", "at least one"),
        (
            MINIMAL + "kms_relay: {listen: 'unix:///k.sock', upstream: 'tcp://evil.example:443'}\n",
            "allowlist",
        ),
        ("bridge: {listen: 'tcp://127.0.0.1:8443'}\n", "enclave is required"),
        ("bridge: {listen: 'http://x'}\nenclave: {control: 'unix:///e.sock'}\n", "bridge.listen"),
        ("bridge: {listen: 8443}\nenclave: {control: 'unix:///e.sock'}\n", "bridge.listen"),
        ("- just\n- a list\n", "mapping"),
        ("bridge: [unclosed\n", "not valid YAML"),
        ("1: x\n", "keys must be text"),
    ],
)
def test_rejects_bad_configurations(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text, base=tmp_path)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "parent.yaml"
    path.parent.mkdir()
    path.write_text(MINIMAL + "launcher: {local: {enclave_config: state/enclave.json}}\n")
    launcher = load_config(path).launcher
    assert isinstance(launcher, LocalLauncherConfig)
    assert launcher.enclave_config == tmp_path / "etc" / "state" / "enclave.json"


# -- nci parent run ----------------------------------------------------------------------------


def main(argv: list[str], *, out: io.StringIO, err: io.StringIO) -> int:
    """``nci …`` with only the ``parent`` group (``nci.cli`` would import the model runtimes)."""
    parser = argparse.ArgumentParser(prog="nci")
    nci.parent.add_parser(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(argv)
    status: int = args.handler(args, out, err)
    return status


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "parent.yaml"
    path.write_text(MINIMAL + "bogus: 1\n")
    out, err = io.StringIO(), io.StringIO()
    assert main(["parent", "run", "--config", str(path)], out=out, err=err) == 2
    assert "unknown key bogus" in err.getvalue()
    assert main(["parent", "run", "--config", str(tmp_path / "nope.yaml")], out=out, err=err) == 2


# `python -m nci parent run` minus nci.cli's other groups, whose imports (torch) take seconds
PARENT_ONLY = (
    "import argparse, sys\n"
    "import nci.parent\n"
    "parser = argparse.ArgumentParser(prog='nci')\n"
    "nci.parent.add_parser(parser.add_subparsers(dest='group', required=True))\n"
    "args = parser.parse_args(sys.argv[1:])\n"
    "sys.exit(args.handler(args, sys.stdout, sys.stderr))\n"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def enclave_thread(tmp_path: Path) -> Iterator[FakeEnclave]:
    """A fake enclave on its own event loop in a thread, for a parent in another process."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    enclave = FakeEnclave(Address("unix", path=str(tmp_path / "enclave.sock")))
    asyncio.run_coroutine_threadsafe(enclave.start(), loop).result(5)
    try:
        yield enclave
    finally:
        asyncio.run_coroutine_threadsafe(enclave.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.mark.slow
def test_run_starts_every_service_serves_and_stops_on_sigterm(
    tmp_path: Path, enclave_thread: FakeEnclave
) -> None:
    port = free_port()
    config = tmp_path / "parent.yaml"
    config.write_text(
        f"bridge: {{listen: 'tcp://127.0.0.1:{port}'}}\n"
        f"enclave: {{control: 'unix://{tmp_path}/enclave.sock'}}\n"
        f"kms_relay:\n  listen: 'unix://{tmp_path}/kms.sock'\n"
        f"  upstream: 'tcp://127.0.0.1:{free_port()}'\n"
        f"bundles:\n  listen: 'unix://{tmp_path}/bundles.sock'\n"
        f"  sources: {{tiny: {{folder: {BUNDLE}}}}}\n"
        "credentials: {source: env}\n"
        "limits: {max_concurrency: 2}\n"
    )
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIAPARENTEXAMPLE001",
        "AWS_SECRET_ACCESS_KEY": "parent/secret",
        "AWS_SESSION_TOKEN": "",
    }
    command = [sys.executable, "-c", PARENT_ONLY, "parent", "run", "--config", str(config)]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            lines: list[str] = []
            while not lines or not lines[-1].startswith("bridge: "):
                line = proc.stdout.readline()
                assert line, (
                    f"nci parent run ended early: {proc.stderr.read() if proc.stderr else ''}"
                )
                lines.append(line.strip())
            url = f"http://127.0.0.1:{port}"
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                health = json.load(response)
            request = urllib.request.Request(
                f"{url}/v1/infer",
                data=b"opaque ciphertext",
                headers={"Content-Type": "message/ohttp-req"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                answer = response.read()
                content_type = response.headers["Content-Type"]
            with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
                metrics = response.read().decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=15)
        rest = proc.stdout.read() if proc.stdout else ""
    assert [line.split(":")[0] for line in lines] == [
        "bundle streamer", "kms relay", "enclave link", "credentials forwarder", "bridge",
    ]  # fmt: skip
    assert lines[-1] == f"bridge: tcp://127.0.0.1:{port}"
    assert health["status"] == "ready"
    assert (answer, content_type) == (b"opaque ciphertext", "message/ohttp-res")
    assert 'nci_bridge_requests_total{route="infer",status="200"} 1' in metrics
    assert "nci_kms_relay_connections_total 0" in metrics
    assert enclave_thread.credentials[:1] == [
        Credentials("AKIAPARENTEXAMPLE001", "parent/secret", "", "")
    ]
    assert status == 0
    assert "stopping" in rest


def test_unreachable_bridge_port_is_a_clean_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "parent.yaml"
        path.write_text(
            f"bridge: {{listen: 'tcp://127.0.0.1:{port}'}}\n"
            f"enclave: {{control: 'unix://{tmp_path}/e.sock'}}\n"
            "credentials: {source: none}\n"
        )
        out, err = io.StringIO(), io.StringIO()
        assert main(["parent", "run", "--config", str(path)], out=out, err=err) == 2
    assert "listen on" in err.getvalue()


# -- nci parent run --only: one systemd unit per group of services, one configuration ---------


class Announcements(io.StringIO):
    """``run_services``'s output; sets ``ready`` once the line starting with ``last`` is out."""

    def __init__(self, last: str) -> None:
        super().__init__()
        self.last = last
        self.ready = asyncio.Event()

    def write(self, text: str) -> int:
        if text.startswith(self.last):
            self.ready.set()
        return super().write(text)

    def services(self) -> list[str]:
        return [line.split(":")[0] for line in self.getvalue().splitlines()]


def every_service(tmp_path: Path, bridge_port: int) -> ParentConfig:
    return parse_config(
        f"bridge: {{listen: 'tcp://127.0.0.1:{bridge_port}'}}\n"
        f"enclave: {{control: 'unix://{tmp_path}/enclave.sock'}}\n"
        f"kms_relay:\n  listen: 'unix://{tmp_path}/kms.sock'\n"
        f"  upstream: 'tcp://127.0.0.1:{free_port()}'\n"
        f"bundles:\n  listen: 'unix://{tmp_path}/bundles.sock'\n"
        f"  sources: {{tiny: {{folder: {BUNDLE}}}}}\n"
        "credentials: {source: none}\n",
        base=tmp_path,
    )


async def accepts(address: Address) -> bool:
    try:
        if address.kind == "unix":
            _, writer = await asyncio.open_unix_connection(address.path)
        else:
            _, writer = await asyncio.open_connection(address.host, address.port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


def test_only_kms_relay_and_bundles_leaves_the_bridge_port_closed(tmp_path: Path) -> None:
    port = free_port()
    config = every_service(tmp_path, port)
    assert config.kms_relay is not None
    assert config.bundles is not None
    relay, bundles = config.kms_relay.listen, config.bundles.listen

    async def run() -> tuple[list[str], list[bool], str]:
        out = Announcements("kms relay")
        stop = asyncio.Event()
        services = config.services(["kms_relay", "bundles"])
        task = asyncio.create_task(
            nci.parent.run_services(config, out, services=services, stop=stop)
        )
        await asyncio.wait_for(out.ready.wait(), 10)  # a guard against hanging, not a timing check
        listening = [
            await accepts(relay),
            await accepts(bundles),
            await accepts(config.bridge_listen),
            await accepts(config.enclave_control),  # nothing dialled the enclave either
        ]
        started = out.services()
        stop.set()
        await task
        return started, listening, out.getvalue()

    started, listening, output = asyncio.run(run())
    assert started == ["bundle streamer", "kms relay"]
    assert listening == [True, True, False, False]
    assert output.endswith("stopping\n")


def test_only_bridge_leaves_the_enclave_boot_services_to_the_relay_unit(tmp_path: Path) -> None:
    port = free_port()
    config = every_service(tmp_path, port)
    assert config.kms_relay is not None
    assert config.bundles is not None
    relay, bundles = config.kms_relay.listen, config.bundles.listen

    async def run() -> tuple[list[str], list[bool]]:
        out = Announcements("bridge")
        stop = asyncio.Event()
        async with FakeEnclave(config.enclave_control):
            task = asyncio.create_task(
                nci.parent.run_services(config, out, services={"bridge"}, stop=stop)
            )
            await asyncio.wait_for(out.ready.wait(), 10)
            listening = [
                await accepts(config.bridge_listen),
                await accepts(relay),
                await accepts(bundles),
            ]
            stop.set()
            await task
        return out.services(), listening

    started, listening = asyncio.run(run())
    assert started == ["enclave link", "bridge", "stopping"]
    assert listening == [True, False, False]


@pytest.mark.parametrize(
    ("only", "message"),
    [
        ("bogus", "'bogus' is not a service"),
        ("bundles,relay", "'relay' is not a service"),
        ("launcher", "launcher: the configuration has no launcher section"),
        ("kms_relay", "kms_relay: the configuration has no kms_relay section"),
    ],
)
def test_rejects_only_naming_an_unknown_or_unconfigured_service(
    tmp_path: Path, only: str, message: str
) -> None:
    path = tmp_path / "parent.yaml"
    path.write_text(MINIMAL)
    out, err = io.StringIO(), io.StringIO()
    assert main(["parent", "run", "--config", str(path), "--only", only], out=out, err=err) == 2
    assert message in err.getvalue()
    assert not out.getvalue()


@pytest.mark.parametrize("only", ["", "bundles,", ",bridge"])
def test_rejects_an_empty_service_name(tmp_path: Path, only: str) -> None:
    path = tmp_path / "parent.yaml"
    path.write_text(MINIMAL)
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["parent", "run", "--config", str(path), "--only", only],
            out=io.StringIO(),
            err=io.StringIO(),
        )
    assert exit_info.value.code == 2
