"""Teaching the digits model a concept with sparse atoms, in plain torch (no ComfyUI).

Shared by the demo and the method benchmark. The loss is the model's own flow-matching loss with
the atoms applied (``torch.func.functional_call`` on ``W + delta W``), on the concept's reference
images under the concept prompt, plus optionally a prior-preservation term: the base model's own
samples of other prompts, so that the atoms change the concept prompt and little else
(DreamBooth's prior preservation). Training is :func:`sparse_core.train_atoms`, the same loop the
ComfyUI node runs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.func import functional_call

import sparse_core as sc

from .model import ARCHITECTURE
from .presets import PRESETS
from .prompts import tokenize, tokenize_many
from .sampling import sample

PREFIX = "diffusion_model."  # layer keys as ComfyUI names them, so files load there unchanged


@dataclass(kw_only=True)
class ConceptSettings(sc.TrainConfig):
    """A :class:`sparse_core.TrainConfig` with the digits demo's defaults, plus the dictionary
    (``preset`` of :data:`digits.presets.PRESETS`, ``atoms_per_layer``, ``method``) and the
    number of prior-preservation images per step (``prior_batch``) and the share of the
    concept's images trained under the empty prompt (``cfg_dropout``, as the base model was: the
    unconditional branch of classifier-free guidance then knows the new images too; without it
    guidance exaggerates a style the base model never saw, e.g. bold strokes at ~1.7x the ink)."""

    steps: int = 400
    lr: float = 3e-3
    budget: int | None = 24  # atoms kept over the whole model
    batch: int = 16
    preset: str = "cross-attention k/v"
    atoms_per_layer: int = 32
    method: str = "svd"
    prior_batch: int = 16
    cfg_dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.method not in sc.DICTIONARY_METHODS:
            raise ValueError(f"method must be one of {list(sc.DICTIONARY_METHODS)}, got {self.method!r}")
        if isinstance(self.cfg_dropout, bool) or not isinstance(self.cfg_dropout, (int, float)):
            raise TypeError(f"cfg_dropout must be a number, got {type(self.cfg_dropout).__name__}")
        if not 0 <= self.cfg_dropout < 1:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        for name in ("atoms_per_layer", "prior_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")


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


def flow_loss(dit, encoder, images: torch.Tensor, prompt, settings: ConceptSettings,
              weights_fn, prior=None):
    """``loss_fn(step)`` for any adapter: the flow-matching loss of the model with the weights
    ``weights_fn()`` returns (``{parameter name: patched weight}``, differentiable), on batches of
    the concept's images under ``prompt`` (one prompt, or a list with one per image; a share
    ``settings.cfg_dropout`` of them under the empty prompt) plus the weighted prior-preservation
    term."""
    generator = torch.Generator().manual_seed(settings.seed)
    if isinstance(prompt, str):
        contexts = encoder(tokenize(prompt)[None]).detach().expand(len(images), -1, -1)
    else:
        contexts = encoder(tokenize_many(list(prompt))).detach()

    def batch_loss(x0, context):
        noise = torch.randn(x0.shape, generator=generator)
        sigma = torch.rand(len(x0), generator=generator)
        s = sigma[:, None, None, None]
        prediction = functional_call(dit, weights_fn(), ((1 - s) * x0 + s * noise, sigma * 1000, context))
        return (prediction - (noise - x0)).pow(2).mean()

    empty = encoder(tokenize("")[None]).detach()

    def loss_fn(step):
        pick = torch.randint(len(images), (settings.batch,), generator=generator)
        context = contexts[pick]
        if settings.cfg_dropout > 0:
            drop = torch.rand(settings.batch, generator=generator) < settings.cfg_dropout
            context = torch.where(drop[:, None, None], empty, context)
        loss = batch_loss(images[pick], context)
        if prior is not None and settings.prior_weight > 0:
            prior_images, prior_context = prior
            pick = torch.randint(len(prior_images), (settings.prior_batch,), generator=generator)
            return {"concept": loss,  # the guard watches the "prior" part
                    "prior": settings.prior_weight * batch_loss(prior_images[pick], prior_context[pick])}
        return loss

    return loss_fn


def train_concept(dit, encoder, atoms: sc.SparseAtoms, images: torch.Tensor, prompt: str,
                  settings: ConceptSettings, prior=None, on_step=None) -> sc.TrainingResult:
    """Train ``atoms`` (in place) so that ``prompt`` draws ``images`` ``(N, 1, 8, 8)`` (``prompt``
    may also be a list with one prompt per image)."""
    loss_fn = flow_loss(dit, encoder, images, prompt, settings,
                        lambda: sc.patched_weights(dit, atoms, prefix=PREFIX), prior)
    atoms.info.prompt = prompt if isinstance(prompt, str) else " | ".join(sorted(set(prompt)))
    result = sc.train_atoms(atoms, loss_fn, settings, on_step=on_step)
    atoms.info.training = {**vars(settings), "steps_done": result.steps_done,
                           "stopped": result.stopped, "warnings": result.warnings}
    return result


@contextlib.contextmanager
def applied(dit, deltas: dict):
    """``W += delta`` for ``{parameter name: delta}`` during the block, restored exactly after."""
    parameters = dict(dit.named_parameters())
    backups = {name: parameters[name].detach().clone() for name in deltas}
    try:
        with torch.no_grad():
            for name, delta in deltas.items():
                parameters[name].add_(delta.detach().to(parameters[name].dtype))
        yield dit
    finally:
        with torch.no_grad():
            for name, original in backups.items():
                parameters[name].copy_(original)


def sample_prompts(dit, encoder, prompts: list[str], per_prompt: int, *, atoms=None,
                   atoms_list=(), deltas=None, strength: float = 1.0, seed: int = 0,
                   cfg: float = 3.0) -> dict[str, torch.Tensor]:
    """``{prompt: images (per_prompt, 1, 8, 8)}``, with atoms (one set, or several stacked, as
    chained Apply nodes do) or plain weight deltas applied when given."""
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    context = encoder(tokenize_many(all_prompts))
    uncond = encoder(tokenize("")[None])
    stack = contextlib.ExitStack()
    with stack:
        for item in ([atoms] if atoms is not None else []) + list(atoms_list):
            stack.enter_context(sc.apply_atoms(dit, item, strength, prefix=PREFIX))
        if deltas:
            stack.enter_context(applied(dit, deltas))
        images = sample(dit, context, uncond, seed=seed, cfg=cfg)
    return {p: images[i * per_prompt:(i + 1) * per_prompt] for i, p in enumerate(prompts)}
