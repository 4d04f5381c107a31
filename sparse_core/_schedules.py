"""How the learning rate and the atom budget change over a training run.

Both are pure functions of the step, so a run's schedule can be printed, tested and resumed
without running it.
"""

from __future__ import annotations

import math

__all__ = ["LR_SCHEDULES", "learning_rate_at", "budget_schedule"]

LR_SCHEDULES = ("constant", "cosine", "linear")


def learning_rate_at(step: int, total_steps: int, lr: float, schedule: str = "constant",
                     warmup_steps: int = 0) -> float:
    """The learning rate of update ``step`` (0-based) of ``total_steps``.

    Warmup: updates ``0 .. warmup_steps - 1`` rise linearly, ``lr * (step + 1) / warmup_steps``
    (the first update already moves, the last warmup update runs at ``lr``). After it the
    ``schedule`` runs over the remaining updates with ``progress = (step - warmup_steps) /
    (total_steps - warmup_steps)`` in ``[0, 1)``: ``"constant"`` keeps ``lr``, ``"linear"`` gives
    ``lr * (1 - progress)``, ``"cosine"`` ``lr * (1 + cos(pi * progress)) / 2``; both reach zero
    only after the last update, so every update moves.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return lr * (1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def budget_schedule(step: int, total_steps: int, final_budget: int, n_atoms: int, *,
                    start: float = 0.1, end: float = 0.6) -> int:
    """Atoms allowed at ``step``: all of them until ``start * total_steps``, then a cubic decline
    to ``final_budget`` at ``end * total_steps``, then ``final_budget`` (Zhu & Gupta, 2017, *To
    prune, or not to prune*: atoms compete while the model still adapts, instead of being cut
    afterwards)."""
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
