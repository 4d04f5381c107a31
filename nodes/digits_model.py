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
from digits import model as digits_dit
from digits.model import ARCHITECTURE


class DigitsLatentFormat(comfy.latent_formats.LatentFormat):
    latent_channels = 1
    scale_factor = 1.0
    # ComfyUI's latent previews draw (x @ factors + bias + 1) / 2: the ink in [-1, 1] as it is,
    # black background, white ink (what Digits to Image draws)
    latent_rgb_factors = [[1.0, 1.0, 1.0]]


class DigitsDiT(digits_dit.DigitsDiT):
    """The digits DiT, refusing inputs made for another model with a message that says what it
    takes (instead of "mat1 and mat2 shapes cannot be multiplied" from deep inside). Same class
    name as its base: the layer presets find a model's family by that name."""

    def __init__(self, *, context_dim=digits_dit.DEFAULT_CONFIG["context_dim"], **config):
        super().__init__(context_dim=context_dim, **config)
        self.context_dim = context_dim

    def forward(self, x, timesteps, context, **kwargs):
        """``x (B, in_channels, image_size, image_size)``, ``context (B, T, context_dim)``."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"the digits model takes latents of shape (B, {', '.join(map(str, expected))}); "
                             f"this latent has {x.shape[1] if x.ndim > 1 else 'no'} channels, shape "
                             f"{tuple(x.shape)} (a latent for another model? make digits latents "
                             "with Empty Digits Latent, Digit Examples or Image to Digits Latent)")
        if context.ndim != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"the digits model takes conditioning of shape (B, tokens, "
                             f"{self.context_dim}); got shape {tuple(context.shape)} (conditioning "
                             "from another text encoder? use Digit Prompt)")
        return super().forward(x, timesteps, context, **kwargs)


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
    config = DigitsConfig({**digits_dit.DEFAULT_CONFIG, **metadata["config"]})
    config.set_inference_dtype(torch.float32, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = config.get_model({}, device=offload_device)
    missing, unexpected = model.diffusion_model.load_state_dict(split_state(path)[0], strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} is not a digits model file: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)
