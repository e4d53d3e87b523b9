"""benchmarks.load: tiny runs with the echo runtime, for the shape of the figures and for what must
hold at any size (every request answered, nothing lost), not for the figures themselves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import load

pytestmark = pytest.mark.slow

LATENCY_KEYS = {"p50", "p95", "p99"}
WAY_KEYS = {
    "consumers",
    "elapsed_s",
    "requests_per_s",
    "latency_ms",
    "ttft_ms",
    "cpu_ms_per_request",
    "accepted",
    "answered",
    "errors",
    "lost",
    "lost_reasons",
}


def check_way(figures: dict[str, Any]) -> None:
    assert set(figures) == WAY_KEYS
    assert figures["answered"] > 0
    assert figures["errors"] == {}
    assert figures["lost"] == 0
    assert figures["lost_reasons"] == {}
    assert figures["accepted"] == figures["answered"]
    assert figures["requests_per_s"] > 0
    assert "this_process" in figures["cpu_ms_per_request"]
    for name in ("latency_ms", "ttft_ms"):  # half the workload is streamed
        cuts = figures[name]
        assert set(cuts) == LATENCY_KEYS
        assert 0 < cuts["p50"] <= cuts["p95"] <= cuts["p99"]


def test_every_way_answers_every_request(tmp_path: Path) -> None:
    result = load.run(consumers=2, seconds=0.5, runtime="echo", state_dir=tmp_path / "state")
    json.dumps(result)  # JSON-ready as it is
    assert set(result["ways"]) == {"a_direct", "b_plain_http", "c_confidential"}
    for figures in result["ways"].values():
        check_way(figures)
    cpu = {name: set(figures["cpu_ms_per_request"]) for name, figures in result["ways"].items()}
    assert cpu == {
        "a_direct": {"this_process"},
        "b_plain_http": {"this_process", "plain_server"},
        "c_confidential": {"this_process", "parent", "enclave"},
    }
    assert result["c_over_a_p50"] > 0
    assert result["c_over_b_p50"] > 0
    assert result["attest_ms"] > 0
    assert result["workload"]["kinds"] == ["jpeg", "png", "text"]
    assert result["workload"]["streamed"] == 0.5
    # with --runtime echo the echo figures are the main ones, and the crypto is measured apart
    echo = result["echo"]
    assert echo["ways"] == {
        name: result["ways"][name] for name in ("b_plain_http", "c_confidential")
    }
    assert echo["c_requests_per_s"] == result["ways"]["c_confidential"]["requests_per_s"]
    assert echo["hop_ms_p50"] is not None
    crypto = echo["crypto_us"]
    assert crypto["ohttp_us"] == pytest.approx(
        sum(
            crypto[f"{step}_us"]
            for step in (
                "encapsulate_request",
                "decapsulate_request",
                "encapsulate_response",
                "decapsulate_response",
            )
        ),
        abs=0.05,
    )
    assert crypto["with_framing_us"] >= crypto["ohttp_us"] > 0
    # the totals, and the goals reported next to them (the built-in model's is not this run's)
    assert result["errors"] == {}
    assert result["lost"] == 0
    assert (
        result["accepted"]
        == result["answered"]
        == sum(way["answered"] for way in result["ways"].values())
    )
    goals = {goal["goal"]: goal for goal in result["goals"]}
    assert goals["zero lost requests"]["met"] is True
    assert [g["met"] for g in result["goals"] if "plain HTTP" in g["goal"]] == [None]


def test_command_prints_one_json_object_with_the_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--way", "a,b", "--runtime", "echo", "--consumers", "3", "--seconds", "0.2"]
    assert load.main([*argv, "--sweep", "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)  # one object, nothing else on standard output
    assert "a_direct × 3" in captured.err  # the progress goes to standard error
    assert set(result["ways"]) == {"a_direct", "b_plain_http"}
    for figures in result["ways"].values():
        check_way(figures)
    assert result["c_over_a_p50"] is None
    assert result["echo"]["c_requests_per_s"] is None
    sweep = result["sweep"]
    assert set(sweep) == {"a_direct", "b_plain_http"}
    for figures in sweep.values():
        assert list(figures["levels"]) == ["1", "4", "16", "64"]
        for level in figures["levels"].values():
            assert level["lost"] == 0
            assert set(level) == {
                "requests_per_s",
                "latency_p50_ms",
                "cpu_ms_per_request",
                "errors",
                "lost",
            }
            assert level["errors"] == {}  # the limits admit 64: no 429
        assert figures["throughput_64_over_1"] > 0
        assert figures["worst_fall"] >= 0
    assert result["lost"] == 0
    assert len(result["goals"]) == 2 + len(sweep)


def test_refuses_settings_it_cannot_honour() -> None:
    with pytest.raises(ValueError, match="consumers"):
        load.run(consumers=65, runtime="echo", ways=["a"])
    with pytest.raises(ValueError, match="runtime"):
        load.run(runtime="onnx", ways=["a"])
    with pytest.raises(ValueError, match="ways"):
        load.run(runtime="echo", ways=["d"])
