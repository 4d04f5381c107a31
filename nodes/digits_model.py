"""The shipped digits model as a ComfyUI MODEL: a flow model (like SD3/Flux) over a one-channel
8x8 "latent" that is the image itself, with layers built from ComfyUI's operations so the model
patcher casts and patches them like any checkpoint's."""

from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base

from digits.checkpoint import MODEL_PATH, read_metadata, split_state
from digits.model import DEFAULT_CONFIG, DigitsDiT

ARCHITECTURE = "digits-dit"


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 1
    scale_factor = 1.0
    latent_rgb_factors = [[0.5, 0.5, 0.5]]  # previews: ink in [-1, 1] -> grey
    latent_rgb_factors_bias = [0.5, 0.5, 0.5]


class DigitsConfig(comfy.supported_models_base.BASE):
    unet_config = {}
    unet_extra_config = {}
    sampling_settings = {"multiplier": 1000.0, "shift": 1.0}
    latent_format = DigitsLatentFormat
    memory_usage_factor = 0.01
    supported_inference_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    sparse_atoms_architecture = ARCHITECTURE

    def get_model(self, state_dict, prefix="", device=None):
        return comfy.model_base.BaseModel(self, comfy.model_base.ModelType.FLOW, device=device,
                                          unet_model=DigitsDiT)


def load_digits_model(path=MODEL_PATH):
    """A ModelPatcher over the digits model in ``path`` (float32 weights, CPU or GPU)."""
    metadata = read_metadata(path)
    config = DigitsConfig({**DEFAULT_CONFIG, **metadata["config"]})
    config.set_inference_dtype(torch.float32, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = config.get_model({}, device=offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(split_state(path)[0], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a digits model file: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
