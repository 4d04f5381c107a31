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

:func:`budget_schedule` lowers the budget gradually during training, :func:`learning_rate_at`
the learning rate (both in :mod:`sparse_core._schedules`).

**Divergence guard.** :func:`train_atoms` stops training that broke the model and puts back the
last state whose losses still stayed near the start's (see :mod:`sparse_core._guard`, which also
gives the measurements its limits come from). Measured effects (``AtomLayer.effect``) describe
the atoms they were measured on, so training that changes the atoms drops them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ._atoms import SparseAtoms
from ._checks import check_int
from ._guard import LOWER_LR, REFERENCE_CHECKS, Guard, all_finite
from ._schedules import budget_schedule, learning_rate_at
from ._state import TrainingState, capture_state, resume_run
from ._train_config import TrainConfig, _number

TAYLOR_DECAY = 0.9  # the Taylor budget's moving average keeps this much of its past per step

__all__ = ["TrainConfig", "trainable_parameters", "sparse_step_", "TrainingResult", "train_atoms"]

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
    ``scores`` (``{key: (m,)}``) when given, else by importance. In place. ``budget`` means
    what it means in :class:`TrainConfig`: ``None`` is no budget, else at least 1 atom."""
    l1_threshold = _number("l1_threshold", l1_threshold, positive=False)
    if budget is not None and check_int("budget", budget) < 1:
        raise ValueError(f"budget must be None (no budget) or >= 1 atom, got {budget}")
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


@dataclass
class TrainingResult:
    """What :func:`train_atoms` did.

    ``losses[i]`` is the loss of step ``i + 1`` (measured before its update) for every step whose
    update the returned atoms contain, so ``steps_done == len(losses)``; ``parts`` holds the same
    per named part of the loss (when ``loss_fn`` returns a dict) and ``growth`` the largest total
    coefficient growth after each of those steps; ``final_loss`` is the loss measured on the
    returned atoms; ``stopped`` says why training stopped early and which step's atoms were kept
    (``None`` when every step ran and the final atoms passed every check); ``warnings`` what the
    user should check although training ran (a risen prior-preservation loss); ``reference``
    the starting atoms' evaluations per part (what the guard compares with); ``learning_rates``
    the rate of each of those steps' updates (the schedule) and ``gradient_norms`` each update's
    global gradient norm before clipping (only when ``gradient_clip`` is set: it costs a
    synchronisation per step).
    """

    losses: list[float] = field(default_factory=list)
    stopped: str | None = None
    final_loss: float | None = None
    parts: dict[str, list[float]] = field(default_factory=dict)
    growth: list[float] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    reference: dict[str, list[float]] = field(default_factory=dict)
    learning_rates: list[float] = field(default_factory=list)
    gradient_norms: list[float] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.losses)

    @property
    def no_working_state(self) -> bool:
        """Training stopped before any trained state passed the guard's checks: the atoms are the
        starting ones, and nothing trained should be used."""
        return self.stopped is not None and self.steps_done == 0


def train_atoms(
    atoms: SparseAtoms,
    loss_fn: Callable[[int], torch.Tensor | dict[str, torch.Tensor]],
    config: TrainConfig | None = None,
    *,
    on_step: Callable[[int, float], None] | None = None,
    check_fn: Callable[[], torch.Tensor | dict[str, torch.Tensor]] | None = None,
    resume: TrainingState | None = None,
    state_every: int = 0,
    on_state: Callable[[TrainingState], None] | None = None,
    **fields,
) -> TrainingResult:
    """The training loop every front end shares, in place on ``atoms``: Adam (AdamW with
    ``weight_decay``) on ``loss_fn(step)`` (called ``gradient_accumulation`` times per update; a
    scalar computed with the atoms applied, or a dict of named scalar parts
    whose sum is the loss; the guard watches a part named ``"prior"``, the prior-preservation
    loss, for a warning), then :func:`sparse_step_` with the l1 threshold ``lr * l1`` (``lr``
    of this step's schedule) and the :func:`budget_schedule` of ``budget`` atoms.

    ``config`` is a :class:`TrainConfig`; keyword ``fields`` build one or override its fields
    (``train_atoms(atoms, loss_fn, steps=100, lr=1e-2)``). The divergence guard
    (:mod:`sparse_core._guard`) judges states by ``check_fn()`` when given (called without
    gradients on the starting atoms, every 5 steps and on the final atoms: the same loss on fixed
    data, noise and noise levels, as a scalar or a dict of named parts, e.g. one per prior
    prompt), else by the training losses (then it calls ``loss_fn(0)`` :data:`REFERENCE_CHECKS`
    - 1 more times without gradients before the first update and ``loss_fn(steps)`` that many
    times after the last); training that diverges or breaks stops with the last working state
    restored, and ``result.stopped`` says what happened. ``on_step(step, loss)`` runs after each completed
    step (progress bars, and cancelling: an exception it raises propagates with the atoms left at
    that step, which passed every check but the loss of the next step).

    **Resuming.** Every ``state_every`` updates (and after the last), ``on_state(state)`` gets a
    :class:`TrainingState` (copies, on the CPU: save it with :func:`save_training_state`). Given
    ``resume=state`` (and ``atoms`` its atoms or a copy), the run continues after ``state.step``
    updates exactly as if it had never stopped, provided ``loss_fn`` continues its own random
    stream too (front ends keep their generator's state in ``state.extra``): the result's history
    holds the earlier steps as well. Every setting must equal the state's but ``steps`` (a larger
    one continues the run further; schedules then follow the new length). A resumed run judged
    broken goes back at most to the resumed state.
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
    if check_fn is not None and not callable(check_fn):
        raise TypeError(f"check_fn must be callable as check_fn(), got {type(check_fn).__name__}")
    check = None if check_fn is None else lambda: _evaluations(lambda _: check_fn(), 0, 1, "check_fn()")[0]
    guard = Guard(atoms, config.lr, config.train_atoms or config.train_readouts, config.steps, check)
    taylor = None  # the Taylor budget's scores, {key: (m,)}
    if config.budget is not None and config.budget_by == "taylor":
        taylor = {key: torch.zeros_like(layer.coefficients, dtype=torch.float32)
                  for key, layer in atoms.layers.items()}
    optimizer = _optimizer(atoms, params, config)
    result = TrainingResult()
    start = 0 if resume is None else resume_run(resume, atoms, config, params, optimizer,
                                                taylor, guard, result)
    state_every = _number("state_every", state_every, positive=False)
    if state_every and not callable(on_state):
        raise TypeError(f"state_every {state_every:g} needs on_state, a callable taking the state")

    def state(steps_done: int) -> TrainingState:
        return capture_state(atoms, steps_done, config, optimizer, taylor, guard, result)

    try:
        for step in range(start, config.steps):
            optimizer.zero_grad(set_to_none=True)
            loss, parts = _forward_backward(loss_fn, step, config.gradient_accumulation)
            problem = guard.start([parts, *_evaluations(loss_fn, 0, 0 if check else
                                                        REFERENCE_CHECKS - 1)]) if step == 0 else None
            if problem:
                result.stopped = f"step 1: {problem[0]}; nothing was trained ({problem[1]})"
                break
            problem = guard.check_loss(step, parts)
            if problem:
                result.stopped = guard.restore(f"step {step + 1}", *problem)
                break
            if not all_finite(p.grad for p in params if p.grad is not None):
                result.stopped = guard.restore(f"step {step + 1}", "a gradient became NaN or inf",
                                               LOWER_LR, True)
                break
            if taylor is not None:
                _accumulate_taylor(atoms, taylor)  # the loss's own gradient, before clipping
            if config.gradient_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, config.gradient_clip)
                result.gradient_norms.append(float(norm))
            lr = learning_rate_at(step, config.steps, config.lr, config.lr_schedule,
                                  config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            before = guard.coefficients()
            optimizer.step()
            stepped = guard.coefficients()
            sparse_step_(atoms, l1_threshold=lr * config.l1,
                         budget=None if config.budget is None else
                         budget_schedule(step + 1, config.steps, config.budget, atoms.n_atoms),
                         scores=taylor)
            problem = guard.check_update(before, stepped)
            if problem:
                result.stopped = guard.restore(f"step {step + 1}", *problem)
                break
            result.losses.append(loss)
            result.learning_rates.append(lr)
            for name, part in parts.items():
                result.parts.setdefault(name, []).append(part)
            result.growth.append(guard.max_growth)
            if state_every and ((step + 1) % int(state_every) == 0 or step + 1 == config.steps):
                on_state(state(step + 1))
            if on_step is not None:
                on_step(step, result.losses[-1])
        else:
            problem = guard.check_final(config.steps, lambda: _evaluations(
                loss_fn, config.steps, 1 if check else REFERENCE_CHECKS))
            if problem:
                result.stopped = guard.restore("the final check", *problem)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        if guard.changed:  # measured effects are stale now; the layers stay the same objects
            for layer in atoms.layers.values():
                layer.effect = None
            atoms.info = replace(atoms.info, effects={})
    del result.losses[guard.working_step:], result.growth[guard.working_step:]
    del result.learning_rates[guard.working_step:], result.gradient_norms[guard.working_step:]
    for values in result.parts.values():
        del values[guard.working_step:]
    result.final_loss, result.reference = guard.working_loss, guard.reference
    result.warnings = guard.warnings() if result.final_loss is not None else []
    return result


def _optimizer(atoms: SparseAtoms, params: list[torch.Tensor], config: TrainConfig):
    """Adam over ``params``; with ``weight_decay``, AdamW whose decay reaches only the
    coefficients (one parameter group for them, one without decay for atoms and read-outs)."""
    if not config.weight_decay:
        return torch.optim.Adam(params, lr=config.lr)
    coefficients = {id(layer.coefficients) for layer in atoms.layers.values()}
    groups = [{"params": [p for p in params if id(p) in coefficients],
               "weight_decay": config.weight_decay},
              {"params": [p for p in params if id(p) not in coefficients], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _forward_backward(loss_fn, step: int, micro_steps: int) -> tuple[float, dict[str, float]]:
    """``micro_steps`` calls of ``loss_fn(step)``, each followed by the backward pass of its
    share ``loss / micro_steps`` (the gradients add up to the mean's); returns the mean loss and
    the mean of each named part."""
    total, parts = 0.0, {}
    for _ in range(micro_steps):
        loss, named = _loss(loss_fn, step)
        (loss / micro_steps if micro_steps > 1 else loss).backward()
        total += float(loss.detach())
        for name, value in named.items():
            parts[name] = parts.get(name, 0.0) + value / micro_steps
    return total / micro_steps, parts


@torch.no_grad()
def _accumulate_taylor(atoms: SparseAtoms, scores: dict[str, torch.Tensor]) -> None:
    """``score <- decay * score + (1 - decay) * |s * dL/ds|`` for atoms still in the model (the
    gradient of this step, before the update); pruned atoms (``s == 0``) score zero."""
    for key, layer in atoms.layers.items():
        s, grad = layer.coefficients, layer.coefficients.grad
        taylor = torch.zeros_like(scores[key]) if grad is None else (s * grad).abs().float()
        scores[key].mul_(TAYLOR_DECAY).add_((1 - TAYLOR_DECAY) * taylor).mul_(s != 0)


def _loss(loss_fn, step: int, what: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``loss_fn(step)`` as (the scalar loss, ``{part: value}``; ``{"total": value}`` when
    ``loss_fn`` returns one scalar); ``what`` names the call in errors."""
    what = what or f"loss_fn({step})"
    loss = loss_fn(step)
    named = loss if isinstance(loss, dict) else {"total": loss}
    if not named:
        raise ValueError(f"{what} returned an empty dict of loss parts")
    for name, part in named.items():
        if not isinstance(name, str) or not isinstance(part, torch.Tensor) or part.numel() != 1:
            raise TypeError(f"{what} must return a scalar tensor or a dict of named scalar "
                            f"tensors, got {type(part).__name__} {tuple(getattr(part, 'shape', ()))}"
                            + ("" if named is not loss else f" for part {name!r}"))
        if torch.is_grad_enabled() and not part.requires_grad:
            raise ValueError(f"{what} returned a loss without gradient: it must be computed "
                             "with the atoms applied (e.g. through sparse_core.patched_weights)")
    total = sum(named.values()) if isinstance(loss, dict) else loss
    return total, {name: float(part.detach()) for name, part in named.items()}


@torch.no_grad()
def _evaluations(loss_fn, step: int, count: int, what: str | None = None) -> list[dict[str, float]]:
    """``count`` evaluations of ``loss_fn(step)`` without gradients, as ``[{part: value}]``."""
    return [_loss(loss_fn, step, what)[1] for _ in range(count)]
