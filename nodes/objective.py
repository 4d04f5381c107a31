"""What one training step of Train Sparse Concept measures: the noise levels it draws, the error of
the model's prediction, and how each noise level is weighted.

Noise levels are ComfyUI's percents ``p`` in ``[0, 1]`` (``model_sampling.percent_to_sigma``: 0 is
the most noise); ``t = 1 - p`` is the amount of noise. ``"uniform"`` draws ``p ~ U(0, 1)``;
``"logit-normal"`` draws ``t = sigmoid(n)``, ``n ~ N(0, 1)`` (Esser et al., 2024, SD3's training:
more middle levels, fewer extremes). ``timestep_shift`` ``k`` then moves ``t`` to
``k t / (1 + (k - 1) t)`` (the flow-matching shift; ``k > 1``: more noise). The model's own
sampling (its schedule, a flow model's own shift) maps the result to sigma.

The error is taken in the model's prediction space: the x0 error divided by
:func:`prediction_scale` ``s(sigma)``, as MSE, L1 or Huber (torch's definitions, delta 1, as
ComfyUI's TrainLoraNode uses them), averaged per image. ``"min-SNR"`` weighting (Hang et al., 2023)
multiplies each image's error by ``min(SNR, gamma) * s(sigma)^2`` (the x0-space error weighted by
``min(SNR, gamma)``, with ``SNR = (a / b)^2`` for ``x_t = a x0 + b noise`` read off the model's own
``noise_scaling``): ``min(SNR, gamma) / SNR`` for eps models, ``min(SNR, gamma) / (SNR + 1)`` for
v-prediction; low-noise levels, which the prediction-space loss overweights, count less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TIMESTEP_SAMPLING = ("uniform", "logit-normal")
LOSS_WEIGHTINGS = ("none", "min-SNR")
LOSS_TYPES = ("MSE", "L1", "Huber")


def draw_levels(count: int, generator: torch.Generator, sampling: str = "uniform",
                shift: float = 1.0) -> list[float]:
    """``count`` noise levels as percents (see the module's docstring), from ``generator``."""
    if sampling == "uniform":
        percents = torch.rand(count, generator=generator)
        if shift == 1.0:
            return percents.tolist()  # exactly the draws of the unshifted default
        noise = 1.0 - percents
    elif sampling == "logit-normal":
        noise = torch.sigmoid(torch.randn(count, generator=generator))
    else:
        raise ValueError(f"timestep sampling must be one of {TIMESTEP_SAMPLING}, got {sampling!r}")
    noise = shift * noise / (1.0 + (shift - 1.0) * noise)
    return (1.0 - noise).tolist()


def prediction_scale(sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """``|d denoised / d model output|`` at each ``sigma`` (shape ``(n,)``), shaped ``(n, 1, ...)``
    with ``ndim`` dimensions: read off the model's own ``calculate_denoised`` (linear in the
    output), so eps (sigma), flow (sigma), v-prediction (sigma * sd / sqrt(sigma^2 + sd^2)) and x0
    models (1) each get theirs. Floored at 1e-3 like the lowest noise levels."""
    ones, zeros = _constants(sigma, ndim)
    with torch.no_grad():
        slope = sampling.calculate_denoised(sigma, ones, zeros) - sampling.calculate_denoised(sigma, zeros, zeros)
    return slope.abs().float().clamp_min(1e-3)


def signal_to_noise(sampling, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    """``(a / b)^2`` per ``sigma`` ``(n,)`` for the model's ``x_t = a x0 + b noise``: ``1 /
    sigma^2`` for eps and v models, ``((1 - sigma) / sigma)^2`` for flow models; shape ``(n,)``."""
    ones, zeros = _constants(sigma, ndim)
    with torch.no_grad():
        signal = sampling.noise_scaling(sigma, zeros, ones, False)
        noise = sampling.noise_scaling(sigma, ones, zeros, False)
    return (signal / noise.clamp_min(1e-6)).flatten(1)[:, 0].float().pow(2)


def image_errors(denoised: torch.Tensor, x0: torch.Tensor, scale: torch.Tensor,
                 loss_type: str = "MSE") -> torch.Tensor:
    """The prediction-space error of each image, ``(n,)``, for ``denoised`` and ``x0`` ``(n, ...)``
    and :func:`prediction_scale` ``scale``."""
    error = (denoised.float() - x0.float()) / scale
    if loss_type == "MSE":
        per_element = error.pow(2)
    elif loss_type == "L1":
        per_element = error.abs()
    elif loss_type == "Huber":
        per_element = F.huber_loss(error, torch.zeros_like(error), reduction="none", delta=1.0)
    else:
        raise ValueError(f"loss type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return per_element.flatten(1).mean(1)


def level_weights(sampling, sigma: torch.Tensor, scale: torch.Tensor, weighting: str,
                  gamma: float) -> torch.Tensor | None:
    """Each image's weight ``(n,)`` under ``weighting`` (``None`` for ``"none"``)."""
    if weighting == "none":
        return None
    if weighting != "min-SNR":
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    snr = signal_to_noise(sampling, sigma, scale.dim())
    return snr.clamp_max(gamma) * scale.flatten(1)[:, 0].pow(2)


def _constants(sigma: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (len(sigma),) + (1,) * (ndim - 1)
    return torch.ones(shape).to(sigma), torch.zeros(shape).to(sigma)
