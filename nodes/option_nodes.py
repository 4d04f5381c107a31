"""Sparse Training Options: how Train Sparse Concept optimises and what loss it measures, in one
node so the trainer's own widgets stay the few that every run sets. Unwired, training uses the
defaults, which are exactly these widgets' defaults."""

from __future__ import annotations

from comfy_api.latest import io

import sparse_core as sc

from .common import CATEGORY, TrainingOptionsType, check_finite
from .objective import LOSS_TYPES, LOSS_WEIGHTINGS, TIMESTEP_SAMPLING
from .training import TrainSettings

NODE = "Sparse Training Options"
OPTION_FIELDS = frozenset({"lr_schedule", "warmup_steps", "weight_decay", "gradient_accumulation",
                           "gradient_clip", "timestep_sampling", "timestep_shift", "loss_type",
                           "loss_weighting", "min_snr_gamma"})


class SparseTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_TrainingOptions", display_name=NODE, category=CATEGORY,
            description="Learning-rate schedule, weight decay, gradient accumulation and clipping, "
                        "noise-level sampling and loss for Train Sparse Concept's options input.",
            inputs=[
                io.Combo.Input("lr_schedule", options=list(sc.LR_SCHEDULES), default="constant",
                               tooltip="How the learning rate falls after warmup; the l1 "
                                       "threshold (lr * l1) follows it."),
                io.Int.Input("warmup_steps", default=0, min=0, max=100000,
                             tooltip="Steps over which the learning rate rises linearly to its value."),
                io.Float.Input("weight_decay", default=0.0, min=0.0, max=10.0, step=0.001,
                               tooltip="AdamW's decoupled decay on the coefficients: delta W "
                                       "shrinks by lr * weight_decay per step."),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=1024,
                             tooltip="Batches whose gradients each step averages (effective "
                                     "batch = batch_size x this, at the memory of one batch)."),
                io.Float.Input("gradient_clip", default=0.0, min=0.0, max=1000.0, step=0.01,
                               tooltip="Largest global gradient norm a step uses; 0 = no clipping."),
                io.Combo.Input("timestep_sampling", options=list(TIMESTEP_SAMPLING),
                               default="uniform",
                               tooltip="How noise levels are drawn: uniform, or logit-normal "
                                       "(SD3's: more middle levels)."),
                io.Float.Input("timestep_shift", default=1.0, min=0.05, max=20.0, step=0.05,
                               tooltip="Shift t -> k t / (1 + (k - 1) t) of the drawn noise "
                                       "amount; above 1 trains more at high noise."),
                io.Combo.Input("loss_type", options=list(LOSS_TYPES), default="MSE",
                               tooltip="Error of the model's prediction: MSE, L1 or Huber (delta 1)."),
                io.Combo.Input("loss_weighting", options=list(LOSS_WEIGHTINGS), default="none",
                               tooltip="min-SNR: noise levels weighted by min(SNR, gamma) in "
                                       "x0 space, so low-noise levels count less."),
                io.Float.Input("min_snr_gamma", default=5.0, min=0.01, max=100.0, step=0.5,
                               tooltip="gamma of the min-SNR weighting."),
            ],
            outputs=[TrainingOptionsType.Output("options", display_name="OPTIONS")],
        )

    @classmethod
    def execute(cls, lr_schedule, warmup_steps, weight_decay, gradient_accumulation, gradient_clip,
                timestep_sampling, timestep_shift, loss_type, loss_weighting, min_snr_gamma):
        check_finite(NODE, weight_decay=weight_decay, gradient_clip=gradient_clip,
                     timestep_shift=timestep_shift, min_snr_gamma=min_snr_gamma)
        options = dict(lr_schedule=lr_schedule, warmup_steps=warmup_steps,
                       weight_decay=weight_decay, gradient_accumulation=gradient_accumulation,
                       gradient_clip=gradient_clip or None, timestep_sampling=timestep_sampling,
                       timestep_shift=timestep_shift, loss_type=loss_type,
                       loss_weighting=loss_weighting, min_snr_gamma=min_snr_gamma)
        try:  # every field checked here; warmup against the steps when Train gets them
            TrainSettings(steps=warmup_steps + 1, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{NODE}: {error}") from None
        return io.NodeOutput(options)


NODES = [SparseTrainingOptions]
