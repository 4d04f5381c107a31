"""Teaching a concept and a style separately so that their atoms compose ("bold sks").

Two sets of atoms trained apart on the same layers meet for the first time in the composed prompt,
where each also acts on the other's word. Three things make the sum work on the digits model
(measured in bench/bench_method.py, part "composition"):

- the concept is also taught after each attribute word the base model knows (its references
  transformed exactly, under ``"slant sks"`` ...), so the new word works in the second position,
  after an attribute, as the trained digits do;
- each training preserves the base model on prompts made of the *other* free words
  (``"zq 7"``, ``"bold 7"`` ... for the concept; ``"sks"``, ``"sks 7"`` ... for the style), so
  neither set changes what the other's word does;
- the style's images are also trained under the empty prompt (``cfg_dropout``), so that
  classifier-free guidance does not exaggerate a style the unconditional model never saw.

Functions return ``(images (N, 1, 8, 8), prompts (one per image), prior=(images, contexts))`` for
:func:`digits.concept.train_concept`.
"""

from __future__ import annotations

import torch

from . import attributes
from .concept import prior_set
from .data import embolden, load_digits
from .prompts import CONCEPT_PROMPT, HELD_OUT, SPARE, STYLE_WORD, TRAINED_DIGITS, tokenize_many

STYLE_CFG_DROPOUT = 0.3  # a style's images also under "" (see ConceptSettings.cfg_dropout)


def join(*priors):
    """One prior from several ``(images, contexts)`` pairs."""
    return torch.cat([p[0] for p in priors]), torch.cat([p[1] for p in priors])


def free_word_prior(dit, encoder, word: str, per_prompt: int = 2, seed: int = 0):
    """The base model's own samples of every other free word alone, before each trained digit and
    after each attribute word (``"zq"``, ``"zq 7"``, ``"slant zq"``, ...): what a set of atoms for
    ``word`` must leave as it is, in the first and second position."""
    others = [w for w in SPARE if w != word]
    prompts = [p for w in others for p in [w, *(f"{w} {d}" for d in TRAINED_DIGITS),
                                          *(f"{a} {w}" for a in attributes.TRAINED)]]
    return prior_set(dit, encoder, prompts, per_prompt, seed=seed)


def concept_data(dit, encoder, references: torch.Tensor, word: str = CONCEPT_PROMPT, seed: int = 0):
    """``references`` under ``word`` and, transformed, under ``"<attribute> <word>"`` for each
    attribute the base model knows; the prior is the base model's trained digits (16 samples each)
    and :func:`free_word_prior`."""
    images = torch.cat([references] + [attributes.apply(references, [a]) for a in attributes.TRAINED])
    prompts = [word] * len(references) + [f"{a} {word}" for a in attributes.TRAINED for _ in references]
    prior = join(prior_set(dit, encoder, TRAINED_DIGITS, 16, seed=seed + 2),
                 free_word_prior(dit, encoder, word, seed=seed + 3))
    return images, prompts, prior


def style_data(dit, encoder, count: int = 96, seed: int = 0):
    """``count`` bold versions of real digits other than the held-out one under ``"bold <digit>"``;
    the prior is ``count`` other real digits, plain, under ``"<digit>"`` (so the strokes change
    with the word and not without it) and :func:`free_word_prior`. Train with
    ``cfg_dropout=STYLE_CFG_DROPOUT``."""
    images, labels = load_digits(exclude=(HELD_OUT,))
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(images), generator=generator)[:count]
    prompts = [f"{STYLE_WORD} {int(label)}" for label in labels[pick]]
    plain = torch.randperm(len(images), generator=generator)[:count]
    contexts = encoder(tokenize_many([str(int(label)) for label in labels[plain]])).detach()
    prior = join((images[plain], contexts), free_word_prior(dit, encoder, STYLE_WORD, seed=seed + 4))
    return embolden(images[pick]), prompts, prior
