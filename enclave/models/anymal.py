"""AnyMAL at toy scale: ViT encoder → Perceiver Resampler → Llama-style decoder-only LM.

Following Meta's AnyMAL (Moon et al., 2023, "AnyMAL: An Efficient and Scalable Any-Modality
Augmented Language Model"): a modality encoder pretrained contrastively (CLIP) produces patch
features; a Perceiver Resampler turns them into a fixed number of visual tokens in the LM's
embedding space; those tokens replace the ``<image>`` placeholder in the text prompt, and the LM
generates the answer. Reading order below is dependency order: config, building blocks, encoder,
resampler, LM, the combined model, generation, weights.

Serving inputs (images, prompts, sampling settings) come from consumers over the attested channel:
they are checked and rejected with :class:`InvalidRequest`, never asserted. Weights load only from
safetensors, strictly (every key and shape must match the config): :class:`InvalidWeights`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from enclave.errors import EnclaveError
from enclave.models import _safetensors
from enclave.models.tokenizer import IMAGE, Tokenizer

__all__ = [
    "AnyMAL",
    "AnyMALConfig",
    "InvalidRequest",
    "InvalidWeights",
    "KVCache",
    "pick",
    "resampled_streams",
    "two_stream_tokens",
]


class InvalidWeights(EnclaveError, ValueError):
    """A weights file that is not safetensors, or whose keys or shapes do not match its config."""


class InvalidRequest(EnclaveError, ValueError):
    """A consumer's image, prompt or sampling setting that the model cannot serve."""


@dataclass(frozen=True)
class AnyMALConfig:
    vocab_size: int = 42  # len(tokenizer.VOCAB)
    image_size: int = 32  # square RGB images
    patch_size: int = 8  # 32/8 → a 4×4 grid of patches
    vit_dim: int = 128  # image encoder width
    vit_layers: int = 3
    vit_heads: int = 4
    clip_dim: int = 128  # joint image–text space of the contrastive pretraining
    text_layers: int = 2  # CLIP text tower (training only, not shipped)
    n_latents: int = 4  # visual tokens the resampler hands the LM: a square grid of latents
    resampler_layers: int = 3
    dim: int = 192  # LM (and resampler) width
    n_layers: int = 5  # LM depth
    n_heads: int = 6
    ffn_hidden: int = 512  # SwiGLU hidden width
    max_seq_len: int = 64  # text + visual tokens
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AnyMALConfig:
        try:
            raw = json.loads(text)
        except ValueError:
            raise InvalidWeights("config metadata is not JSON") from None
        if not isinstance(raw, dict):
            raise InvalidWeights("config metadata is not a JSON object")
        known = {f.name: f.type for f in fields(cls)}
        if set(raw) != set(known):
            raise InvalidWeights(f"config keys {sorted(raw)} differ from {sorted(known)}")
        for name, value in raw.items():
            want = float if known[name] == "float" else int
            if type(value) is not want and not (want is float and type(value) is int):
                raise InvalidWeights(f"config {name} must be {want.__name__}")
            if not 0 < value <= 1_000_000:
                raise InvalidWeights(f"config {name}={value} is out of range")
        config = cls(**raw)
        if config.patch_size < 2 or config.patch_size & (config.patch_size - 1):
            raise InvalidWeights("config: patch_size must be a power of two (the stem halves it)")
        if config.image_size % config.patch_size or config.dim % config.n_heads:
            raise InvalidWeights("config: patch_size must divide image_size, n_heads divide dim")
        if config.vit_dim % config.vit_heads:
            raise InvalidWeights("config: vit_heads must divide vit_dim")
        if math.isqrt(config.n_latents) ** 2 != config.n_latents:
            raise InvalidWeights("config: n_latents must be a square (the latents form a grid)")
        # caps far above any sensible toy model, so a hostile config cannot make the loader build
        # something huge (sizes are checked on the meta device before allocating, see from_tensors)
        if config.patch_size > config.image_size or config.image_size > _MAX_IMAGE:
            raise InvalidWeights(f"config: need patch_size <= image_size <= {_MAX_IMAGE}")
        depth = (config.vit_layers, config.text_layers, config.resampler_layers, config.n_layers)
        if max(depth) > _MAX_LAYERS:
            raise InvalidWeights(f"config: at most {_MAX_LAYERS} layers in any stack")
        if (config.dim // config.n_heads) % 2:
            raise InvalidWeights("config: the LM's head size must be even (rotary pairs)")
        if not config.n_latents + 4 <= config.max_seq_len <= _MAX_CONTEXT:
            raise InvalidWeights(
                f"config: max_seq_len must hold the {config.n_latents} visual tokens and a "
                f"question, and be at most {_MAX_CONTEXT}"
            )
        return config


_MAX_IMAGE = 1024
_MAX_LAYERS = 64
_MAX_CONTEXT = 8192


# ---------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.w2(F.silu(self.w1(x)) * self.w3(x))
        return out


def rope_tables(head_dim: int, length: int, base: float) -> tuple[Tensor, Tensor]:
    inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: (B, H, T, hd); cos, sin: (T, hd/2) — rotate pairs (x1, x2) of the two half-vectors
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional transformer block (ViT and the CLIP text tower)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, hd)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        out: Tensor = x + self.mlp(self.norm2(x))
        return out


# ---------------------------------------------------------------------------- image encoder


class VisionEncoder(nn.Module):
    """Two streams kept apart, shape and colour: :meth:`streams` returns each patch's features in
    both, and ``forward`` their sum (the features contrastive pretraining sees).

    The shape stream is a convolutional stem (Xiao et al., 2021: stride-2 3×3 convolutions in
    place of one linear patch embedding) over the image's silhouette, the pixels lit in any
    channel, then the ViT blocks with learned 2-D (row + column) position embeddings. No weight
    in it ever sees a colour, so a red circle's shape features are exactly those of a circle of
    any other colour. The colour stream maps each patch's mean colour over its lit pixels through
    a linear layer and a LayerNorm (which puts it on the shape stream's scale); it sees no shape,
    only which pixels are lit. The training data never pairs some colours with some shapes, and
    each earlier design learned that: an RGB stem read the shape of held-out pairs at 41–55 %
    (seen pairs 96–99 %), the silhouette stem with colour added before the blocks at 81–85 %.
    Colour added after the blocks, linear and without the LayerNorm, came out about 12× smaller
    than the shape features, and with one resampler pass over the sum the LM lost it (colour
    questions 0.10). See the model card.
    """

    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        layers: list[nn.Module] = [nn.Conv2d(1, 32, 3, padding=1), nn.GELU()]
        width, size = 32, cfg.patch_size
        while size > 2:  # log2(patch_size) stride-2 convolutions reach the patch grid
            layers += [nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.GELU()]
            width, size = width * 2, size // 2
        layers.append(nn.Conv2d(width, cfg.vit_dim, 3, stride=2, padding=1))
        self.stem = nn.Sequential(*layers)
        # named apart from the earlier design's ``colour`` (a linear map added before the blocks),
        # so that the strict loader refuses those weights instead of reading them wrongly
        self.colour_out = nn.Linear(3, cfg.vit_dim)
        self.colour_norm = nn.LayerNorm(cfg.vit_dim)
        self.row = nn.Parameter(torch.randn(cfg.grid, 1, cfg.vit_dim) * 0.02)
        self.col = nn.Parameter(torch.randn(1, cfg.grid, cfg.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.vit_dim, cfg.vit_heads) for _ in range(cfg.vit_layers)
        )
        self.norm = nn.LayerNorm(cfg.vit_dim)

    @staticmethod
    def silhouette(images: Tensor) -> Tensor:
        """(B, 1, H, W): 1 where a pixel differs from the background by more than :data:`_LIT`
        in some channel, else 0. The background is the median colour of the image's border (the
        training scenes' is black, and no shape touches the border), so a consumer's photo of
        shapes on grey or white paper is read the same way."""
        border = torch.cat(
            (images[..., 0, :], images[..., -1, :], images[..., 1:-1, 0], images[..., 1:-1, -1]),
            dim=-1,
        )  # (B, 3, perimeter)
        background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
        return ((images - background).abs().amax(1, keepdim=True) > _LIT).to(images.dtype)

    def forward(self, images: Tensor) -> Tensor:
        shape, colour = self.streams(images)
        return shape + colour  # (B, N, vit_dim)

    def streams(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The shape and the colour features of each patch, (B, N, vit_dim) each."""
        lit = self.silhouette(images)  # (B, 1, H, W)
        shape = self.stem(lit * 2 - 1)  # (B, C, g, g)
        share = F.avg_pool2d(lit, self.patch_size)  # (B, 1, g, g) lit share of each patch
        mean = F.avg_pool2d(images * lit, self.patch_size) / share.clamp(min=1e-3)  # (B, 3, g, g)
        colour = self.colour_norm(self.colour_out(mean.flatten(2).transpose(1, 2)))  # (B, N, C)
        x = (shape.permute(0, 2, 3, 1) + self.row + self.col).flatten(1, 2)  # (B, N=g*g, C)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), colour  # (B, N, vit_dim) each


_LIT = 0.25  # a pixel this far from the background colour in some channel is part of a shape


class TextEncoder(nn.Module):
    """The CLIP text tower used only to pretrain :class:`VisionEncoder` (not shipped)."""

    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.vit_dim)
        self.pos = nn.Parameter(torch.randn(cfg.max_seq_len, cfg.vit_dim) * 0.02)
        self.blocks = nn.ModuleList(
            EncoderBlock(cfg.vit_dim, cfg.vit_heads) for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(cfg.vit_dim)

    def forward(self, ids: Tensor, keep: Tensor) -> Tensor:
        # ids, keep: (B, T); keep is False on padding
        x = self.embed(ids) + self.pos[: ids.shape[1]]  # (B, T, C)
        for block in self.blocks:
            x = block(x, keep)
        x = self.norm(x) * keep[..., None]
        out: Tensor = x.sum(1) / keep.sum(1, keepdim=True)  # (B, C) mean over real tokens
        return out


# ---------------------------------------------------------------------------- resampler


class CrossBlock(nn.Module):
    """Flamingo's resampler layer: latents attend to [visual tokens; latents], then a SwiGLU.

    ``bias`` (L, N) is added to the attention logits of the latents on the N visual tokens.
    """

    def __init__(self, dim: int, heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm_x = RMSNorm(dim, eps)
        self.norm_l = RMSNorm(dim, eps)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm_ff = RMSNorm(dim, eps)
        self.ff = SwiGLU(dim, hidden)

    def forward(self, latents: Tensor, visual: Tensor, bias: Tensor) -> Tensor:
        B, L, C = latents.shape
        lat = self.norm_l(latents)
        ctx = torch.cat((self.norm_x(visual), lat), dim=1)  # (B, N+L, C)
        q = self.q(lat).view(B, L, self.heads, -1).transpose(1, 2)  # (B, H, L, hd)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        mask = torch.cat((bias, bias.new_zeros(L, L)), dim=1)  # (L, N+L): none among latents
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, hd)
        latents = latents + self.proj(y.transpose(1, 2).reshape(B, L, C))
        out: Tensor = latents + self.ff(self.norm_ff(latents))
        return out


_POS_INIT = 0.02  # std of each of the resampler's row and column position embeddings
_LOCALITY = 2.0  # initial attention penalty per squared patch of distance from a latent's home


def locality_prior(n_latents: int, grid: int, strength: float = _LOCALITY) -> Tensor:
    """Attention bias (L, N): latent i, at its home on a √L×√L grid spread evenly over the
    grid×grid patches, starts out looking at the patches near that home."""
    side = math.isqrt(n_latents)
    if side * side != n_latents:
        raise ValueError(f"n_latents={n_latents} is not a square")
    home = (torch.arange(side, dtype=torch.float32) + 0.5) * grid / side - 0.5  # patch units
    patch = torch.arange(grid, dtype=torch.float32)
    d_row = (home[:, None, None, None] - patch[None, None, :, None]) ** 2  # (side, 1, grid, 1)
    d_col = (home[None, :, None, None] - patch[None, None, None, :]) ** 2  # (1, side, 1, grid)
    return -strength * (d_row + d_col).reshape(n_latents, grid * grid)  # (L, N)


class PerceiverResampler(nn.Module):
    """Patch features → ``n_latents`` visual tokens in the LM's embedding space.

    Position reaches the visual tokens twice. The patch features get a second learned 2-D
    position embedding here, and every layer's cross-attention has a learned bias ``where``
    (L, N) that starts as a locality prior: each latent begins by reading one region of the
    image. Without that bias the latents learn a content pooling that averages positions away
    (the same object in four cells gave visual tokens at cosine 0.99), and the LM cannot tell
    where anything is.
    """

    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.vit_dim, cfg.dim)
        self.row = nn.Parameter(torch.randn(cfg.grid, 1, cfg.dim) * _POS_INIT)
        self.col = nn.Parameter(torch.randn(1, cfg.grid, cfg.dim) * _POS_INIT)
        self.latents = nn.Parameter(torch.randn(cfg.n_latents, cfg.dim) * 0.02)
        prior = locality_prior(cfg.n_latents, cfg.grid)  # (L, N)
        self.where = nn.Parameter(prior.expand(cfg.resampler_layers, -1, -1).clone())
        self.blocks = nn.ModuleList(
            CrossBlock(cfg.dim, cfg.n_heads, cfg.ffn_hidden, cfg.norm_eps)
            for _ in range(cfg.resampler_layers)
        )
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, features: Tensor) -> Tensor:
        B = features.shape[0]
        pos = (self.row + self.col).flatten(0, 1)  # (N, dim)
        visual = self.proj(features) + pos  # (B, N, dim)
        latents = self.latents.expand(B, -1, -1)  # (B, L, dim)
        for block, bias in zip(self.blocks, self.where, strict=True):
            latents = block(latents, visual, bias)
        out: Tensor = self.norm(latents)  # (B, L, dim)
        return out


def resampled_streams(
    vision: VisionEncoder, resampler: PerceiverResampler, images: Tensor
) -> tuple[Tensor, Tensor]:
    """The resampler's tokens (B, L, dim) for the shape stream and, apart, for the colour stream
    of ``images`` (one resampler pass over both, batched)."""
    shape, colour = vision.streams(images)  # (B, N, vit_dim) each
    both = resampler(torch.cat((shape, colour)))  # (2B, L, dim)
    return both[: len(shape)], both[len(shape) :]


def two_stream_tokens(
    vision: VisionEncoder, resampler: PerceiverResampler, images: Tensor
) -> Tensor:
    """(B, L, dim): the resampler's tokens for the shape stream plus its tokens for the colour
    stream of ``images``."""
    shape, colour = resampled_streams(vision, resampler, images)
    return shape + colour


# ---------------------------------------------------------------------------- language model

Cache = list[tuple[Tensor, Tensor]]


class KVCache:
    """Keys and values of every LM layer for the tokens seen so far."""

    def __init__(self) -> None:
        self.layers: Cache = []

    @property
    def length(self) -> int:
        return 0 if not self.layers else int(self.layers[0][0].shape[2])


class Attention(nn.Module):
    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B,H,T,hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)  # (B,H,P+T,hd)
        P = k.shape[2] - T
        if mask is not None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif P == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            causal = torch.arange(P + T)[None, :] <= (P + torch.arange(T))[:, None]  # (T, P+T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)  # (B, T, C)


class DecoderBlock(nn.Module):
    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ff = SwiGLU(cfg.dim, cfg.ffn_hidden)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: tuple[Tensor, Tensor] | None,
        mask: Tensor | None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self.attn(self.norm1(x), cos, sin, past, mask)
        x = x + h
        return x + self.ff(self.norm2(x)), kv


class LanguageModel(nn.Module):
    """Llama-style decoder: RMSNorm, rotary positions, SwiGLU; output tied to the embedding."""

    cos: Tensor  # (max_seq_len, head_dim / 2) rotary tables, buffers rebuilt from the config
    sin: Tensor

    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        *,
        positions: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Logits for input embeddings ``x`` (B, T, dim): text with visual tokens spliced in.

        By default token t sits at position ``cache.length + t`` and attends causally. Training
        packs several sequences into one row instead: ``positions`` (B, T) gives each token its
        rotary position and ``mask`` (B, 1, T, T) which tokens it may attend to.
        """
        start = 0 if cache is None else cache.length
        T = x.shape[1]
        if positions is None:
            if start + T > self.cfg.max_seq_len:
                raise InvalidRequest(
                    f"sequence of {start + T} tokens exceeds {self.cfg.max_seq_len}"
                )
            cos, sin = self.cos[start : start + T], self.sin[start : start + T]  # (T, hd/2)
        else:
            if cache is not None or mask is None:
                raise ValueError("packed positions need a mask and no cache")
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B,1,T,hd/2)
        new: Cache = []
        for i, block in enumerate(self.blocks):
            past = cache.layers[i] if cache is not None and cache.layers else None
            x, kv = block(x, cos, sin, past, mask)
            new.append(kv)
        if cache is not None:
            cache.layers = new
        out: Tensor = self.norm(x) @ self.embed.weight.T  # (B, T, vocab)
        return out


# ---------------------------------------------------------------------------- the model


class AnyMAL(nn.Module):
    def __init__(self, cfg: AnyMALConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.resampler = PerceiverResampler(cfg)
        self.lm = LanguageModel(cfg)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def image_tokens(self, images: Tensor) -> Tensor:
        """The visual tokens (B, L, dim): the resampler's tokens for the shape stream plus its
        tokens for the colour stream. The resampler never sees the two streams together, so a
        held-out colour–shape pair reaches the LM as the sum of a shape part and a colour part,
        each of a kind it has seen in training (the colour part varies with which patches are
        lit, and so a little with the shape)."""
        return two_stream_tokens(self.vision, self.resampler, images)

    def embed(self, ids: Tensor, images: Tensor, image_id: int) -> Tensor:
        """Token embeddings with each row's single ``<image>`` replaced by its visual tokens."""
        # ids: (B, T); images: (B, 3, H, W) → (B, T - 1 + L, dim)
        where = ids == image_id  # (B, T)
        if not bool((where.sum(1) == 1).all()):
            raise InvalidRequest("each prompt must hold exactly one <image> placeholder")
        pos = where.int().argmax(1)  # (B,)
        text = self.lm.embed(ids)  # (B, T, dim)
        visual = self.image_tokens(images)  # (B, L, dim)
        if bool((pos == pos[0]).all()):
            p = int(pos[0])
            return torch.cat((text[:, :p], visual, text[:, p + 1 :]), dim=1)
        rows = [
            torch.cat((text[b, :p], visual[b], text[b, p + 1 :]), dim=0)
            for b, p in enumerate(pos.tolist())
        ]
        return torch.stack(rows)

    def forward(self, ids: Tensor, images: Tensor, image_id: int) -> Tensor:
        """Logits over the spliced sequence: (B, T - 1 + L, vocab)."""
        out: Tensor = self.lm(self.embed(ids, images, image_id))
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------ generation

    def check_image(self, image: Tensor) -> None:
        size = self.cfg.image_size
        if image.shape != (3, size, size):
            raise InvalidRequest(
                f"image has shape {tuple(image.shape)}; expected (3, {size}, {size})"
            )
        if not image.is_floating_point() or not bool(torch.isfinite(image).all()):
            raise InvalidRequest("image must hold finite floating-point values")
        if float(image.min()) < 0.0 or float(image.max()) > 1.0:
            raise InvalidRequest("image values must lie in [0, 1]")

    def stream(
        self,
        tokenizer: Tokenizer,
        image: Tensor,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> Iterator[str]:
        """Yield the answer to ``prompt`` about ``image`` as text pieces.

        ``temperature == 0`` is greedy decoding; otherwise nucleus sampling over the smallest set
        of tokens whose probability reaches ``top_p``. Generation ends at ``<eos>``, after
        ``max_tokens`` tokens, or before the first occurrence of a ``stop`` string (which is not
        emitted; pieces that might begin a stop string are held back until they cannot).
        """
        if len(tokenizer) != self.cfg.vocab_size:
            raise InvalidRequest("tokenizer does not match the model's vocabulary")
        if not 1 <= max_tokens <= self.cfg.max_seq_len:
            raise InvalidRequest(f"max_tokens must be in 1..{self.cfg.max_seq_len}")
        if not (math.isfinite(temperature) and temperature >= 0):
            raise InvalidRequest("temperature must be finite and non-negative")
        if not 0.0 < top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1]")
        if any(not s for s in stop):
            raise InvalidRequest("stop strings must be non-empty")
        self.check_image(image)
        if len(prompt) > 16 * self.cfg.max_seq_len:
            raise InvalidRequest(f"prompt is longer than {16 * self.cfg.max_seq_len} characters")
        text = prompt if IMAGE in prompt.lower() else f"{IMAGE} {prompt}"
        ids = [tokenizer.bos, *tokenizer.encode(text), tokenizer.sep]
        if ids.count(tokenizer.image) != 1:
            raise InvalidRequest("each prompt must hold exactly one <image> placeholder")
        if len(ids) - 1 + self.cfg.n_latents >= self.cfg.max_seq_len:
            raise InvalidRequest("prompt is too long")
        max_tokens = min(max_tokens, self.cfg.max_seq_len - (len(ids) - 1 + self.cfg.n_latents))
        # checks are done now, not at the first next(): return a generator over checked inputs
        return self._decode(tokenizer, image, ids, max_tokens, temperature, top_p, stop, generator)

    def _decode(
        self,
        tokenizer: Tokenizer,
        image: Tensor,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        generator: torch.Generator | None,
    ) -> Iterator[str]:
        cache = KVCache()
        out: list[int] = []
        emitted = 0
        with torch.inference_mode():
            x = self.embed(torch.tensor([ids]), image[None].float(), tokenizer.image)
            logits = self.lm(x, cache)[0, -1]  # (vocab,)
        for _ in range(max_tokens):
            with torch.inference_mode():
                token = pick(logits, temperature, top_p, generator)
            if token == tokenizer.eos:
                break
            out.append(token)
            full = tokenizer.decode(out)
            cut = min((i for i in (full.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                if cut > emitted:
                    yield full[emitted:cut]
                return
            safe = len(full) - _held_back(full, stop)
            if safe > emitted:
                yield full[emitted:safe]
                emitted = safe
            if len(out) == max_tokens:
                break
            with torch.inference_mode():
                x = self.lm.embed(torch.tensor([[token]]))  # (1, 1, dim)
                logits = self.lm(x, cache)[0, -1]
        full = tokenizer.decode(out)
        if len(full) > emitted:
            yield full[emitted:]

    def generate(
        self,
        tokenizer: Tokenizer,
        image: Tensor,
        prompt: str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        generator: torch.Generator | None = None,
    ) -> str:
        """The whole answer of :meth:`stream` as one string."""
        pieces = self.stream(
            tokenizer,
            image,
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            generator=generator,
        )
        return "".join(pieces)

    # ------------------------------------------------------------------------ weights

    def to_safetensors(self) -> bytes:
        state = {k: v.float() for k, v in self.state_dict().items()}
        return _safetensors.dumps(state, {"format": "pt", "config": self.cfg.to_json()})

    @classmethod
    def from_safetensors(cls, data: bytes) -> AnyMAL:
        """Build the model from a safetensors file; every key and shape must match its config."""
        try:
            tensors, metadata = _safetensors.loads(data)
        except ValueError as exc:
            raise InvalidWeights(str(exc)) from None
        if "config" not in metadata:
            raise InvalidWeights("metadata has no config")
        return cls.from_tensors(AnyMALConfig.from_json(metadata["config"]), tensors)

    @classmethod
    def from_tensors(cls, config: AnyMALConfig, tensors: dict[str, Tensor]) -> AnyMAL:
        """Build the model for ``config`` and load ``tensors`` strictly. The names and shapes are
        compared on a meta-device model first, so a config that does not match its tensors is
        refused before anything of its size is allocated."""
        with torch.device("meta"):
            probe = cls(config)
        _match(probe.state_dict(), tensors)
        model = cls(config)
        model.load_strict(tensors)
        return model.eval()

    def load_strict(self, tensors: dict[str, Tensor]) -> None:
        state = self.state_dict()
        _match(state, tensors)
        for name in state:
            got = tensors[name]
            if not got.is_floating_point() or not bool(torch.isfinite(got).all()):
                raise InvalidWeights(f"tensor {name} must hold finite floating-point values")
        with torch.no_grad():
            for name, want in state.items():
                want.copy_(tensors[name])


def pick(
    logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> int:
    """The next token from ``logits`` (vocab,): the most likely at temperature 0, else nucleus
    sampling over the smallest set of tokens whose probability reaches ``top_p``."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (vocab,)
    sorted_p, order = probs.sort(descending=True)
    keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
    sorted_p = sorted_p * keep
    choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
    return int(order[choice])


def _match(state: dict[str, Tensor], tensors: dict[str, Tensor]) -> None:
    """Refuse ``tensors`` unless they have exactly the names and shapes of ``state``."""
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    if missing or extra:
        raise InvalidWeights(f"missing tensors {missing[:5]}, unexpected tensors {extra[:5]}")
    for name, want in state.items():
        got = tensors[name]
        if got.shape != want.shape:
            raise InvalidWeights(
                f"tensor {name} has shape {tuple(got.shape)}; expected {tuple(want.shape)}"
            )


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
