"""Sampling the digits model outside ComfyUI: Euler steps of the flow ODE with classifier-free
guidance, the same schedule ComfyUI's ``euler`` sampler with the ``simple`` scheduler follows for
a flow model (sigma from 1 to 0)."""

from __future__ import annotations

import torch


@torch.no_grad()
def sample(model, context: torch.Tensor, uncond: torch.Tensor, *, steps: int = 24,
           cfg: float = 3.0, seed: int = 0, size: int = 8) -> torch.Tensor:
    """Images ``(N, 1, size, size)`` in about ``[-1, 1]`` for contexts ``(N, T, C)``; ``uncond``
    is the empty prompt's context ``(1, T, C)``."""
    n = context.shape[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=generator).to(context.device)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    both = torch.cat([context, uncond.expand(n, -1, -1)])
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        t = torch.full((2 * n,), float(sigma) * 1000.0, device=context.device)
        v_cond, v_uncond = model(torch.cat([x, x]), t, both).chunk(2)
        v = v_uncond + cfg * (v_cond - v_uncond)
        x = x + (float(next_sigma) - float(sigma)) * v
    return x
