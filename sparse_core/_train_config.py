"""The one validated configuration of a training run (every front end shares it)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from ._schedules import LR_SCHEDULES

__all__ = ["BUDGET_CRITERIA", "TrainConfig"]

BUDGET_CRITERIA = ("taylor", "weight norm")


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
    loss) drive the front ends' loss functions.

    Optimisation controls (the defaults are plain Adam at a constant rate, today's results bit
    for bit): ``lr_schedule`` (one of :data:`LR_SCHEDULES`) after ``warmup_steps`` of linear
    warmup (:func:`learning_rate_at`; the l1 threshold ``lr * l1`` follows the rate);
    ``weight_decay`` (AdamW's decoupled decay, on the coefficients only: atoms and read-outs are
    renormalised every step, so ``delta W`` itself shrinks by ``1 - lr * weight_decay`` per step);
    ``gradient_accumulation`` (each update averages the gradients of that many ``loss_fn``
    calls: an effective batch of ``batch * gradient_accumulation`` at the memory of ``batch``);
    ``gradient_clip`` (``None``, or the largest global gradient norm an update sees; larger ones
    are scaled down).

    Every field is checked on construction (and by
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
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    gradient_accumulation: int = 1
    gradient_clip: float | None = None

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
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        self.warmup_steps = _int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be fewer than steps "
                             f"({self.steps})")
        self.weight_decay = _number("weight_decay", self.weight_decay, positive=False)
        self.gradient_accumulation = _int("gradient_accumulation", self.gradient_accumulation, 1)
        if self.gradient_clip is not None:
            self.gradient_clip = _number("gradient_clip", self.gradient_clip, positive=True)
