"""The enclave image's recipe: pinned inputs, the enclave's own packages only, a configuration the
enclave accepts and that agrees with the parent's example."""

from __future__ import annotations

import re
from pathlib import Path

from enclave.config import load_config
from parent.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "enclave" / "Dockerfile").read_text()


def test_base_image_is_pinned_by_digest() -> None:
    bases = re.findall(r"^FROM\s+(\S+)", DOCKERFILE, re.MULTILINE)
    assert bases
    assert all(re.search(r"@sha256:[0-9a-f]{64}$", base) for base in bases)


def test_every_python_package_in_the_image_is_pinned() -> None:
    lines = (ROOT / "enclave" / "image" / "requirements.txt").read_text().splitlines()
    packages = [line for line in lines if line and not line.startswith("#")]
    assert packages
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][^ ]*", p) for p in packages)
    assert "torch==2.13.0" in DOCKERFILE
    assert "--no-deps" in DOCKERFILE  # nothing unpinned is pulled in behind our back


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
