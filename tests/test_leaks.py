"""Invariants 1 and 2 of ARCHITECTURE.md, across real processes: during an end-to-end run, no
prompt, image, completion or piece of the plaintext weights crosses the parent (every connection
through it is behind a recording tap) or reaches the parent's or the enclave's logs (both at INFO).

The positive controls show that the search can fail: plaintext sent through a tap is found, and
the log files searched are the processes' real, verbose logs.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from nci.demo import png_pixels, weight_samples
from nci.localsystem import TAP_BRIDGE, TAP_BUNDLES, TAP_CONTROL, TAP_KMS, LocalSystem
from nci.tap import MIN_LEAK, leaks
from tests.test_system import MAX_TOKENS, client_for, questions, system  # noqa: F401 (the fixture)

pytestmark = pytest.mark.slow


def test_no_plaintext_crosses_the_parent_or_reaches_its_logs(
    system: LocalSystem,  # noqa: F811 (the fixture)
) -> None:
    before = {name: tap.bytes_relayed for name, tap in system.taps.items()}
    asked = questions(seed=21, count=6)
    secrets: list[bytes] = []
    answers: list[str] = []
    with client_for(system) as client:
        for index, item in enumerate(asked):
            image = [("image/png", item.png)]
            for prompt in (item.prompt, "describe the image ?"):
                if index % 2:
                    stream = client.generate(
                        prompt, images=image, stream=True, max_tokens=MAX_TOKENS, temperature=0.0
                    )
                    answers.append(stream.completion().text)
                else:
                    answers.append(
                        client.generate(
                            prompt, images=image, max_tokens=MAX_TOKENS, temperature=0.0
                        ).text
                    )
            secrets += [item.prompt.encode(), png_pixels(item.png)]
    secrets.append(b"describe the image ?")
    checked = [a.encode() for a in answers if len(a.encode()) >= MIN_LEAK]
    weights = weight_samples(system.model_dir)
    assert len(weights) >= 32
    # the run went through the taps: the images alone, encrypted, grew the consumer's capture
    assert system.taps[TAP_BRIDGE].bytes_relayed - before[TAP_BRIDGE] > sum(
        len(item.png) for item in asked
    )
    for name in (TAP_CONTROL, TAP_BUNDLES, TAP_KMS):
        assert system.taps[name].bytes_relayed > 0, name
    captures = [tap.captured for tap in system.taps.values()]
    assert leaks(secrets + checked + weights, captures) == []

    parent_log, enclave_log = system.parent_log.read_bytes(), system.enclave_log.read_bytes()
    assert b"enclave link: connected" in parent_log  # INFO lines: the verbose logs
    assert b"boot step 6/6: ready" in enclave_log
    assert leaks(secrets + checked + weights, [parent_log, enclave_log]) == []
    for text in [item.prompt for item in asked] + answers:
        words = text.split()
        if len(words) > 1:  # one word ("red") is in the logs' own vocabulary anyway
            assert text.encode() not in parent_log + enclave_log, text


def test_plaintext_sent_through_a_tap_is_found(
    system: LocalSystem,  # noqa: F811 (the fixture)
) -> None:
    marker = b"a prompt sent in clear, " + os.urandom(8).hex().encode()
    tap = system.taps[TAP_BRIDGE]
    before = bytes(tap.captured)
    post = urllib.request.Request(
        f"{system.bridge_url}/v1/infer",
        data=marker,
        headers={"Content-Type": "message/ohttp-req"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(post, timeout=30)
    caught.value.close()
    assert caught.value.code in (400, 422)  # the enclave could not decapsulate it
    assert leaks([marker], [before]) == []
    assert leaks([marker], [tap.captured]) == [0]
    # the bridge relayed it as it came: the control tap holds it too
    assert leaks([marker[:MIN_LEAK]], [system.taps[TAP_CONTROL].captured]) == [0]
