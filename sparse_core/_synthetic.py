"""Signals drawn from a hidden sparse dictionary, and how well a learned dictionary recovers it.

The standard test of dictionary learning (Aharon, Elad & Bruckstein, 2006): draw unit-norm atoms,
code each signal with a few of them, add noise, learn, and count the hidden atoms that some
learned atom matches up to sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_matrix, check_nonnegative_float, check_positive_int

__all__ = ["SyntheticSignals", "sparse_coded_signals", "atom_recovery"]


@dataclass
class SyntheticSignals:
    """``signals (n_samples, n_features) = codes (n_samples, n_components) @ atoms + noise``."""

    signals: torch.Tensor
    atoms: torch.Tensor
    codes: torch.Tensor


def sparse_coded_signals(
    n_samples: int,
    n_components: int,
    n_features: int,
    n_nonzero_coefs: int,
    *,
    noise: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> SyntheticSignals:
    """Draw signals from a hidden dictionary.

    Atoms are Gaussian directions normalised to unit norm; each signal uses ``n_nonzero_coefs``
    distinct atoms with standard normal coefficients; Gaussian noise is scaled so that
    ``||noise||_F = noise * ||codes @ atoms||_F`` (``noise=0.01`` is "1 % noise", 40 dB SNR).
    """
    check_positive_int("n_samples", n_samples)
    check_positive_int("n_components", n_components)
    check_positive_int("n_features", n_features)
    check_positive_int("n_nonzero_coefs", n_nonzero_coefs, upper=n_components,
                       upper_name="n_components")
    noise = check_nonnegative_float("noise", noise)
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_components, n_features, generator=generator, dtype=torch.float64)
    atoms /= atoms.norm(dim=1, keepdim=True)
    support = torch.rand(n_samples, n_components, generator=generator).argsort(1)[:, :n_nonzero_coefs]
    values = torch.randn(n_samples, n_nonzero_coefs, generator=generator, dtype=torch.float64)
    codes = torch.zeros(n_samples, n_components, dtype=torch.float64).scatter_(1, support, values)
    clean = codes @ atoms
    perturbation = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
    perturbation *= noise * clean.norm() / perturbation.norm().clamp_min(1e-300)
    return SyntheticSignals(
        signals=(clean + perturbation).to(dtype), atoms=atoms.to(dtype), codes=codes.to(dtype)
    )


def atom_recovery(true_atoms: torch.Tensor, learned_atoms: torch.Tensor,
                  threshold: float = 0.99) -> float:
    """Share of ``true_atoms (m, d)`` matched by some learned atom with ``|cosine| > threshold``."""
    check_matrix("true_atoms", true_atoms)
    check_matrix("learned_atoms", learned_atoms, n_cols=true_atoms.shape[1],
                 cols_of="true_atoms (n_features)")
    true = true_atoms.double()
    learned = learned_atoms.double().to(true.device)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-300)
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-300)
    best = (true @ learned.T).abs().amax(1)
    return float((best > threshold).double().mean())
