"""The evaluator: a digit classifier fit on real digits only, never used in any training.

An RBF support-vector classifier on the bundled digits and their bold-stroke versions (the style
the composition experiment teaches; without them it calls a third of real bold 3s something
else), on a stratified 70/30 split, seeded; its held-out accuracy on the plain and on the bold
digits is reported with it. Generated images are mapped back to the dataset's 0-16 grey levels
before classification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import embolden, load_digits


@dataclass
class DigitEvaluator:
    classifier: object
    held_out_accuracy: float
    held_out_accuracy_bold: float = 0.0

    @classmethod
    def fit(cls, seed: int = 0) -> "DigitEvaluator":
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        images, labels = load_digits()
        train_i, test_i = train_test_split(range(len(images)), test_size=0.3, random_state=seed,
                                           stratify=labels.numpy())
        train_i, test_i = list(train_i), list(test_i)
        train_x = _features(torch.cat([images[train_i], embolden(images[train_i])]))
        train_y = torch.cat([labels[train_i], labels[train_i]]).numpy()
        classifier = SVC(gamma=0.001, C=10.0).fit(train_x, train_y)
        truth = labels[test_i].numpy()
        plain = float((classifier.predict(_features(images[test_i])) == truth).mean())
        bold = float((classifier.predict(_features(embolden(images[test_i]))) == truth).mean())
        return cls(classifier, plain, bold)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit ``(N,)`` for images ``(N, 1, 8, 8)`` in ``[-1, 1]``."""
        return torch.from_numpy(self.classifier.predict(_features(images))).long()

    def share(self, images: torch.Tensor, digit: int) -> float:
        """Share of ``images`` classified as ``digit``."""
        return float((self.classify(images) == digit).float().mean())

    def accuracy(self, samples: dict[str, torch.Tensor]) -> float:
        """Share of all ``{digit prompt: images (N, 1, 8, 8)}`` classified as their prompt's digit."""
        images = torch.cat(list(samples.values()))
        target = torch.tensor([int(prompt) for prompt, batch in samples.items() for _ in batch])
        return float((self.classify(images) == target).float().mean())


def _features(images: torch.Tensor) -> np.ndarray:
    grey = ((images.detach().cpu().float() + 1.0) * 8.0).clamp(0, 16)
    return grey.reshape(len(grey), -1).numpy()


def reference_similarity(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Fidelity to a concept's reference images: mean over samples of the best Pearson
    correlation with any reference (1 = a copy of some reference)."""
    centre = lambda x: x.flatten(1) - x.flatten(1).mean(1, keepdim=True)
    a, b = centre(samples.float()), centre(references.float())
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-8)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return float((a @ b.T).amax(1).mean())
