"""The runtime interface the control server drives, and :class:`EchoRuntime`, its stand-in model.

Re-exported by :mod:`enclave.server`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from enclave.errors import ConfigError
from protocol.inference import Image, Params

__all__ = ["EchoRuntime", "Generation", "Runtime"]


class Generation(Protocol):
    """Text pieces as the model produces them; the counters are set once it is exhausted."""

    def __iter__(self) -> Iterator[str]: ...

    def __next__(self) -> str: ...

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...


class Runtime(Protocol):
    """A loaded model (``enclave.models.runtime.load_runtime``), or :class:`EchoRuntime`.

    ``generate`` validates its input eagerly and raises an :class:`EnclaveError` subclass for a
    request the model refuses (answered ``malformed``). It is called from worker threads, up to
    ``max_concurrency`` at once.
    """

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation: ...


class EchoRuntime:
    """Echoes the prompt back, one word (with its trailing space) per piece, up to
    ``params.max_tokens`` pieces: a stand-in model for tests and load benchmarks. ``delay`` seconds
    of sleep per piece imitate a model's token latency."""

    def __init__(self, *, delay: float = 0.0) -> None:
        if isinstance(delay, bool) or not isinstance(delay, int | float) or delay < 0:
            raise ConfigError("delay must be a non-negative number of seconds")
        self._delay = float(delay)

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> _EchoGeneration:
        words = re.findall(r"\s*\S+\s*|\s+", prompt)
        return _EchoGeneration(words, params.max_tokens, len(words) + len(images), self._delay)


class _EchoGeneration:
    def __init__(self, words: list[str], limit: int, prompt_tokens: int, delay: float) -> None:
        self._words = words
        self._limit = limit
        self._delay = delay
        self.finish_reason: str | None = None
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self.completion_tokens >= min(len(self._words), self._limit):
            self.finish_reason = "length" if self._limit < len(self._words) else "stop"
            raise StopIteration
        if self._delay:
            time.sleep(self._delay)
        word = self._words[self.completion_tokens]
        self.completion_tokens += 1
        return word
