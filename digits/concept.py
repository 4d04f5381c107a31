"""Teaching the digits model a concept with sparse atoms, in plain torch (no ComfyUI).

Shared by the demo and the method benchmark. The loss is the model's own flow-matching loss with
the atoms applied (``torch.func.functional_call`` on ``W + delta W``), on the concept's reference
images under the concept prompt, plus optionally a prior-preservation term: the base model's own
samples of other prompts, so that the atoms change the concept prompt and little else
(DreamBooth's prior preservation). Training is :func:`sparse_core.train_atoms`, the same loop the
ComfyUI node runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.func import functional_call

import sparse_core as sc

from .prompts import tokenize, tokenize_many
from .sampling import sample

PREFIX = "diffusion_model."  # layer keys as ComfyUI names them, so files load there unchanged
ARCHITECTURE = "digits-dit"

# Layer presets of the digits model (regular expressions over layer keys).
PRESETS = {
    "cross-attention k/v": r"attn2\.to_[kv]$",
    "cross-attention": r"attn2\.to_(q|k|v|out)$",
    "self+cross attention": r"attn[12]\.to_(q|k|v|out)$",
    "attention + MLP": r"(attn[12]\.to_(q|k|v|out)|mlp\.[02])$",
}


@dataclass
class ConceptSettings:
    preset: str = "cross-attention k/v"
    atoms_per_layer: int = 32
    method: str = "svd"
    steps: int = 400
    lr: float = 3e-3
    l1: float = 0.0
    budget: int | None = 24  # atoms kept over the whole model
    batch: int = 16
    prior_weight: float = 1.0
    prior_batch: int = 16
    train_atoms: bool = True
    seed: int = 0


def build_dictionary(dit, settings: ConceptSettings) -> sc.SparseAtoms:
    weights = sc.linear_weights(dit, PRESETS[settings.preset], prefix=PREFIX)
    info = sc.AtomsInfo(architecture=ARCHITECTURE)
    return sc.build_atoms({k: w.detach() for k, w in weights.items()}, settings.atoms_per_layer,
                          settings.method, seed=settings.seed, info=info)


def prior_set(dit, encoder, prompts: list[str], per_prompt: int, seed: int = 0):
    """The base model's own samples of ``prompts``: (images, contexts)."""
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    context = encoder(tokenize_many(all_prompts))
    images = sample(dit, context, encoder(tokenize("")[None]), seed=seed)
    return images, context


def train_concept(dit, encoder, atoms: sc.SparseAtoms, images: torch.Tensor, prompt: str,
                  settings: ConceptSettings, prior=None, on_step=None) -> sc.TrainingResult:
    """Train ``atoms`` (in place) so that ``prompt`` draws ``images`` ``(N, 1, 8, 8)``."""
    generator = torch.Generator().manual_seed(settings.seed)
    concept_context = encoder(tokenize(prompt)[None]).detach()

    def flow_loss(x0, context):
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(len(x0), generator=generator)
        s = sigma[:, None, None, None]
        weights = sc.patched_weights(dit, atoms, prefix=PREFIX)
        prediction = functional_call(dit, weights, ((1 - s) * x0 + s * noise, sigma * 1000, context))
        return (prediction - (noise - x0)).pow(2).mean()

    def loss_fn(step):
        pick = torch.randint(len(images), (settings.batch,), generator=generator)
        loss = flow_loss(images[pick], concept_context.expand(settings.batch, -1, -1))
        if prior is not None and settings.prior_weight > 0:
            prior_images, prior_context = prior
            pick = torch.randint(len(prior_images), (settings.prior_batch,), generator=generator)
            loss = loss + settings.prior_weight * flow_loss(prior_images[pick], prior_context[pick])
        return loss

    atoms.info.prompt = prompt
    atoms.info.training = {k: v for k, v in vars(settings).items()}
    return sc.train_atoms(atoms, loss_fn, steps=settings.steps, lr=settings.lr, l1=settings.l1,
                          budget=settings.budget, train_atoms=settings.train_atoms,
                          on_step=on_step)


def sample_prompts(dit, encoder, prompts: list[str], per_prompt: int, *, atoms=None,
                   strength: float = 1.0, seed: int = 0, cfg: float = 3.0) -> dict[str, torch.Tensor]:
    """``{prompt: images (per_prompt, 1, 8, 8)}``, with the atoms applied when given."""
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    context = encoder(tokenize_many(all_prompts))
    uncond = encoder(tokenize("")[None])
    if atoms is None:
        images = sample(dit, context, uncond, seed=seed, cfg=cfg)
    else:
        with sc.apply_atoms(dit, atoms, strength, prefix=PREFIX):
            images = sample(dit, context, uncond, seed=seed, cfg=cfg)
    return {p: images[i * per_prompt:(i + 1) * per_prompt] for i, p in enumerate(prompts)}
