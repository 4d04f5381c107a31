"""Measuring atom effects through ComfyUI's own machinery (the calibration side).

The atoms enter the model as weight wrappers (``W + delta W`` evaluated at every forward, so
:func:`sparse_core.measure_effects` can remove, isolate or gate atoms by changing their
coefficients), and the model is called through a ``Guider_Basic`` whose sampler is the
measurement, so conditioning is encoded the way sampling encodes it. Noise comes from the model's
own ``model_sampling`` (eps, v or flow models alike), at fixed noise levels with fixed noise::

    sigma_l = model_sampling.percent_to_sigma((l + 0.5) / L),   l = 0 .. L-1
    x_t     = model_sampling.noise_scaling(sigma_l, noise, x0)
    output  = guider(x_t, sigma_l) / s(sigma_l)

Dividing the model's denoised prediction by ``s(sigma)`` (:func:`objective.prediction_scale`: sigma
for eps and flow models, sigma / sqrt(1 + sigma^2) for v-prediction) makes differences between two
atom sets the difference of the model's own prediction (its noise, velocity or v), the quantity
the trainer's loss measures, so every noise level weighs alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

import sparse_core as sc

from .common import send_text
from .objective import prediction_scale
from .guided import run_guided
from .patching import check_fit
from .datasets import Dataset, broadcast_conds, distinct_conds
from .training import TrainSettings, _by_condition, _denoise, _sampler_inputs

EXACT_TOP = 16  # atoms whose effect is measured exactly (by removing each one)
PROBES = 8  # random probes per batch of sparse_core.measure_effects' gradient estimate
TRAINING_SHARE = 0.1  # measuring after training costs about this share of the training...
MIN_EXACT_TOP = 4  # ...but never fewer exact ablations...
MIN_PROBES = 2  # ...or probes than these (see training_measurement)


@dataclass
class Calibration:
    """What effects are measured on: ``latents (N, C, H, W)`` as ComfyUI holds them (before
    ``process_latent_in``) with one CONDITIONING entry, or one per latent, each seen at
    ``noise_levels`` noise levels; at most ``batch_size`` latents per forward pass."""

    latents: torch.Tensor
    conds: list
    noise_levels: int = 4
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        if not isinstance(self.latents, torch.Tensor) or self.latents.ndim < 4 or not len(self.latents):
            raise ValueError("calibration latents must be a non-empty batch (N, C, H, W), got "
                             f"{getattr(self.latents, 'shape', type(self.latents).__name__)}")
        if not bool(torch.isfinite(self.latents).all()):
            raise ValueError("calibration latents contain NaN or inf")
        if self.noise_levels < 1 or self.batch_size < 1:
            raise ValueError(f"noise_levels and batch_size must be >= 1, got {self.noise_levels} "
                             f"and {self.batch_size}")
        self.conds = broadcast_conds(list(self.conds), len(self.latents), "calibration")

    @property
    def n_chunks(self) -> int:
        return math.ceil(len(self.latents) / self.batch_size)

    @property
    def n_batches(self) -> int:
        """Calibration batches: every chunk of latents at every noise level."""
        return self.noise_levels * self.n_chunks

    def describe(self) -> str:
        count, levels = len(self.latents), self.noise_levels
        return (f"{count} latent{'s' * (count != 1)} x {levels} noise level{'s' * (levels != 1)}")


@dataclass(frozen=True)
class Measurement:
    """How to measure effects: on ``calibration``, a gradient estimate with ``probes`` random
    probes per batch, then exact ablation of the ``exact_top`` atoms it ranks highest."""

    calibration: Calibration
    exact_top: int = EXACT_TOP
    probes: int = PROBES

    def forward_passes(self) -> int:
        """Cost in forward passes of one image: per image and noise level one forward pass with
        gradients, ``probes`` backward passes (about two forwards each), one reference forward
        and one per exact ablation."""
        images = len(self.calibration.latents) * self.calibration.noise_levels
        return images * (2 + 2 * self.probes + self.exact_top)


def measure(model, atoms: sc.SparseAtoms, calibration: Calibration, *,
            exact_top: int = EXACT_TOP, probes: int = PROBES, progress=None, bf16: bool = False,
            gradient_checkpointing: bool = False) -> sc.SparseAtoms:
    """A copy of ``atoms`` whose layers carry their measured effects on ``calibration``;
    ``info.effects`` says how they were measured (calibration, ``exact`` ablations, ``probes``)
    and how long it took (model loading included).

    ``progress(done, total)`` is called while measuring; an exception it raises (cancel) stops
    the measurement and leaves ``atoms`` and ``model`` unchanged. ``bf16`` and
    ``gradient_checkpointing`` save memory as they do in training."""
    check_fit(model, atoms)
    started = time.perf_counter()

    def run(wired, predict, n_batches):
        return sc.measure_effects(wired, predict, n_batches=n_batches, exact_top=exact_top,
                                  probes=probes, progress=progress,
                                  calibration=calibration.describe())

    found = _with_retry(model, atoms, calibration, run, bf16, gradient_checkpointing)
    # The effects, on the caller's atoms exactly as they were (dtype and device kept).
    layers = {key: replace(layer, effect=found[key].effect.detach().to(layer.coefficients.device,
                                                                      torch.float32))
              for key, layer in atoms.clone().layers.items()}
    info = replace(atoms.info, training=dict(atoms.info.training),
                   effects={**found.info.effects, "probes": probes,
                            "seconds": round(time.perf_counter() - started, 3)})
    return sc.SparseAtoms(layers, info)


def predictions(model, calibration: Calibration) -> torch.Tensor:
    """The model's outputs on every calibration batch, concatenated ``(noise_levels * N, C, H, W)``
    (float32, CPU; noise level by noise level, latents in their order): the quantity whose change
    an atom's effect is. ``model`` may carry any patches (applied atoms, LoRAs)."""

    def run(wired, predict, n_batches):
        with torch.no_grad():
            return torch.cat([predict(batch).cpu() for batch in range(n_batches)])

    return _with_retry(model, None, calibration, run)


def after_training(model, trained: sc.SparseAtoms, concept: Dataset, settings: TrainSettings,
                   with_prior: bool, node_id=None) -> tuple[sc.SparseAtoms, str]:
    """Freshly trained atoms ranked by their effects on their own training images (see
    :func:`training_measurement`), and a line saying what was measured and how long it took;
    with a progress bar whose updates also check the cancel button."""
    if not trained.n_atoms:
        return trained, "no atom to measure"
    plan = training_measurement(concept, settings, with_prior)
    bar = comfy.utils.ProgressBar(1)

    def progress(done, total):
        bar.update_absolute(done, total)
        send_text(f"measuring atom effects: model call {done}/{total}", node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()

    measured = measure(model, trained, plan.calibration, exact_top=plan.exact_top, probes=plan.probes,
                       progress=progress, bf16=settings.dtype == "bf16",
                       gradient_checkpointing=settings.gradient_checkpointing)
    seconds, training = measured.info.effects["seconds"], trained.info.training.get("seconds")
    share = f" ({100 * seconds / training:.0f}% of the training time)" if training else ""
    return measured, (f"effects measured on {plan.calibration.describe()} of the training images "
                      f"({plan.probes} probes, top {measured.info.effects['exact']} exact) in "
                      f"{seconds:.1f} s{share}")


def training_measurement(concept: Dataset, settings: TrainSettings, with_prior: bool) -> Measurement:
    """How to measure the effects of freshly trained atoms on their training images, at about
    :data:`TRAINING_SHARE` of the training's cost (in forward passes of one image).

    Training ran ``steps * batch`` forward and backward passes of one image (twice that with prior
    preservation), about three forward passes each; :meth:`Measurement.forward_passes` is the
    measurement's cost, ``2 + 2 * probes + exact_top`` per image and noise level. Long runs get
    :data:`PROBES` probes and :data:`EXACT_TOP` exact ablations on as many images (up to 8, spread
    over the data set) x noise levels (up to 4) as the share affords. Shorter runs measure one
    image at one noise level and scale ``probes`` and ``exact_top`` down together to fit the
    share, but never below :data:`MIN_PROBES` and :data:`MIN_EXACT_TOP`: with fewer probes the
    single batch's gradient estimate is mostly noise (relative spread about ``sqrt(2 / probes)``),
    and the exact ablations anchor the top of the ranking. So a run of a few steps still spends
    about ``2 + 2 * MIN_PROBES + MIN_EXACT_TOP`` = 10 forward passes, more than its share.
    Batches have the training's batch size (memory the training needed already)."""
    training = 3 * settings.steps * settings.batch * (2 if with_prior else 1)
    budget = TRAINING_SHARE * training
    per_image = 2 + 2 * PROBES + EXACT_TOP
    affordable = int(budget / per_image)
    levels = max(1, min(4, affordable))
    concept = concept.largest_size()  # images of one size: the measurement runs them together
    count = max(1, min(8, len(concept.latents), affordable // levels))
    chosen = torch.linspace(0, len(concept.latents) - 1, count).round().long().tolist()
    conds = broadcast_conds(concept.conds, len(concept.latents), "calibration")
    calibration = Calibration(concept.latents[chosen], [conds[i] for i in chosen], noise_levels=levels,
                              seed=settings.seed, batch_size=settings.batch)
    if affordable >= 1:
        return Measurement(calibration)
    scale = max(0.0, (budget - 2) / (per_image - 2))  # < 1: the share of the full probes and ablations
    return Measurement(calibration, exact_top=max(MIN_EXACT_TOP, int(scale * EXACT_TOP)),
                       probes=max(MIN_PROBES, int(scale * PROBES)))


class _CalibrationSampler(comfy.samplers.Sampler):
    """Runs ``run(predict, n_batches)`` where a sampler would run its steps; ``predict(batch)``
    is the model's output on calibration batch ``batch`` (see the module docstring)."""

    def __init__(self, calibration: Calibration, cond_of: list[int], run, bf16: bool,
                 copy_saved: bool):
        self.calibration, self.cond_of, self.run = calibration, cond_of, run
        self.bf16, self.copy_saved = bf16, copy_saved
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None,
               denoise_mask=None, disable_pbar=False):
        calibration = self.calibration
        conds, sampling, x0_all, generator = _sampler_inputs(model_wrap, latent_image, calibration.seed)
        # Fixed noise per (noise level, latent): every call of predict(batch) sees the same inputs.
        noises = torch.randn((calibration.noise_levels, *x0_all.shape), generator=generator).to(x0_all)
        levels = [float(sampling.percent_to_sigma((level + 0.5) / calibration.noise_levels))
                  for level in range(calibration.noise_levels)]

        def predict(batch: int) -> torch.Tensor:
            """The model's prediction ``(n, C, H, W)`` for calibration batch ``batch``."""
            level, chunk = divmod(batch, calibration.n_chunks)
            rows = range(chunk * calibration.batch_size,
                         min((chunk + 1) * calibration.batch_size, len(x0_all)))
            outputs, order = [], []
            for cond_index, chosen in _by_condition(self.cond_of, rows):
                order += chosen
                x0 = x0_all[chosen]
                sigma = torch.full((len(chosen),), levels[level]).to(x0)
                x_t = sampling.noise_scaling(sigma, noises[level, chosen], x0, False)
                autocast = torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.bf16)
                denoised = _denoise(model_wrap, conds[cond_index], x_t, sigma, extra_args, autocast,
                                    self.copy_saved)
                outputs.append(denoised.float() / prediction_scale(sampling, sigma, x0.dim()))
            return torch.cat(outputs)[torch.argsort(torch.tensor(order))]  # the latents' order

        try:
            self.result = self.run(predict, calibration.n_batches)
        finally:
            model_wrap.conds["positive"] = conds
        return torch.zeros_like(latent_image)


def _with_retry(model, atoms, calibration, run, bf16=False, checkpointing=False):
    """``run(wired, predict, n_batches)`` in :func:`guided.run_guided` over ``model`` with
    ``atoms`` (if any) wired in; ``wired`` are those atoms (fp32, on the model's device), whose
    coefficients ``run`` may change between ``predict`` calls."""
    unique, cond_of = distinct_conds(calibration.conds)

    def make_sampler(wired, copy_saved):
        return _CalibrationSampler(calibration, cond_of,
                                   lambda predict, n_batches: run(wired, predict, n_batches),
                                   bf16, copy_saved)

    _, sampler = run_guided(model, atoms, calibration.latents, unique, make_sampler,
                            seed=calibration.seed, bf16=bf16, checkpointing=checkpointing,
                            what="Measuring atom effects")
    return sampler.result
