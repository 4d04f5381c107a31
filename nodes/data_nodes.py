"""Training data in the graph: several (LATENT, CONDITIONING) sets joined into one, each image
with its own prompt, so one Train Sparse Concept input can take a concept under several prompts,
or a prior made of several sources (real images, the base model's own samples); each set with a
weight, how often its images are drawn."""

from __future__ import annotations

import os

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io

from .common import CATEGORY, check_finite, conditioning_per_image, latent_images
from .datasets import WEIGHT_KEY

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
                                                     "or one per image."),
                       io.Float.Input(f"weight_{k}", default=1.0, min=0.01, max=100.0, step=0.05,
                                      optional=True,
                                      tooltip=f"How often each image of set {k} is drawn "
                                              "relative to the others' (2 = twice as often).")]
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
        latents, conds, weights = [], [], []
        for k in range(1, SETS + 1):
            latent, cond = sets.get(f"latents_{k}"), sets.get(f"conditioning_{k}")
            if latent is None and cond is None:
                continue
            if latent is None or cond is None:
                given, missing = (f"latents_{k}", f"conditioning_{k}") if cond is None else \
                    (f"conditioning_{k}", f"latents_{k}")
                raise ValueError(f"{NODE}: {given} is connected but {missing} is not: give both")
            samples = latent_images(latent, f"latents_{k}", NODE)
            if latents and samples.shape[1:] != latents[0].shape[1:]:
                raise ValueError(f"{NODE}: latents_{k} has images of shape {tuple(samples.shape[1:])}, "
                                 f"the first set {tuple(latents[0].shape[1:])}: they must match")
            weight = sets.get(f"weight_{k}", 1.0)
            check_finite(NODE, **{f"weight_{k}": weight})
            if not weight > 0:
                raise ValueError(f"{NODE}: weight_{k} must be > 0, got {weight}")
            latents.append(samples)
            conds += conditioning_per_image(cond, len(samples), f"conditioning_{k}",
                                            f"latents_{k}", NODE)
            weights += [float(weight)] * len(samples)
        joined = {"samples": torch.cat(latents)}
        if any(w != 1.0 for w in weights):  # drawn in proportion to them (Train Sparse Concept)
            joined[WEIGHT_KEY] = torch.tensor(weights)
        return io.NodeOutput(joined, conds)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LOADER = "Load Training Images"


def input_subfolders() -> list[str]:
    """Folders under ComfyUI's input directory (relative, with "/"), sorted."""
    root = folder_paths.get_input_directory()
    found = []
    for folder, dirs, _ in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folder != root:
            found.append(os.path.relpath(folder, root).replace(os.sep, "/"))
    return found


class LoadTrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_LoadTrainingImages", display_name=LOADER, category=CATEGORY,
            description="The images of a folder in ComfyUI's input directory, each at its own "
                        "size, with its caption (<image name>.txt beside it): lists, for VAE "
                        "Encode and CLIP Text Encode, then Train Sparse Concept (one bucket per "
                        "size).",
            inputs=[
                io.Combo.Input("folder", options=input_subfolders(),
                               tooltip="A folder in ComfyUI's input directory."),
                io.String.Input("default_caption", default="",
                                tooltip="The caption of images without a .txt file."),
                io.Int.Input("max_size", default=1024, min=0, max=8192, step=64,
                             tooltip="Images larger than this (longer side) are scaled down; "
                                     "every size is rounded down to a multiple of 64 (what "
                                     "the models take); 0 = only the rounding."),
            ],
            outputs=[io.Image.Output("images", display_name="IMAGE", is_output_list=True),
                     io.String.Output("captions", display_name="STRING", is_output_list=True)],
        )

    @classmethod
    def execute(cls, folder, default_caption, max_size):
        from PIL import Image, ImageOps

        root = os.path.realpath(folder_paths.get_input_directory())
        path = os.path.realpath(os.path.join(root, folder))
        if os.path.commonpath([root, path]) != root or not os.path.isdir(path):
            raise ValueError(f"{LOADER}: folder {folder!r} is not a folder in the input directory")
        names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
        if not names:
            raise ValueError(f"{LOADER}: no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
        images, captions = [], []
        for name in names:
            try:
                with Image.open(os.path.join(path, name)) as opened:
                    picture = ImageOps.exif_transpose(opened).convert("RGB")
            except (OSError, ValueError) as error:
                raise ValueError(f"{LOADER}: cannot read {name} in {path}: {error}") from None
            width, height = _trained_size(picture.width, picture.height, max_size)
            if width < 64 or height < 64:
                raise ValueError(f"{LOADER}: {name} is {picture.width}x{picture.height} px; "
                                 "images need at least 64 px on each side")
            if (width, height) != picture.size:
                picture = picture.resize((width, height), Image.LANCZOS)
            pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)
            images.append(pixels[None])
            captions.append(_caption(os.path.join(path, os.path.splitext(name)[0] + ".txt"),
                                     default_caption))
        return io.NodeOutput(images, captions)


def _trained_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """``(width, height)`` scaled so the longer side is at most ``max_size`` (0: any), each
    rounded down to a multiple of 64."""
    scale = min(1.0, max_size / max(width, height)) if max_size else 1.0
    return int(width * scale) // 64 * 64, int(height * scale) // 64 * 64


def _caption(path: str, default: str) -> str:
    if not os.path.isfile(path):
        return default
    try:
        with open(path, encoding="utf-8") as file:
            return file.read().strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"{LOADER}: caption {path} is not UTF-8 text ({error})") from None


NODES = [JoinTrainingData, LoadTrainingImages]
