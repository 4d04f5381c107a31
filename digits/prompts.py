"""Prompts of the digits model: a tiny fixed vocabulary, like a text encoder's tokenizer.

A prompt is space-separated words, e.g. ``"7"``, ``"slant 7"``, ``"sks"``, ``"bold sks"``, or ``""``
(the empty prompt, used as the negative for classifier-free guidance). It becomes ``LENGTH`` token
ids: ``<bos>``, the words, then ``<pad>``. The base model is trained on the digits ``0``-``9`` except
the held-out ``3``, each alone or after up to two attribute words (:data:`ATTRIBUTES`, see
:mod:`digits.attributes`); ``3`` and the spare words (among them the held-out style ``bold``) are
never trained, so they are free for new concepts and styles.
"""

from __future__ import annotations

import torch

DIGITS = [str(d) for d in range(10)]
SPARE = ["sks", "bold", "zq", "vx"]  # never trained: for concepts and styles
ATTRIBUTES = ["faint", "slant", "small"]  # trained attribute words (digits/attributes.py)
VOCAB = ["<bos>", "<pad>", *DIGITS, *SPARE, *ATTRIBUTES]
LENGTH = 4
HELD_OUT = 3
TRAINED_DIGITS = [d for d in DIGITS if d != str(HELD_OUT)]  # the base model's prompts
CONCEPT_PROMPT = "sks"
STYLE_WORD = "bold"
COMPOSED_PROMPT = f"{STYLE_WORD} {CONCEPT_PROMPT}"


def tokenize(prompt: str) -> torch.Tensor:
    """``prompt`` -> token ids ``(LENGTH,)``; unknown words are a clear error."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    words = prompt.split()
    if len(words) > LENGTH - 1:
        raise ValueError(f"prompt {prompt!r} has {len(words)} words; the digits model takes at "
                         f"most {LENGTH - 1}")
    unknown = [w for w in words if w not in VOCAB or w.startswith("<")]
    if unknown:
        raise ValueError(f"prompt word {unknown[0]!r} is not in the digits vocabulary "
                         f"{DIGITS + ATTRIBUTES + SPARE}")
    ids = [VOCAB.index("<bos>")] + [VOCAB.index(w) for w in words]
    ids += [VOCAB.index("<pad>")] * (LENGTH - len(ids))
    return torch.tensor(ids)


def tokenize_many(prompts: list[str]) -> torch.Tensor:
    return torch.stack([tokenize(p) for p in prompts])
