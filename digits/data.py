"""The handwritten digits scikit-learn bundles (8x8, 17 grey levels 0-16), as model inputs.

The project ships them in ``digits_8x8.npz`` (44 KiB; written by :mod:`digits.export_digits`,
which states their provenance and licence: UCI, CC BY 4.0), so nothing here needs scikit-learn.
Images are ``(N, 1, 8, 8)`` float tensors in ``[-1, 1]`` (``-1`` background, ``1`` full ink).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATA_PATH = Path(__file__).resolve().parent / "digits_8x8.npz"


@functools.lru_cache(maxsize=1)
def _bundled() -> tuple[np.ndarray, np.ndarray]:
    """``images (1797, 8, 8)`` and ``labels (1797,)``, uint8, read-only."""
    with np.load(DATA_PATH, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def load_digits(exclude: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """All bundled digits except the classes in ``exclude``: images ``(N, 1, 8, 8)``, labels ``(N,)``."""
    images, labels = _bundled()
    images = torch.tensor(images, dtype=torch.float32) / 8.0 - 1.0
    labels = torch.tensor(labels, dtype=torch.long)
    keep = ~torch.isin(labels, torch.tensor(exclude, dtype=torch.long))
    return images[keep, None], labels[keep]


def images_of(digit: int, count: int, *, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """``count`` distinct images of ``digit`` ``(count, 1, 8, 8)``, chosen by ``seed``."""
    images, labels = load_digits()
    pool = images[labels == digit]
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    if offset + count > len(pool):
        raise ValueError(f"only {len(pool)} images of {digit}, asked for {offset + count}")
    return pool[order[offset:offset + count]]


def embolden(images: torch.Tensor) -> torch.Tensor:
    """Bold-stroke versions: ink spread to the 4-neighbours (a morphological dilation by a plus
    shape) and clipped, for images in ``[-1, 1]``."""
    ink = (images + 1) / 2  # [0, 1]
    padded = F.pad(ink, (1, 1, 1, 1))
    neighbours = torch.stack([padded[..., 1:-1, :-2], padded[..., 1:-1, 2:],
                              padded[..., :-2, 1:-1], padded[..., 2:, 1:-1]]).amax(0)
    bold = torch.maximum(ink, 0.85 * neighbours).clamp(0, 1)
    return bold * 2 - 1


def stroke_mass(images: torch.Tensor) -> torch.Tensor:
    """Total ink per image ``(N,)`` (pixels mapped to ``[0, 1]``)."""
    return ((images + 1) / 2).clamp(0, 1).flatten(1).sum(1)
