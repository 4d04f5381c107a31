"""Atom effects: how much the model's prediction changes when one atom is removed.

For calibration batches ``b = 0 .. B-1`` the caller's ``predict(b)`` is the model's prediction
``f_b(s)`` with every atom applied (``s`` = all layers' coefficients, read afresh on each call).
The **effect** of atom ``i`` is the RMS change of all calibration outputs when it is removed::

    effect_i = sqrt( sum_b || f_b(s) - f_b(s without atom i) ||^2 / N ),   N = number of outputs

Exact ablation costs one forward per atom and batch. :func:`measure_effects` first estimates
every active atom at once from gradients (``J_b = d f_b / d s``, ``delta_i = s_i J_{b,i}`` the
first-order change when atom ``i`` is removed, ``r_b = f_b(s) - f_b(0)`` the change all atoms
make, ``n`` a sample, i.e. an index along the prediction's first dimension):

- ``"jacobian"``: ``|s_i| * sqrt(sum_b ||J_{b,i}||^2 / N)``, the first-order ablation effect
  itself. Column norms of ``J`` come from ``probes`` random sign vectors ``v`` per batch
  (Hutchinson: ``E[(v^T J)_i^2] = ||J_i||^2``): one forward and ``probes`` backward passes.
- ``"taylor"``: the first-order Taylor score ``|s_i dL/ds_i|`` of ``L = 1/2 sum_b ||r_b||^2`` (how
  far the atoms move the prediction from the base model), divided by ``||r|| sqrt(N)``: one base
  forward, one forward and one backward pass.
- ``"fisher"``: its per-sample (empirical Fisher) form ``sqrt(n_samples sum_n (s_i dL_n/ds_i)^2 /
  (||r||^2 N))``; the per-sample sums come from ``probes`` random signs per sample.

``"auto"`` is ``"jacobian"``, which ranked closest to exact ablation on the digits concept
(``bench/bench_method.py``). Then the ``exact_top`` atoms with the largest estimates are ablated
exactly and their estimates replaced (``method="exact"`` ablates every active atom). So that the
merged ranking is consistent, the other estimates are multiplied by one scale: the median ratio
exact / estimate over the exactly measured atoms, lowered where needed so that no estimated atom
ranks above an exactly measured one (the estimate ranked them all below). Atoms with a zero
coefficient change nothing: their effect is exactly 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ._atoms import SparseAtoms, _compute_dtype
from ._checks import check_positive_int

__all__ = ["EFFECT_METHODS", "measure_effects", "ablation_effects", "NonFiniteOutput"]


class NonFiniteOutput(ValueError):
    """``predict`` returned NaN or inf (``batch`` names the call): the inputs it renders or the
    atoms overflow the model; front ends name the input that feeds it."""

    def __init__(self, batch: int):
        super().__init__(f"predict({batch}) returned NaN or inf")
        self.batch = batch

@dataclass(frozen=True)
class _Estimator:
    """One gradient estimate of every active atom's effect (the module docstring has the math).

    Per batch it runs ``1 + base`` model calls: with ``base`` one forward with every atom
    removed (``f_b(0)``, for the residual ``r_b``), then one forward with the atoms and a backward
    pass per direction ``v`` of ``directions(output, residual, probes, generator)``; it sums
    ``s_i v^T J_i`` (``signed``) or its square averaged over the directions, and ``finish(scores,
    outputs, samples, residual_sq)`` turns the sums into effects."""

    description: Callable[[int], str]
    base: bool
    signed: bool
    directions: Callable
    finish: Callable

    @property
    def calls_per_batch(self) -> int:
        return 1 + int(self.base)


def _random_signs(shape, generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=generator)
    return (2 * signs - 1).to(device=like.device, dtype=like.dtype)


def _per_output_signs(output, residual, probes, generator):
    return [_random_signs(tuple(output.shape), generator, output) for _ in range(probes)]


def _per_sample_signs_times_residual(output, residual, probes, generator):
    per_sample = (output.shape[0],) + (1,) * (output.ndim - 1) if output.ndim else ()
    return [_random_signs(per_sample, generator, output) * residual for _ in range(probes)]


def _zero_without_residual(finish):
    def guarded(scores, outputs, samples, residual_sq):
        if residual_sq == 0.0:
            return {key: torch.zeros_like(score) for key, score in scores.items()}
        return finish(scores, outputs, samples, residual_sq)
    return guarded


ESTIMATORS = {
    "jacobian": _Estimator(
        lambda probes: f"jacobian-norm estimate ({probes} random probes per batch)",
        base=False, signed=False, directions=_per_output_signs,
        finish=lambda scores, outputs, samples, residual_sq: {
            key: (score / max(outputs, 1)).sqrt() for key, score in scores.items()}),
    "taylor": _Estimator(
        lambda probes: "first-order taylor estimate |s dL/ds|, L = distance to the base prediction",
        base=True, signed=True, directions=lambda output, residual, probes, generator: [residual],
        finish=_zero_without_residual(lambda scores, outputs, samples, residual_sq: {
            key: score.abs() / math.sqrt(residual_sq * outputs) for key, score in scores.items()})),
    "fisher": _Estimator(
        lambda probes: f"per-sample fisher estimate ({probes} random probes per batch)",
        base=True, signed=False, directions=_per_sample_signs_times_residual,
        finish=_zero_without_residual(lambda scores, outputs, samples, residual_sq: {
            key: (samples * score / (residual_sq * outputs)).sqrt()
            for key, score in scores.items()})),
}
EFFECT_METHODS = ("auto", *ESTIMATORS, "exact")
_AUTO = "jacobian"
_METRIC = "rms change of the model prediction when the atom is removed"
_PROBE_SEED = 0


def measure_effects(atoms: SparseAtoms, predict: Callable[[int], torch.Tensor], *, n_batches: int,
                    exact_top: int = 16, probes: int = 8, method: str = "auto",
                    progress: Callable[[int, int], None] | None = None,
                    calibration: str | None = None) -> SparseAtoms:
    """A copy of ``atoms`` with every layer's ``effect (m,)`` (float32) and ``info.effects`` set.

    ``predict(b)`` (``0 <= b < n_batches``) must compute the model's prediction (any shape, first
    dimension = samples) for calibration batch ``b`` with the same inputs and noise on every call,
    with *these* atoms applied through their layers' ``delta()`` at call time, and must not disable
    gradients itself. While this runs, the layers' ``coefficients`` are temporarily replaced (to
    remove, zero or differentiate atoms) and restored, the same tensor objects, on every exit;
    ``progress(done, total)`` runs after each ``predict`` call, and an exception it raises (cancel)
    propagates. ``calibration`` describes the data for ``info.effects`` (default: the counts).
    Deterministic for deterministic ``predict``. See the module docstring for the methods.
    """
    _check_common(atoms, predict, n_batches, progress)
    if isinstance(exact_top, bool) or not isinstance(exact_top, int):
        raise TypeError(f"exact_top must be an int, got {type(exact_top).__name__} {exact_top!r}")
    if exact_top < 0:
        raise ValueError(f"exact_top must be >= 0, got {exact_top}")
    check_positive_int("probes", probes)
    if method not in EFFECT_METHODS:
        raise ValueError(f"method must be one of {EFFECT_METHODS}, got {method!r}")
    if calibration is not None and not isinstance(calibration, str):
        raise TypeError(f"calibration must be a string or None, got {type(calibration).__name__}")
    start = time.perf_counter()
    estimator = _AUTO if method == "auto" else method
    active = [(key, row) for key, layer in atoms.layers.items()
              for row in (layer.coefficients != 0).nonzero().flatten().tolist()]
    n_exact = len(active) if estimator == "exact" else min(exact_top, len(active))
    estimating = n_exact < len(active)
    calls_per_batch = ((ESTIMATORS[estimator].calls_per_batch if estimating else 0)
                       + (1 + n_exact if n_exact else 0))
    counter = _Progress(progress, calls_per_batch * n_batches)
    estimates = None
    if estimating:
        estimates = _estimate(atoms, predict, n_batches, estimator, probes, counter)
        active.sort(key=lambda atom: -float(estimates[atom[0]][atom[1]]))  # stable: layer, row order
    exact, rest = active[:n_exact], active[n_exact:]
    measured = _ablate(atoms, predict, exact, n_batches, counter) if exact else torch.zeros(0)
    values, scale = _merge(atoms, estimates, exact, rest, measured)
    result = atoms.clone()
    for key, layer in result.layers.items():
        layer.effect = values[key].to(layer.coefficients.device)
    if estimator == "exact" or not estimating:
        how = f"exact ablation of all {len(active)} active atoms"
    else:
        how = ESTIMATORS[estimator].description(probes)
        how += f" + exact ablation of the top {n_exact}" if n_exact else ""
    result.info.effects = {
        "method": how,
        "calibration": calibration or f"{n_batches} calibration batches",
        "metric": _METRIC,
        "exact": n_exact,
        "estimate": None if not estimating else estimator,
        "estimate_scale": scale,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return result


def ablation_effects(atoms: SparseAtoms, predict: Callable[[int], torch.Tensor],
                     remove: list[tuple[str, int]], *, n_batches: int,
                     progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Exact effects ``(len(remove),)`` (float32, CPU) of the atoms ``(layer key, row)`` in
    ``remove``, each removed alone: the RMS change of all ``predict(b)`` outputs. ``predict`` and
    restoring work as in :func:`measure_effects`."""
    _check_common(atoms, predict, n_batches, progress)
    if not isinstance(remove, (list, tuple)):
        raise TypeError(f"remove must be a list of (layer key, row), got {type(remove).__name__}")
    for item in remove:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int)
                and not isinstance(item[1], bool)):
            raise TypeError(f"remove must hold (layer key, row) tuples, got {item!r}")
        key, row = item
        if key not in atoms.layers:
            raise KeyError(f"remove names layer {key!r}, which these atoms do not have")
        if not 0 <= row < atoms[key].n_atoms:
            raise ValueError(f"remove names row {row} of layer {key!r}, which has "
                             f"{atoms[key].n_atoms} atoms")
    counter = _Progress(progress, n_batches * (1 + len(remove)) if remove else 0)
    return _ablate(atoms, predict, list(remove), n_batches, counter) if remove else torch.zeros(0)


# -- cores ---------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, callback, total: int):
        self.callback, self.total, self.done = callback, total, 0

    def step(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


class _Swapped:
    """Replaces layers' ``coefficients`` inside the block; puts the original objects back on exit."""

    def __init__(self, atoms: SparseAtoms):
        self.layers = atoms.layers
        self.saved = {key: layer.coefficients for key, layer in atoms.layers.items()}

    def __enter__(self):
        return self

    def set(self, key: str, coefficients: torch.Tensor) -> None:
        self.layers[key].coefficients = coefficients

    def reset(self, key: str) -> None:
        self.layers[key].coefficients = self.saved[key]

    def __exit__(self, *exc):
        for key, original in self.saved.items():
            self.layers[key].coefficients = original
        return False


def _call(predict, batch: int, shape=None) -> torch.Tensor:
    output = predict(batch)
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"predict({batch}) must return a torch.Tensor, got {type(output).__name__}")
    if not output.is_floating_point():
        raise TypeError(f"predict({batch}) must return a floating-point tensor, got {output.dtype}")
    if shape is not None and tuple(output.shape) != shape:
        raise ValueError(f"predict({batch}) returned shape {tuple(output.shape)}, earlier {shape}: "
                         "each batch must have the same inputs on every call")
    if not bool(torch.isfinite(output.detach()).all()):
        raise NonFiniteOutput(batch)
    return output


def _ablate(atoms, predict, targets: list[tuple[str, int]], n_batches: int, counter) -> torch.Tensor:
    """Exact RMS change ``(len(targets),)`` when each target atom alone is removed."""
    squares = [0.0] * len(targets)
    outputs = 0
    with _Swapped(atoms) as swap, torch.no_grad():
        for batch in range(n_batches):
            reference = _call(predict, batch)
            reference = reference.to(torch.promote_types(reference.dtype, torch.float32))
            counter.step()
            outputs += reference.numel()
            for j, (key, row) in enumerate(targets):
                removed = swap.saved[key].detach().clone()
                removed[row] = 0
                swap.set(key, removed)
                output = _call(predict, batch, tuple(reference.shape))
                swap.reset(key)
                squares[j] += float((output.to(reference.dtype) - reference).pow(2).sum())
                counter.step()
    return torch.tensor([math.sqrt(sq / max(outputs, 1)) for sq in squares], dtype=torch.float32)


def _estimate(atoms, predict, n_batches: int, name: str, probes: int, counter
              ) -> dict[str, torch.Tensor]:
    """Gradient estimates ``{key: (m,) float64 CPU}`` by ``ESTIMATORS[name]``."""
    estimator = ESTIMATORS[name]
    generator = torch.Generator().manual_seed(_PROBE_SEED)  # on CPU: the same probes on any device
    saved = {key: layer.coefficients for key, layer in atoms.layers.items()}
    keys = [key for key, s in saved.items() if bool((s != 0).any())]
    scores = {key: torch.zeros(len(s), dtype=torch.float64) for key, s in saved.items()}
    outputs = samples = 0
    residual_sq = 0.0
    with _Swapped(atoms) as swap:
        for batch in range(n_batches):
            base = None
            if estimator.base:
                for key in saved:
                    swap.set(key, torch.zeros_like(saved[key]))
                with torch.no_grad():
                    base = _call(predict, batch).detach()
                counter.step()
            leaves = {}
            for key in keys:
                s = saved[key].detach()
                leaves[key] = s.to(_compute_dtype(s)).clone().requires_grad_(True)
                swap.set(key, leaves[key])
            for key in saved:
                if key not in leaves:
                    swap.reset(key)
            with torch.inference_mode(False), torch.enable_grad():
                output = _call(predict, batch, None if base is None else tuple(base.shape))
                if not output.requires_grad:
                    raise ValueError(f"predict({batch}) does not depend on the atoms' coefficients: "
                                     "compute it with the atoms applied through their layers' "
                                     "delta() at call time, with gradients enabled")
                outputs += output.numel()
                samples += output.shape[0] if output.ndim else 1
                wide = torch.promote_types(output.dtype, torch.float32)  # no float64 on some devices
                residual = None if base is None else (output.detach() - base.to(output.dtype))
                if residual is not None:
                    residual_sq += float(residual.to(wide).pow(2).sum())
                directions = estimator.directions(output, residual, probes, generator)
                for p, direction in enumerate(directions):
                    last = p == len(directions) - 1
                    grads = torch.autograd.grad(output, [leaves[k] for k in keys], direction,
                                                retain_graph=not last, allow_unused=True)
                    for key, grad in zip(keys, grads):
                        if grad is None:
                            continue
                        change = (leaves[key].detach() * grad).cpu().double()  # s_i * v^T J_i
                        squared = change.pow(2) / len(directions)
                        scores[key] += change if estimator.signed else squared
            counter.step()
            for key in saved:
                swap.reset(key)
    return estimator.finish(scores, outputs, samples, residual_sq)


def _merge(atoms, estimates, exact, rest, measured: torch.Tensor):
    """``({key: effect (m,) float32 CPU}, scale)``: exact values for ``exact``, the estimates of
    ``rest`` times one scale: the median ratio exact / estimate over ``exact``, lowered so that
    ``rest`` (ranked below ``exact`` by the estimate) stays below every exact value."""
    values = {key: torch.zeros(layer.n_atoms, dtype=torch.float32)
              for key, layer in atoms.layers.items()}
    for (key, row), value in zip(exact, measured.tolist()):
        values[key][row] = value
    if not rest:
        return values, 1.0
    guess = lambda chosen: torch.tensor([float(estimates[key][row]) for key, row in chosen],
                                        dtype=torch.float64)
    scale = 1.0
    if exact:
        guessed, exact_values = guess(exact), measured.double()
        positive = guessed > 0
        if bool(positive.any()):
            scale = float((exact_values[positive] / guessed[positive]).median())
        highest, floor = float(guess(rest).max()), float(exact_values.min())
        if highest * scale > floor:
            scale = floor / highest
    below = torch.nextafter(measured.min(), torch.tensor(0.0)) if exact else None
    for key, row in rest:
        value = torch.tensor(float(estimates[key][row]) * scale, dtype=torch.float32)
        values[key][row] = value if below is None else torch.minimum(value, below.clamp_min(0))
    return values, scale


def _check_common(atoms, predict, n_batches, progress) -> None:
    if not isinstance(atoms, SparseAtoms):
        raise TypeError(f"atoms must be SparseAtoms, got {type(atoms).__name__}")
    if not callable(predict):
        raise TypeError(f"predict must be callable (batch index -> prediction), got "
                        f"{type(predict).__name__}")
    check_positive_int("n_batches", n_batches)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable (done, total) or None, got "
                        f"{type(progress).__name__}")
