"""Procedural "shapes" scenes with captions and question/answer pairs, deterministic from a seed.

A scene is a 32×32 RGB image on a black background holding one to three objects, each a coloured
shape centred in one cell of a 2×2 grid. Within a scene the objects have distinct cells, distinct
shapes and distinct colours, so every question below has exactly one correct answer.

Six question types, in one fixed format each (the model is trained on this format only):

===============  ======================================  =================
type             question                                answer
===============  ======================================  =================
``colour``       what colour is the circle ?             red
``shape``        what shape is in the top left ?         square
``where``        where is the red square ?               top left
``count``        how many shapes are there ?             two
``exists``       is there a red square ?                 yes / no
``colour_at``    what colour is in the bottom right ?    blue
===============  ======================================  =================

Held-out split. :data:`HELD_OUT_COMBOS` (4 of the 24 colour–shape combinations) never appear in a
``"train"`` scene nor in a training question; ``"heldout"`` scenes come from a separate seed stream,
and half of them contain at least one held-out combination.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "COLOURS",
    "HELD_OUT_COMBOS",
    "IMAGE_SIZE",
    "POSITIONS",
    "QUESTION_TYPES",
    "SHAPES",
    "WORDS",
    "Obj",
    "Sample",
    "Scene",
    "caption",
    "exists_question",
    "questions",
    "render",
    "sample_qa",
    "sample_scene",
    "scene_stream",
    "shape_twin",
]

IMAGE_SIZE: Final = 32
CELL: Final = IMAGE_SIZE // 2
COLOURS: Final[dict[str, tuple[float, float, float]]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.8, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "purple": (0.65, 0.1, 0.85),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: Final = ("square", "circle", "triangle", "cross")
POSITIONS: Final = ("top left", "top right", "bottom left", "bottom right")
NUMBERS: Final = ("zero", "one", "two", "three")
QUESTION_TYPES: Final = ("colour", "shape", "where", "count", "exists", "colour_at")
# One per shape and one per colour (except purple and white), so every colour and every shape is
# still seen in training, only these pairings are not.
HELD_OUT_COMBOS: Final = frozenset(
    {("red", "circle"), ("green", "triangle"), ("blue", "cross"), ("yellow", "square")}
)
# Every word the generator can emit (questions, answers, captions, the caption prompt).
WORDS: Final = (
    *COLOURS,
    *SHAPES,
    "top",
    "bottom",
    "left",
    "right",
    *NUMBERS[1:],
    "yes",
    "no",
    "what",
    "colour",
    "is",
    "the",
    "shape",
    "in",
    "where",
    "how",
    "many",
    "shapes",
    "are",
    "there",
    "a",
    "and",
    "describe",
    "image",
    "?",
)

Split = Literal["train", "heldout"]
_SPLIT_SALT: Final = {"train": 0x5EED_0001, "heldout": 0x5EED_0002}


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    position: str  # one of POSITIONS
    size: int  # side of the bounding box in pixels
    dx: int  # jitter of the box inside its cell
    dy: int


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]  # in POSITIONS order

    def has_held_out(self) -> bool:
        return any((o.colour, o.shape) in HELD_OUT_COMBOS for o in self.objects)


@dataclass(frozen=True)
class Sample:
    scene: Scene
    qtype: str
    question: str
    answer: str
    unseen: bool  # the question is about, or answered by, a held-out combination


def _rng(seed: int, split: Split) -> random.Random:
    return random.Random(seed * 1_000_003 + _SPLIT_SALT[split])  # noqa: S311 (data, not keys)


def sample_scene(rng: random.Random, split: Split) -> Scene:
    """Draw a scene; ``"train"`` scenes never hold a :data:`HELD_OUT_COMBOS` pair."""
    want_unseen = split == "heldout" and rng.random() < 0.5
    while True:
        k = rng.randint(1, 3)
        cells = sorted(rng.sample(range(4), k))
        shapes = rng.sample(SHAPES, k)
        colours = rng.sample(list(COLOURS), k)
        combos = set(zip(colours, shapes, strict=True))
        unseen = bool(combos & HELD_OUT_COMBOS)
        if (split == "train" and unseen) or (want_unseen and not unseen):
            continue
        objects = []
        for cell, shape, colour in zip(cells, shapes, colours, strict=True):
            size = rng.randint(9, 13)
            slack = CELL - size
            objects.append(
                Obj(
                    colour,
                    shape,
                    POSITIONS[cell],
                    size,
                    rng.randint(1, slack - 1),
                    rng.randint(1, slack - 1),
                )
            )
        return Scene(tuple(objects))


def shape_twin(scene: Scene, rng: random.Random, split: Split) -> Scene | None:
    """``scene`` with one object's shape changed, everything else equal: a hard negative that
    only a model that reads shapes can tell apart (None if no object can change shape)."""
    objects = list(scene.objects)
    used = {o.shape for o in objects}
    for i in rng.sample(range(len(objects)), len(objects)):
        o = objects[i]
        options = [
            s
            for s in SHAPES
            if s not in used and (split != "train" or (o.colour, s) not in HELD_OUT_COMBOS)
        ]
        if options:
            objects[i] = replace(o, shape=rng.choice(options))
            return Scene(tuple(objects))
    return None


def _mask(shape: str, size: int) -> npt.NDArray[np.bool_]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return np.asarray((x - c) ** 2 + (y - c) ** 2 <= c * c)
    if shape == "triangle":  # apex up
        return np.asarray(np.abs(x - c) <= y / 2)
    if shape == "cross":
        bar = max(size / 6, 1.5)
        return np.asarray((np.abs(x - c) <= bar) | (np.abs(y - c) <= bar))
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def render(scene: Scene) -> npt.NDArray[np.float32]:
    """The scene as a float32 image (3, 32, 32) with values in [0, 1]."""
    image = np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for o in scene.objects:
        cell = POSITIONS.index(o.position)
        top, left = (cell // 2) * CELL + o.dy, (cell % 2) * CELL + o.dx
        mask = _mask(o.shape, o.size)
        region = image[:, top : top + o.size, left : left + o.size]
        region[:, mask] = np.asarray(COLOURS[o.colour], dtype=np.float32)[:, None]
    return image


def caption(scene: Scene) -> str:
    """``"a red square in the top left and a blue circle in the bottom right"``."""
    return " and ".join(f"a {o.colour} {o.shape} in the {o.position}" for o in scene.objects)


def questions(scene: Scene, rng: random.Random, split: Split) -> list[Sample]:
    """One question of each type about ``scene`` (answers follow from the scene alone)."""
    objs = scene.objects
    o = rng.choice(objs)
    held = (o.colour, o.shape) in HELD_OUT_COMBOS
    out = [
        Sample(scene, "colour", f"what colour is the {o.shape} ?", o.colour, held),
        Sample(scene, "where", f"where is the {o.colour} {o.shape} ?", o.position, held),
    ]
    o = rng.choice(objs)
    held = (o.colour, o.shape) in HELD_OUT_COMBOS
    out.append(Sample(scene, "shape", f"what shape is in the {o.position} ?", o.shape, held))
    out.append(Sample(scene, "colour_at", f"what colour is in the {o.position} ?", o.colour, held))
    out.append(
        Sample(
            scene, "count", "how many shapes are there ?", NUMBERS[len(objs)], scene.has_held_out()
        )
    )
    out.append(exists_question(scene, rng, split))
    return out


def exists_question(scene: Scene, rng: random.Random, split: Split) -> Sample:
    """An ``exists`` question about ``scene``: half the time about an object in it, half about
    an absent pair, mostly a present colour or shape re-paired (never a held-out pair in
    ``"train"``)."""
    objs = scene.objects
    if rng.random() < 0.5:
        o = rng.choice(objs)
        colour, shape, answer = o.colour, o.shape, "yes"
    else:
        present = {(p.colour, p.shape) for p in objs}
        while True:
            if rng.random() < 0.7:
                colour = rng.choice(objs).colour
                shape = rng.choice(objs).shape if rng.random() < 0.5 else rng.choice(SHAPES)
            else:
                colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            if (colour, shape) in present:
                continue
            if split == "train" and (colour, shape) in HELD_OUT_COMBOS:
                continue
            break
        answer = "no"
    held = (colour, shape) in HELD_OUT_COMBOS
    return Sample(scene, "exists", f"is there a {colour} {shape} ?", answer, held)


def sample_qa(seed: int, n: int, split: Split) -> list[Sample]:
    """``n`` question/answer samples, types cycling evenly; deterministic from ``seed``."""
    rng = _rng(seed, split)
    out: list[Sample] = []
    while len(out) < n:
        scene = sample_scene(rng, split)
        qs = questions(scene, rng, split)
        out.append(qs[len(out) % len(qs)])
    return out


def scene_stream(seed: int, split: Split) -> random.Random:
    """The generator state for drawing an endless stream of scenes of ``split`` from ``seed``."""
    return _rng(seed, split)
