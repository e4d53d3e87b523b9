"""The runbook (docs/deploy-aws.md) and the files it deploys agree: one bundle name from the
provider's publish to the enclave's request, commands in an order that can run, the consumer's
path to the bridge as the stack allows it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from enclave.config import load_config as load_enclave_config
from parent.config import AwsLauncherConfig
from parent.config import load_config as load_parent_config

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = (ROOT / "docs" / "deploy-aws.md").read_text()
README = (ROOT / "deploy" / "README.md").read_text()
ENCLAVE = load_enclave_config(ROOT / "deploy" / "enclave.json")
PARENT = load_parent_config(ROOT / "deploy" / "parent.yaml.example")


def _commands(text: str, program: str) -> list[list[str]]:
    """Every ``program …`` command line of the shell blocks, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    found = []
    for line in joined.splitlines():
        line = line.strip().split(" #", 1)[0]
        if line.startswith(program + " "):
            found.append(shlex.split(line))
    return found


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_rejects_an_enclave_asking_for_a_bundle_the_parent_does_not_serve() -> None:
    assert PARENT.bundles is not None
    assert ENCLAVE.bundle in PARENT.bundles.sources


def test_rejects_publishing_under_another_prefix_than_the_parent_streams_from() -> None:
    assert PARENT.bundles is not None
    source = PARENT.bundles.sources[ENCLAVE.bundle]
    publishes = [argv for argv in _commands(RUNBOOK, "nci") if argv[1:3] == ["provider", "publish"]]
    assert publishes, "the runbook publishes the bundle"
    for argv in publishes:
        bucket, _, prefix = argv[4].removeprefix("s3://").partition("/")
        assert (bucket, prefix) == (source.s3_bucket, source.s3_prefix)
    assert f"s3://BUCKET/{source.s3_prefix}" in README
    # under the stack's BundlePrefix, the only prefix the instance role may read
    template = yaml.safe_load((ROOT / "deploy" / "cloudformation.yaml").read_text())
    assert source.s3_prefix.startswith(template["Parameters"]["BundlePrefix"]["Default"] + "/")


def test_rejects_sealing_or_attesting_another_model_id_than_the_enclave_pins() -> None:
    seals = [argv for argv in _commands(RUNBOOK, "nci") if argv[1:3] == ["provider", "seal"]]
    consumers = [argv for argv in _commands(RUNBOOK, "nci") if argv[1] == "consumer"]
    assert seals
    assert consumers
    for argv in seals + [a for a in consumers if "--model-id" in a]:
        assert _option(argv, "--model-id") == ENCLAVE.model_id
    assert all("--model-id" in argv for argv in consumers if argv[2] in ("attest", "ask"))


def test_rejects_running_nci_on_the_instance_before_installing_it() -> None:
    step3 = RUNBOOK[RUNBOOK.index("## 3.") : RUNBOOK.index("## 4.")]
    lines = [line.strip() for line in step3.splitlines()]  # the commands, not the prose

    def first(prefix: str) -> int:
        return next(n for n, line in enumerate(lines) if line.startswith(prefix))

    installed = first("sudo python3.11 -m pip install .")
    assert installed < first("nci audit eif")
    assert installed < first("make eif")
    # and the measurements reach the key administrator's laptop before step 4 uses them
    assert "Take the measurements to the key administrator's laptop" in step3


def test_rejects_a_consumer_url_the_stack_cannot_serve() -> None:
    # the bridge is plain HTTP on the instance's loopback and the stack opens no ingress: the
    # consumer goes through Session Manager port forwarding to 127.0.0.1
    assert "https://HOST" not in RUNBOOK
    assert "AWS-StartPortForwardingSession" in RUNBOOK
    assert PARENT.bridge_listen.host == "127.0.0.1"
    port = PARENT.bridge_listen.port
    consumers = [argv for argv in _commands(RUNBOOK, "nci") if argv[1] == "consumer"]
    assert consumers
    for argv in consumers:
        assert argv[3] == f"http://127.0.0.1:{port}", argv
    assert f'"portNumber":["{port}"]' in RUNBOOK


def test_rejects_an_ami_that_floats_between_stack_updates() -> None:
    deploys = [a for a in _commands(RUNBOOK, "aws") if a[1:3] == ["cloudformation", "deploy"]]
    create, *updates = deploys
    assert any(item.startswith("ImageId=") for item in create)
    assert updates
    for argv in updates:  # later updates reuse it
        assert not any(item.startswith("ImageId=") for item in argv)
    assert "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64" in RUNBOOK


def test_rejects_an_unpinned_nitro_cli() -> None:
    installs = [a for a in _commands(RUNBOOK, "sudo") if a[1:4] == ["dnf", "install", "-y"]]
    packages = [p for argv in installs for p in argv[4:] if p.startswith("aws-nitro-enclaves")]
    assert packages
    assert all(re.fullmatch(r"aws-nitro-enclaves-cli(-devel)?-1\.4\.\*", p) for p in packages)


def test_example_enclave_sizes_follow_the_documented_rule() -> None:
    launcher = PARENT.launcher
    assert isinstance(launcher, AwsLauncherConfig)
    assert launcher.cpu_count >= 2
    assert launcher.cpu_count % 2 == 0
    assert launcher.memory_mib >= 4 * 1536  # 4 x a 1.5 GiB CPU torch EIF
    allocator = re.search(r"s/\^memory_mib:\.\*/memory_mib: (\d+)/", RUNBOOK)
    assert allocator
    assert int(allocator[1]) >= launcher.memory_mib
