"""Expected-measurement files: the shapes people have, and the typos that must not drop a pin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attestation.errors import ConfigError
from attestation.expectations import (
    MAX_EXPECTATION_FILE,
    load_expectations,
    parse_expectations,
    parse_pcr_option,
)
from attestation.policy import Nonce, PcrSet

P0, P1, P2 = "aa" * 48, "bb" * 48, "cc" * 48


def test_reads_nitro_cli_build_enclave_output() -> None:
    text = json.dumps(
        {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": P0, "PCR1": P1, "PCR2": P2}}
    )
    (only,) = parse_expectations(text)
    assert only.values == {0: bytes.fromhex(P0), 1: bytes.fromhex(P1), 2: bytes.fromhex(P2)}


def test_reads_yaml_with_several_sets_for_rolling_deploys() -> None:
    text = f"accept:\n  - {{pcr0: '{P0}'}}\n  - {{'0': '{P1}', PCR8: '{P2}'}}\n"
    sets = parse_expectations(text)
    assert [sorted(s.values) for s in sets] == [[0], [0, 8]]


def test_reads_a_plain_list_of_sets() -> None:
    assert len(parse_expectations(json.dumps([{"PCR0": P0}, {"PCR0": P1}]))) == 2


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("typo_in_pcr_key", json.dumps({"PRC0": P0}), "unknown key"),
        ("pcr_index_out_of_range", json.dumps({"PCR32": P0}), "not in 0 to 31"),
        ("short_pcr_value", json.dumps({"PCR0": "aa" * 32}), "48 bytes"),
        ("non_hex_value", json.dumps({"PCR0": "zz" * 48}), "not hexadecimal"),
        ("unquoted_yaml_number", "PCR0: 1234", "quote"),
        ("sha256_measurements", json.dumps({"HashAlgorithm": "Sha256", "PCR0": P0}), "Sha384"),
        ("empty_list", "[]", "no PCR set"),
        ("empty_mapping", "{}", "mapping"),
        ("not_yaml", "PCR0: [unclosed", "not valid YAML"),
        ("same_pcr_twice", json.dumps({"PCR0": P0, "0": P0}), "twice"),
    ],
)
def test_rejects_bad_expectation_file(name: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_expectations(text)


def test_rejects_oversized_expectation_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text("#" * (MAX_EXPECTATION_FILE + 1))
    with pytest.raises(ConfigError, match="exceeds"):
        load_expectations(path)


def test_missing_expectation_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_expectations(tmp_path / "absent.yaml")


def test_parses_pcr_option() -> None:
    assert parse_pcr_option(f"0={P0}") == (0, bytes.fromhex(P0))
    assert parse_pcr_option(f"PCR8={P0}")[0] == 8
    with pytest.raises(ConfigError, match="INDEX=HEX"):
        parse_pcr_option(P0)
    with pytest.raises(ConfigError, match="hexadecimal"):
        parse_pcr_option("0=xyz")


def test_pcr_set_rejects_all_zero_index_out_of_range_and_empty() -> None:
    with pytest.raises(ConfigError):
        PcrSet({})
    with pytest.raises(ConfigError):
        PcrSet({40: bytes(48)})


@pytest.mark.parametrize("size", [0, 15, 1025])
def test_rejects_guessable_or_oversized_nonce(size: int) -> None:
    with pytest.raises(ConfigError):
        Nonce(b"\x01" * size)


def test_random_nonce_has_fixed_size() -> None:
    assert len(Nonce.random().value) == Nonce.SIZE == 32


def test_rejects_empty_expected_public_key_or_user_data() -> None:
    from attestation.policy import ExpectedPublicKey, ExpectedUserData

    with pytest.raises(ConfigError):
        ExpectedUserData(b"")
    with pytest.raises(ConfigError):
        ExpectedPublicKey(b"")
