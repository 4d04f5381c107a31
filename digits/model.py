"""The digits model: a tiny pixel-space diffusion transformer with cross-attention conditioning.

It predicts the flow-matching velocity ``v = noise - x0`` of 8x8 one-channel images at noise level
``sigma`` (input ``x = (1 - sigma) x0 + sigma noise``), taking ``timesteps = 1000 * sigma`` and a
context of prompt-token embeddings, exactly as ComfyUI's flow models (``ModelType.FLOW``) call a
diffusion model. Layers come from an ``operations`` namespace (``torch.nn`` by default,
``comfy.ops.*`` inside ComfyUI) so ComfyUI can cast and patch their weights.

Shapes: x ``(B, 1, 8, 8)``, timesteps ``(B,)``, context ``(B, T, context_dim)`` -> ``(B, 1, 8, 8)``.
Each block: adaLN-zero modulated self-attention (``attn1``), cross-attention to the context
(``attn2``: ``to_q`` on image tokens, ``to_k``/``to_v`` on context tokens) and an MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURE = "digits-dit"  # the name atoms files made for this model carry

DEFAULT_CONFIG = dict(image_size=8, patch_size=2, in_channels=1, dim=64, depth=4, heads=4,
                      context_dim=64, mlp_ratio=4)


def timestep_embedding(timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0):
    """Sinusoidal features of ``timesteps (B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim, heads, context_dim=None, *, ops, dtype=None, device=None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.to_k = ops.Linear(context_dim, dim, bias=False, dtype=dtype, device=device)
        self.to_v = ops.Linear(context_dim, dim, bias=False, dtype=dtype, device=device)
        self.to_out = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        split = lambda t: t.view(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, d / heads)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim, heads, context_dim, mlp_ratio, *, ops, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.attn1 = Attention(dim, heads, ops=ops, **kw)
        self.norm2 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.attn2 = Attention(dim, heads, context_dim, ops=ops, **kw)
        self.norm3 = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.mlp = nn.Sequential(ops.Linear(dim, dim * mlp_ratio, **kw), nn.GELU(approximate="tanh"),
                                 ops.Linear(dim * mlp_ratio, dim, **kw))
        self.modulation = ops.Linear(dim, 6 * dim, **kw)  # adaLN-zero: shift/scale/gate x 2

    def forward(self, x, c, context):
        shift1, scale1, gate1, shift3, scale3, gate3 = self.modulation(F.silu(c))[:, None].chunk(6, -1)
        x = x + gate1 * self.attn1(self.norm1(x) * (1 + scale1) + shift1)
        x = x + self.attn2(self.norm2(x), context)
        return x + gate3 * self.mlp(self.norm3(x) * (1 + scale3) + shift3)


class DigitsDiT(nn.Module):
    """See the module docstring. Keyword-only configuration (``DEFAULT_CONFIG``)."""

    def __init__(self, *, image_size=8, patch_size=2, in_channels=1, dim=64, depth=4, heads=4,
                 context_dim=64, mlp_ratio=4, dtype=None, device=None, operations=None, **_):
        super().__init__()
        ops = operations or nn
        kw = dict(dtype=dtype, device=device)
        self.dtype = dtype or torch.float32  # ComfyUI's model base reads it
        self.patch_size, self.in_channels, self.image_size = patch_size, in_channels, image_size
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = ops.Linear(in_channels * patch_size ** 2, dim, **kw)
        self.position = nn.Parameter(torch.zeros(1, tokens, dim, **kw))
        self.time_embed = nn.Sequential(ops.Linear(256, dim, **kw), nn.SiLU(), ops.Linear(dim, dim, **kw))
        self.blocks = nn.ModuleList(Block(dim, heads, context_dim, mlp_ratio, ops=ops, **kw)
                                    for _ in range(depth))
        self.final_norm = ops.LayerNorm(dim, elementwise_affine=False, eps=1e-6, **kw)
        self.final_modulation = ops.Linear(dim, 2 * dim, **kw)
        self.final = ops.Linear(dim, in_channels * patch_size ** 2, **kw)

    def initialize(self, generator: torch.Generator | None = None) -> "DigitsDiT":
        """Training initialisation (ComfyUI loads weights instead): small position embeddings,
        adaLN-zero gates and output at zero so every block starts as the identity."""
        with torch.no_grad():
            self.position.normal_(0.0, 0.02, generator=generator)
            for block in self.blocks:
                nn.init.zeros_(block.modulation.weight)
                nn.init.zeros_(block.modulation.bias)
            nn.init.zeros_(self.final_modulation.weight)
            nn.init.zeros_(self.final_modulation.bias)
            nn.init.zeros_(self.final.weight)
            nn.init.zeros_(self.final.bias)
        return self

    def forward(self, x, timesteps, context, **kwargs):
        b, ch, h, w = x.shape
        p = self.patch_size
        # (b, ch, h, w) -> (b, h/p * w/p, ch * p * p)
        tokens = x.reshape(b, ch, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, ch * p * p)
        tokens = self.patch_embed(tokens) + self.position.to(tokens.dtype)
        c = self.time_embed(timestep_embedding(timesteps).to(tokens.dtype))
        context = context.to(tokens.dtype)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        shift, scale = self.final_modulation(F.silu(c))[:, None].chunk(2, -1)
        tokens = self.final(self.final_norm(tokens) * (1 + scale) + shift)
        # (b, h/p * w/p, ch * p * p) -> (b, ch, h, w)
        return tokens.reshape(b, h // p, w // p, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, h, w)


class PromptEncoder(nn.Module):
    """The digits model's "text encoder": a prompt's tokens -> context ``(B, T, context_dim)``.

    Token ids come from :mod:`digits.prompts`; embeddings of tokens never seen in training (the
    held-out ``3`` and the spare tokens) stay at their random initialisation.
    """

    def __init__(self, vocab_size: int, length: int, context_dim: int = 64):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, context_dim)
        self.position = nn.Parameter(torch.zeros(1, length, context_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens) + self.position
