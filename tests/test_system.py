"""The whole system across real processes (nci.localsystem): the local KMS and S3, the parent
(`nci parent run`) and the enclave it launches, consumers over loopback HTTP, every connection that
crosses the parent behind a recording tap.

One system serves the whole session (``system``, shared with tests/test_leaks.py): bringing it up
costs ~10 s. The test that restarts the enclave runs last in this file.
"""

from __future__ import annotations

import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from attestation import _measure
from consumer import AsyncClient, Client
from consumer.client import OHTTP_KEY_PROBLEM, build_request
from consumer.errors import AttestationFailed, ServerError
from consumer.proxy import ProxyServer
from enclave.models import _safetensors, shapes
from enclave.models.anymal import AnyMAL, AnyMALConfig
from enclave.models.builtin import AnyMALRuntime
from nci import localsystem
from nci.demo import scene_png
from nci.localsystem import TAP_BRIDGE, LocalSystem, LocalSystemError
from protocol.inference import Image, Params, http_request
from protocol.ohttp import MEDIA_TYPE_REQUEST, encapsulate_request

pytestmark = pytest.mark.slow

MAX_TOKENS = 24  # greedy answers (temperature 0) of at most this many tokens

# -- one system for the session ---------------------------------------------------------------

_SHARED: dict[str, Any] = {}


@contextlib.contextmanager
def shared_system(factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    """The session's system: started by its first user, closed after its last (each test module
    that imports the ``system`` fixture gets its own fixture instance, so they count here)."""
    if not _SHARED:
        system = LocalSystem(factory.mktemp("system-state"), boot_timeout=180)
        system.__enter__()
        _SHARED.update(system=system, users=0)
    _SHARED["users"] += 1
    try:
        yield _SHARED["system"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            system = _SHARED.pop("system")
            _SHARED.clear()
            system.close()
            assert system.leftovers == [], "processes outlived the parent"


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSystem]:
    with shared_system(tmp_path_factory) as running:
        yield running


def client_for(system: LocalSystem, **options: Any) -> Client:
    options.setdefault("expect", system.expect_path)
    return Client(system.bridge_url, trust_local_root=system.root_pem_path, **options)


# -- questions, and the same model run in this process -----------------------------------------


@dataclass(frozen=True)
class Asked:
    qtype: str
    prompt: str
    expected: str
    png: bytes


def questions(seed: int, count: int) -> list[Asked]:
    """``count`` held-out questions cycling over the types, each about its own scene."""
    return [
        Asked(s.qtype, s.question, s.answer, scene_png(s.scene))
        for s in shapes.sample_qa(seed, count, "heldout")
    ]


class Reference:
    """The sealed model, loaded from the provider's own folder in this process: greedy answers
    must equal the enclave's exactly."""

    def __init__(self, model_dir: Path) -> None:
        tensors, _ = _safetensors.loads((model_dir / "model.safetensors").read_bytes())
        config = json.loads((model_dir / "config.json").read_text())
        model = AnyMAL(AnyMALConfig.from_json(json.dumps(config["anymal"])))
        model.load_strict(tensors)
        self.runtime = AnyMALRuntime(model.eval(), model_id=config["model_id"])

    def answer(self, prompt: str, png: bytes) -> str:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the enclave runs it (configuration "threads": 1)
        try:
            params = Params(max_tokens=MAX_TOKENS, temperature=0.0)
            return self.runtime.generate(prompt, [Image("image/png", png)], params).text()
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(system: LocalSystem) -> Reference:
    return Reference(system.model_dir)


def vocabulary_words(text: str) -> bool:
    words = text.split()
    return bool(words) and all(word in shapes.WORDS for word in words)


# -- it works ----------------------------------------------------------------------------------


def test_text_and_image_question_answered_in_one_response(
    system: LocalSystem, reference: Reference
) -> None:
    asked = questions(seed=11, count=6)
    with client_for(system) as client:
        for item in asked:
            completion = client.generate(
                item.prompt,
                images=[("image/png", item.png)],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
            )
            assert vocabulary_words(completion.text), completion.text
            assert completion.text == reference.answer(item.prompt, item.png)
            assert completion.finish_reason == "stop"
            assert completion.usage.completion_tokens >= 1
            assert not completion.attestation.is_nitro_hardware  # the emulator, said so
            assert completion.attestation.pcrs[0] == system.measurements[0]
    counts = [item for item in asked if item.qtype == "count"]
    assert counts
    with client_for(system) as client:
        for item in counts:  # the built-in model counts perfectly (model card)
            text = client.generate(
                item.prompt,
                images=[("image/png", item.png)],
                max_tokens=MAX_TOKENS,
                temperature=0.0,
            ).text
            assert text == item.expected


def test_streamed_answer_equals_the_whole_one(system: LocalSystem, reference: Reference) -> None:
    with client_for(system) as client:
        for item in questions(seed=12, count=4):
            stream = client.generate(
                item.prompt,
                images=[("image/png", item.png)],
                stream=True,
                max_tokens=MAX_TOKENS,
                temperature=0.0,
            )
            pieces = list(stream)
            assert pieces
            assert stream.finish_reason == "stop"
            assert "".join(pieces) == reference.answer(item.prompt, item.png)


def test_caption_prompt_gets_a_longer_answer_in_the_model_vocabulary(system: LocalSystem) -> None:
    item = questions(seed=13, count=1)[0]
    with client_for(system) as client:
        text = client.generate(
            "describe the image ?",
            images=[("image/png", item.png)],
            max_tokens=MAX_TOKENS,
            temperature=0.0,
        ).text
    assert vocabulary_words(text), text


def test_question_without_an_image_is_refused_by_the_model(system: LocalSystem) -> None:
    with client_for(system) as client, pytest.raises(ServerError) as caught:
        client.generate("how many shapes are there ?", max_tokens=MAX_TOKENS, temperature=0.0)
    assert caught.value.status == 400  # the enclave's "malformed": this model takes one image


def test_eight_concurrent_consumers(system: LocalSystem, reference: Reference) -> None:
    asked = questions(seed=14, count=8)
    expected = [reference.answer(item.prompt, item.png) for item in asked]
    clients = [client_for(system) for _ in asked]
    for client in clients:  # one after the other: the bridge caps attestations in flight
        client.attest()

    def consume(index: int) -> str:
        item, client = asked[index], clients[index]
        if index % 2:
            return (
                client.generate(
                    item.prompt,
                    images=[("image/png", item.png)],
                    stream=True,
                    max_tokens=MAX_TOKENS,
                    temperature=0.0,
                )
                .completion()
                .text
            )
        return client.generate(
            item.prompt, images=[("image/png", item.png)], max_tokens=MAX_TOKENS, temperature=0.0
        ).text

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(consume, range(8)))
    finally:
        for client in clients:
            client.close()
    assert answers == expected


def test_consumer_expecting_other_pcrs_sends_nothing(system: LocalSystem) -> None:
    other = dict(system.measurements)
    other[0] = _measure.extend(other[0], b"another release")
    tap = system.taps[TAP_BRIDGE]
    before = tap.bytes_relayed
    item = questions(seed=15, count=1)[0]
    with client_for(system, expect=other) as client, pytest.raises(AttestationFailed):
        client.generate(
            item.prompt, images=[("image/png", item.png)], max_tokens=MAX_TOKENS, temperature=0.0
        )
    seen = bytes(tap.captured[before:])
    assert b"GET /v1/attestation?nonce=" in seen  # it asked who is there…
    assert b"/v1/infer" not in seen  # …and sent no request
    assert item.png[:64] not in seen


def test_unmodified_openai_client_through_the_proxy_streams_an_answer(
    system: LocalSystem, reference: Reference
) -> None:
    import base64

    item = next(a for a in questions(seed=16, count=6) if a.qtype == "count")
    client = AsyncClient(
        system.bridge_url, expect=system.expect_path, trust_local_root=system.root_pem_path
    )
    proxy = ProxyServer(client)
    base = system.run(proxy.start())
    try:
        openai_client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
        model = openai_client.models.list().data[0].id
        assert model == "anymal-shapes"
        url = "data:image/png;base64," + base64.b64encode(item.png).decode()
        stream = openai_client.chat.completions.create(
            model=model,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": item.prompt},
                        {"type": "image_url", "image_url": {"url": url}},
                    ],
                }
            ],
            stream=True,
            temperature=0,
            max_tokens=MAX_TOKENS,
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    finally:
        system.run(proxy.close())
        system.run(client.aclose())
    assert text == reference.answer(item.prompt, item.png)
    assert finish == "stop"


def test_failed_boot_is_a_clear_error_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key bound to other measurements: the enclave's key release is denied at boot step 3."""
    measured = localsystem.fresh_measurements()
    other = dict(measured)
    other[0] = _measure.extend(other[0], b"another release")
    monkeypatch.setattr(localsystem, "fresh_measurements", lambda: other)
    broken = LocalSystem(tmp_path / "state", boot_timeout=120)
    with pytest.raises(LocalSystemError) as caught:
        broken.__enter__()
    message = str(caught.value)
    assert "the enclave's boot failed: key_release_denied" in message
    assert "did the code of enclave/, attestation/ or protocol/ change" in message
    assert "--- enclave log (enclave.log), last lines:" in message
    assert "boot step 3 (key release and unlock) failed: key_release_denied" in message
    assert broken.leftovers == []
    assert not broken.root.exists()


# -- last: the enclave restarts under the consumers ----------------------------------------------


def post_with_key(
    system: LocalSystem, key_config: bytes, item: Asked
) -> tuple[int, dict[str, Any]]:
    """POST one plain OHTTP request encapsulated to ``key_config``; (status, problem)."""
    request = build_request(
        item.prompt, images=[("image/png", item.png)], max_tokens=MAX_TOKENS, temperature=0.0
    )
    body, _ = encapsulate_request(key_config, http_request(request))
    post = urllib.request.Request(
        f"{system.bridge_url}/v1/infer",
        data=body,
        headers={"Content-Type": MEDIA_TYPE_REQUEST},
        method="POST",
    )
    try:
        with urllib.request.urlopen(post, timeout=60) as response:
            return response.status, {}
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_enclave_restart_changes_the_key_and_consumers_reattest(
    system: LocalSystem, reference: Reference
) -> None:
    item = next(a for a in questions(seed=17, count=6) if a.qtype == "count")
    if localsystem.fresh_measurements() != system.measurements:  # a shared checkout being edited
        pytest.skip("the enclave's code changed since the key was made: a new enclave gets no key")
    with client_for(system) as client:
        old = client.attest()
        for _ in range(3):  # key ids are 8 bits: a restart may draw the same id (then go again)
            old_pid = system.kill_enclave()
            system.wait_ready(timeout=180, restarted=True)
            assert system.enclave_pid() != old_pid  # the launcher started a new one
            if system.health()["key_id"] != old.key_id:
                break
        else:
            pytest.fail("three restarts drew the same OHTTP key id")
        # the client still holds the old attestation: 422, it attests again and retries once
        completion = client.generate(
            item.prompt, images=[("image/png", item.png)], max_tokens=MAX_TOKENS, temperature=0.0
        )
        assert completion.attestation.key_config != old.key_config
        assert completion.attestation.nonce != old.nonce
        assert completion.text == reference.answer(item.prompt, item.png)
    status, problem = post_with_key(system, old.key_config, item)
    assert status == 422
    assert problem["type"] == OHTTP_KEY_PROBLEM
