"""Hugging Face vision-language models behind the runtime interface (optional extra ``[hf]``).

Families (``model_type`` in the bundle's ``config.json``):

============  ==================================  ============================================
family        model class                         inputs
============  ==================================  ============================================
``llava``     ``LlavaForConditionalGeneration``   ``LlavaProcessor`` (CLIP/SigLIP image processor)
``idefics3``  ``Idefics3ForConditionalGeneration``  ``Idefics3Processor`` (Idefics3, SmolVLM)
``qwen2_vl``  ``Qwen2VLForConditionalGeneration``   image processor + ``<|image_pad|>`` expansion
============  ==================================  ============================================

Everything is built from enclave memory, never from disk or the network:

1. the config from ``config.json`` (the manifest's ``model_config``) through the family's config
   class; quantized checkpoints are refused;
2. the model from that config and the unlocked tensors
   (``from_pretrained(None, config=…, state_dict=…)``: transformers' own key renaming for older
   checkpoints, tied weights and non-persistent buffers), strictly: a missing, unexpected or
   mismatched tensor is :class:`~enclave.models.runtime.UnsupportedModel` naming a few;
3. the tokenizer from ``tokenizer.json`` (``tokenizers.Tokenizer.from_str``) and the allowed keys
   of ``tokenizer_config.json``; the image processor from ``processor_config.json`` or
   ``preprocessor_config.json``, its class from a fixed allow-list per family (Pillow backends);
   the chat template from ``chat_template.jinja``, ``chat_template.json``, ``processor_config.json``
   or ``tokenizer_config.json`` (rendered by transformers in its Jinja sandbox); the generation
   defaults from ``generation_config.json``. No ``auto_map`` or remote code is ever followed.

A request becomes one user message (its images, then its text) rendered with the chat template and
a generation prompt. Prompts that contain any of the tokenizer's special tokens are refused, so a
consumer cannot forge image placeholders or conversation turns. ``model.generate`` runs in a
worker thread under ``torch.inference_mode()``, one generation at a time per model, and hands each
new token to the iterator; closing the iterator stops the worker at its next step.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final

import torch

from enclave.models.images import decode_image
from enclave.models.runtime import (
    Generation,
    InvalidInput,
    ModelDescription,
    ModelRuntimeError,
    StopText,
    UnsupportedModel,
    clip_new_tokens,
)
from enclave.unlock import UnlockedModel
from protocol.bundle import thaw_config
from protocol.inference import MAX_IMAGE_BYTES, MAX_IMAGES, MAX_TOKENS, Image, Params

__all__ = ["INSTALL_HINT", "HFRuntime"]

log = logging.getLogger(__name__)

INSTALL_HINT: Final = "pip install 'nitro-confidential-inference[hf]'"
MAX_IMAGE_PIXELS: Final = 4096 * 4096  # decoded, before the family's processor resizes


@dataclass(frozen=True)
class _Family:
    config_class: str
    model_class: str
    processor_class: str | None  # None: images through the image processor, tokens expanded here
    image_processors: Mapping[str, str]  # image_processor_type (no Fast/Pil suffix) → class
    processor_keys: tuple[str, ...]  # processor_config.json keys passed to the processor


_FAMILIES: Final = {
    "llava": _Family(
        "LlavaConfig",
        "LlavaForConditionalGeneration",
        "LlavaProcessor",
        {
            "CLIPImageProcessor": "CLIPImageProcessorPil",
            "SiglipImageProcessor": "SiglipImageProcessorPil",
            "LlavaImageProcessor": "LlavaImageProcessorPil",
        },
        (
            "patch_size",
            "vision_feature_select_strategy",
            "image_token",
            "num_additional_image_tokens",
        ),
    ),
    "idefics3": _Family(
        "Idefics3Config",
        "Idefics3ForConditionalGeneration",
        "Idefics3Processor",
        {"Idefics3ImageProcessor": "Idefics3ImageProcessorPil"},
        ("image_seq_len",),
    ),
    "qwen2_vl": _Family(
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        None,
        {"Qwen2VLImageProcessor": "Qwen2VLImageProcessorPil"},
        (),
    ),
}
# tokenizer_config.json keys that shape encoding and decoding; everything else (auto_map,
# tokenizer_class, processor_class, added_tokens_decoder: tokenizer.json has the added tokens) is
# ignored
_TOKEN_KEYS: Final = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token")
_TOKENIZER_KEYS: Final = (
    *_TOKEN_KEYS,
    "mask_token",
    "additional_special_tokens",
    "extra_special_tokens",
    "model_max_length",
    "padding_side",
    "clean_up_tokenization_spaces",
)


def _transformers() -> ModuleType:
    """transformers, imported on first use (the ``[hf]`` extra)."""
    try:
        module = importlib.import_module("transformers")
        importlib.import_module("tokenizers")
    except ImportError:
        raise UnsupportedModel(f"Hugging Face models need transformers: {INSTALL_HINT}") from None
    module.utils.logging.disable_progress_bar()  # the enclave's console is no place for bars
    return module


class HFRuntime:
    """:class:`~enclave.models.runtime.Runtime` of a Hugging Face VLM (see the module doc)."""

    def __init__(
        self,
        *,
        description: ModelDescription,
        model: Any,
        tokenizer: Any,
        prepare: Callable[[str, list[Any]], dict[str, torch.Tensor]],
        chat_template: str,
        generation_config: Any,
    ) -> None:
        self.description = description
        self.model = model
        self.tokenizer = tokenizer
        self._prepare = prepare
        self._chat_template = chat_template
        self._generation_config = generation_config
        self._lock = threading.Lock()  # one generation at a time: some models keep state
        eos = generation_config.eos_token_id
        self._eos = frozenset([eos] if isinstance(eos, int) else list(eos or ()))
        specials = {str(t) for t in tokenizer.all_special_tokens}
        specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self._specials = tuple(sorted(s for s in specials if s))

    # ------------------------------------------------------------------------ loading

    @classmethod
    def from_unlocked(cls, unlocked: UnlockedModel) -> HFRuntime:
        """Build the runtime from an unlocked bundle (tensors and files in enclave memory)."""
        tf = _transformers()
        config_json = thaw_config(unlocked.manifest.model_config)
        family_name = config_json.get("model_type")
        family = _FAMILIES.get(family_name) if isinstance(family_name, str) else None
        if family is None:
            raise UnsupportedModel(f"model_type {family_name!r} is not a Hugging Face family")
        files = unlocked.files
        # (1) the config
        if "quantization_config" in config_json:
            raise UnsupportedModel("quantized checkpoints are not supported")
        try:
            config = getattr(tf, family.config_class).from_dict(config_json)
        except Exception as exc:  # noqa: BLE001 (any config the class refuses)
            raise UnsupportedModel(
                f"config.json does not build a {family_name} config: {exc}"
            ) from None
        # (2) the model, strictly, from the tensors in memory
        model = _load_model(tf, family, config, unlocked.tensors)
        # (3) tokenizer, image processor, chat template, generation defaults
        tokenizer = _load_tokenizer(tf, files)
        image_processor, processor_options = _load_image_processor(tf, family, files)
        chat_template = _chat_template(files)
        generation_config = _generation_config(tf, files, model)
        prepare = _preparer(tf, family, config, tokenizer, image_processor, processor_options)
        context = int(getattr(config.get_text_config(), "max_position_embeddings", 0) or 0)
        if context < 2:
            raise UnsupportedModel("text config has no usable max_position_embeddings")
        description = ModelDescription(
            model_id=unlocked.model_id,
            family=str(family_name),
            modalities=("text", "image"),
            max_images=MAX_IMAGES,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            context_length=context,
            max_new_tokens=min(MAX_TOKENS, context - 1),
        )
        log.info("loaded %s model %s", family_name, unlocked.model_id)
        return cls(
            description=description,
            model=model,
            tokenizer=tokenizer,
            prepare=prepare,
            chat_template=chat_template,
            generation_config=generation_config,
        )

    # ------------------------------------------------------------------------ serving

    def render(self, prompt: str, image_count: int) -> str:
        """The chat-template text of one user turn (``image_count`` images, then ``prompt``)
        with the generation prompt: what the model reads, before image tokens are expanded."""
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(image_count)]
        content.append({"type": "text", "text": prompt})
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}],
            chat_template=self._chat_template,
            tokenize=False,
            add_generation_prompt=True,
        )
        return str(text)

    def inputs(self, prompt: str, images: Sequence[Image]) -> dict[str, torch.Tensor]:
        """The model inputs of a request (``input_ids``, ``attention_mask``, pixel tensors).
        ``prompt`` and ``images`` come from a consumer (untrusted)."""
        d = self.description
        if type(prompt) is not str:
            raise InvalidInput("prompt must be text")
        if any(s in prompt for s in self._specials):
            raise InvalidInput("prompt must not contain the model's special tokens")
        if len(images) > d.max_images:
            raise InvalidInput(f"images: this model takes at most {d.max_images} images")
        pictures = [
            decode_image(i, max_bytes=d.max_image_bytes, max_pixels=d.max_image_pixels)
            for i in images
        ]
        try:
            text = self.render(prompt, len(pictures))
        except Exception:  # noqa: BLE001 (the provider's template raising on this request)
            raise InvalidInput("the chat template refuses this request") from None
        try:
            inputs = self._prepare(text, pictures)
        except InvalidInput:
            raise
        except Exception:  # noqa: BLE001 (processors raise ValueError, IndexError…)
            raise InvalidInput(
                "the model's processor refuses these images or this prompt"
            ) from None
        dtype = self.model.dtype
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation:
        """Check the request, prepare its inputs, return its lazy completion."""
        inputs = self.inputs(prompt, images)
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        cap = clip_new_tokens(params.max_tokens, prompt_tokens, self.description)
        config = copy.deepcopy(self._generation_config)
        config.max_new_tokens, config.max_length, config.min_new_tokens = cap, None, None
        config.num_beams, config.num_return_sequences = 1, 1
        if params.temperature == 0:
            config.do_sample, config.temperature, config.top_p, config.top_k = (
                False,
                None,
                None,
                None,
            )
        else:
            config.do_sample, config.temperature, config.top_p, config.top_k = (
                True, params.temperature, params.top_p, 0,
            )  # fmt: skip
        return Generation(
            prompt_tokens,
            lambda g: self._run(g, inputs, config, cap, params.stop, seed),
        )

    def _run(
        self,
        generation: Generation,
        inputs: dict[str, torch.Tensor],
        config: Any,
        cap: int,
        stops: Sequence[str],
        seed: int | None,
    ) -> Iterator[str]:
        tokens: queue.SimpleQueue[int | _Done] = queue.SimpleQueue()
        cancel = threading.Event()
        worker = threading.Thread(
            target=self._work,
            args=(inputs, config, seed, tokens, cancel),
            name="nci-hf-generate",
            daemon=True,
        )
        worker.start()
        stop = StopText(stops)
        ids: list[int] = []
        text = ""
        ended_by_eos = False
        try:
            while True:
                item = tokens.get()
                if isinstance(item, _Done):
                    if item.failure is not None:
                        raise ModelRuntimeError(f"generation failed ({item.failure})")
                    break
                if item in self._eos:
                    ended_by_eos = True
                    continue
                ids.append(item)
                generation.completion_tokens = len(ids)
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                piece = stop.push(text)
                if piece:
                    yield piece
                if stop.stopped:
                    generation.finish_reason = "stop"
                    return
            rest = stop.finish(text)
            if rest:
                yield rest
            length = not (ended_by_eos or stop.stopped) and len(ids) >= cap
            generation.finish_reason = "length" if length else "stop"
        finally:
            cancel.set()
            worker.join()

    def _work(
        self,
        inputs: dict[str, torch.Tensor],
        config: Any,
        seed: int | None,
        tokens: queue.SimpleQueue[int | _Done],
        cancel: threading.Event,
    ) -> None:
        failure = None
        try:
            # wait for the model, but give up as soon as the consumer has gone
            while not self._lock.acquire(timeout=0.05):
                if cancel.is_set():
                    return
            try:
                with torch.inference_mode():
                    if not cancel.is_set():
                        if seed is not None:
                            torch.manual_seed(seed)
                        self.model.generate(
                            **inputs,
                            generation_config=config,
                            streamer=_Streamer(tokens),
                            stopping_criteria=[_Cancelled(cancel)],
                        )
            finally:
                self._lock.release()
        except BaseException as exc:  # noqa: BLE001 (handed to the consuming thread)
            failure = type(exc).__name__
            log.warning("generation failed: %s", failure)
        finally:
            tokens.put(_Done(failure))


@dataclass(frozen=True)
class _Done:
    failure: str | None  # the exception's type name; never its message (it may quote content)


class _Streamer:
    """What ``generate`` calls with the prompt, then every new token (``BaseStreamer``'s API)."""

    def __init__(self, tokens: queue.SimpleQueue[int | _Done]) -> None:
        self._tokens = tokens
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True  # the first call carries the prompt
            return
        for token in value.reshape(-1).tolist():
            self._tokens.put(int(token))

    def end(self) -> None:
        pass


class _Cancelled:
    """A stopping criterion: true once the consumer has gone (the iterator was closed)."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(
        self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool)


# ---------------------------------------------------------------------------- loading helpers


def _load_model(
    tf: ModuleType, family: _Family, config: Any, tensors: Mapping[str, torch.Tensor]
) -> Any:
    model_class = getattr(tf, family.model_class)
    try:
        model, info = model_class.from_pretrained(
            None,
            config=config,
            state_dict=dict(tensors),
            output_loading_info=True,
            local_files_only=True,
        )
    except Exception as exc:  # noqa: BLE001 (weights or config the model class refuses)
        raise UnsupportedModel(f"weights do not load into {family.model_class}: {exc}") from None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k) for k in info.get(key) or ())
        if found:
            problems.append(f"{len(found)} {key.replace('_', ' ')} (e.g. {', '.join(found[:3])})")
    if info.get("error_msgs"):
        problems.append(f"{len(info['error_msgs'])} load errors")
    if problems:
        raise UnsupportedModel(f"weights do not match {family.model_class}: {'; '.join(problems)}")
    return model.eval()


def _json_file(files: Mapping[str, bytes], name: str) -> dict[str, Any] | None:
    data = files.get(name)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UnsupportedModel(f"{name} is not JSON") from None
    if not isinstance(value, dict):
        raise UnsupportedModel(f"{name} is not a JSON object")
    return value


def _token_text(value: object) -> object:
    # older files write special tokens as AddedToken objects: {"content": "<s>", ...}
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return value


def _load_tokenizer(tf: ModuleType, files: Mapping[str, bytes]) -> Any:
    raw = files.get("tokenizer.json")
    if raw is None:
        raise UnsupportedModel("the bundle has no tokenizer.json (fast tokenizers only)")
    tokenizers = importlib.import_module("tokenizers")
    try:
        backend = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises its own Exception type)
        raise UnsupportedModel(f"tokenizer.json does not load: {exc}") from None
    config = _json_file(files, "tokenizer_config.json") or {}
    options: dict[str, Any] = {}
    for key in _TOKENIZER_KEYS:
        if key in config:
            value = config[key]
            if key in _TOKEN_KEYS:
                value = _token_text(value)
            elif key in ("additional_special_tokens", "extra_special_tokens"):
                value = [_token_text(v) for v in value] if isinstance(value, list) else value
            options[key] = value
    try:
        return tf.PreTrainedTokenizerFast(tokenizer_object=backend, **options)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(f"tokenizer_config.json does not fit the tokenizer: {exc}") from None


def _load_image_processor(
    tf: ModuleType, family: _Family, files: Mapping[str, bytes]
) -> tuple[Any, dict[str, Any]]:
    processor_config = _json_file(files, "processor_config.json") or {}
    nested = processor_config.get("image_processor")
    settings = nested if isinstance(nested, dict) else _json_file(files, "preprocessor_config.json")
    if settings is None:
        raise UnsupportedModel(
            "the bundle has no image processor settings (processor_config.json or "
            "preprocessor_config.json)"
        )
    kind = settings.get("image_processor_type")
    base = kind.removesuffix("Fast").removesuffix("Pil") if isinstance(kind, str) else None
    class_name = family.image_processors.get(base or "")
    if class_name is None:
        raise UnsupportedModel(
            f"image_processor_type {kind!r} is not one of {', '.join(family.image_processors)}"
        )
    settings = {k: v for k, v in settings.items() if k not in ("auto_map", "image_processor_type")}
    try:
        image_processor = getattr(tf, class_name).from_dict(settings)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(f"image processor settings do not fit {class_name}: {exc}") from None
    options = {k: processor_config[k] for k in family.processor_keys if k in processor_config}
    return image_processor, options


def _chat_template(files: Mapping[str, bytes]) -> str:
    if "chat_template.jinja" in files:
        try:
            return files["chat_template.jinja"].decode("utf-8")
        except UnicodeDecodeError:
            raise UnsupportedModel("chat_template.jinja is not UTF-8") from None
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        value = (_json_file(files, name) or {}).get("chat_template")
        if isinstance(value, list):  # named templates: [{"name": "default", "template": …}]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if isinstance(value, str) and value:
            return value
    raise UnsupportedModel("the bundle has no chat template")


def _generation_config(tf: ModuleType, files: Mapping[str, bytes], model: Any) -> Any:
    settings = _json_file(files, "generation_config.json")
    if settings is None:
        return copy.deepcopy(model.generation_config)
    try:
        return tf.GenerationConfig.from_dict(settings)
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedModel(f"generation_config.json does not load: {exc}") from None


def _preparer(
    tf: ModuleType,
    family: _Family,
    config: Any,
    tokenizer: Any,
    image_processor: Any,
    options: Mapping[str, Any],
) -> Callable[[str, list[Any]], dict[str, torch.Tensor]]:
    """The function that turns rendered text and decoded images into model inputs."""
    if family.processor_class is not None:
        try:
            processor = getattr(tf, family.processor_class)(
                image_processor=image_processor, tokenizer=tokenizer, **options
            )
        except Exception as exc:  # noqa: BLE001
            raise UnsupportedModel(f"{family.processor_class} does not build: {exc}") from None

        def prepare(text: str, images: list[Any]) -> dict[str, torch.Tensor]:
            # as transformers' apply_chat_template: a template that writes BOS gets no second one
            bos = tokenizer.bos_token
            add_special = not (bos is not None and text.startswith(bos))
            out = processor(
                text=text,
                images=images or None,
                return_tensors="pt",
                add_special_tokens=add_special,
            )
            return dict(out)

        return prepare
    return _qwen2_vl_preparer(config, tokenizer, image_processor)


def _qwen2_vl_preparer(
    config: Any, tokenizer: Any, image_processor: Any
) -> Callable[[str, list[Any]], dict[str, torch.Tensor]]:
    """Qwen2-VL inputs without ``Qwen2VLProcessor`` (whose constructor insists on a video
    processor, which needs torchvision): each ``<|image_pad|>`` of the rendered text becomes
    ``t·h·w / merge²`` pads, as the processor does."""
    pad = tokenizer.convert_ids_to_tokens(int(config.image_token_id))
    if not isinstance(pad, str) or tokenizer.convert_tokens_to_ids(pad) != config.image_token_id:
        raise UnsupportedModel("the tokenizer has no token for config.image_token_id")
    merge = int(image_processor.merge_size) ** 2

    def prepare(text: str, images: list[Any]) -> dict[str, torch.Tensor]:
        parts = text.split(pad)
        if len(parts) != len(images) + 1:
            raise InvalidInput("the chat template does not place one image token per image")
        out: dict[str, torch.Tensor] = {}
        counts: list[int] = []
        if images:
            pixels = image_processor(images=images, return_tensors="pt")
            out["pixel_values"] = pixels["pixel_values"]
            out["image_grid_thw"] = pixels["image_grid_thw"]
            counts = [int(g.prod()) // merge for g in pixels["image_grid_thw"]]
        expanded = parts[0] + "".join(
            pad * n + part for n, part in zip(counts, parts[1:], strict=True)
        )
        bos = tokenizer.bos_token
        add_special = not (bos is not None and expanded.startswith(bos))
        encoded = tokenizer(expanded, return_tensors="pt", add_special_tokens=add_special)
        out["input_ids"] = encoded["input_ids"]
        out["attention_mask"] = encoded["attention_mask"]
        return out

    return prepare
