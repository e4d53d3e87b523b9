"""A word-level tokenizer over the fixed vocabulary of the shapes generator.

The vocabulary is data in this file, in a fixed order (a token's id is its index), so the ids the
shipped weights were trained with never move. Words are split on whitespace, with ``?`` split off;
text is lower-cased; an unknown word becomes ``<unk>``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

__all__ = ["BOS", "EOS", "IMAGE", "PAD", "SEP", "UNK", "VOCAB", "Tokenizer"]

PAD: Final = "<pad>"
BOS: Final = "<bos>"
EOS: Final = "<eos>"
IMAGE: Final = "<image>"
SEP: Final = "<sep>"
UNK: Final = "<unk>"
SPECIALS: Final = (PAD, BOS, EOS, IMAGE, SEP, UNK)
# Append only: ids are positions. Matches shapes.WORDS (a test checks every generated word is here).
VOCAB: Final = (
    *SPECIALS,
    *("red", "green", "blue", "yellow", "purple", "white"),
    *("square", "circle", "triangle", "cross"),
    *("top", "bottom", "left", "right"),
    *("one", "two", "three", "yes", "no"),
    *("what", "colour", "is", "the", "shape", "in", "where", "how", "many", "shapes", "are"),
    *("there", "a", "and", "describe", "image", "?"),
)


class Tokenizer:
    """Encode text to ids and back; special tokens are written as ``<name>`` in text."""

    def __init__(self, vocab: Sequence[str] = VOCAB) -> None:
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate entries")
        self.vocab = tuple(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad, self.bos, self.eos = self.ids[PAD], self.ids[BOS], self.ids[EOS]
        self.image, self.sep, self.unk = self.ids[IMAGE], self.ids[SEP], self.ids[UNK]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace("?", " ? ").split()
        return [self.ids.get(w, self.unk) for w in words]

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        words = []
        for i in ids:
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(self.vocab)}")
            w = self.vocab[i]
            if skip_special and w in SPECIALS:
                continue
            words.append(w)
        return " ".join(words)
