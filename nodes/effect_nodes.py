"""Measure Atom Effects: each atom's measured effect, and the atom-effect explorer grid."""

from __future__ import annotations

import logging


import comfy.model_management
import comfy.samplers
import comfy.utils
from comfy_api.latest import io

import sparse_core as sc

from . import effects, explorer
from .common import (CATEGORY, SparseAtomsType, check_finite, conditioning_per_image, latent_images,
                     send_text)
from .patching import apply_to_model, check_fit

log = logging.getLogger("sparse_atoms")

NODE = "Measure Atom Effects"


class MeasureAtomEffects(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_MeasureEffects", display_name=NODE, category=CATEGORY,
            description="Measures what each atom does: how much the model's prediction on "
                        "calibration images changes when the atom is removed. The atoms come out "
                        "ranked by that effect (density, top-k, the mask editor use it), with a "
                        "grid of renders without each top atom and with it alone.",
            inputs=[
                io.Model.Input("model", tooltip="The model the atoms are for, without them applied "
                                                "(this node applies them itself)."),
                SparseAtomsType.Input("sparse_atoms", tooltip="Trained, loaded or atomized (LoRA to "
                                                              "Sparse Atoms) atoms."),
                io.Conditioning.Input("positive", tooltip="The prompt the atoms are about (e.g. the "
                                                          "concept's word): used for the renders, "
                                                          "and for sampled calibration images."),
                io.Conditioning.Input("negative", tooltip="The negative prompt of the renders (as in KSampler)."),
                io.Latent.Input("latent", tooltip="The latent to render, like KSampler's latent_image "
                                                  "(e.g. an empty latent: its size and batch)."),
                io.Latent.Input("calibration_latents", optional=True,
                                tooltip="The images to measure on (e.g. the training images, "
                                        "VAE-encoded). Without them, calibration_images images are "
                                        "sampled from the model with all atoms applied."),
                io.Conditioning.Input("calibration_conditioning", optional=True,
                                      tooltip="The prompt(s) of calibration_latents: one, or one per "
                                              "image. Default: positive."),
                io.Int.Input("calibration_images", default=8, min=1, max=256,
                             tooltip="Images to sample for calibration when no calibration_latents "
                                     "are given."),
                io.Int.Input("noise_levels", default=4, min=1, max=32,
                             tooltip="Each calibration image is seen at this many fixed noise levels."),
                io.Int.Input("batch_size", default=4, min=1, max=256,
                             tooltip="Calibration images per model call (lower it if memory runs out)."),
                io.Int.Input("exact_top", default=16, min=0, max=4096,
                             tooltip="The atoms with the largest estimated effect are measured "
                                     "exactly, by removing each one (one model call per atom, "
                                     "image batch and noise level); the rest keep the fast "
                                     "gradient estimate."),
                io.Int.Input("top_n", default=8, min=0, max=64,
                             tooltip="Atoms shown in the explorer grid (two renders each); 0 = no renders."),
                io.Float.Input("alone_strength", default=1.0, min=-10.0, max=10.0, step=0.05,
                               tooltip="Strength of the atom in the 'alone' renders (raise it to "
                                       "exaggerate what one atom does)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the renders, the sampled calibration images and the "
                                     "calibration noise."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps of each render."),
                io.Float.Input("cfg", default=7.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance scale of the renders."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               default="euler", tooltip="Sampler of the renders."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               default="normal", tooltip="Scheduler of the renders."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the renders; without it they are latent previews "
                                     "(the digits model shows its own images)."),
            ],
            outputs=[SparseAtomsType.Output("measured_atoms", display_name="SPARSE_ATOMS"),
                     io.Image.Output("explorer", display_name="explorer")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, sparse_atoms, positive, negative, latent, calibration_images,
                noise_levels, batch_size, exact_top, top_n, alone_strength, seed, steps, cfg,
                sampler_name, scheduler, calibration_latents=None, calibration_conditioning=None,
                vae=None):
        check_finite(NODE, alone_strength=alone_strength, cfg=cfg)
        check_fit(model, sparse_atoms)
        render_latent = latent_images(latent, "latent", NODE, model)
        if not positive or not negative:
            raise ValueError(f"{NODE}: {'positive' if not positive else 'negative'} is empty")
        settings = explorer.SamplerSettings(seed, steps, cfg, sampler_name, scheduler)
        renders = 2 + 2 * min(top_n, sparse_atoms.n_atoms) if top_n else 0
        sampled = calibration_latents is None
        progress = _Progress(steps * (renders + sampled), cls.hidden.unique_id)

        if calibration_latents is None:
            empty = render_latent[:1].repeat(calibration_images, *[1] * (render_latent.ndim - 1))
            calibration_latents = {"samples": explorer.sample(
                apply_to_model(model, sparse_atoms, 1.0), positive, negative, empty, settings,
                progress.sampling_step)}
        samples = latent_images(calibration_latents, "calibration_latents", NODE, model)
        conds = conditioning_per_image(calibration_conditioning or positive, len(samples),
                                       "calibration_conditioning", "calibration_latents", NODE)
        calibration = effects.Calibration(samples, conds, noise_levels=noise_levels,
                                          seed=seed, batch_size=batch_size)
        try:
            measured = effects.measure(model, sparse_atoms, calibration, exact_top=exact_top,
                                       progress=progress.measuring)
        except sc.NonFiniteOutput as error:
            peak = float(samples.abs().max()) if samples.numel() else 0.0
            given = "sampled from the model" if sampled else "given"
            raise ValueError(
                f"{NODE}: the model's prediction on calibration_latents is NaN or inf (batch "
                f"{error.batch}); the calibration latents ({given}, largest |value| {peak:.3g}) or "
                "the atoms overflow the model: check calibration_latents, or the atoms' strength"
            ) from None
        if sampled:
            measured.info.effects["calibration"] += f" (sampled from the model with its atoms, seed {seed})"

        if renders:
            ranked = explorer.variants(measured, top_n, alone_strength)  # by the measured effect
            latents = explorer.render(model, ranked, positive, negative, render_latent, settings,
                                      progress.sampling_step)
            image = explorer.grid([explorer.to_rgb(model, x, vae) for x in latents],
                                  _labels(measured, top_n), alone_strength=alone_strength)
        else:
            image = explorer.note("no renders (top_n = 0)")
        report = _report(measured)
        log.info("%s: %s", NODE, report)
        return io.NodeOutput(measured, image, ui={"text": [report]})


class _Progress:
    """One progress bar over the effect measurement and the sampling steps; every update also
    checks the cancel button."""

    def __init__(self, sampling_steps: int, node_id):
        self.sampling_steps, self.node_id = sampling_steps, node_id
        self.sampled, self.measured, self.measure_total = 0, 0, 0
        self.bar = comfy.utils.ProgressBar(1000)

    def measuring(self, done: int, total: int) -> None:
        self.measured, self.measure_total = done, total
        self._update(f"measuring effects: model call {done}/{total}")

    def sampling_step(self) -> None:
        self.sampled += 1
        self._update(f"rendering: step {self.sampled}/{self.sampling_steps}")

    def _update(self, text: str) -> None:
        # A model call of the measurement weighs like a sampling step.
        fraction = (self.sampled + self.measured) / max(1, self.sampling_steps + self.measure_total)
        self.bar.update_absolute(min(999, int(1000 * fraction)), 1000)
        send_text(text, self.node_id)
        comfy.model_management.throw_exception_if_processing_interrupted()


def _labels(atoms: sc.SparseAtoms, top_n: int) -> list[str]:
    ranking = atoms.ranking()
    return [f"{ranking.label(i)}  effect {float(ranking.importance[i]):.3g}"
            for i in range(min(top_n, len(ranking.importance)))]


def _report(atoms: sc.SparseAtoms) -> str:
    how = atoms.info.effects
    ranking = atoms.ranking()
    top = ", ".join(f"{ranking.label(i)} {float(ranking.importance[i]):.3g}"
                    for i in range(min(5, len(ranking.importance))))
    total = float(ranking.importance.sum())
    quarter = float(ranking.importance[: -(-len(ranking.importance) // 4)].sum())
    share = f"; the top 25% of atoms carry {100 * quarter / total:.0f}% of the summed effect" \
        if total > 0 else ""
    return (f"effects of {atoms.n_atoms} atoms ({how['method']}) on {how['calibration']} in "
            f"{how['seconds']:.1f} s; top: {top}{share}")


NODES = [MeasureAtomEffects]
