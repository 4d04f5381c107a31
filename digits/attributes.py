"""Attribute words of the digits model: exact image transforms the prompts name.

The base model learns prompts such as ``"7"``, ``"slant 7"`` or ``"small faint 2"``: the digit
last, up to two attribute words before it in any order. Each attribute is a fixed transform of the
real image, so the label is exact: ``faint`` halves the ink, ``slant`` shears the glyph (top to the
right), ``small`` shrinks it about the centre. ``bold`` (strokes spread to the 4-neighbours,
:func:`digits.data.embolden`) is the held-out style: the base model never sees the word or a bold
image, so it is free for the composition demo to teach.

Images are ``(N, 1, 8, 8)`` in ``[-1, 1]`` (``-1`` background, ``1`` full ink). Transforms work on
ink (``(x + 1) / 2``) with empty ink outside the frame, and return the same shape and range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import embolden
from .prompts import ATTRIBUTES, STYLE_WORD

SLANT = 0.3  # shear in normalised units: the top row moves ~1.2 px right, the bottom row left
SMALL = 0.7  # scale of the "small" glyph about the centre


def _warp(images: torch.Tensor, theta: list[list[float]]) -> torch.Tensor:
    """Resample ``images`` through the affine map ``theta`` (output -> input, normalised
    coordinates), ink outside the frame is empty."""
    ink = (images + 1) / 2
    matrix = torch.tensor(theta, dtype=ink.dtype).expand(len(ink), 2, 3)
    grid = F.affine_grid(matrix, list(ink.shape), align_corners=False)
    warped = F.grid_sample(ink, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.clamp(0, 1) * 2 - 1


def faint(images: torch.Tensor) -> torch.Tensor:
    """Half the ink."""
    return ((images + 1) / 2 * 0.5) * 2 - 1


def slant(images: torch.Tensor) -> torch.Tensor:
    """Sheared: the output at height ``y`` (normalised, ``-1`` top) reads the input at ``x + SLANT
    y``, so the top leans right."""
    return _warp(images, [[1.0, SLANT, 0.0], [0.0, 1.0, 0.0]])


def small(images: torch.Tensor) -> torch.Tensor:
    """Shrunk by :data:`SMALL` about the centre."""
    return _warp(images, [[1.0 / SMALL, 0.0, 0.0], [0.0, 1.0 / SMALL, 0.0]])


TRANSFORMS = {"small": small, "slant": slant, "faint": faint, STYLE_WORD: embolden}
TRAINED = tuple(ATTRIBUTES)  # what the base model learns
HELD_OUT_STYLE = STYLE_WORD  # never seen by the base model
ORDER = ("small", "slant", STYLE_WORD, "faint")  # transforms apply in this order, whatever the word order


def apply(images: torch.Tensor, words) -> torch.Tensor:
    """``images`` with the attributes ``words`` (any order, any subset of :data:`TRANSFORMS`)."""
    unknown = [w for w in words if w not in TRANSFORMS]
    if unknown:
        raise ValueError(f"attribute {unknown[0]!r} is not one of {list(TRANSFORMS)}")
    for word in ORDER:
        if word in words:
            images = TRANSFORMS[word](images)
    return images


def lean(images: torch.Tensor) -> torch.Tensor:
    """How far each image ``(N, 1, 8, 8)`` leans right ``(N,)``: the ink-weighted mean column of
    the top three rows minus that of the bottom three (``slant`` adds about 2 columns)."""
    ink = ((images + 1) / 2).clamp(0, 1)[:, 0]
    columns = torch.arange(ink.shape[-1], dtype=ink.dtype)
    centroid = lambda rows: (rows * columns).sum((1, 2)) / rows.sum((1, 2)).clamp_min(1e-6)
    return centroid(ink[:, :3]) - centroid(ink[:, -3:])


def random_prompts(labels: torch.Tensor, generator: torch.Generator, *, p: float = 0.3,
                   attributes=TRAINED, max_attributes: int = 2) -> tuple[list[str], list[tuple[str, ...]]]:
    """For each label ``(N,)``: a prompt (attributes in random order, then the digit) and the
    attributes it names. Each attribute is drawn with probability ``p``; at most
    ``max_attributes`` are kept."""
    prompts, chosen = [], []
    draws = torch.rand(len(labels), len(attributes), generator=generator) < p
    orders = torch.rand(len(labels), len(attributes), generator=generator).argsort(1)
    for label, draw, order in zip(labels.tolist(), draws, orders):
        words = [attributes[i] for i in order.tolist() if draw[i]][:max_attributes]
        prompts.append(" ".join([*words, str(label)]))
        chosen.append(tuple(words))
    return prompts, chosen


def apply_each(images: torch.Tensor, attribute_sets: list[tuple[str, ...]]) -> torch.Tensor:
    """Per-image attributes: ``images (N, 1, 8, 8)``, one tuple of words per image."""
    out = images.clone()
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, words in enumerate(attribute_sets):
        groups.setdefault(tuple(sorted(words)), []).append(i)
    for words, index in groups.items():
        if words:
            out[index] = apply(images[index], words)
    return out
