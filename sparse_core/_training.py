"""What every training loop of sparse atoms shares (ComfyUI's node and the digits demo alike).

Objective, per training step on the model's own loss::

    minimize  loss(W + delta W(D, C, s)) + l1 * sum_i |s_i|
    subject to  at most `budget` atoms with s_i != 0   (optional hard budget)

An optimizer (Adam, say) steps on the differentiable part; then :func:`sparse_step_` applies the
non-smooth parts exactly:

1. **normalise**: atoms and read-outs back to unit norm, their norms moved into ``s`` (the update
   ``delta W`` is unchanged). This makes ``|s_i|`` the atom's importance and keeps the l1 penalty
   meaningful when ``D`` or ``C`` train (otherwise ``s`` could shrink while ``C`` grows);
2. **proximal l1**: ``s <- sign(s) * max(|s| - lr * l1, 0)`` (soft-thresholding);
3. **budget**: coefficients outside the ``budget`` most important atoms are set to zero.

:func:`budget_schedule` lowers the budget gradually during training (Zhu & Gupta, 2017, *To prune,
or not to prune*): atoms compete while the model still adapts, instead of being cut afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ._atoms import SparseAtoms

__all__ = ["trainable_parameters", "sparse_step_", "budget_schedule", "TrainingResult",
           "train_atoms"]


def trainable_parameters(atoms: SparseAtoms, *, train_atoms: bool = True,
                         train_readouts: bool = False) -> list[torch.Tensor]:
    """Mark and return the tensors to optimise: coefficients always, atoms and read-outs on
    request. The tensors must be leaves (use :meth:`SparseAtoms.clone` on shared atoms first)."""
    params = []
    for layer in atoms.layers.values():
        for tensor, wanted in ((layer.coefficients, True), (layer.atoms, train_atoms),
                               (layer.readouts, train_readouts)):
            if wanted:
                if not tensor.is_leaf:
                    raise ValueError("atoms to train must be leaf tensors; call .clone() first")
                params.append(tensor.requires_grad_(True))
    return params


@torch.no_grad()
def sparse_step_(atoms: SparseAtoms, *, l1_threshold: float = 0.0, budget: int | None = None,
                 per_layer: bool = False) -> None:
    """Normalise, soft-threshold by ``l1_threshold`` (= learning rate * l1 weight) and keep at most
    ``budget`` atoms with non-zero coefficients (over the model, or per layer). In place."""
    if l1_threshold < 0:
        raise ValueError(f"l1_threshold must be >= 0, got {l1_threshold}")
    for layer in atoms.layers.values():
        atom_norms = layer.atoms.norm(dim=1)
        readout_norms = layer.readouts.norm(dim=1)
        layer.coefficients.mul_((atom_norms * readout_norms).to(layer.coefficients.dtype))
        layer.atoms.div_(atom_norms.clamp_min(torch.finfo(layer.atoms.dtype).tiny)[:, None])
        layer.readouts.div_(readout_norms.clamp_min(torch.finfo(layer.readouts.dtype).tiny)[:, None])
        if l1_threshold:
            s = layer.coefficients
            s.copy_(torch.sign(s) * (s.abs() - l1_threshold).clamp_min(0))
    if budget is not None:
        for key, keep in atoms.top_k_mask(budget, per_layer=per_layer).items():
            atoms[key].coefficients.mul_(keep.to(atoms[key].coefficients.device))


def budget_schedule(step: int, total_steps: int, final_budget: int, n_atoms: int, *,
                    start: float = 0.1, end: float = 0.6) -> int:
    """Atoms allowed at ``step``: all of them until ``start * total_steps``, then a cubic decline
    to ``final_budget`` at ``end * total_steps``, then ``final_budget``."""
    if not 0 <= start <= end <= 1:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
    final_budget = min(final_budget, n_atoms)
    begin, finish = start * total_steps, end * total_steps
    if step <= begin:
        return n_atoms
    if step >= finish or finish == begin:
        return final_budget
    progress = (step - begin) / (finish - begin)
    return final_budget + math.ceil((n_atoms - final_budget) * (1 - progress) ** 3)


@dataclass
class TrainingResult:
    """What :func:`train_atoms` did: the loss of every completed step, and why it stopped early
    (``None`` when all steps ran)."""

    losses: list[float] = field(default_factory=list)
    stopped: str | None = None

    @property
    def steps_done(self) -> int:
        return len(self.losses)


def train_atoms(
    atoms: SparseAtoms,
    loss_fn: Callable[[int], torch.Tensor],
    *,
    steps: int,
    lr: float,
    l1: float = 0.0,
    budget: int | None = None,
    per_layer_budget: bool = False,
    train_atoms: bool = True,
    train_readouts: bool = False,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainingResult:
    """The training loop every front end shares: Adam on ``loss_fn(step)`` (a scalar computed
    with the atoms applied), then :func:`sparse_step_` with the l1 threshold ``lr * l1`` and the
    :func:`budget_schedule` of ``budget`` atoms.

    A non-finite loss or gradient stops training *before* the optimizer touches the atoms, so
    they keep the last good state; ``result.stopped`` says what happened. ``on_step(step, loss)``
    runs after each completed step (progress bars, and cancelling: an exception it raises
    propagates with the atoms left at their last completed step).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    if budget is not None and budget < 1:
        raise ValueError(f"budget must be >= 1 atom, got {budget}")
    params = trainable_parameters(atoms, train_atoms=train_atoms, train_readouts=train_readouts)
    optimizer = torch.optim.Adam(params, lr=lr)
    pool = max(layer.n_atoms for layer in atoms.layers.values()) if per_layer_budget else atoms.n_atoms
    result = TrainingResult()
    for step in range(steps):
        loss = loss_fn(step)
        value = float(loss.detach())
        if not math.isfinite(value):
            result.stopped = (f"loss became {value} at step {step + 1}; the atoms of step {step} "
                              "were kept (lower the learning rate, or train in float32)")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if not all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
            result.stopped = (f"a gradient became NaN or inf at step {step + 1}; the atoms of "
                              f"step {step} were kept (lower the learning rate, or train in float32)")
            optimizer.zero_grad(set_to_none=True)
            break
        optimizer.step()
        current = None if budget is None else budget_schedule(step + 1, steps, budget, pool)
        sparse_step_(atoms, l1_threshold=lr * l1, budget=current, per_layer=per_layer_budget)
        result.losses.append(value)
        if on_step is not None:
            on_step(step, value)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return result
