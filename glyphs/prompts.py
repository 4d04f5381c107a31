"""Glyph prompts: a character, then its typeface's words (``"g serif bold italic"``,
``"7 mono"``), or a free word for a taught typeface (``"sks"``); the empty prompt for guidance.

The vocabulary is fixed: the 62 characters (case matters), the five classes, the weight and
slant words, and spare words no training prompt uses (for new typefaces or characters)."""

from __future__ import annotations

import torch

from .render import CHARS, CLASSES

STYLE_WORDS = ("bold", "light", "italic")
SPARE = ("sks", "zq", "vx", "kp")
VOCAB = ["<bos>", "<pad>", *CHARS, *CLASSES, *STYLE_WORDS, *SPARE]
LENGTH = 6  # <bos> + a character + at most four words
_INDEX = {word: i for i, word in enumerate(VOCAB)}


def tokenize(prompt: str) -> torch.Tensor:
    """``prompt`` -> token ids ``(LENGTH,)``; an unknown word or too many words is a clear error."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words = prompt.split()
    if len(words) > LENGTH - 1:
        raise ValueError(f"a glyph prompt has at most {LENGTH - 1} words, got {prompt!r}")
    unknown = [w for w in words if w not in _INDEX]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not in the glyph vocabulary (characters A-Z a-z 0-9, "
                         f"{', '.join(CLASSES)}, {', '.join(STYLE_WORDS)}, {', '.join(SPARE)})")
    ids = [_INDEX["<bos>"], *(_INDEX[w] for w in words)]
    return torch.tensor(ids + [_INDEX["<pad>"]] * (LENGTH - len(ids)), dtype=torch.long)


def tokenize_many(prompts: list[str]) -> torch.Tensor:
    return torch.stack([tokenize(p) for p in prompts])


def typeface_words(kind: str, weight: int, italic: bool) -> list[str]:
    """The words that describe a font: its class, ``bold`` (weight >= 600) or ``light``
    (<= 300), ``italic``."""
    words = [kind]
    if weight >= 600:
        words.append("bold")
    elif weight <= 300:
        words.append("light")
    if italic:
        words.append("italic")
    return words
