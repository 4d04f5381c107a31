"""The digits model in ComfyUI: load it, prompt it, and move its 8x8 images in and out."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from comfy_api.latest import io

from digits.checkpoint import MODEL_PATH, load_prompt_encoder
from digits.attributes import TRANSFORMS
from digits.data import images_of
from digits.prompts import ATTRIBUTES, DIGITS, SPARE, tokenize

from .digits_model import load_digits_model

CATEGORY = "sparse_atoms/digits"


class LoadDigitsModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_LoadDigitsModel", display_name="Load Digits Model", category=CATEGORY,
            description="The tiny digits diffusion transformer shipped with Sparse Atoms (8x8 "
                        "handwritten digits, the digit 3 held out): samples with the stock KSampler.",
            inputs=[],
            outputs=[io.Model.Output("model", display_name="MODEL")],
        )

    @classmethod
    def execute(cls):
        with torch.inference_mode(False):  # trainable downstream, like a model built in a script
            return io.NodeOutput(load_digits_model())


@functools.lru_cache(maxsize=1)
def _encoder():
    return load_prompt_encoder(MODEL_PATH)


class DigitPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_DigitPrompt", display_name="Digit Prompt", category=CATEGORY,
            description="CONDITIONING for the digits model: a digit 0-9 after up to two attribute "
                        "words (e.g. 'slant small 7'), an unused word for a new concept or style "
                        "(e.g. 'sks', 'bold sks'), or empty (the negative).",
            inputs=[io.String.Input("prompt", default="7",
                                    tooltip=f"Up to 3 words: digits {' '.join(DIGITS)}; attributes "
                                            f"{' '.join(ATTRIBUTES)}; unused words {' '.join(SPARE)}; "
                                            "empty = unconditional.")],
            outputs=[io.Conditioning.Output("conditioning", display_name="CONDITIONING")],
        )

    @classmethod
    def validate_inputs(cls, prompt):
        if prompt is None:  # wired from another node (e.g. captions): checked when it runs
            return True
        try:
            tokenize(prompt)
        except (TypeError, ValueError) as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, prompt):
        with torch.no_grad():
            context = _encoder()(tokenize(prompt)[None]).clone()
        return io.NodeOutput([[context, {}]])


class DigitExamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_DigitExamples", display_name="Digit Examples", category=CATEGORY,
            description="Real handwritten digits bundled with scikit-learn, as a digits LATENT with "
                        "one CONDITIONING per image: training data with no downloads.",
            inputs=[
                io.String.Input("digits", default="3", tooltip="Comma-separated digits, e.g. '3' or '0,1,2'."),
                io.Int.Input("per_digit", default=8, min=1, max=170, tooltip="Images of each digit."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Which images are picked."),
                io.Combo.Input("style", options=["plain", *TRANSFORMS], default="plain",
                               tooltip="bold: strokes thickened (a style the model never saw, to "
                                       "learn); faint / slant / small: the attributes it knows."),
                io.String.Input("prompt", default="",
                                tooltip="Prompt for every image (e.g. 'sks'); '{digit}' stands for "
                                        "the image's digit (e.g. 'bold {digit}'); empty = its digit."),
            ],
            outputs=[io.Latent.Output("latent", display_name="LATENT"),
                     io.Conditioning.Output("conditioning", display_name="CONDITIONING")],
        )

    @classmethod
    def validate_inputs(cls, digits, prompt):
        if digits is None or prompt is None:  # wired from another node: checked when it runs
            return True
        try:
            _parse_digits(digits)
            tokenize(prompt.replace("{digit}", "0"))
        except (TypeError, ValueError) as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, digits, per_digit, seed, style, prompt):
        images, conds = [], []
        for digit in _parse_digits(digits):
            chosen = images_of(digit, per_digit, seed=seed)
            images.append(chosen if style == "plain" else TRANSFORMS[style](chosen))
            text = prompt.replace("{digit}", str(digit)) if prompt.strip() else str(digit)
            conds += DigitPrompt.execute(text).args[0] * per_digit
        return io.NodeOutput({"samples": torch.cat(images)}, conds)


def _parse_digits(text: str) -> list[int]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and len(p) == 1 for p in parts):
        raise ValueError(f"digits must be comma-separated digits 0-9, got {text!r}")
    return [int(p) for p in parts]


class EmptyDigitsLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_EmptyDigitsLatent", display_name="Empty Digits Latent", category=CATEGORY,
            inputs=[io.Int.Input("batch_size", default=16, min=1, max=4096, tooltip="Images to sample.")],
            outputs=[io.Latent.Output("latent", display_name="LATENT")],
        )

    @classmethod
    def execute(cls, batch_size):
        return io.NodeOutput({"samples": torch.zeros(batch_size, 1, 8, 8)})


class DigitsToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_DigitsToImage", display_name="Digits to Image", category=CATEGORY,
            description="The digits latent (the image itself, ink in [-1, 1]) as an IMAGE for preview and save.",
            inputs=[io.Latent.Input("latent", tooltip="Digits latents, e.g. from KSampler."),
                    io.Int.Input("scale", default=8, min=1, max=64, tooltip="Nearest-neighbour upscale.")],
            outputs=[io.Image.Output("image", display_name="IMAGE")],
        )

    @classmethod
    def execute(cls, latent, scale):
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor) or samples.ndim != 4 or samples.shape[1] != 1:
            shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else None
            channels = shape[1] if shape and len(shape) > 1 else "no"
            raise ValueError(f"Digits to Image: the latent has {channels} channels (shape {shape}); "
                             "digits latents have 1 channel, shape (B, 1, 8, 8) (a latent of another "
                             "model? decode it with that model's VAE)")
        grey = ((samples.float() + 1) / 2).clamp(0, 1)
        grey = F.interpolate(grey, scale_factor=scale, mode="nearest")
        return io.NodeOutput(grey.permute(0, 2, 3, 1).repeat(1, 1, 1, 3).contiguous())


class ImageToDigitsLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_ImageToDigitsLatent", display_name="Image to Digits Latent",
            category=CATEGORY,
            description="An IMAGE (e.g. from Load Image) as a digits latent for training: grey, "
                        "8x8 by area averaging, light ink on dark (invert for dark ink on light).",
            inputs=[io.Image.Input("image", tooltip="Images of digits, any size."),
                    io.Boolean.Input("invert", default=False, tooltip="For dark ink on a light background.")],
            outputs=[io.Latent.Output("latent", display_name="LATENT")],
        )

    @classmethod
    def execute(cls, image, invert):
        if image.ndim != 4 or image.shape[0] == 0:
            raise ValueError(f"Image to Digits Latent needs a batch of images, got {tuple(image.shape)}")
        grey = image[..., :3].float().mean(-1, keepdim=True).permute(0, 3, 1, 2)  # (B, 1, H, W)
        small = F.adaptive_avg_pool2d(grey, (8, 8))
        if invert:
            small = 1 - small
        return io.NodeOutput({"samples": small * 2 - 1})


NODES = [LoadDigitsModel, DigitPrompt, DigitExamples, EmptyDigitsLatent, DigitsToImage,
         ImageToDigitsLatent]
