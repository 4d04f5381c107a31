"""Training data in the graph: several (LATENT, CONDITIONING) sets joined into one, each image
with its own prompt, so one Train Sparse Concept input can take a concept under several prompts,
or a prior made of several sources (real images, the base model's own samples)."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from .common import CATEGORY
from .training import _broadcast_conds

NODE = "Join Training Data"
SETS = 4


class JoinTrainingData(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        inputs = []
        for k in range(1, SETS + 1):
            optional = k > 1
            inputs += [io.Latent.Input(f"latents_{k}", optional=optional,
                                       tooltip=f"Images of set {k} (a LATENT batch)."),
                       io.Conditioning.Input(f"conditioning_{k}", optional=optional,
                                             tooltip=f"Set {k}'s prompt: one for all its images, "
                                                     "or one per image.")]
        return io.Schema(
            node_id="SparseAtoms_JoinTrainingData", display_name=NODE, category=CATEGORY,
            description="Joins up to four image sets, each with one prompt or one per image, into "
                        "one LATENT with one CONDITIONING per image (for Train Sparse Concept's "
                        "latents or prior_latents).",
            inputs=inputs,
            outputs=[io.Latent.Output("latents", display_name="LATENT"),
                     io.Conditioning.Output("conditioning", display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, **sets):
        latents, conds = [], []
        for k in range(1, SETS + 1):
            latent, cond = sets.get(f"latents_{k}"), sets.get(f"conditioning_{k}")
            if latent is None and cond is None:
                continue
            if latent is None or cond is None:
                given, missing = (f"latents_{k}", f"conditioning_{k}") if cond is None else \
                    (f"conditioning_{k}", f"latents_{k}")
                raise ValueError(f"{NODE}: {given} is connected but {missing} is not: give both")
            samples = latent.get("samples") if isinstance(latent, dict) else None
            if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or len(samples) == 0:
                raise ValueError(f"{NODE}: latents_{k} must be a LATENT with a batch of images")
            if latents and samples.shape[1:] != latents[0].shape[1:]:
                raise ValueError(f"{NODE}: latents_{k} has images of shape {tuple(samples.shape[1:])}, "
                                 f"the first set {tuple(latents[0].shape[1:])}: they must match")
            if len(cond) not in (1, len(samples)):
                raise ValueError(f"{NODE}: conditioning_{k} has {len(cond)} entries for "
                                 f"{len(samples)} images in latents_{k}: give one, or one per image")
            latents.append(samples)
            conds += _broadcast_conds(cond, len(samples), f"{NODE}: conditioning_{k}")
        return io.NodeOutput({"samples": torch.cat(latents)}, conds)


NODES = [JoinTrainingData]
