"""What every training loop of sparse atoms shares (ComfyUI's node and the digits demo alike).

Objective, per training step on the model's own loss::

    minimize  loss(W + delta W(D, C, s)) + l1 * sum_i |s_i|
    subject to  at most `budget` atoms with s_i != 0   (optional hard budget)

An optimizer (Adam) steps on the differentiable part; then :func:`sparse_step_` applies the
non-smooth parts exactly:

1. **normalise**: atoms and read-outs back to unit norm, their norms moved into ``s`` (the update
   ``delta W`` is unchanged). This makes ``|s_i|`` the atom's importance and keeps the l1 penalty
   meaningful when ``D`` or ``C`` train (otherwise ``s`` could shrink while ``C`` grows);
2. **proximal l1**: ``s <- sign(s) * max(|s| - lr * l1, 0)`` (soft-thresholding);
3. **budget**: coefficients outside the ``budget`` best atoms are set to zero. "Best" is by
   default (``budget_by="taylor"``) the atom's accumulated first-order effect on the loss, an
   exponential moving average (decay :data:`TAYLOR_DECAY`) of ``|s_i * dL/ds_i|`` over the steps
   (the loss change to first order if the atom were removed); ``budget_by="weight norm"`` ranks by
   ``|s_i| * ||d_i|| * ||c_i||``. On the digits concept the Taylor budget kept the concept at least
   as well at every atom count (2 atoms: 100 % fidelity against 90 % by weight norm; see
   bench/bench_method.py --parts budget).

:func:`budget_schedule` lowers the budget gradually during training (Zhu & Gupta, 2017, *To prune,
or not to prune*): atoms compete while the model still adapts, instead of being cut afterwards.

**Divergence guard.** :func:`train_atoms` keeps a copy of the last *verified* state (on the atoms'
device: one more copy of the trained tensors, next to the optimizer's two) and stops, restoring
that state, at the first step that diverges. A state is verified when the loss measured on it is
finite and has not exploded; a step diverges when

- its loss, a gradient, or a trained tensor after the update is NaN or inf;
- its loss exceeds :data:`LOSS_LIMIT` times the starting loss (the median loss of the first
  :data:`REFERENCE_STEPS` steps, as single batches are noisy): the loss exploded;
- renormalising the tuned atoms or read-outs grows a coefficient by more than
  :data:`MAX_STEP_GROWTH` in one step, or by more than :data:`MAX_TOTAL_GROWTH` since it was last
  zero, beyond what the optimizer's own steps on ``s`` did (see :meth:`_Guard.check_update`).
  Adam moves every entry of a unit-norm atom by about ``lr``, so a step changes its length by up
  to about ``lr * sqrt(out_features)``; normalising (1. above) moves that length into ``s``; with a
  learning rate too large for the atoms this feeds on itself: the coefficients grow
  geometrically (to 1e17 within a few dozen steps) while the loss, behind layer norms and
  softmaxes, barely rises.

The growth limits come from measurements. On the digits model (64 output features, 400 steps),
learning rates up to 1e-2 grew coefficients by at most 1.04x per step and 151x in total and
learned the concept; at 3e-2 and 0.1 the total passed 300 after 140 and 30 steps, and the samples
broke soon after (the limit is 1e4, not 300: layers with many more output features than the digits
model's 64 grow more per step at the same learning rate, and a geometric runaway passes 1e4 a few
steps after 300); at 1.0 a single step grew them 6x. Least-squares problems that converge at
learning rates up to 1.0, with or without noise, stayed below 2.4x and 5x.

The atoms after the last step are verified too (one more forward pass, without gradients), so
the atoms returned always passed every check. Measured effects (``AtomLayer.effect``) describe
the atoms they were measured on, so training that changes the atoms drops them.
"""

from __future__ import annotations

import math
import numbers
import statistics
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ._atoms import SparseAtoms

__all__ = ["TrainConfig", "trainable_parameters", "sparse_step_", "budget_schedule",
           "TrainingResult", "train_atoms"]

BUDGET_CRITERIA = ("taylor", "weight norm")
TAYLOR_DECAY = 0.9  # the Taylor budget's moving average keeps this much of its past per step
LOSS_LIMIT = 100.0  # a loss this many times the starting loss has exploded
REFERENCE_STEPS = 5  # the starting loss: median of this many first steps (batches are noisy)
MAX_STEP_GROWTH = 3.0  # renormalisation may grow a coefficient at most this much in one step
MAX_TOTAL_GROWTH = 1e4  # ... and at most this much in total


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'} and finite, got {value}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


@dataclass(kw_only=True)
class TrainConfig:
    """How to train sparse atoms: the one validated configuration every front end shares (the
    ComfyUI node extends it with its dtype options, the digits code with its dictionary).

    ``steps``, ``lr``, ``l1``, ``budget`` (``None``: no hard budget; else the number of atoms
    kept over the whole model), ``budget_by`` (one of :data:`BUDGET_CRITERIA`: how the budget
    ranks atoms), ``train_atoms`` / ``train_readouts`` drive :func:`train_atoms`;
    ``batch`` (images per step), ``seed`` and ``prior_weight`` (weight of the prior-preservation
    loss) drive the front ends' loss functions. Every field is checked on construction (and by
    :func:`dataclasses.replace`): a ``TypeError`` or ``ValueError`` names the field and value;
    NaN and inf are refused.
    """

    steps: int = 200
    lr: float = 3e-3
    l1: float = 0.0
    budget: int | None = None
    budget_by: str = "taylor"
    train_atoms: bool = True
    train_readouts: bool = False
    batch: int = 1
    seed: int = 0
    prior_weight: float = 1.0

    def __post_init__(self):
        self.steps = _int("steps", self.steps, 1)
        self.lr = _number("lr", self.lr, positive=True)
        self.l1 = _number("l1", self.l1, positive=False)
        if self.budget is not None:  # None, never 0, means "no budget"
            if isinstance(self.budget, numbers.Integral) and not isinstance(self.budget, bool) \
                    and self.budget < 1:
                raise ValueError(f"budget must be None (no budget) or >= 1 atom, got {self.budget}")
            self.budget = _int("budget", self.budget, 1)
        if self.budget_by not in BUDGET_CRITERIA:
            raise ValueError(f"budget_by must be one of {BUDGET_CRITERIA}, got {self.budget_by!r}")
        self.train_atoms = _bool("train_atoms", self.train_atoms)
        self.train_readouts = _bool("train_readouts", self.train_readouts)
        self.batch = _int("batch", self.batch, 1)
        self.seed = _int("seed", self.seed, 0)
        self.prior_weight = _number("prior_weight", self.prior_weight, positive=False)


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
                 per_layer: bool = False, scores: dict[str, torch.Tensor] | None = None) -> None:
    """Normalise, soft-threshold by ``l1_threshold`` (= learning rate * l1 weight) and keep at most
    ``budget`` atoms with non-zero coefficients (over the model, or per layer), ranked by
    ``scores`` (``{key: (m,)}``) when given, else by importance. In place."""
    l1_threshold = _number("l1_threshold", l1_threshold, positive=False)
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
        for key, keep in atoms.top_k_mask(budget, per_layer=per_layer, scores=scores).items():
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
    """What :func:`train_atoms` did.

    ``losses[i]`` is the loss of step ``i + 1`` (measured before its update) for every step whose
    update the returned atoms contain, so ``steps_done == len(losses)``; ``final_loss`` is the
    loss measured on the returned atoms; ``stopped`` says why training stopped early and which
    step's atoms were kept (``None`` when every step ran and passed the checks).
    """

    losses: list[float] = field(default_factory=list)
    stopped: str | None = None
    final_loss: float | None = None

    @property
    def steps_done(self) -> int:
        return len(self.losses)


def train_atoms(
    atoms: SparseAtoms,
    loss_fn: Callable[[int], torch.Tensor],
    config: TrainConfig | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
    **fields,
) -> TrainingResult:
    """The training loop every front end shares, in place on ``atoms``: Adam on
    ``loss_fn(step)`` (a scalar computed with the atoms applied), then :func:`sparse_step_` with
    the l1 threshold ``lr * l1`` and the :func:`budget_schedule` of ``budget`` atoms.

    ``config`` is a :class:`TrainConfig`; keyword ``fields`` build one or override its fields
    (``train_atoms(atoms, loss_fn, steps=100, lr=1e-2)``). A step that diverges (see the module
    docstring) stops training with the atoms of the last verified step restored;
    ``result.stopped`` says what happened. After the last step ``loss_fn(steps)`` is called once
    more, without gradients, to verify the final atoms. ``on_step(step, loss)`` runs after each
    completed step (progress bars, and cancelling: an exception it raises propagates with the
    atoms left at that step, which passed every check but the loss of the next step).
    """
    if not isinstance(atoms, SparseAtoms):
        raise TypeError(f"atoms must be SparseAtoms, got {type(atoms).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(step), got {type(loss_fn).__name__}")
    if config is None:
        config = TrainConfig(**fields)
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    elif fields:
        config = replace(config, **fields)
    if atoms.n_atoms == 0:
        raise ValueError("atoms has no atoms to train")
    params = trainable_parameters(atoms, train_atoms=config.train_atoms,
                                  train_readouts=config.train_readouts)
    guard = _Guard(atoms, config)
    taylor = None  # the Taylor budget's scores, {key: (m,)}
    if config.budget is not None and config.budget_by == "taylor":
        taylor = {key: torch.zeros_like(layer.coefficients, dtype=torch.float32)
                  for key, layer in atoms.layers.items()}
    optimizer = torch.optim.Adam(params, lr=config.lr)
    result = TrainingResult()
    try:
        for step in range(config.steps):
            loss = loss_fn(step)
            value = _loss_value(loss, step)
            problem = guard.check_loss(value)
            if problem:
                result.stopped = guard.restore(f"step {step + 1}", *problem)
                break
            guard.verified(step, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not _all_finite(p.grad for p in params if p.grad is not None):
                result.stopped = guard.restore(f"step {step + 1}", "a gradient became NaN or inf",
                                               _LOWER_LR)
                break
            if taylor is not None:
                _accumulate_taylor(atoms, taylor)
            before = guard.coefficients()
            optimizer.step()
            stepped = guard.coefficients()
            sparse_step_(atoms, l1_threshold=config.lr * config.l1,
                         budget=None if config.budget is None else
                         budget_schedule(step + 1, config.steps, config.budget, atoms.n_atoms),
                         scores=taylor)
            problem = guard.check_update(before, stepped)
            if problem:
                result.stopped = guard.restore(f"step {step + 1}", *problem)
                break
            result.losses.append(value)
            if on_step is not None:
                on_step(step, value)
        else:
            with torch.no_grad():
                value = _loss_value(loss_fn(config.steps), config.steps)
            problem = guard.check_loss(value)
            if problem:
                result.stopped = guard.restore("the final check", *problem)
            else:
                guard.verified(config.steps, value)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if guard.changed:
            stripped = atoms.without_effects()
            atoms.layers, atoms.info = stripped.layers, stripped.info
    del result.losses[guard.kept_step:]
    result.final_loss = guard.kept_loss
    return result


@torch.no_grad()
def _accumulate_taylor(atoms: SparseAtoms, scores: dict[str, torch.Tensor]) -> None:
    """``score <- decay * score + (1 - decay) * |s * dL/ds|`` for atoms still in the model (the
    gradient of this step, before the update); pruned atoms (``s == 0``) score zero."""
    for key, layer in atoms.layers.items():
        s, grad = layer.coefficients, layer.coefficients.grad
        taylor = torch.zeros_like(scores[key]) if grad is None else (s * grad).abs().float()
        scores[key].mul_(TAYLOR_DECAY).add_((1 - TAYLOR_DECAY) * taylor).mul_(s != 0)


def _loss_value(loss, step: int) -> float:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn({step}) must return a scalar tensor, got "
                        f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError(f"loss_fn({step}) returned a loss without gradient: it must be computed "
                         "with the atoms applied (e.g. through sparse_core.patched_weights)")
    return float(loss.detach())


def _all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())  # one synchronisation


_LOWER_LR = "lower the learning rate, or train in float32"


class _Guard:
    """The divergence checks of :func:`train_atoms` and the copy of the last verified state."""

    def __init__(self, atoms: SparseAtoms, config: TrainConfig):
        self.atoms, self.lr = atoms, config.lr
        self.tuned = config.train_atoms or config.train_readouts
        self.tensors = [t for layer in atoms.layers.values()
                        for t in (layer.atoms, layer.readouts, layer.coefficients)]
        self.saved = [t.detach().clone() for t in self.tensors]  # the last verified state
        self.kept_step, self.kept_loss = 0, None
        self.reference: list[float] = []  # losses of the first REFERENCE_STEPS steps
        # per atom, the growth renormalising has given its coefficient since it was last zero
        self.growth = {key: torch.ones(layer.n_atoms, device=layer.coefficients.device)
                       for key, layer in atoms.layers.items()}
        self.changed = False  # whether the atoms differ from the ones training started with

    def check_loss(self, value: float) -> tuple[str, str] | None:
        """``(what happened, advice)`` when the loss of the atoms in place diverged."""
        if not math.isfinite(value):
            if not self.reference:
                return (f"the loss of the starting atoms is {value}",
                        "check the data, the conditioning and the model")
            return f"the loss became {value}", _LOWER_LR
        if self.reference:
            start = statistics.median(self.reference)
            # The loss's own scale: the starting loss, or (a loss that starts at or below 0) the
            # spread of the first steps, or 1 when those are all 0.
            scale = max(abs(start), max(self.reference) - min(self.reference)) or 1.0
            if value - start > LOSS_LIMIT * scale:
                return (f"the loss exploded to {value:.4g} (the starting loss {start:.4g}; the "
                        f"limit is {LOSS_LIMIT:g}x its scale {scale:.4g} above it)", _LOWER_LR)
        return None

    def verified(self, step: int, value: float) -> None:
        """The atoms in place (``step`` updates) gave the finite loss ``value``: keep a copy."""
        if len(self.reference) < REFERENCE_STEPS:
            self.reference.append(value)
        if step > self.kept_step:
            with torch.no_grad():
                for saved, tensor in zip(self.saved, self.tensors):
                    saved.copy_(tensor)
        self.kept_step, self.kept_loss = step, value

    def coefficients(self) -> list[torch.Tensor] | None:
        """A copy of every layer's ``s`` ``(m,)`` (``None`` when neither atoms nor read-outs train:
        then renormalising never grows a coefficient)."""
        if not self.tuned:
            return None
        return [layer.coefficients.detach().clone() for layer in self.atoms.layers.values()]

    def check_update(self, before, stepped) -> tuple[str, str] | None:
        """After the optimizer step and :func:`sparse_step_`: finite tensors, and bounded growth
        of the coefficients beyond what the optimizer gave them. With ``s0`` before the step,
        ``s1`` after the optimizer and ``s2`` now, an atom's growth is ``|s2| / max(|s0|, |s1|)``:
        renormalising counts, the optimizer's own steps on ``s`` do not, and shrinking (by the
        optimizer, l1 or the budget) pays growth back. The total restarts when ``s`` is zero."""
        self.changed = True
        if not _all_finite(self.tensors):
            return "the atoms became NaN or inf in the update", _LOWER_LR
        if before is None:
            return None
        worst = []  # (key, [growth in this step, total growth, row]) of each layer's worst atom
        with torch.no_grad():
            for (key, layer), s0, s1 in zip(self.atoms.layers.items(), before, stepped):
                if not layer.n_atoms:
                    continue
                s2 = layer.coefficients.detach()
                alive = (s0 != 0) & (s2 != 0)
                step = torch.where(alive, s2.abs() / torch.maximum(s0.abs(), s1.abs()), 1.0).float()
                self.growth[key] = torch.where(alive, self.growth[key] * step, 1.0)
                row = torch.argmax(torch.maximum(step / MAX_STEP_GROWTH,
                                                 self.growth[key] / MAX_TOTAL_GROWTH))
                worst.append((key, torch.stack([step[row], self.growth[key][row], row.float()])))
        if not worst:
            return None
        values = torch.stack([value for _, value in worst]).tolist()  # one synchronisation
        for (key, _), (step, total, row) in zip(worst, values):
            if step > MAX_STEP_GROWTH or total > MAX_TOTAL_GROWTH:
                label = self.atoms.label(key, int(self.atoms[key].index[int(row)]))
                what = (f"in one step by {step:.3g}x (limit {MAX_STEP_GROWTH:g}x)"
                        if step > MAX_STEP_GROWTH else
                        f"by {total:.3g}x in total (limit {MAX_TOTAL_GROWTH:g}x)")
                return (f"renormalising atom {label} ({key}) grew its coefficient {what}: "
                        "the atoms' scale is running away",
                        f"the learning rate {self.lr:g} is too large for tuning the atoms; "
                        "lower it, or do not tune the atoms")
        return None

    def restore(self, where: str, what: str, advice: str) -> str:
        """Put the last verified atoms back; the message for ``TrainingResult.stopped``."""
        with torch.no_grad():
            for saved, tensor in zip(self.saved, self.tensors):
                tensor.copy_(saved)
        self.changed = self.kept_step > 0
        kept = ("the starting atoms were kept" if self.kept_step == 0 else
                f"the atoms of step {self.kept_step} were kept")
        return f"{where}: {what}; {kept} ({advice})"
