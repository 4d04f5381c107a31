"""Measuring atom effects on the digits model (plain torch).

The calibration data of a concept are its reference images under its prompt, noised at fixed
levels with fixed noise (``x = (1 - sigma) x0 + sigma noise``), so ``predict(b)`` returns the same
thing on every call: the model's velocity prediction ``(batch, 1, 8, 8)`` with the atoms applied
through ``sparse_core.patched_weights`` (which reads the coefficients afresh on each call, as
:func:`sparse_core.measure_effects` requires).

The training budget's functional criterion (accumulated ``|s_i dL/ds_i|``) lives in
:func:`sparse_core.train_atoms` (``TrainConfig.budget_by``), shared with the ComfyUI trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

import sparse_core as sc

from .concept import PREFIX
from .prompts import tokenize

NOISE_LEVELS = (0.2, 0.4, 0.6, 0.8)


@dataclass
class Calibration:
    """Noisy inputs ``x (N, 1, 8, 8)`` at ``sigmas (N,)`` under one prompt, in batches of ``batch``."""

    inputs: torch.Tensor
    sigmas: torch.Tensor
    prompt: str
    batch: int
    description: str

    @property
    def n_batches(self) -> int:
        return -(-len(self.inputs) // self.batch)


def fixed_levels(images: torch.Tensor, prompt: str, *, levels=NOISE_LEVELS, draws: int = 2,
                 seed: int = 0, batch: int = 16) -> Calibration:
    """Every image ``(N, 1, 8, 8)`` at every noise level in ``levels``, ``draws`` noises each."""
    generator = torch.Generator().manual_seed(seed)
    x0 = images.repeat(len(levels) * draws, 1, 1, 1)  # (levels * draws * N, 1, 8, 8)
    sigmas = torch.tensor(levels).repeat_interleave(draws * len(images))
    noise = torch.randn(x0.shape, generator=generator)
    s = sigmas[:, None, None, None]
    description = (f"{len(images)} images x {len(levels)} noise levels {list(levels)} x {draws} "
                   f"noises, prompt {prompt!r}")
    return Calibration((1 - s) * x0 + s * noise, sigmas, prompt, batch, description)


def random_levels(images: torch.Tensor, prompt: str, count: int, *, seed: int,
                  batch: int = 64) -> Calibration:
    """``count`` noisy versions of ``images``: random image, uniform noise level, random noise."""
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(images), (count,), generator=generator)
    sigmas = torch.rand(count, generator=generator)
    noise = torch.randn((count, *images.shape[1:]), generator=generator)
    s = sigmas[:, None, None, None]
    description = f"{count} noisy versions of {len(images)} images (uniform sigma), prompt {prompt!r}"
    return Calibration((1 - s) * images[pick] + s * noise, sigmas, prompt, batch, description)


def predictor(dit, encoder, atoms: sc.SparseAtoms, calibration: Calibration):
    """``predict(b)``: the model's prediction for batch ``b`` of ``calibration``, atoms applied."""
    context = encoder(tokenize(calibration.prompt)[None]).detach()

    def predict(batch: int) -> torch.Tensor:
        part = slice(batch * calibration.batch, (batch + 1) * calibration.batch)
        x, sigma = calibration.inputs[part], calibration.sigmas[part]
        weights = sc.patched_weights(dit, atoms, prefix=PREFIX)
        return functional_call(dit, weights, (x, sigma * 1000, context.expand(len(x), -1, -1)))

    return predict


def measure(dit, encoder, atoms: sc.SparseAtoms, images: torch.Tensor, prompt: str, *,
            seed: int = 0, draws: int = 2, exact_top: int = 16, method: str = "auto",
            progress=None) -> sc.SparseAtoms:
    """A copy of ``atoms`` with their effects measured on ``images`` at :data:`NOISE_LEVELS`
    (``draws`` noises each) under ``prompt`` (see :func:`sparse_core.measure_effects`)."""
    calibration = fixed_levels(images, prompt, draws=draws, seed=seed)
    return sc.measure_effects(atoms, predictor(dit, encoder, atoms, calibration),
                              n_batches=calibration.n_batches, exact_top=exact_top, method=method,
                              progress=progress, calibration=calibration.description)
