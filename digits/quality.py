"""Quality metrics for generated images of one class, beyond "does a classifier say the class".

Pure torch, on images ``(n_samples, 1, 8, 8)`` in ``[-1, 1]`` (any ``(n, ...)`` works: images are
flattened to ``(n, n_features)``). Three questions, each with a real-data value to read it against:

- **memorization**: is each sample closer to a training reference than to any held-out real image
  of the class? (:func:`memorization`; :func:`real_memorization` is the same for real images);
- **diversity**: mean pairwise Pearson correlation of the samples and each sample's best
  correlation to another sample (:func:`diversity`; copies of one image give 1 and 1, copies of a
  few give 1 for the latter); :func:`real_diversity` is the same for as many real images;
- **distribution distance** to held-out real images, in a fixed feature space no training touches
  (:class:`FeatureSpace`: a PCA basis fit once on all bundled real digits): the Fréchet distance of
  Gaussians fit to the features (:func:`frechet_distance`) and the unbiased kernel MMD² with an RBF
  kernel whose bandwidth is fixed from the real digits (:func:`mmd2`). Both are biased by small
  sample counts in their own ways, so :func:`real_floor` gives the value between two disjoint sets
  of real images of the sizes compared: a generator that draws the real distribution scores about
  the floor;
- **two-sample test**: can a 1-nearest-neighbour rule tell the samples from real images
  (:func:`two_sample_accuracy`: 0.5 = no, 1.0 = always)?

Correlations are Pearson's over pixels (each image centred and scaled to unit norm); statistics
are computed in float64 (covariances of 64-200 samples, matrix square roots) and returned as floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import load_digits


def _unit(images: torch.Tensor) -> torch.Tensor:
    """``(n, ...)`` -> ``(n, n_features)`` float64, each row centred and of unit norm."""
    x = images.detach().cpu().double().flatten(1)
    x = x - x.mean(1, keepdim=True)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every image in ``a (n_a, ...)`` with every image in ``b (n_b, ...)``:
    ``(n_a, n_b)`` float64 (a blank image correlates 0 with everything)."""
    if a.shape[1:].numel() != b.shape[1:].numel():
        raise ValueError(f"images must have the same number of pixels, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _unit(a) @ _unit(b).T


@dataclass(frozen=True)
class Memorization:
    """Per-sample best correlations, averaged: ``to_references`` (best over the training
    references), ``to_held_out`` (best over held-out real images), and ``closer_to_references``:
    the share of samples whose best reference beats their best held-out image."""

    to_references: float
    to_held_out: float
    closer_to_references: float


def memorization(samples: torch.Tensor, references: torch.Tensor, held_out: torch.Tensor) -> Memorization:
    """Memorization of ``samples (n_samples, ...)`` against the training ``references (n_refs, ...)``
    and ``held_out (n_held_out, ...)`` real images of the class (none of them a reference).

    A generator that copies its references scores ``to_references`` ~ 1 and
    ``closer_to_references`` ~ 1; one that draws new images of the class scores about
    :func:`real_memorization` (low share: there are many more held-out images than references)."""
    to_refs = correlations(samples, references).amax(1)  # (n_samples,)
    to_held = correlations(samples, held_out).amax(1)  # (n_samples,)
    return Memorization(float(to_refs.mean()), float(to_held.mean()),
                        float((to_refs > to_held).double().mean()))


def real_memorization(references: torch.Tensor, held_out: torch.Tensor) -> Memorization:
    """:func:`memorization` of the real held-out images themselves, leave-one-out (each image's
    best held-out match excludes itself): what a generator of new real images would score."""
    if len(held_out) < 2:
        raise ValueError(f"held_out needs at least 2 images for leave-one-out, got {len(held_out)}")
    to_refs = correlations(held_out, references).amax(1)
    among = correlations(held_out, held_out)
    among.fill_diagonal_(-float("inf"))
    to_held = among.amax(1)
    return Memorization(float(to_refs.mean()), float(to_held.mean()),
                        float((to_refs > to_held).double().mean()))


@dataclass(frozen=True)
class Diversity:
    """``mean_pairwise``: mean Pearson correlation over all pairs of distinct images (1 = all one
    image); ``nearest_neighbour``: mean over images of the best correlation to another image of
    the set (1 = every image has a copy in the set; depends on the set's size)."""

    mean_pairwise: float
    nearest_neighbour: float


def diversity(images: torch.Tensor) -> Diversity:
    """:class:`Diversity` of ``images (n, ...)``, ``n >= 2`` (lower = more diverse)."""
    n = len(images)
    if n < 2:
        raise ValueError(f"images needs at least 2 images for pairs, got {n}")
    c = correlations(images, images)
    pairwise = (c.sum() - c.diagonal().sum()) / (n * (n - 1))
    c.fill_diagonal_(-float("inf"))
    return Diversity(float(pairwise), float(c.amax(1).mean()))


def real_diversity(real: torch.Tensor, n_samples: int, *, splits: int = 8, seed: int = 0) -> Diversity:
    """:func:`diversity` of ``n_samples`` real images drawn from ``real (m, ...)`` (all of them
    when ``m <= n_samples``), averaged over ``splits`` seeded draws: the value to read a
    generator's ``n_samples`` samples against."""
    count = min(n_samples, len(real))
    generator = torch.Generator().manual_seed(seed)
    values = [diversity(real[torch.randperm(len(real), generator=generator)[:count]]) for _ in range(splits)]
    return Diversity(sum(v.mean_pairwise for v in values) / splits,
                     sum(v.nearest_neighbour for v in values) / splits)


def template_correlation(samples: torch.Tensor, template: torch.Tensor) -> float:
    """Mean Pearson correlation of ``samples (n, ...)`` with one clean ``template (1, ...)``."""
    if len(template) != 1:
        raise ValueError(f"template must be one image (1, ...), got {len(template)} images")
    return float(correlations(samples, template).mean())


@dataclass(frozen=True)
class FeatureSpace:
    """A fixed linear feature map: ``features(x) = (flatten(x) - mean) @ components.T``, with
    ``mean (n_features,)`` and ``components (n_components, n_features)`` float64, and the RBF
    bandwidth ``bandwidth`` for :func:`mmd2` (median pairwise feature distance of the fit data)."""

    mean: torch.Tensor
    components: torch.Tensor
    bandwidth: float

    @classmethod
    def fit(cls, images: torch.Tensor, n_components: int = 8) -> "FeatureSpace":
        """PCA of ``images (n, ...)``, deterministic: the top ``n_components`` right singular
        vectors of the centred data, each signed so that its largest-magnitude entry is positive."""
        x = images.detach().cpu().double().flatten(1)
        if isinstance(n_components, bool) or not isinstance(n_components, int):
            raise TypeError(f"n_components must be an int, got {type(n_components).__name__}")
        if not 1 <= n_components <= min(x.shape):
            raise ValueError(f"n_components must be in [1, {min(x.shape)}] for {tuple(x.shape)} data, "
                             f"got {n_components}")
        mean = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
        components = vh[:n_components]  # (n_components, n_features)
        peak = components.gather(1, components.abs().argmax(1, keepdim=True))
        components = components * peak.sign()
        features = (x - mean) @ components.T
        distances = torch.cdist(features, features)
        bandwidth = float(distances[torch.triu(torch.ones_like(distances, dtype=torch.bool), 1)].median())
        return cls(mean, components, bandwidth)

    @classmethod
    def of_digits(cls, n_components: int = 8) -> "FeatureSpace":
        """:meth:`fit` on all 1797 bundled real digits (every class, the held-out 3 included)."""
        return cls.fit(load_digits()[0], n_components)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``images (n, ...)`` -> ``(n, n_components)`` float64."""
        x = images.detach().cpu().double().flatten(1)
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"images have {x.shape[1]} pixels; this feature space was fit on "
                             f"{self.mean.numel()}")
        return (x - self.mean) @ self.components.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fit to features ``a (n_a, d)`` and ``b (n_b, d)``:
    ``|mu_a - mu_b|² + tr(S_a + S_b - 2 (S_a^½ S_b S_a^½)^½)`` (sample covariances, n - 1)."""
    a, b = a.double(), b.double()
    for name, x in (("a", a), ("b", b)):
        if x.dim() != 2 or len(x) < 2:
            raise ValueError(f"{name} must be (n >= 2, d) features, got {tuple(x.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T  # S_a^½
    middle = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * middle)


def mmd2(a: torch.Tensor, b: torch.Tensor, bandwidth: float) -> float:
    """Unbiased squared maximum mean discrepancy of features ``a (n_a, d)`` and ``b (n_b, d)``
    with the kernel ``k(x, y) = exp(-|x - y|² / (2 bandwidth²))`` (Gretton et al., JMLR 2012,
    eq. 3): 0 in expectation for one distribution, so small sets of it can score slightly below 0."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
    a, b = a.double(), b.double()
    for name, x in (("a", a), ("b", b)):
        if x.dim() != 2 or len(x) < 2:
            raise ValueError(f"{name} must be (n >= 2, d) features, got {tuple(x.shape)}")
    kernel = lambda x, y: torch.exp(-torch.cdist(x, y).pow(2) / (2 * bandwidth ** 2))
    within = lambda x: (kernel(x, x).sum() - len(x)) / (len(x) * (len(x) - 1))  # diagonal is 1
    return float(within(a) + within(b) - 2 * kernel(a, b).mean())


def two_sample_accuracy(a: torch.Tensor, b: torch.Tensor) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy telling set ``a (n_a, ...)`` from ``b (n_b, ...)``
    by pixel distance (Lopez-Paz & Oquab, ICLR 2017): about 0.5 for two draws of one distribution,
    1.0 when every image's nearest neighbour comes from its own set."""
    for name, x in (("a", a), ("b", b)):
        if len(x) < 2:
            raise ValueError(f"{name} needs at least 2 images, got {len(x)}")
    x = torch.cat([a, b]).detach().cpu().double().flatten(1)
    label = torch.cat([torch.zeros(len(a)), torch.ones(len(b))])
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return float((label[d.argmin(1)] == label).double().mean())


@dataclass(frozen=True)
class Distance:
    """Distances between two image sets in one :class:`FeatureSpace`."""

    frechet: float
    mmd2: float


def distance(samples: torch.Tensor, real: torch.Tensor, space: FeatureSpace) -> Distance:
    """:func:`frechet_distance` and :func:`mmd2` of ``samples (n, ...)`` and ``real (m, ...)``
    in ``space``."""
    fs, fr = space.features(samples), space.features(real)
    return Distance(frechet_distance(fs, fr), mmd2(fs, fr, space.bandwidth))


def real_floor(real: torch.Tensor, n_samples: int, space: FeatureSpace, *, splits: int = 8,
               seed: int = 0) -> Distance:
    """What a perfect generator would score: :func:`distance` between ``n_samples`` real images
    and the rest of ``real (m, ...)``, averaged over ``splits`` random splits (seeded). With
    ``n_samples`` larger than half of ``real``, half is used (the two sides must not overlap)."""
    count = min(n_samples, len(real) // 2)
    if count < 2:
        raise ValueError(f"real needs at least 4 images to split, got {len(real)}")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(splits):
        order = torch.randperm(len(real), generator=generator)
        values.append(distance(real[order[:count]], real[order[count:]], space))
    return Distance(sum(v.frechet for v in values) / splits, sum(v.mmd2 for v in values) / splits)
