"""What the nodes share: custom types, the model folder, safe file names, progress text, images."""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io

AtomDict = io.Custom("ATOM_DICT")
SparseAtomsType = io.Custom("SPARSE_ATOMS")

FOLDER = "sparse_atoms"
CATEGORY = "sparse_atoms"


def register_folder() -> None:
    """``models/sparse_atoms`` (``.safetensors`` only), merged with any extra_model_paths.yaml entry."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    folder_paths.folder_names_and_paths[FOLDER] = (folder_paths.get_folder_paths(FOLDER), {".safetensors"})


def atoms_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def safe_target(folder: str, name: str, what: str) -> str:
    """``folder/name.safetensors`` for a user-typed ``name``; a name that is empty, absolute, or
    climbs out of ``folder`` is refused before anything is written."""
    cleaned = name.strip()
    if not cleaned:
        raise ValueError(f"{what}: the file name is empty")
    if os.path.isabs(cleaned) or re.match(r"^[A-Za-z]:", cleaned) or "\\" in cleaned:
        raise ValueError(f"{what}: file name {name!r} must be a plain relative name, not a path")
    parts = cleaned.split("/")
    if any(part in ("..", "") or part.startswith(".") for part in parts):
        raise ValueError(f"{what}: file name {name!r} tries to leave {folder} (no '..', no empty or "
                         "hidden parts)")
    if not cleaned.endswith(".safetensors"):
        cleaned += ".safetensors"
    target = os.path.abspath(os.path.join(folder, cleaned))
    if os.path.commonpath([target, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise ValueError(f"{what}: file name {name!r} resolves outside {folder}")
    return target


def send_text(text: str, node_id) -> None:
    """Text under the node in the frontend (no-op outside a running server)."""
    server_module = sys.modules.get("server")  # imported by a running ComfyUI; never import it here
    prompt_server = getattr(server_module, "PromptServer", None)
    server = getattr(prompt_server, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, str(node_id), server.client_id)


def rgb_to_image(pixels) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` (tensor or array) -> ComfyUI IMAGE ``(1, H, W, 3)`` float in [0, 1]."""
    array = pixels.numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    return torch.from_numpy(array.astype(np.float32) / 255.0)[None]


def loss_curve(losses: list[float], *, width: int = 480, height: int = 240) -> torch.Tensor:
    """The training loss per step as an IMAGE (log scale when it spans a decade or more)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = 48, 12, width - 12, height - 28
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    values = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    if len(values):
        low, high = float(values.min()), float(values.max())
        use_log = low > 0 and high / low >= 10
        scaled = np.log10(values) if use_log else values
        lo, hi = float(scaled.min()), float(scaled.max())
        span = hi - lo or 1.0
        xs = left + (right - left) * np.arange(len(values)) / max(1, len(values) - 1)
        ys = bottom - (bottom - top) * (scaled - lo) / span
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        draw.text((4, top), f"{high:.3g}", fill=(40, 40, 40))
        draw.text((4, bottom - 10), f"{low:.3g}", fill=(40, 40, 40))
        draw.text((left, bottom + 8), f"loss per step ({len(values)} steps{', log' if use_log else ''})",
                  fill=(40, 40, 40))
    return rgb_to_image(np.asarray(canvas))
