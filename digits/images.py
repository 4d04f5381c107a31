"""Digits images to pixels and PNG files (grayscale, black background, white ink)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, 1, H, W)`` in ``[-1, 1]`` -> ``(N, H, W)`` uint8."""
    return (((images.detach().cpu().float() + 1) / 2).clamp(0, 1) * 255).round().byte()[:, 0].numpy()


def save_each(images: torch.Tensor, folder: str) -> list[str]:
    """Every image as its own 8-bit grayscale PNG ``folder/000.png``...; returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, pixels in enumerate(to_uint8(images)):
        path = os.path.join(folder, f"{i:03d}.png")
        Image.fromarray(pixels, mode="L").save(path)
        paths.append(path)
    return paths


def grid(rows: list[torch.Tensor], *, scale: int = 4, gap: int = 1) -> Image.Image:
    """A grid image: one row per tensor ``(N, 1, H, W)``, upscaled ``scale`` times."""
    columns = max(len(r) for r in rows)
    h, w = rows[0].shape[-2:]
    cell_h, cell_w = h * scale + gap, w * scale + gap
    canvas = np.full((len(rows) * cell_h + gap, columns * cell_w + gap), 96, dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, pixels in enumerate(to_uint8(images)):
            big = np.kron(pixels, np.ones((scale, scale), dtype=np.uint8))
            top, left = gap + r * cell_h, gap + c * cell_w
            canvas[top:top + h * scale, left:left + w * scale] = big
    return Image.fromarray(canvas, mode="L")
