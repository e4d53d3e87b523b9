"""`nci consumer ask|attest|proxy`: answers on stdout, what was verified on stderr, exit codes."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import urllib3

from nci.cli import main
from tests.consumer.fakeserver import (
    MANIFEST_SHA256,
    MODEL_ID,
    OTHER_MEASUREMENTS,
    FakeBridge,
    expect_yaml,
    tiny_png,
)

PROMPT = "what shape is this"


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), out=out, err=err)
    assert "Traceback" not in err.getvalue()
    return status, out.getvalue(), err.getvalue()


def common(url: str, bridge: FakeBridge, expect: Path) -> list[str]:
    return [url, "--expect", str(expect), "--trust-local-root", str(bridge.root_pem_path)]


def test_ask_streams_the_answer_and_says_what_was_verified(
    url: str, bridge: FakeBridge, expect_file: Path, tmp_path: Path
) -> None:
    image = tmp_path / "shape.png"
    image.write_bytes(tiny_png())
    status, out, err = run(
        "consumer", "ask", *common(url, bridge, expect_file), "--image", str(image),
        "--max-tokens", "20", "--temperature", "0", PROMPT,
    )  # fmt: skip
    assert status == 0
    assert out == "WHAT SHAPE IS THIS (1 image(s))\n"
    assert "PCR0, PCR1, PCR2 match accepted set 1 of 1" in err
    assert f"OHTTP key:    id {bridge.key_id}" in err
    assert f"model:        {MODEL_ID}" in err
    assert MANIFEST_SHA256.hex() in err
    assert "NOT Nitro hardware" in err
    assert bridge.emulator.module_id in err
    assert "finished: stop" in err
    assert bridge.received[0].params.stream
    assert bridge.received[0].params.max_tokens == 20


def test_ask_without_streaming(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    status, out, _ = run(
        "consumer", "ask", *common(url, bridge, expect_file), "--no-stream", PROMPT
    )
    assert status == 0
    assert out == "WHAT SHAPE IS THIS (0 image(s))\n"
    assert not bridge.received[0].params.stream


def test_ask_reads_the_prompt_from_stdin(
    url: str, bridge: FakeBridge, expect_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    status, out, _ = run("consumer", "ask", *common(url, bridge, expect_file), "-")
    assert status == 0
    assert out.startswith("FROM STDIN")


def test_ask_refuses_an_enclave_with_other_measurements(
    url: str, bridge: FakeBridge, tmp_path: Path
) -> None:
    other = tmp_path / "other.yaml"
    other.write_text(expect_yaml(OTHER_MEASUREMENTS))
    status, out, err = run("consumer", "ask", *common(url, bridge, other), PROMPT)
    assert status == 1
    assert out == ""
    assert "PCRs match none" in err
    assert bridge.infer_count == 0


def test_ask_reports_a_truncated_answer_as_incomplete(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    bridge.knobs.truncate = True
    status, _, err = run("consumer", "ask", *common(url, bridge, expect_file), PROMPT)
    assert status == 1
    assert "INCOMPLETE" in err
    assert "finished:" not in err


def test_ask_reports_a_busy_bridge(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    bridge.knobs.infer_status = 429
    status, _, err = run("consumer", "ask", *common(url, bridge, expect_file), PROMPT)
    assert status == 1
    assert "429" in err


def test_ask_usage_and_input_errors_exit_2(
    url: str, bridge: FakeBridge, expect_file: Path, tmp_path: Path
) -> None:
    args = common(url, bridge, expect_file)
    assert run("consumer", "ask", url, PROMPT)[0] == 2  # no --expect
    assert run("consumer", "ask", *args, "--image", str(tmp_path / "none.png"), PROMPT)[0] == 2
    assert run("consumer", "ask", *args, "--max-tokens", "0", PROMPT)[0] == 2
    assert run("consumer", "ask", *args, "--max-age", "-1", PROMPT)[0] == 2
    missing = ["--expect", str(tmp_path / "none.yaml")]
    assert run("consumer", "ask", url, *missing, PROMPT)[0] == 2
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    status, _, err = run(
        "consumer", "ask", *common(f"http://127.0.0.1:{port}", bridge, expect_file), PROMPT
    )
    assert status == 2
    assert "cannot reach" in err
    assert bridge.hits == []


def test_attest_prints_every_check(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    status, out, _ = run("consumer", "attest", *common(url, bridge, expect_file))
    assert status == 0
    for name in ("chain", "signature", "debug mode", "measurements", "nonce", "key binding"):
        assert f"[ok  ] {name}" in out
    assert "RESULT: VALID" in out
    assert "LOCAL root" in out
    assert bridge.infer_count == 0


def test_attest_json(url: str, bridge: FakeBridge, expect_file: Path) -> None:
    status, out, _ = run("consumer", "attest", *common(url, bridge, expect_file), "--json")
    assert status == 0
    report = json.loads(out)
    assert report["valid"] is True
    assert report["model_id"] == MODEL_ID
    assert report["key_id"] == bridge.key_id
    assert report["manifest_sha256"] == MANIFEST_SHA256.hex()
    assert report["nitro_hardware"] is False


def test_attest_rejects_a_debug_mode_enclave(
    nsm_state: Path, serve: object, expect_file: Path
) -> None:
    debug = FakeBridge(nsm_state, debug_mode=True)
    url = serve(debug.app())  # type: ignore[operator]
    status, out, _ = run("consumer", "attest", *common(url, debug, expect_file))
    assert status == 1
    assert "RESULT: REJECTED (DebugModeDocument)" in out
    status, out, _ = run("consumer", "attest", *common(url, debug, expect_file), "--json")
    assert status == 1
    assert json.loads(out)["error"]["type"] == "DebugModeDocument"


def test_attest_without_the_local_root_is_rejected(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    status, out, _ = run("consumer", "attest", url, "--expect", str(expect_file))
    assert status == 1
    assert "ChainInvalid" in out


@pytest.mark.parametrize("command", ["ask", "attest", "proxy"])
def test_refuses_expectations_that_pin_only_the_kernel(
    command: str, url: str, bridge: FakeBridge, tmp_path: Path
) -> None:
    kernel_only = tmp_path / "kernel.yaml"
    kernel_only.write_text(expect_yaml({1: OTHER_MEASUREMENTS[1]}))  # any image matches it
    extra = {"ask": [PROMPT], "attest": [], "proxy": ["--listen", "127.0.0.1:0"]}[command]
    status, out, err = run("consumer", command, *common(url, bridge, kernel_only), *extra)
    assert status == 2
    assert "PCR0 (the whole enclave image) or PCR8" in err
    assert out == ""
    assert bridge.hits == []


def test_ask_refuses_an_enclave_serving_another_model(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    args = common(url, bridge, expect_file)
    status, out, err = run("consumer", "ask", *args, "--model-id", "another-model", PROMPT)
    assert status == 1
    assert "user_data.model_id" in err
    assert out == ""
    assert bridge.infer_count == 0


def test_attest_checks_the_pinned_model_and_manifest(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    args = common(url, bridge, expect_file)
    pins = ["--model-id", MODEL_ID, "--manifest-sha256", MANIFEST_SHA256.hex()]
    status, out, _ = run("consumer", "attest", *args, *pins)
    assert status == 0
    assert "[ok  ] pinned model" in out
    assert "RESULT: VALID" in out
    status, out, _ = run("consumer", "attest", *args, "--manifest-sha256", "00" * 32, "--json")
    assert status == 1
    assert json.loads(out)["error"]["type"] == "ManifestMismatch"
    status, _, err = run("consumer", "attest", *args, "--manifest-sha256", "not-hex")
    assert status == 2
    assert "manifest sha256" in err


@pytest.mark.parametrize("listen", ["0.0.0.0:8000", "192.168.1.10:8000", "localhost", "x:y"])
def test_proxy_refuses_to_listen_beyond_loopback(
    listen: str, url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    status, _, err = run("consumer", "proxy", *common(url, bridge, expect_file), "--listen", listen)
    assert status == 2
    assert "nci consumer proxy:" in err
    assert bridge.hits == []


def test_proxy_command_serves_until_sigterm(
    url: str, bridge: FakeBridge, expect_file: Path
) -> None:
    out, err = io.StringIO(), io.StringIO()
    seen: list[object] = []

    def use_then_stop() -> None:  # the proxy runs in this (the main) thread, where signals go
        try:
            for _ in range(1000):
                if "proxy on" in out.getvalue():
                    break
                time.sleep(0.01)
            base = out.getvalue().split()[3]
            answer = urllib3.PoolManager(retries=False).request("GET", f"{base}/models")
            seen.append(json.loads(answer.data)["data"][0]["id"])
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=use_then_stop)
    helper.start()
    argv = ["consumer", "proxy", *common(url, bridge, expect_file), "--listen", "127.0.0.1:0"]
    status = main(argv, out=out, err=err)
    helper.join(10)
    assert status == 0
    assert seen == [MODEL_ID]
    assert out.getvalue().startswith("OpenAI-compatible proxy on http://127.0.0.1:")
    assert "OHTTP key:" in err.getvalue()
