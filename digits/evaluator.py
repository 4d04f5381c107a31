"""The evaluator: classifiers fit on real digits only, never used in any training.

- Digit: an RBF support-vector classifier on the bundled digits and their versions with each
  attribute of :mod:`digits.attributes` (bold, the style the composition experiment teaches, and
  faint / slant / small, which the base model draws on request; trained on plain digits alone it
  calls a third of real bold 3s and three quarters of real small digits something else).
- Style: the same kind of classifier telling plain from bold strokes (all ten digits, plain vs
  :func:`digits.data.embolden`), so "is this sample bold" is judged like "is this sample a 3"
  rather than by a fixed ink threshold (the median ink of bold images would pass only half of the
  real bold digits).

Both on a stratified 70/30 split, seeded; their held-out accuracies are reported with them.
Generated images are mapped back to the dataset's 0-16 grey levels before classification.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import attributes
from .data import embolden, load_digits


@dataclass
class DigitEvaluator:
    classifier: object
    held_out_accuracy: float
    held_out_accuracy_bold: float = 0.0
    style_classifier: object = None
    style_held_out_accuracy: float = 0.0  # plain and bold held-out images together
    held_out_accuracy_by_attribute: dict = None  # {attribute: digit accuracy on held-out images}

    @classmethod
    def fit(cls, seed: int = 0) -> "DigitEvaluator":
        from sklearn.model_selection import train_test_split
        from sklearn.svm import SVC

        images, labels = load_digits()
        train_i, test_i = train_test_split(range(len(images)), test_size=0.3, random_state=seed,
                                           stratify=labels.numpy())
        train_i, test_i = list(train_i), list(test_i)
        variants = lambda x: [x] + [attributes.apply(x, [word]) for word in attributes.TRANSFORMS]
        train_x = _features(torch.cat(variants(images[train_i])))
        train_y = labels[train_i].repeat(1 + len(attributes.TRANSFORMS)).numpy()
        classifier = SVC(gamma=0.001, C=10.0).fit(train_x, train_y)
        truth = labels[test_i].numpy()
        scores = [float((classifier.predict(_features(x)) == truth).mean()) for x in variants(images[test_i])]
        plain, by_attribute = scores[0], dict(zip(attributes.TRANSFORMS, scores[1:]))
        bold = by_attribute[attributes.HELD_OUT_STYLE]
        train_x = _features(torch.cat([images[train_i], embolden(images[train_i])]))
        style_y = torch.cat([torch.zeros(len(train_i)), torch.ones(len(train_i))]).numpy()
        style = SVC(gamma=0.001, C=10.0).fit(train_x, style_y)
        test_x = _features(torch.cat([images[test_i], embolden(images[test_i])]))
        test_y = torch.cat([torch.zeros(len(test_i)), torch.ones(len(test_i))]).numpy()
        style_accuracy = float((style.predict(test_x) == test_y).mean())
        return cls(classifier, plain, bold, style, style_accuracy, by_attribute)

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted digit ``(N,)`` for images ``(N, 1, 8, 8)`` in ``[-1, 1]``."""
        return torch.from_numpy(self.classifier.predict(_features(images))).long()

    def is_bold(self, images: torch.Tensor) -> torch.Tensor:
        """Whether each image ``(N, 1, 8, 8)`` has bold strokes ``(N,)`` bool."""
        return torch.from_numpy(self.style_classifier.predict(_features(images)) == 1)

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
