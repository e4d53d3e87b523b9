"""Architecture rules that hold for the whole distribution: pinned public APIs and import rules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("attestation", "kms_policy", "protocol", "enclave", "parent", "provider", "consumer")

# ARCHITECTURE.md, "Packages": what each package may import of ours.
ALLOWED_IMPORTS: dict[str, set[str]] = {
    "attestation": set(),
    "kms_policy": {"attestation"},
    "protocol": set(),
    "enclave": {"attestation", "protocol"},
    "parent": {"protocol"},
    "provider": {"protocol", "kms_policy"},
    "consumer": {"protocol", "attestation"},
}

PUBLIC_API: dict[str, list[str]] = {
    "attestation": [
        "AttestationDocument",
        "AuditReport",
        "EmulatedNsm",
        "ExpectedMeasurements",
        "Nonce",
        "NsmClient",
        "NsmDevice",
        "PcrSet",
        "Policy",
        "TrustRoot",
        "VerifiedAttestation",
        "audit",
        "verify",
    ],
    "kms_policy": [
        "Decision",
        "Finding",
        "KeyPolicy",
        "KmsRequest",
        "PolicyReport",
        "Statement",
        "attestation_context",
        "check",
        "evaluate",
        "generate",
    ],
    "protocol": [
        "Address",
        "ClientContext",
        "Frame",
        "FrameType",
        "InferenceRequest",
        "InferenceResponse",
        "KeyConfig",
        "Manifest",
        "ServerContext",
        "chunked_request_reader",
        "connect",
        "decapsulate_request",
        "encapsulate_chunked_request",
        "encapsulate_request",
        "generate_key_config",
        "http_request",
        "open_chunk_into",
        "open_connection",
        "parse_address",
        "parse_http_request",
        "parse_key_configs",
        "read_frame",
        "recv_frame",
        "seal_chunk",
        "send_frame",
        "start_server",
        "write_frame",
    ],
    "enclave": [],
    "parent": [
        "BridgeLimits",
        "BundleSource",
        "BundleStreamer",
        "CredentialsForwarder",
        "EnclaveError",
        "EnclaveLink",
        "FolderSource",
        "KmsRelay",
        "LocalLauncher",
        "NitroLauncher",
        "ParentConfig",
        "S3Source",
        "create_app",
        "load_config",
        "start_bridge",
    ],
    "provider": ["inspect", "publish", "seal"],
    "consumer": ["AsyncClient", "AsyncStream", "Attestation", "Client", "Completion", "Stream"],
}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    ours = set(PACKAGES) | {"nci"}
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imported_top_levels(path) & ours - {package}
        forbidden = imported - ALLOWED_IMPORTS[package]
        assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_public_api_is_pinned(package: str) -> None:
    module = importlib.import_module(package)
    assert sorted(module.__all__) == PUBLIC_API[package]
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name} is exported but missing"


@pytest.mark.parametrize("package", PACKAGES)
def test_package_ships_py_typed(package: str) -> None:
    assert (ROOT / package / "py.typed").is_file()
