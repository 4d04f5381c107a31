"""Glyphs the digits model never saw (X, plus, box, triangle, circle), drawn like the digits.

The bundled digits are 32x32 binary bitmaps whose 4x4 blocks were counted (0-16 grey levels). A
glyph is drawn the same way: its strokes (:data:`GLYPHS`, polylines in normalised coordinates,
``x`` right and ``y`` down, the frame is ``[-1, 1]²``) rasterised at 32x32 with a pen of some
thickness, block-summed to 8x8 and mapped to ``[-1, 1]`` (``-1`` background). Each drawing jitters
the glyph (:class:`Jitter`): size, rotation, shear, offset, pen thickness and ink intensity, so a
glyph is a distribution, not one image. Its clean drawing (:func:`template`) is the reference for
template correlation (:func:`digits.quality.template_correlation`).

:func:`references` and :func:`held_out` draw from disjoint random streams (by ``seed``), so a
concept's training images are never its held-out images. Images are ``(n, 1, 8, 8)`` float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CIRCLE = [(0.65 * math.cos(2 * math.pi * i / 24), 0.65 * math.sin(2 * math.pi * i / 24)) for i in range(25)]
GLYPHS: dict[str, list[list[tuple[float, float]]]] = {  # name -> polylines of (x, y) vertices
    "x": [[(-0.7, -0.7), (0.7, 0.7)], [(-0.7, 0.7), (0.7, -0.7)]],
    "plus": [[(0.0, -0.75), (0.0, 0.75)], [(-0.75, 0.0), (0.75, 0.0)]],
    "box": [[(-0.6, -0.65), (0.6, -0.65), (0.6, 0.65), (-0.6, 0.65), (-0.6, -0.65)]],
    "triangle": [[(0.0, -0.7), (0.7, 0.6), (-0.7, 0.6), (0.0, -0.7)]],
    "circle": [_CIRCLE],
}
HIGH_RES = 32  # the bitmap side before 4x4 block counting, as in the UCI digits


@dataclass(frozen=True)
class Jitter:
    """Ranges of the per-drawing jitter, each drawn uniformly: ``scale`` (glyph size factor),
    ``rotation`` (degrees, +-), ``shear`` (+-, x += shear * y), ``offset`` (normalised units, +-,
    each axis; one 8x8 pixel is 0.25), ``thickness`` (pen width in 32x32 pixels) and
    ``intensity`` (ink factor)."""

    scale: tuple[float, float] = (0.75, 1.0)
    rotation: float = 12.0
    shear: float = 0.15
    offset: float = 0.15
    thickness: tuple[float, float] = (4.0, 7.0)
    intensity: tuple[float, float] = (0.75, 1.0)


NONE = Jitter(scale=(0.9, 0.9), rotation=0.0, shear=0.0, offset=0.0, thickness=(5.5, 5.5),
              intensity=(1.0, 1.0))  # the clean drawing: the jitter ranges' middle, no pose change


def _segments(glyph: str) -> torch.Tensor:
    """The glyph's strokes as segments ``(n_segments, 2 ends, 2 coordinates)``."""
    if glyph not in GLYPHS:
        raise ValueError(f"glyph must be one of {list(GLYPHS)}, got {glyph!r}")
    return torch.tensor([[a, b] for line in GLYPHS[glyph] for a, b in zip(line[:-1], line[1:])],
                        dtype=torch.float64)


def _rasterise(segments: torch.Tensor, thickness: torch.Tensor) -> torch.Tensor:
    """Binary ink ``(n, HIGH_RES, HIGH_RES)``: pixel centres within ``thickness / 2`` (32x32 pixels,
    ``(n,)``) of any of the segments ``(n, n_segments, 2, 2)``."""
    centres = (torch.arange(HIGH_RES, dtype=torch.float64) + 0.5) * 2 / HIGH_RES - 1
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], -1)  # (P, 2), P = HIGH_RES²
    start, end = segments[:, :, None, 0], segments[:, :, None, 1]  # (n, S, 1, 2)
    direction = end - start
    along = ((points - start) * direction).sum(-1) / direction.pow(2).sum(-1).clamp_min(1e-12)
    nearest = start + along.clamp(0, 1)[..., None] * direction  # (n, S, P, 2)
    distance = (points - nearest).norm(dim=-1).amin(1)  # (n, P)
    ink = distance <= (thickness * 2 / HIGH_RES / 2)[:, None]
    return ink.reshape(-1, HIGH_RES, HIGH_RES)


def draw(glyph: str, count: int, *, seed: int, jitter: Jitter = Jitter()) -> torch.Tensor:
    """``count`` jittered drawings of ``glyph`` ``(count, 1, 8, 8)`` in ``[-1, 1]``, by ``seed``
    (the first ``k`` drawings are the same for any ``count >= k``)."""
    if isinstance(count, bool) or not isinstance(count, int):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    segments = _segments(glyph)
    draws = torch.rand(count, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    uniform = lambda column, low, high: low + (high - low) * draws[:, column]  # one row per drawing
    scale = uniform(0, *jitter.scale)
    angle = torch.deg2rad(uniform(1, -jitter.rotation, jitter.rotation))
    shear = uniform(2, -jitter.shear, jitter.shear)
    offset = torch.stack([uniform(3, -jitter.offset, jitter.offset), uniform(4, -jitter.offset, jitter.offset)], -1)
    thickness = uniform(5, *jitter.thickness)
    intensity = uniform(6, *jitter.intensity)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shear_matrix = torch.eye(2, dtype=torch.float64).repeat(count, 1, 1)
    shear_matrix[:, 0, 1] = shear
    pose = scale[:, None, None] * shear_matrix @ rotate  # (n, 2, 2), applied to column vectors
    placed = torch.einsum("nij,sej->nsei", pose, segments) + offset[:, None, None, :]  # (n, S, 2, 2)
    ink = _rasterise(placed, thickness).double()  # (n, 32, 32)
    counts = F.avg_pool2d(ink[:, None], HIGH_RES // 8) * 16  # (n, 1, 8, 8), 0-16 like the digits
    grey = (counts * intensity[:, None, None, None]).round()
    return (grey / 8.0 - 1.0).float()


def template(glyph: str) -> torch.Tensor:
    """The clean drawing of ``glyph`` ``(1, 1, 8, 8)``: no pose change, middle thickness, full ink."""
    return draw(glyph, 1, seed=0, jitter=NONE)


def _stream(glyph: str, seed: int, role: int) -> int:
    """The random stream of ``glyph``'s references (``role`` 0) or held-out images (1) for ``seed``."""
    if glyph not in GLYPHS:
        raise ValueError(f"glyph must be one of {list(GLYPHS)}, got {glyph!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return (2 * seed + role) * len(GLYPHS) + list(GLYPHS).index(glyph)


def references(glyph: str, count: int, *, seed: int) -> torch.Tensor:
    """Training images of ``glyph`` ``(count, 1, 8, 8)`` for ``seed`` (never a :func:`held_out` draw)."""
    return draw(glyph, count, seed=_stream(glyph, seed, 0))


def held_out(glyph: str, count: int = 192, *, seed: int = 0) -> torch.Tensor:
    """Held-out images of ``glyph`` ``(count, 1, 8, 8)`` (a random stream :func:`references` never uses)."""
    return draw(glyph, count, seed=_stream(glyph, seed, 1))
