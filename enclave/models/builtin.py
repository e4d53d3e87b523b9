"""The built-in model behind the runtime interface: :class:`AnyMALRuntime` over
:class:`enclave.models.anymal.AnyMAL`, and the model folder the provider seals for it.

The bundle's ``config.json``::

    {"model_type": "anymal", "model_id": "anymal-shapes", "anymal": {AnyMALConfig fields}}

and its tensors are exactly the model's state dict (``model.safetensors``). The built-in model
answers the shapes questions (``enclave.models.shapes``) about one image: a request carries exactly
one PNG or JPEG, decoded and resized to the model's image size (32×32).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import torch

from enclave.models import _safetensors
from enclave.models.anymal import AnyMAL, AnyMALConfig, InvalidRequest, InvalidWeights
from enclave.models.images import decode_image, to_tensor
from enclave.models.runtime import (
    Generation,
    InvalidInput,
    ModelDescription,
    StopText,
    UnsupportedModel,
    clip_new_tokens,
)
from enclave.models.tokenizer import BOS, EOS, IMAGE, PAD, SEP, Tokenizer
from enclave.unlock import UnlockedModel
from protocol.bundle import thaw_config
from protocol.inference import MAX_IMAGE_BYTES, Image, Params

__all__ = [
    "BUILTIN_MODEL_ID",
    "SHIPPED_WEIGHTS",
    "AnyMALRuntime",
    "builtin_config",
    "write_builtin_model_folder",
]

log = logging.getLogger(__name__)

BUILTIN_MODEL_ID: Final = "anymal-shapes"
SHIPPED_WEIGHTS: Final = Path(__file__).resolve().parent / "weights" / "anymal-shapes.safetensors"
MAX_IMAGE_PIXELS: Final = 4096 * 4096  # any larger image is resized to 32×32 all the same
# words the tokenizer turns into control tokens (<image> may be placed once; <unk> is harmless)
_FORBIDDEN_WORDS: Final = frozenset({PAD, BOS, EOS, SEP})


def builtin_config(config: AnyMALConfig, model_id: str = BUILTIN_MODEL_ID) -> dict[str, Any]:
    """The ``config.json`` of a built-in model folder."""
    return {"model_type": "anymal", "model_id": model_id, "anymal": json.loads(config.to_json())}


def write_builtin_model_folder(
    out: Path, *, weights: Path = SHIPPED_WEIGHTS, model_id: str = BUILTIN_MODEL_ID
) -> Path:
    """Write the folder the provider seals for the built-in model: ``model.safetensors`` (the
    tensors of ``weights``, the shipped weights by default) and ``config.json``. Returns ``out``,
    which must be empty or absent (the provider seals every file in it). The tensors are checked
    against their config here, so a bad folder is never sealed."""
    model = AnyMAL.from_safetensors(Path(weights).read_bytes())
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: the folder is sealed as a whole")
    (out / "model.safetensors").write_bytes(_safetensors.dumps(tensors, {"format": "pt"}))
    text = json.dumps(builtin_config(model.cfg, model_id), indent=2, sort_keys=True)
    (out / "config.json").write_text(text + "\n")
    return out


class AnyMALRuntime:
    """:class:`~enclave.models.runtime.Runtime` of the built-in AnyMAL (one image per request)."""

    def __init__(self, model: AnyMAL, *, model_id: str = BUILTIN_MODEL_ID) -> None:
        self.model = model.eval()
        self.tokenizer = Tokenizer()
        if len(self.tokenizer) != model.cfg.vocab_size:
            raise UnsupportedModel(
                f"anymal.vocab_size is {model.cfg.vocab_size}; the tokenizer has "
                f"{len(self.tokenizer)} words"
            )
        cfg = model.cfg
        shortest = cfg.n_latents + 2  # <bos> <image> <sep> with the image as n_latents tokens
        self.description = ModelDescription(
            model_id=model_id,
            family="anymal",
            modalities=("text", "image"),
            max_images=1,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            context_length=cfg.max_seq_len,
            max_new_tokens=max(cfg.max_seq_len - shortest, 0),
        )

    @classmethod
    def from_unlocked(cls, unlocked: UnlockedModel) -> AnyMALRuntime:
        """Build the model from an unlocked bundle: the config from its ``config.json`` (the
        manifest's ``model_config``), every tensor checked by name and shape (strict)."""
        config = thaw_config(unlocked.manifest.model_config)
        raw = config.get("anymal")
        if not isinstance(raw, dict):
            raise UnsupportedModel("config.json of an anymal model needs an 'anymal' object")
        try:
            model = AnyMAL.from_tensors(
                AnyMALConfig.from_json(json.dumps(raw)), dict(unlocked.tensors)
            )
        except InvalidWeights as exc:
            raise UnsupportedModel(f"anymal weights: {exc}") from None
        return cls(model, model_id=unlocked.model_id)

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation:
        """Check the request and return its lazy completion. ``prompt`` and ``images`` come from
        a consumer (untrusted); every check happens here, before the first piece."""
        d = self.description
        # (1) the prompt: text, and none of the tokenizer's control words
        if type(prompt) is not str:
            raise InvalidInput("prompt must be text")
        words = prompt.lower().replace("?", " ? ").split()  # as the tokenizer splits
        if not _FORBIDDEN_WORDS.isdisjoint(words):
            raise InvalidInput("prompt must not contain the model's control tokens")
        if words.count(IMAGE) > 1:
            raise InvalidInput("prompt may place <image> at most once")
        # (2) exactly one image, decoded with the caps, resized to the model's input
        if len(images) != d.max_images:
            raise InvalidInput(f"images: this model takes exactly {d.max_images} image")
        picture = decode_image(
            images[0], max_bytes=d.max_image_bytes, max_pixels=d.max_image_pixels
        )
        image = to_tensor(picture, self.model.cfg.image_size)  # (3, 32, 32) in [0, 1]
        # (3) token budget: the prompt as the model will see it, then the cap
        text = prompt if IMAGE in prompt.lower() else f"{IMAGE} {prompt}"
        prompt_tokens = len(self.tokenizer.encode(text)) + 1 + self.model.cfg.n_latents  # bos, sep
        cap = clip_new_tokens(params.max_tokens, prompt_tokens, d)
        # (4) sampling settings (Params bounds them; the model checks them again, eagerly)
        generator = None
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        try:
            pieces = self.model.stream(
                self.tokenizer,
                image,
                prompt,
                max_tokens=cap,
                temperature=params.temperature,
                top_p=params.top_p,
                generator=generator,
            )
        except InvalidRequest as exc:
            raise InvalidInput(str(exc)) from None
        return Generation(prompt_tokens, lambda g: self._run(g, pieces, cap, params.stop))

    def _run(
        self, generation: Generation, pieces: Iterator[str], cap: int, stops: Sequence[str]
    ) -> Iterator[str]:
        stop = StopText(stops)
        text = ""
        try:
            # the model enters inference mode around each step itself: a `with` here would
            # stay active in the caller's code between pieces
            for piece in pieces:
                text += piece
                generation.completion_tokens = len(self.tokenizer.encode(text))
                out = stop.push(text)
                if out:
                    yield out
                if stop.stopped:
                    generation.finish_reason = "stop"
                    return
            rest = stop.finish(text)
            if rest:
                yield rest
            if stop.stopped:
                generation.finish_reason = "stop"
            else:
                generation.finish_reason = (
                    "length" if generation.completion_tokens >= cap else "stop"
                )
        finally:
            close = getattr(pieces, "close", None)
            if close is not None:
                close()
