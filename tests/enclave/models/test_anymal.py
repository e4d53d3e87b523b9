"""The built-in AnyMAL shapes model: data generator, tokenizer, model, generation, weights."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from enclave.models import _safetensors, shapes
from enclave.models import train as train_module
from enclave.models.anymal import (
    AnyMAL,
    AnyMALConfig,
    InvalidRequest,
    InvalidWeights,
    VisionEncoder,
    locality_prior,
)
from enclave.models.tokenizer import VOCAB, Tokenizer
from enclave.models.train import blind_baseline, evaluate

WEIGHTS = Path(__file__).parents[3] / "enclave" / "models" / "weights" / "anymal-shapes.safetensors"
TINY = AnyMALConfig(
    vocab_size=len(VOCAB),
    vit_dim=32,
    vit_layers=1,
    vit_heads=2,
    clip_dim=16,
    n_latents=4,
    resampler_layers=1,
    dim=32,
    n_layers=2,
    n_heads=2,
    ffn_hidden=64,
)


@pytest.fixture(autouse=True)
def _threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> AnyMAL:
    torch.manual_seed(0)
    model = AnyMAL(TINY).eval()
    # sharpen the random output layer so greedy decoding is not flat, and silence the special
    # tokens (logit 0) so that it emits words rather than stopping at once
    with torch.no_grad():
        model.lm.embed.weight.mul_(20)
        model.lm.embed.weight[:6] = 0
    return model


def _image(seed: int = 0) -> torch.Tensor:
    scene = shapes.sample_scene(random.Random(seed), "heldout")
    return torch.from_numpy(shapes.render(scene))


# ---------------------------------------------------------------------------- data


def test_generator_is_deterministic() -> None:
    a, b = shapes.sample_qa(3, 60, "train"), shapes.sample_qa(3, 60, "train")
    assert a == b
    assert all(
        (shapes.render(x.scene) == shapes.render(y.scene)).all() for x, y in zip(a, b, strict=True)
    )
    assert a != shapes.sample_qa(4, 60, "train")
    assert {s.qtype for s in a} == set(shapes.QUESTION_TYPES)


def test_held_out_combos_never_in_training() -> None:
    samples = shapes.sample_qa(0, 3000, "train")
    for s in samples:
        assert not s.scene.has_held_out()
        assert not s.unseen
        assert not any(f"{c} {h}" in s.question for c, h in shapes.HELD_OUT_COMBOS)
    held = shapes.sample_qa(0, 600, "heldout")
    assert sum(s.scene.has_held_out() for s in held) > 200
    assert sum(s.unseen for s in held) > 50


def test_answers_follow_from_the_scene() -> None:
    for s in shapes.sample_qa(1, 300, "heldout"):
        objs = s.scene.objects
        assert len({o.position for o in objs}) == len(objs)
        if s.qtype == "where":
            assert any(o.position == s.answer for o in objs)
        if s.qtype == "exists":
            colour, shape = s.question.split()[3:5]
            present = any((o.colour, o.shape) == (colour, shape) for o in objs)
            assert s.answer == ("yes" if present else "no")


def test_render_shape_and_range() -> None:
    image = shapes.render(shapes.sample_scene(random.Random(0), "train"))
    assert image.shape == (3, 32, 32)
    assert image.dtype.name == "float32"
    assert image.min() >= 0.0
    assert 0.0 < image.max() <= 1.0


# ---------------------------------------------------------------------------- tokenizer


def test_vocab_covers_every_generated_word() -> None:
    tok = Tokenizer()
    for word in shapes.WORDS:
        assert word in tok.ids
    for s in shapes.sample_qa(2, 300, "heldout"):
        text = f"{s.question} {s.answer} {shapes.caption(s.scene)}"
        assert tok.unk not in tok.encode(text)


def test_tokenizer_round_trip() -> None:
    tok = Tokenizer()
    text = "what colour is the circle ?"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("WHAT colour is the circle?")) == text
    ids = tok.encode("<bos> <image> where is the red square ? <sep>")
    assert ids[:2] == [tok.bos, tok.image]
    assert tok.decode(ids) == "where is the red square ?"


def test_tokenizer_unknown_word_and_bad_id() -> None:
    tok = Tokenizer()
    assert tok.encode("what is a banana") == [tok.ids["what"], tok.ids["is"], tok.ids["a"], tok.unk]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([len(VOCAB)])


# ---------------------------------------------------------------------------- model


def test_forward_shapes(tiny: AnyMAL) -> None:
    tok = Tokenizer()
    ids = torch.tensor([[tok.bos, tok.image, *tok.encode("how many shapes are there ?"), tok.sep]])
    ids = ids.repeat(2, 1)  # (2, T)
    images = torch.stack([_image(0), _image(1)])
    assert tiny.vision(images).shape == (2, 16, TINY.vit_dim)
    assert tiny.image_tokens(images).shape == (2, TINY.n_latents, TINY.dim)
    logits = tiny(ids, images, tok.image)
    assert logits.shape == (2, ids.shape[1] - 1 + TINY.n_latents, len(VOCAB))


def test_rejects_prompt_without_exactly_one_image(tiny: AnyMAL) -> None:
    tok = Tokenizer()
    ids = torch.tensor([[tok.bos, tok.image, tok.image, tok.sep]])
    with pytest.raises(InvalidRequest, match="exactly one"):
        tiny(ids, _image()[None], tok.image)
    with pytest.raises(InvalidRequest, match="exactly one"):
        tiny.generate(tok, _image(), "<image> <image> how many")


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (torch.rand(3, 16, 16), {}, "shape"),
        (torch.full((3, 32, 32), float("nan")), {}, "finite"),
        (torch.full((3, 32, 32), 2.0), {}, r"\[0, 1\]"),
        (torch.rand(3, 32, 32), {"max_tokens": 0}, "max_tokens"),
        (torch.rand(3, 32, 32), {"temperature": -1.0}, "temperature"),
        (torch.rand(3, 32, 32), {"top_p": 0.0}, "top_p"),
        (torch.rand(3, 32, 32), {"stop": [""]}, "stop"),
    ],
)
def test_rejects_bad_requests(
    tiny: AnyMAL, image: torch.Tensor, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match):
        tiny.generate(Tokenizer(), image, "how many shapes are there ?", **kwargs)


def test_stream_checks_inputs_before_the_first_piece(tiny: AnyMAL) -> None:
    with pytest.raises(InvalidRequest, match="top_p"):
        tiny.stream(Tokenizer(), _image(), "how many shapes are there ?", top_p=2.0)
    with pytest.raises(InvalidRequest, match="longer than"):
        tiny.stream(Tokenizer(), _image(), "what " * 1000)


def _no_cache_greedy(model: AnyMAL, image: torch.Tensor, prompt: str, n: int) -> list[int]:
    tok = Tokenizer()
    ids = [tok.bos, tok.image, *tok.encode(prompt), tok.sep]
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out]), image[None], tok.image)[0, -1]
            token = int(logits.argmax())
            if token == tok.eos:
                break
            out.append(token)
    return out


def test_kv_cache_generation_equals_full_recompute(tiny: AnyMAL) -> None:
    tok = Tokenizer()
    for seed in range(3):
        image = _image(seed)
        expected = _no_cache_greedy(tiny, image, "describe the image ?", 12)
        got = tiny.generate(tok, image, "describe the image ?", max_tokens=12)
        assert got == tok.decode(expected)
        assert len(expected) > 3  # the comparison covers several cached steps


def test_max_tokens_and_stop_strings(tiny: AnyMAL) -> None:
    tok = Tokenizer()
    image = _image(0)
    words = tok.decode(_no_cache_greedy(tiny, image, "describe the image ?", 12)).split()
    assert len(words) >= 4
    assert tiny.generate(tok, image, "describe the image ?", max_tokens=2) == " ".join(words[:2])
    stop = f"{words[2]}"
    cut = " ".join(words[:2]) + " "
    full = " ".join(words)
    expected = full[: full.find(stop)]
    assert tiny.generate(tok, image, "describe the image ?", max_tokens=12, stop=[stop]) == expected
    assert expected.startswith(cut[: len(expected)])
    pieces = list(tiny.stream(tok, image, "describe the image ?", max_tokens=12))
    assert "".join(pieces) == full
    assert len(pieces) == len(words)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny: AnyMAL) -> None:
    tok = Tokenizer()
    image = _image(1)

    def sample(seed: int, **kw: float) -> str:
        g = torch.Generator().manual_seed(seed)
        return tiny.generate(tok, image, "describe the image ?", max_tokens=8, generator=g, **kw)

    assert sample(5, temperature=1.0) == sample(5, temperature=1.0)
    greedy = tiny.generate(tok, image, "describe the image ?", max_tokens=8)
    assert sample(5, temperature=1.0, top_p=1e-6) == greedy


# ---------------------------------------------------------------------------- weights


def test_safetensors_round_trip(tiny: AnyMAL) -> None:
    data = tiny.to_safetensors()
    again = AnyMAL.from_safetensors(data)
    assert again.cfg == tiny.cfg
    for (name, a), (_, b) in zip(
        tiny.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert again.to_safetensors() == data


def _rewrite(data: bytes, change: str) -> bytes:
    tensors, metadata = _safetensors.loads(data)
    if change == "missing":
        tensors.pop("lm.norm.weight")
    elif change == "extra":
        tensors["lm.head.weight"] = torch.zeros(2, 2)
    elif change == "shape":
        tensors["lm.norm.weight"] = torch.ones(TINY.dim + 1)
    elif change == "nan":
        tensors["lm.norm.weight"] = torch.full((TINY.dim,), float("nan"))
    elif change == "config":
        metadata["config"] = metadata["config"].replace('"n_layers": 2', '"n_layers": 3')
    return _safetensors.dumps(tensors, metadata)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "nan", "config"])
def test_rejects_weights_not_matching_config(tiny: AnyMAL, change: str) -> None:
    with pytest.raises(InvalidWeights):
        AnyMAL.from_safetensors(_rewrite(tiny.to_safetensors(), change))


@pytest.mark.parametrize(
    "changes",
    [
        {"image_size": 48, "patch_size": 12},
        {"patch_size": 1},
        {"n_latents": 5},
        {"resampler_layers": 1_000_000},
        {"image_size": 2048, "patch_size": 1024},
        {"max_seq_len": 6},
        {"dim": 6, "n_heads": 2},
    ],
    ids=[
        "patch-not-power-of-two",
        "patch-one",
        "latents-not-square",
        "million-layers",
        "huge-image",
        "context-smaller-than-image-tokens",
        "odd-rotary-head",
    ],
)
def test_rejects_config_the_architecture_cannot_build_or_serve(changes: dict[str, int]) -> None:
    """A weights file's config is untrusted metadata: a patch size the stem cannot halve down to,
    latents that do not form a grid, stacks or images big enough to exhaust memory, a context
    that cannot hold the image tokens, or a rotary head of odd size are refused before any module
    is built."""
    raw = json.loads(TINY.to_json())
    raw.update(changes)
    with pytest.raises(InvalidWeights, match="config"):
        AnyMALConfig.from_json(json.dumps(raw))


def test_rejects_hostile_config_before_allocating_its_model(tiny: AnyMAL) -> None:
    """A config that passes the caps but does not match its (tiny) tensors is refused on the
    meta device: the 1024-pixel stem it describes (gigabytes of convolution weights) is never
    allocated."""
    tensors, metadata = _safetensors.loads(tiny.to_safetensors())
    raw = json.loads(metadata["config"])
    raw.update(image_size=1024, patch_size=1024, max_seq_len=64)
    metadata["config"] = json.dumps(raw)
    with pytest.raises(InvalidWeights, match="vision"):
        AnyMAL.from_safetensors(_safetensors.dumps(tensors, metadata))


def test_shape_path_is_blind_to_colour_and_background(tiny: AnyMAL) -> None:
    """The encoder's shape feature sees only the silhouette: recolouring an object, or drawing
    the scene on a grey or white background instead of black, leaves it unchanged, so shapes
    read on seen colours carry over to held-out colour-shape pairs. The colour feature, and so
    the encoder's output, does change with the object's colour."""
    red = torch.from_numpy(
        shapes.render(shapes.Scene((shapes.Obj("red", "circle", "top left", 12, 2, 2),)))
    )
    blue = torch.from_numpy(
        shapes.render(shapes.Scene((shapes.Obj("blue", "circle", "top left", 12, 2, 2),)))
    )
    lit = VisionEncoder.silhouette(red[None])
    assert int(lit.sum()) > 50
    assert torch.equal(VisionEncoder.silhouette(blue[None]), lit)
    for paper in (0.35, 1.0):  # the same red circle on grey, then white paper
        drawn = torch.where(red.amax(0, keepdim=True) > 0, red, torch.full_like(red, paper))
        assert torch.equal(VisionEncoder.silhouette(drawn[None]), lit)
    with torch.inference_mode():
        assert not torch.allclose(tiny.vision(red[None]), tiny.vision(blue[None]))


def _one_object(colour: str, shape: str) -> torch.Tensor:
    # size 12 at offset 2 covers the same four 8×8 patches whatever the shape
    scene = shapes.Scene(
        (
            shapes.Obj(colour, shape, "top left", 12, 2, 2),
            shapes.Obj("white", "cross", "bottom right", 11, 1, 3),
        )
    )
    return torch.from_numpy(shapes.render(scene))[None]


def test_colour_cannot_bind_to_shape_inside_the_encoder(tiny: AnyMAL) -> None:
    """Attack: a held-out colour–shape pair (a red circle) read as a training pair because the
    encoder learned conjunctions. The ViT blocks see the same input for a red and a green
    circle, and the colour stream is the same for a red circle and a red square."""
    vision = tiny.vision.eval()
    seen: list[torch.Tensor] = []
    hooks = [
        b.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
        for b in vision.blocks
    ]
    try:
        with torch.inference_mode():
            red_circle = vision.streams(_one_object("red", "circle"))
            red_inputs, seen[:] = list(seen), []
            green_circle = vision.streams(_one_object("green", "circle"))
            red_square = vision.streams(_one_object("red", "square"))
    finally:
        for h in hooks:
            h.remove()
    assert len(red_inputs) == len(vision.blocks) > 0
    for a, b in zip(red_inputs, seen[: len(vision.blocks)], strict=True):
        assert torch.equal(a, b)  # no block sees the colour
    assert torch.equal(red_circle[0], green_circle[0])  # shape stream
    assert not torch.allclose(red_circle[1], green_circle[1])  # colour stream
    assert torch.allclose(red_circle[1], red_square[1], atol=1e-5)
    assert not torch.allclose(red_circle[0], red_square[0])


def test_visual_tokens_of_an_unseen_pair_are_a_sum_of_seen_parts(tiny: AnyMAL) -> None:
    """Attack: the resampler re-binds colour to shape. Its tokens for the two streams are added,
    so tokens(red circle) − tokens(green circle) = tokens(red square) − tokens(green square): a
    colour moves the tokens the same way whatever the shape it is on."""
    with torch.inference_mode():
        tok = {
            (c, s): tiny.image_tokens(_one_object(c, s))
            for c in ("red", "green")
            for s in ("circle", "square")
        }
    recolour_circle = tok["red", "circle"] - tok["green", "circle"]
    recolour_square = tok["red", "square"] - tok["green", "square"]
    assert recolour_circle.abs().amax() > 1e-3
    assert torch.allclose(recolour_circle, recolour_square, atol=1e-5)


def test_locality_prior_starts_each_latent_on_its_own_quadrant() -> None:
    prior = locality_prior(4, 4)  # 4 latents over a 4×4 patch grid
    assert prior.shape == (4, 16)
    quadrant_of_patch = [(r // 2) * 2 + c // 2 for r in range(4) for c in range(4)]
    for latent in range(4):
        favourite = {p for p in range(16) if prior[latent, p] == prior[latent].max()}
        assert {quadrant_of_patch[p] for p in favourite} == {latent}
    with pytest.raises(ValueError, match="square"):
        locality_prior(5, 4)


def test_packed_questions_train_exactly_what_separate_rows_would() -> None:
    """Instruction tuning packs a scene's questions into one row; a mask or rotary-position bug
    would silently train something else. The packed loss equals the loss of one row per question
    (float64, random weights, ragged rows so padding is exercised), and no row is fully masked."""
    torch.manual_seed(0)
    model = AnyMAL(TINY).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = Tokenizer()
    rng = random.Random(1)
    scenes = [shapes.sample_scene(rng, "train") for _ in range(3)]
    groups = [shapes.questions(s, rng, "train") for s in scenes]
    groups[1] = groups[1][:3]
    images = {id(s): torch.from_numpy(shapes.render(s)).double()[None] for s in scenes}
    L = TINY.n_latents
    ids, positions, mask, target = train_module._pack_questions(tok, groups, L)
    assert bool(mask.any(-1).all())
    bos = model.lm.embed(torch.full((3, 1), tok.bos))
    visual = torch.cat([model.image_tokens(images[id(s)]) for s in scenes])
    x = torch.cat((bos, visual, model.lm.embed(ids)), dim=1)
    logits = model.lm(x, positions=positions, mask=mask)[:, 1 + L :]
    packed = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for scene, group in zip(scenes, groups, strict=True):
        for q in group:
            row, answer = train_module._prompt_answer_batch(tok, [q.question], [q.answer])
            text = model.lm.embed(row)
            out = model.lm(
                torch.cat((text[:, :1], model.image_tokens(images[id(scene)]), text[:, 2:]), 1)
            )
            want = row[:, 2:].masked_fill(~answer[:, 2:], -100)
            total = total + F.cross_entropy(
                out[:, L:-1].reshape(-1, out.shape[-1]), want.reshape(-1), reduction="sum"
            )
            count += int((want != -100).sum())
    assert torch.allclose(packed, total / count, rtol=1e-9, atol=1e-12)


def test_region_labels_name_what_is_in_each_cell() -> None:
    """Stage (a)'s region term contrasts each cell with the phrases naming its shape and its
    colour; a label in the wrong cell would teach the encoder the wrong thing everywhere."""
    scene = shapes.Scene(
        (
            shapes.Obj("white", "cross", "top right", 11, 2, 2),
            shapes.Obj("blue", "circle", "bottom left", 11, 2, 2),
        )
    )
    shape, colour = train_module._cell_labels([scene, shapes.Scene(())])
    names, colours = train_module._SHAPE_PHRASES, train_module._COLOUR_PHRASES
    empty = ("no shape",) * 4
    assert [names[i] for i in shape] == ["no shape", "a cross", "a circle", "no shape", *empty]
    assert [colours[i] for i in colour] == ["no shape", "white", "blue", "no shape", *empty]


def test_region_phrases_never_pair_a_colour_with_a_shape() -> None:
    """The phrases name a shape or a colour, never both: no held-out pair can be taught, and the
    shape features cannot lean on colour (nor colour on shape)."""
    tok = Tokenizer()
    for phrase in (*train_module._SHAPE_PHRASES, *train_module._COLOUR_PHRASES):
        words = set(phrase.split())
        assert tok.unk not in tok.encode(phrase), phrase
        assert not (words & set(shapes.COLOURS) and words & set(shapes.SHAPES)), phrase


@pytest.mark.parametrize("position", shapes.POSITIONS)
def test_region_cells_pool_their_own_quadrant(position: str) -> None:
    """A cell's feature pools the patches of its own quadrant, in POSITIONS order, through the
    real encoder's patch layout. With no transformer layers, no position embeddings and the
    stem silenced (its receptive field crosses cell borders), every patch is its own colour
    feature, so only the cell holding the scene's one object differs from the empty ones."""
    torch.manual_seed(0)
    vision = VisionEncoder(replace(TINY, vit_layers=0)).eval()
    with torch.no_grad():
        for tensor in (vision.row, vision.col, *vision.stem[-1].parameters()):
            tensor.zero_()
    scene = shapes.Scene((shapes.Obj("red", "square", position, 11, 2, 2),))
    with torch.inference_mode():
        cells = train_module._cell_features(vision(torch.from_numpy(shapes.render(scene))[None]))
    assert cells.shape == (1, 4, TINY.vit_dim)
    empty = cells[0, (shapes.POSITIONS.index(position) + 1) % 4]
    differs = [not torch.allclose(cell, empty) for cell in cells[0]]
    assert differs == [p == position for p in shapes.POSITIONS]
    with pytest.raises(ValueError, match="split evenly"):
        train_module._cell_features(torch.zeros(1, 9, 4))


def test_region_loss_reads_shape_and_colour_columns() -> None:
    """The region loss scores the shape phrases' columns against shape labels and the colour
    phrases' against colour labels: logits that are right in that layout give a loss near 0,
    and the same logits with the two blocks swapped give a large one."""
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng, "train") for _ in range(5)]
    shape, colour = train_module._cell_labels(scenes)
    n, m = len(train_module._SHAPE_PHRASES), len(train_module._COLOUR_PHRASES)
    right = torch.cat((F.one_hot(shape, n), F.one_hot(colour, m)), dim=1).float() * 30
    assert float(train_module._region_loss(right, scenes)) < 1e-6
    swapped = torch.cat((F.one_hot(colour, m), F.one_hot(shape, n)), dim=1).float() * 30
    assert float(train_module._region_loss(swapped, scenes)) > 10


def test_region_term_reaches_the_encoder_stem() -> None:
    """The region logits come from the encoder's cells and carry gradient into its stem."""
    torch.manual_seed(0)
    clip = train_module._Clip(AnyMAL(TINY))
    tok = Tokenizer()
    scenes = train_module._clip_scenes(random.Random(0), 4)
    images, ids, _ = train_module._clip_tensors(tok, scenes)
    phrases = train_module._region_phrases(tok)
    logits, regions = clip.logits_and_regions(images, ids, tok.pad, phrases)
    assert logits.shape == (4, 4)
    assert regions is not None
    assert regions.shape == (4 * 4, len(phrases))
    torch.autograd.backward(train_module._region_loss(regions, scenes))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in clip.vision.stem.parameters())
    assert clip.text.embed.weight.grad is not None


def test_frozen_encoder_is_restored_when_a_stage_fails() -> None:
    """Stage (c) freezes the encoder; an error mid-stage must not leave it frozen, nor unfreeze
    a parameter the caller had frozen on purpose."""
    torch.manual_seed(0)
    model = AnyMAL(TINY)
    model.vision.norm.weight.requires_grad_(False)

    def interrupt(stage: str, step: int, total: int) -> None:
        assert not any(p.requires_grad for p in model.vision.parameters())
        raise KeyboardInterrupt

    tc = train_module.TrainConfig(qa_steps=3, qa_scenes=2, warmup=1)
    with pytest.raises(KeyboardInterrupt):
        train_module._stage_qa(model, tc, random.Random(0), interrupt)
    flags = {n: p.requires_grad for n, p in model.vision.named_parameters()}
    assert flags.pop("norm.weight") is False
    assert all(flags.values())


def test_train_config_rejects_negative_weights() -> None:
    with pytest.raises(ValueError, match="clip_regions"):
        train_module.TrainConfig(clip_regions=-1.0)
    with pytest.raises(ValueError, match="qa_extra_exists"):
        train_module.TrainConfig(qa_extra_exists=-1)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="qa_label_smoothing"):
            train_module.TrainConfig(qa_label_smoothing=bad)


def test_extra_exists_questions_never_name_a_held_out_pair() -> None:
    """Attack: the extra instruction-tuning questions leak a held-out colour–shape pair into
    training. Each scene gets its six questions and then the extra ``exists`` ones, all about
    training pairs, answered from the scene, both answers occurring."""
    rng = shapes.scene_stream(3, "train")
    scenes = [shapes.sample_scene(rng, "train") for _ in range(400)]
    groups = train_module._qa_groups(scenes, rng, 2)
    answers: Counter[str] = Counter()
    for scene, group in zip(scenes, groups, strict=True):
        assert [q.qtype for q in group] == [
            "colour",
            "where",
            "shape",
            "colour_at",
            "count",
            "exists",
            "exists",
            "exists",
        ]
        for q in group[5:]:
            colour, shape = q.question.split()[3:5]
            assert (colour, shape) not in shapes.HELD_OUT_COMBOS
            present = any((o.colour, o.shape) == (colour, shape) for o in scene.objects)
            assert q.answer == ("yes" if present else "no")
            answers[q.answer] += 1
    assert set(answers) == {"yes", "no"}
    assert min(answers.values()) > 450  # 1200 questions, about half each


def test_label_smoothing_reaches_the_instruction_loss() -> None:
    torch.manual_seed(0)
    model = AnyMAL(TINY).eval()
    rng = random.Random(0)
    scenes = [shapes.sample_scene(rng, "train") for _ in range(2)]
    groups = train_module._qa_groups(scenes, rng, 1)
    tok = Tokenizer()
    with torch.no_grad():
        plain = train_module._qa_loss(model, tok, scenes, groups)
        smooth = train_module._qa_loss(model, tok, scenes, groups, 0.5)
    assert not torch.isclose(plain, smooth)


def test_instruction_stage_uses_its_extra_questions_and_smoothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stage (c) hands the configured extra questions and label smoothing to its loss."""
    seen: list[tuple[int, float]] = []
    real = train_module._qa_loss

    def spy(model, tok, scenes, groups, label_smoothing=0.0):  # type: ignore[no-untyped-def]
        seen.append((len(groups[0]), label_smoothing))
        return real(model, tok, scenes, groups, label_smoothing)

    monkeypatch.setattr(train_module, "_qa_loss", spy)
    torch.manual_seed(0)
    tc = train_module.TrainConfig(
        qa_steps=1, qa_scenes=2, warmup=1, qa_extra_exists=3, qa_label_smoothing=0.2
    )
    train_module._stage_qa(AnyMAL(TINY), tc, random.Random(0), lambda *_: None)
    assert seen == [(6 + 3, 0.2)]


def test_weights_of_the_earlier_encoder_are_refused_not_misread(tiny: AnyMAL) -> None:
    """Attack (or accident): weights of the earlier single-stream encoder, whose ``vision.colour``
    was added before the ViT blocks, loaded into this one and read with another meaning."""
    tensors, metadata = _safetensors.loads(tiny.to_safetensors())
    tensors["vision.colour.weight"] = torch.zeros(TINY.vit_dim, 4)
    tensors["vision.colour.bias"] = torch.zeros(TINY.vit_dim)
    for name in ("colour_out.weight", "colour_out.bias", "colour_norm.weight", "colour_norm.bias"):
        del tensors[f"vision.{name}"]
    with pytest.raises(InvalidWeights, match=r"vision\.colour\.bias"):
        AnyMAL.from_safetensors(_safetensors.dumps(tensors, metadata))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff" * 8,
        (2).to_bytes(8, "little") + b"[]",
        (4).to_bytes(8, "little") + b"{}  ",
        (2).to_bytes(8, "little") + b"{}" + b"x",  # buffer bytes no tensor indexes
    ],
    ids=["empty", "huge-header", "not-object", "no-config", "unindexed-bytes"],
)
def test_rejects_malformed_safetensors(data: bytes) -> None:
    with pytest.raises(InvalidWeights):
        AnyMAL.from_safetensors(data)


def test_safetensors_rejects_overlapping_tensors() -> None:
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    header += b'"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    data = len(header).to_bytes(8, "little") + header + b"\0" * 4
    with pytest.raises(ValueError, match="overlap"):
        _safetensors.loads(data)


# ---------------------------------------------------------------------------- shipped weights


@pytest.mark.skipif(not WEIGHTS.exists(), reason="shipped weights not built yet")
def test_shipped_weights_answer_held_out_questions() -> None:
    """The shipped model answers 60 fresh held-out questions (incl. unseen combinations).

    Floor 0.85: the shipped model measures 0.953 on 1000 held-out questions (model-card.md) and
    on 3000 others, and 0.983 on this fixed sample (seed 123); the best text-only ("blind")
    answerer scores 0.27. On 60 questions the binomial standard deviation at p = 0.95 is about
    0.028, so 0.85 sits more than three deviations below the model and far above blind: a
    retrain that falls below it has lost real ability (the previous recipe measured 0.91).
    """
    model = AnyMAL.from_safetensors(WEIGHTS.read_bytes())
    assert WEIGHTS.stat().st_size <= 20 * 1024 * 1024
    accuracy = evaluate(model, 60, seed=123)
    blind = blind_baseline(60, seed=123, train_samples=3000)
    assert accuracy["overall"] >= 0.85
    assert accuracy["overall"] > blind["overall"] + 0.1
    tok = Tokenizer()
    scene = shapes.Scene((shapes.Obj("red", "circle", "top left", 12, 2, 2),))  # a held-out combo
    image = torch.from_numpy(shapes.render(scene))
    assert model.generate(tok, image, "how many shapes are there ?") == "one"
