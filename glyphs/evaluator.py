"""Legibility: a character classifier fit on real renderings of the held-out families (the eval
pack), never on anything a model drew. ``read(images)`` says which character each image is."""

from __future__ import annotations

import pathlib

import numpy as np
import torch

from .render import CHARS

PACK = pathlib.Path(__file__).parent / "data" / "eval_pack.npz"


class CharacterReader:
    """An RBF support-vector classifier over the 32 x 32 pixels (ink in [0, 1])."""

    def __init__(self, classifier, held_out_accuracy: float):
        self.classifier, self.held_out_accuracy = classifier, held_out_accuracy

    @classmethod
    def fit(cls, pack_path=PACK, seed: int = 0) -> "CharacterReader":
        """Fit on the eval pack's fonts; ``held_out_accuracy`` is its accuracy on a fifth of the
        fonts it was not fit on (the real-vs-real floor of legibility)."""
        from sklearn.svm import SVC

        pack = np.load(pack_path)
        images = pack["images"].astype(np.float32) / 255  # (F, C, 32, 32)
        fonts, chars = images.shape[:2]
        order = np.random.default_rng(seed).permutation(fonts)
        test, train = order[: fonts // 5], order[fonts // 5:]
        flat = lambda rows: images[rows].reshape(len(rows) * chars, -1)
        labels = lambda rows: np.tile(np.arange(chars), len(rows))
        probe = SVC(C=10.0, gamma="scale").fit(flat(train), labels(train))
        accuracy = float((probe.predict(flat(test)) == labels(test)).mean())
        every = np.arange(fonts)
        return cls(SVC(C=10.0, gamma="scale").fit(flat(every), labels(every)), accuracy)

    def read(self, images: torch.Tensor) -> list[str]:
        """Images ``(N, 1, 32, 32)`` in ``[-1, 1]`` (ink +1) -> the characters they read as."""
        pixels = ((images.detach().cpu().float() + 1) / 2).clamp(0, 1).reshape(len(images), -1)
        return [CHARS[i] for i in self.classifier.predict(pixels.numpy())]

    def legibility(self, images: torch.Tensor, asked: list[str]) -> float:
        """Share of ``images`` read as the character ``asked`` for each."""
        return float(np.mean([r == a for r, a in zip(self.read(images), asked)]))
