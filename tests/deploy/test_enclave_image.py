"""The enclave image's recipe: pinned inputs, the enclave's own packages only, a configuration the
enclave accepts and that agrees with the parent's example."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from enclave.config import load_config
from parent.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "enclave" / "Dockerfile").read_text()


def test_base_image_is_pinned_by_digest() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert bases
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", base) for base in bases)


REQUIREMENTS = ROOT / "enclave" / "image" / "requirements.txt"
TORCH = "torch==2.13.0+cpu"


def _requirements() -> dict[str, str]:
    """requirements.txt as normalised name -> version; every line must be NAME==VERSION."""
    pinned: dict[str, str] = {}
    for number, line in enumerate(REQUIREMENTS.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([0-9][A-Za-z0-9.+!-]*)", line)
        assert match, f"requirements.txt:{number}: {line!r} is not pinned NAME==VERSION"
        pinned[_normalise(match[1])] = match[2]
    return pinned


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def _pip_installs() -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [c.strip() for c in re.split(r"&&|\n", joined) if re.search(r"\bpip install\b", c)]


def test_rejects_an_unpinned_python_package_in_the_image() -> None:
    pinned = _requirements()
    assert pinned
    installs = _pip_installs()
    assert len(installs) == 2, installs
    torch, requirements = installs
    assert TORCH in torch.split()
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch
    assert "-r /opt/nci/requirements.txt" in requirements
    # --no-deps on every install: pip resolves nothing, so nothing unlisted floats in
    for command in installs:
        assert "--no-deps" in command.split(), command
        assert "--no-compile" in command.split(), command  # no .pyc built at image build time


def test_requirements_close_over_the_enclaves_imports_and_torchs_dependencies() -> None:
    # with --no-deps a missing dependency is an ImportError at boot: the pinned set must hold
    # every dependency (for Linux, Python 3.11) of every pinned package, and of torch
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pinned = _requirements()
    environment = {"sys_platform": "linux", "platform_system": "Linux", "extra": ""}
    environment |= {"python_version": "3.11", "python_full_version": "3.11.7"}
    environment |= {"platform_machine": "x86_64", "implementation_name": "cpython"}
    environment |= {"platform_python_implementation": "CPython", "os_name": "posix"}
    missing: list[str] = []
    for name in [*pinned, "torch"]:
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            pytest.fail(f"{name} is pinned for the image but not installed here to check")
        for text in requires:
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is not None and not marker.evaluate(environment):
                continue
            if _normalise(requirement.name) not in pinned:
                missing.append(f"{requirement.name} (for {name})")
    assert not missing, f"requirements.txt lacks {missing}"
    # every package the enclave's own code imports is there (pyproject's runtime dependencies)
    for name in ("asn1crypto", "boto3", "cbor2", "cryptography", "numpy", "pillow", "pyyaml"):
        assert name in pinned, name


def test_rejects_a_package_manager_step_in_the_image() -> None:
    # apt-get pulls whatever the mirror serves that day: not reproducible (enclave/netif.py brings
    # the loopback up instead of iproute2)
    assert not re.search(r"\b(apt-get|apt|dpkg|apk|dnf|yum)\b", DOCKERFILE)


def test_image_timestamps_are_pinned_and_rewritten() -> None:
    assert re.search(r"^ENV .*SOURCE_DATE_EPOCH=", DOCKERFILE, re.MULTILINE | re.DOTALL)
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\neif:") :].split("\n\n", 1)[0]
    assert "docker buildx build" in recipe
    assert "rewrite-timestamp=true" in recipe
    assert "--build-arg SOURCE_DATE_EPOCH=" in recipe
    assert "docker build " not in recipe


def test_rejects_a_region_baked_into_the_entry_point() -> None:
    # the KMS host comes from the measured enclave.json, not from a build argument defaulting to
    # us-east-1 (enclave/netif.py); no ip(8) either
    entrypoint = (ROOT / "enclave" / "image" / "entrypoint.sh").read_text()
    assert "NCI_REGION" not in DOCKERFILE + entrypoint
    assert "amazonaws.com" not in entrypoint
    assert "ip link" not in entrypoint
    command = [line for line in entrypoint.splitlines() if line.startswith("exec ")]
    assert command == ["exec python -m enclave --config /etc/nci/enclave.json --inside-image"]


def test_build_context_leaves_out_generated_files() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*"
    kept = [rule[1:] for rule in rules if rule.startswith("!")]
    copied = re.findall(r"^COPY\s+(\S+)", DOCKERFILE, re.MULTILINE)
    for path in copied:  # everything the Dockerfile copies is in the context, and only that
        assert any(path == k or path.startswith(k) or f"{path}/" == k for k in kept), path
    assert "**/__pycache__" in rules


def test_only_the_enclave_packages_are_copied_into_the_image() -> None:
    copied = re.findall(r"^COPY\s+(\S+)", DOCKERFILE, re.MULTILINE)
    packages = {c for c in copied if "/" not in c}
    assert packages == {"attestation", "protocol", "enclave"}  # never parent/, provider/, nci/


def test_the_image_configuration_is_one_the_enclave_accepts_on_hardware() -> None:
    config = load_config(ROOT / "deploy" / "enclave.json")
    assert config.nsm == "device"
    assert config.kms_endpoint.startswith("https://")


def test_the_image_configuration_meets_the_parents_example() -> None:
    enclave = load_config(ROOT / "deploy" / "enclave.json")
    example = ROOT / "deploy" / "parent.yaml.example"
    parent = parse_config(example.read_text(), base=example.parent)
    assert parent.enclave_control.port == enclave.control.port
    assert parent.kms_relay is not None
    assert parent.bundles is not None
    assert parent.kms_relay.listen.port == enclave.kms_relay.port
    assert parent.bundles.listen.port == enclave.bundle_streamer.port
