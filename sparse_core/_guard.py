"""The divergence guard of :func:`sparse_core.train_atoms`: it stops training that broke the
model and puts back the last state that still worked.

**Evidence** (``bench/bench_guard.py``: the digits concept graph trained through ComfyUI's nodes
with the guard's stops off, "sks" (the concept) and "7" (preservation) sampled from the atoms in
place every few steps, 64 samples each, judged by the digits evaluator). The samples broke at lr
3e-2 after ~125 steps, at 0.1 after ~20, at 0.3 in bf16 within 10; at 3e-3 they never did.

- Coefficient growth did not separate working from broken states: 0.1 broke at 22x, 3e-2 still
  drew both at 153x. It stays a runaway stop at :data:`MAX_TOTAL_GROWTH`.
- The training loss's windowed medians did not either (a batch's noise level and images are
  random): the prior loss was 1.32x the start's over states that drew both, 1.27x over broken ones.
- The node's *check* (``check_fn``: the same loss on fixed images, noise and noise levels, one
  part per prior prompt) did: over states that drew both, the worst prior prompt's loss stayed at
  <= 1.62x the start's (3e-3: <= 1.08x), broken states reached >= 2.2x within a few steps (0.3 in
  bf16: 7.7x at step 10). One state in between (1.64x) had already lost the "7".

**Working states.** With a ``check_fn``, the guard evaluates it on the starting atoms and every
:data:`WINDOW` steps; a state whose every check part is at most :data:`BROKEN_RISE` times its
start's scale above the start's (:func:`_rise`; 1.5x a positive loss) becomes the working state
(copied then). Early on the worst prior prompt may pass that briefly and return (0.1: 1.6-2.0x at
steps 4-10, 1.4x at 15), so a check above it only stops training after :data:`BROKEN_WINDOWS`
failed checks in a row (at least a quarter of the run), and then the last passing one is kept: in
the runs above steps 115 (3e-2) and 15 (0.1), which drew both.

Without a ``check_fn`` the evidence is the training loss itself: its starting value is the median
of the first step's loss and :data:`REFERENCE_CHECKS` - 1 more evaluations on the starting atoms,
and a state becomes a candidate when its window's medians stay near the start and working when
the next window's do too (noisier: single batches, so a window only judges its neighbourhood).
The atoms after the last step are checked the same way (the check, or :data:`REFERENCE_CHECKS`
loss evaluations). Memory: up to two copies of the trained tensors, next to the optimizer's two.

**Stops.** Training stops and the working state is put back when

- the loss, a gradient or a trained tensor becomes NaN or inf, the loss exceeds the start by
  :data:`LOSS_LIMIT` times its scale (exploded), or renormalising grows a coefficient by more
  than :data:`MAX_STEP_GROWTH` in one step or :data:`MAX_TOTAL_GROWTH` in total (see
  :meth:`Guard.check_update`): then a candidate whose following steps stayed near the start is
  kept instead;
- the checks (or windows) rose beyond :data:`BROKEN_RISE` that many times in a row;
- the final atoms' check rose beyond it.

When the working state is the starting atoms, no working state was reached: the starting atoms
are put back and :attr:`~sparse_core.TrainingResult.no_working_state` is true (the ComfyUI node
then fails with that message instead of passing untrained atoms on). A kept state whose prior
part rose above :data:`PRIOR_WARN` times its start gets a warning.
"""

from __future__ import annotations

import math
import statistics

import torch

from ._atoms import SparseAtoms

LOSS_LIMIT = 100.0  # a loss this many times its scale above the start has exploded
REFERENCE_CHECKS = 4  # the starting loss: median of this many evaluations on the starting atoms
WINDOW = 5  # steps between the guard's checks (the window of losses without a check_fn)
BROKEN_RISE = 1.5  # a check part (or window median) this many times the start's has broken ...
BROKEN_WINDOWS = 4  # ... and this many in a row (at least a quarter of the run) stop training
PRIOR_WARN = 1.25  # a kept prior-preservation loss this many times the start's gets a warning
MAX_STEP_GROWTH = 3.0  # renormalisation may grow a coefficient at most this much in one step
MAX_TOTAL_GROWTH = 1e4  # ... and at most this much in total

LOWER_LR = "lower the learning rate, or train in float32"


def _scale(reference: list[float]) -> float:
    """A loss's own scale: the starting loss, or (one that starts at or below 0) the spread of
    the starting evaluations, or 1 when those are all 0."""
    return max(abs(statistics.median(reference)), max(reference) - min(reference)) or 1.0


def _rise(values: list[float], reference: list[float]) -> float:
    """How far the median of ``values`` is above the start, in the start's scale: 0.5 means
    1.5x a positive starting loss."""
    return (statistics.median(values) - statistics.median(reference)) / _scale(reference)


def _columns(rows: list[dict[str, float]]) -> dict[str, list[float]]:
    return {name: [row[name] for row in rows] for name in rows[0]}


def _compare(values: list[float], reference: list[float]) -> str:
    start, now = statistics.median(reference), statistics.median(values)
    return f"{now / start:.2f}x" if start > 0 else f"{now:.4g} (start {start:.4g})"


class Guard:
    """The checks of :func:`train_atoms`, the windows' verdicts and the copies of the candidate
    and working states. A check that finds a problem returns ``(what happened, advice,
    sudden)``: ``sudden`` for a single bad step (NaN, an explosion, a runaway scale), not for
    losses that rose over windows."""

    def __init__(self, atoms: SparseAtoms, lr: float, tuned: bool, steps: int, check_fn=None):
        self.atoms, self.lr, self.tuned, self.check_fn = atoms, lr, tuned, check_fn
        # transient rises (an lr of 1 on least squares: 20 steps at 4-9x) must not stop a run
        self.broken_limit = max(BROKEN_WINDOWS, steps // (4 * WINDOW))
        self.tensors = [t for layer in atoms.layers.values()
                        for t in (layer.atoms, layer.readouts, layer.coefficients)]
        self.working = [t.detach().clone() for t in self.tensors]
        # the candidate's copy: only judging by windows needs it (a check judges the state itself)
        self.candidate = [] if check_fn else [t.detach().clone() for t in self.tensors]
        self.loss_reference: list[float] = []  # the starting atoms' training losses
        self.reference: dict[str, list[float]] = {}  # {part: the starting atoms' evidence}
        self.window: dict[str, list[float]] = {}  # {part: losses of the current window}
        self.window_start = 0
        self.broken_windows = 0  # broken windows in a row
        # the working state: its step, the losses that judged it, where, its own loss
        self.working_step, self.working_losses, self.working_span = 0, {}, ""
        self.working_loss: float | None = None
        # the candidate (-1: none): the last state of a window near the start, copied then
        self.candidate_step, self.candidate_losses, self.candidate_loss = -1, {}, None
        self.candidate_first = 0  # the first step of the candidate's window
        # per atom, the growth renormalising has given its coefficient since it was last zero
        self.growth = {key: torch.ones(layer.n_atoms, device=layer.coefficients.device)
                       for key, layer in atoms.layers.items()}
        self.max_growth = 1.0
        self.changed = False  # whether the atoms differ from the ones training started with

    # -- the loss ------------------------------------------------------------------------------

    def start(self, parts: list[dict[str, float]]) -> tuple[str, str, bool] | None:
        """The starting atoms' loss evaluations ``[{part: loss}]`` (and their check): the
        reference."""
        evidence = [self.check_fn()] if self.check_fn else parts
        for values, what in [(v, "loss") for v in parts] + [(v, "check loss") for v in evidence]:
            total = sum(values.values())
            if not math.isfinite(total):
                return (f"the {what} of the starting atoms is {total}",
                        "check the data, the conditioning and the model", True)
        self.loss_reference = [sum(values.values()) for values in parts]
        self.reference = _columns(evidence)
        self.working_losses = self.reference
        self.working_loss = statistics.median(sum(values.values()) for values in parts)
        return None

    def resume(self, reference: dict[str, list[float]], loss_reference: list[float], step: int,
               loss: float) -> None:
        """Continue a run instead of starting one: its start's ``reference`` (``{part:
        [losses]}``) and training losses ``loss_reference`` judge it; the atoms in place (after
        ``step`` updates, training loss ``loss``) are the working state."""
        self.loss_reference = list(loss_reference)
        self.reference = {name: list(values) for name, values in reference.items()}
        self.working_step, self.working_losses = step, self.reference
        self.working_span, self.working_loss, self.window_start = f" at step {step}", loss, step

    def check_loss(self, step: int, parts: dict[str, float]) -> tuple[str, str, bool] | None:
        """The loss of the atoms in place (``step`` updates), before their update."""
        total = sum(parts.values())
        if not math.isfinite(total):
            return f"the loss became {total}", LOWER_LR, True
        start, scale = statistics.median(self.loss_reference), _scale(self.loss_reference)
        if total - start > LOSS_LIMIT * scale:
            return (f"the loss exploded to {total:.4g} (the starting loss {start:.4g}; the limit is "
                    f"{LOSS_LIMIT:g}x its scale {scale:.4g} above it)", LOWER_LR, True)
        for name, value in parts.items():
            self.window.setdefault(name, []).append(value)
        if (step + 1) % WINDOW:
            return None
        window, first = self.window, self.window_start
        self.window, self.window_start = {}, step + 1
        where = f"over steps {first}-{step}"
        if self.check_fn:  # the atoms in place, on the check's fixed data
            window, where = _columns([self.check_fn()]), f"at step {step}"
            if not math.isfinite(sum(v[0] for v in window.values())):
                return f"the check loss became {sum(v[0] for v in window.values())}", LOWER_LR, True
        if not self._near_start(window):
            self.broken_windows += 1
            self.candidate_step = -1  # the window after it broke
            if self.broken_windows < self.broken_limit:
                return None
            checks = (f"{self.broken_windows} checks in a row (every {WINDOW} steps)" if self.check_fn
                      else f"{self.broken_windows} windows of {WINDOW} steps in a row")
            return (f"the losses rose far above the start's in {checks} ({self._describe(window)} "
                    f"{where}): "
                    f"the samples break at such a rise", LOWER_LR, False)
        self.broken_windows = 0
        if self.check_fn:  # an exact verdict on this very state: it works
            self._keep(step, window, total, f" at step {step}")
            return None
        if self.candidate_step >= 0:
            self._confirm(window, step)
        with torch.no_grad():
            for copy, tensor in zip(self.candidate, self.tensors):
                copy.copy_(tensor)
        self.candidate_step, self.candidate_losses, self.candidate_loss = step, window, total
        self.candidate_first = first
        return None

    def check_final(self, step: int, evaluate) -> tuple[str, str, bool] | None:
        """The final atoms (``step`` updates): ``evaluate()`` gives their loss evaluations
        without gradients ``[{part: loss}]``; with their check (or those evaluations) finite and
        near the start, they become the working state."""
        parts = evaluate()
        evidence = [self.check_fn()] if self.check_fn else parts
        bad = next((t for t in (sum(v.values()) for v in parts + evidence) if not math.isfinite(t)),
                   None)
        if bad is not None:
            return f"the loss became {bad}", LOWER_LR, True
        losses = _columns(evidence)
        if not self._near_start(losses):
            return (f"the final atoms' losses rose far above the start's "
                    f"({self._describe(losses)}): the samples break at such a rise", LOWER_LR, False)
        self._keep(step, losses, statistics.median(sum(v.values()) for v in parts), f" at step {step}")
        return None

    def _keep(self, step: int, losses: dict[str, list[float]], loss: float, span: str) -> None:
        """The atoms in place (``step`` updates, loss ``loss``) become the working state."""
        with torch.no_grad():
            for copy, tensor in zip(self.working, self.tensors):
                copy.copy_(tensor)
        self.working_step, self.working_losses, self.working_span = step, losses, span
        self.working_loss = loss

    def _near_start(self, losses: dict[str, list[float]]) -> bool:
        return all(_rise(values, self.reference[name]) <= BROKEN_RISE - 1
                   for name, values in losses.items())

    def _describe(self, losses: dict[str, list[float]]) -> str:
        """``"concept loss 0.64x, prior loss 1.40x (prior 7, the worst of 9) the start's"``."""
        words, priors = [], {}
        for name, values in losses.items():
            if name.split(" ")[0] == "prior" and name != "prior":
                priors[name] = _rise(values, self.reference[name])
            else:
                label = "loss" if name == "total" else f"{name} loss"
                words.append(f"{label} {_compare(values, self.reference[name])}")
        if priors:
            worst = max(priors, key=priors.get)
            words.append(f"prior loss {_compare(losses[worst], self.reference[worst])} ({worst}, "
                         f"the worst of {len(priors)} prior prompts)")
        return ", ".join(words) + " the start's"

    def _confirm(self, after: dict[str, list[float]], last: int) -> None:
        """The candidate becomes the working state: the losses of its own window and of
        ``after`` (the steps after it, up to ``last``) stayed near the start."""
        self.working, self.candidate = self.candidate, self.working
        self.working_step, self.working_loss = self.candidate_step, self.candidate_loss
        self.working_losses = {name: values + after.get(name, [])
                               for name, values in self.candidate_losses.items()}
        self.working_span = f" over steps {self.candidate_first}-{last}"
        self.candidate_step = -1

    # -- the update ----------------------------------------------------------------------------

    def coefficients(self) -> list[torch.Tensor] | None:
        """A copy of every layer's ``s`` ``(m,)`` (``None`` when neither atoms nor read-outs train:
        then renormalising never grows a coefficient)."""
        if not self.tuned:
            return None
        return [layer.coefficients.detach().clone() for layer in self.atoms.layers.values()]

    def check_update(self, before, stepped) -> tuple[str, str, bool] | None:
        """After the optimizer step and :func:`sparse_step_`: finite tensors, and bounded growth
        of the coefficients beyond what the optimizer gave them. With ``s0`` before the step,
        ``s1`` after the optimizer and ``s2`` now, an atom's growth is ``|s2| / max(|s0|, |s1|)``:
        renormalising counts, the optimizer's own steps on ``s`` do not, and shrinking (by the
        optimizer, l1 or the budget) pays growth back. The total restarts when ``s`` is zero.

        Adam moves every entry of a unit-norm atom by about ``lr``, so a step changes its length
        by up to about ``lr * sqrt(out_features)``; normalising moves that length into ``s``; with
        a learning rate too large for the atoms this feeds on itself: the coefficients grow
        geometrically (to 1e17 within a few dozen steps) while the loss, behind layer norms and
        softmaxes, barely rises."""
        self.changed = True
        if not all_finite(self.tensors):
            return "the atoms became NaN or inf in the update", LOWER_LR, True
        if before is None:
            return None
        worst = []  # (key, [growth in this step, total growth, row, largest total]) per layer
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
                worst.append((key, torch.stack([step[row], self.growth[key][row], row.float(),
                                                self.growth[key].max()])))
        if not worst:
            return None
        values = torch.stack([value for _, value in worst]).tolist()  # one synchronisation
        self.max_growth = max(largest for *_, largest in values)
        for (key, _), (step, total, row, _) in zip(worst, values):
            if step > MAX_STEP_GROWTH or total > MAX_TOTAL_GROWTH:
                label = self.atoms.label(key, int(self.atoms[key].index[int(row)]))
                what = (f"in one step by {step:.3g}x (limit {MAX_STEP_GROWTH:g}x)"
                        if step > MAX_STEP_GROWTH else
                        f"by {total:.3g}x in total (limit {MAX_TOTAL_GROWTH:g}x)")
                return (f"renormalising atom {label} ({key}) grew its coefficient {what}: "
                        "the atoms' scale is running away",
                        f"the learning rate {self.lr:g} is too large for tuning the atoms; "
                        "lower it, or do not tune the atoms", True)
        return None

    # -- stopping ------------------------------------------------------------------------------

    def restore(self, where: str, what: str, advice: str, sudden: bool) -> str:
        """Put the working state back, after a ``sudden`` stop the candidate when the steps since
        it stayed near the start; the message for ``TrainingResult.stopped``."""
        if sudden and self.candidate_step >= 0 and self.broken_windows == 0 and \
                (not self.window or self._near_start(self.window)):
            self._confirm(self.window, self.window_start + len(next(iter(self.window.values()), [])) - 1)
        with torch.no_grad():
            for copy, tensor in zip(self.working, self.tensors):
                tensor.copy_(copy)
        self.changed = self.working_step > 0
        if self.working_step == 0:
            return (f"{where}: {what}; no working state was reached: the starting atoms were put "
                    f"back and nothing trained is kept ({advice})")
        return (f"{where}: {what}; kept the atoms of step {self.working_step}, the last whose "
                f"losses stayed near the start's ({self.kept_losses()}) ({advice})")

    def kept_losses(self) -> str:
        """How the working state's losses compare with the start's, and where they were measured."""
        return self._describe(self.working_losses) + self.working_span

    def warnings(self) -> list[str]:
        """A warning when a prior-preservation part (named ``"prior"`` or ``"prior ..."``) of the
        kept state rose above :data:`PRIOR_WARN` times its start."""
        rises = {name: _rise(values, self.reference[name]) for name, values in
                 self.working_losses.items() if name.split(" ")[0] == "prior"}
        if not rises or max(rises.values()) <= PRIOR_WARN - 1:
            return []
        name = max(rises, key=rises.get)
        return [f"the prior-preservation loss ({name}) of the kept atoms is "
                f"{_compare(self.working_losses[name], self.reference[name])} the start's: the "
                f"prior prompts may have drifted (check their samples; a lower learning rate or a "
                f"larger prior_weight keeps them)"]


def all_finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    if not flags:
        return True
    device = flags[0].device
    return bool(torch.stack([f.to(device) for f in flags]).all())  # one synchronisation
