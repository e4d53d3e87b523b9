"""The model runtime interface the enclave server calls, and the dispatch on the bundle's model.

The server holds one :class:`Runtime`, built once at boot from the unlocked bundle by
:func:`load_runtime`, and calls :meth:`Runtime.generate` per request. Everything comes from enclave
memory (:class:`enclave.unlock.UnlockedModel`: tensors and files); nothing is written to disk.

``generate`` checks the whole request before it returns (prompt, images, sampling settings) and
raises :class:`InvalidInput` naming the rule; the returned :class:`Generation` yields text pieces
and, once exhausted, says why it stopped and how many tokens it read and wrote. Dispatch is on
``model_type`` in the bundle's ``config.json`` (``manifest.model_config``)::

    anymal      the built-in AnyMAL (enclave.models.builtin)
    llava       LLaVA-style Hugging Face VLMs              ┐
    idefics3    Idefics3 and SmolVLM                       ├ enclave.models.hf, extra [hf]
    qwen2_vl    Qwen2-VL                                   ┘
    anymal_smollm2  AnyMAL with SmolLM2-135M-Instruct as its LLM (enclave.models.smollm2, [hf])

Errors (``enclave.errors.EnclaveError`` below)::

    ModelRuntimeError
    ├── UnsupportedModel   the bundle: an unknown family, a bad config, weights that do not fit it,
    │                      a missing optional dependency (our or the provider's side)
    └── InvalidInput       the request: a prompt, image or setting the model refuses (the
                           consumer's side); messages name the rule, never quote the content
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import torch

from enclave.errors import EnclaveError
from enclave.unlock import UnlockedModel
from protocol.bundle import thaw_config
from protocol.inference import Image, Params

__all__ = [
    "FAMILIES",
    "FinishReason",
    "Generation",
    "InvalidInput",
    "ModelDescription",
    "ModelRuntimeError",
    "Runtime",
    "StopText",
    "UnsupportedModel",
    "clip_new_tokens",
    "load_runtime",
]

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]
FAMILIES: Final = ("anymal", "llava", "idefics3", "qwen2_vl", "anymal_smollm2")


class ModelRuntimeError(EnclaveError):
    """Base class of the runtime's errors."""


class UnsupportedModel(ModelRuntimeError):
    """The bundle's model cannot be served: unknown family, bad config, weights that do not fit
    the config, or an optional dependency that is not installed."""


class InvalidInput(ModelRuntimeError, ValueError):
    """A consumer's prompt, image or sampling setting the model refuses. The message names the
    rule ("images: this model takes exactly 1 image"), never the content."""


@dataclass(frozen=True)
class ModelDescription:
    """What a runtime serves and its limits (public: the server may publish it)."""

    model_id: str
    family: str  # one of FAMILIES
    modalities: tuple[str, ...]  # ("text", "image")
    max_images: int  # images per request
    max_image_bytes: int  # encoded size of one image
    max_image_pixels: int  # width × height of one image, checked before decoding
    context_length: int  # prompt and completion tokens together
    max_new_tokens: int  # the most completion tokens any request can get


class Generation(Iterator[str]):
    """The text pieces of one completion, produced as they are iterated.

    After exhaustion ``finish_reason`` is ``"stop"`` (end of sequence or a stop string, which is
    not emitted) or ``"length"`` (the token cap was reached); ``completion_tokens`` counts the
    tokens generated. ``close()`` (or leaving a ``with`` block) abandons the generation and frees
    the model; ``finish_reason`` then stays ``None``.
    """

    def __init__(self, prompt_tokens: int, run: Callable[[Generation], Iterator[str]]) -> None:
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self._pieces = run(self)

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Generation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def text(self) -> str:
        """Consume the rest and return it as one string."""
        return "".join(self)


class Runtime(Protocol):
    """One loaded model. ``generate`` inputs come from a consumer, through the attested channel."""

    description: ModelDescription

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation:
        """Check the request (raising :class:`InvalidInput`) and return its lazy completion.
        ``seed`` makes sampling reproducible; greedy decoding (temperature 0) ignores it."""
        ...


def load_runtime(model: UnlockedModel, *, threads: int | None = None) -> Runtime:
    """The runtime for ``model``, dispatched on ``model_type`` in its config.

    ``threads`` sets torch's intra-op thread count (process-wide). The bundle is authenticated,
    but its config is still checked: an unknown family or a config that does not build is
    :class:`UnsupportedModel`.
    """
    if threads is not None:
        if type(threads) is not int or threads < 1:
            raise UnsupportedModel("threads must be a positive integer")
        torch.set_num_threads(threads)
    config = thaw_config(model.manifest.model_config)
    family = config.get("model_type")
    if family == "anymal":
        from enclave.models.builtin import AnyMALRuntime

        return AnyMALRuntime.from_unlocked(model)
    if family in ("llava", "idefics3", "qwen2_vl"):
        from enclave.models.hf import HFRuntime

        return HFRuntime.from_unlocked(model)
    if family == "anymal_smollm2":
        from enclave.models.smollm2 import SmolRuntime

        return SmolRuntime.from_unlocked(model)
    if not isinstance(family, str):
        raise UnsupportedModel("config.json has no model_type")
    raise UnsupportedModel(f"model_type {family!r} is not one of {', '.join(FAMILIES)}")


def clip_new_tokens(requested: int, prompt_tokens: int, description: ModelDescription) -> int:
    """The completion cap of one request: what was asked, within the model's limits. Raises
    :class:`InvalidInput` when the prompt leaves no room for a single token."""
    room = description.context_length - prompt_tokens
    if room < 1:
        raise InvalidInput(
            f"prompt is {prompt_tokens} tokens; the context holds {description.context_length}"
        )
    return min(requested, description.max_new_tokens, room)


class StopText:
    """Cut a growing completion at the first stop string (which is not emitted), holding back any
    tail that might begin one until it cannot.

    :meth:`push` takes the whole text decoded so far and returns what may be emitted now; once a
    stop string is found ``stopped`` is true and nothing more is returned. A trailing U+FFFD (an
    incomplete UTF-8 sequence of a byte-level tokenizer) is also held back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self.emitted = 0

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        start = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        cuts = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped = True
            return self._take(text, min(cuts))
        safe = len(text) - self._held_back(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        return self._take(text, safe)

    def finish(self, text: str) -> str:
        """The rest of ``text`` when generation ended (a held-back tail is released)."""
        piece = self.push(text)
        if self.stopped:
            return piece
        return piece + self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece = text[self.emitted : end]
        self.emitted = end
        return piece

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
