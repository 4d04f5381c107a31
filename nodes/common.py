"""What the nodes share: custom types, the model folder, safe file names and numbered saves,
input checks, progress text, images."""

from __future__ import annotations

import math
import numbers
import os
import re
import sys

import numpy as np
import torch

import folder_paths
from comfy_api.latest import io

import sparse_core as sc

from .patching import model_family

AtomDict = io.Custom("ATOM_DICT")
SparseAtomsType = io.Custom("SPARSE_ATOMS")
TrainingOptionsType = io.Custom("SPARSE_TRAINING_OPTIONS")
TrainingSamplesType = io.Custom("SPARSE_TRAINING_SAMPLES")

FOLDER = "sparse_atoms"
STATES_FOLDER = "sparse_atoms_states"  # training states to resume from (not atoms: kept apart)
CATEGORY = "sparse_atoms"


def register_folder() -> None:
    """``models/sparse_atoms`` and ``models/sparse_atoms_states`` (``.safetensors`` only), merged
    with any extra_model_paths.yaml entries."""
    for name in (FOLDER, STATES_FOLDER):
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        folder_paths.folder_names_and_paths[name] = (folder_paths.get_folder_paths(name), {".safetensors"})


def atoms_files() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def safe_target(folder: str, name: str, what: str) -> str:
    """``folder/name.safetensors`` for a user-typed ``name``; a name that is empty, absolute, climbs
    out of ``folder``, or leads out of it through a symbolic link is refused before anything is
    written."""
    cleaned = name.strip()
    if not cleaned:
        raise ValueError(f"{what}: the file name is empty")
    control = next((c for c in cleaned if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if control is not None:
        raise ValueError(f"{what}: file name {name!r} contains the control character "
                         f"{control!r} (no NUL, newline, tab or CR in a file name)")
    try:
        cleaned.encode("utf-8")  # a lone surrogate (an undecodable byte) does not encode
    except UnicodeEncodeError:
        raise ValueError(f"{what}: file name {name!r} is not valid Unicode (a lone surrogate, "
                         "e.g. an undecodable byte); type the name again") from None
    if os.path.isabs(cleaned) or re.match(r"^[A-Za-z]:", cleaned) or "\\" in cleaned:
        raise ValueError(f"{what}: file name {name!r} must be a plain relative name, not a path")
    parts = cleaned.split("/")
    if any(part.strip() != part for part in parts):
        raise ValueError(f"{what}: file name {name!r} has a part that begins or ends with a space "
                         "(or is only spaces)")
    if any(part in ("..", "") or part.startswith(".") for part in parts):
        raise ValueError(f"{what}: file name {name!r} tries to leave {folder} (no '..', no empty or "
                         "hidden parts)")
    if not cleaned.endswith(".safetensors"):
        cleaned += ".safetensors"
    target = os.path.abspath(os.path.join(folder, cleaned))
    if not _inside(os.path.abspath(folder), target):
        raise ValueError(f"{what}: file name {name!r} resolves outside {folder}")
    if not _inside(os.path.realpath(folder), os.path.realpath(target)):
        raise ValueError(f"{what}: file name {name!r} leads outside {folder} through a symbolic link")
    return target


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root


_MAX_NAME_BYTES = 255  # the longest file name most file systems allow
_MAX_NUMBER_TRIES = 1000


def save_numbered(folder: str, name: str, what: str, write, *, overwrite: bool) -> str:
    """Save through ``write(path, overwrite=...)`` and return the path written.

    With ``overwrite`` the file is ``folder/name.safetensors`` (replaced if present). Without it,
    as ComfyUI's own savers do, it is ``name_00001.safetensors``, ``name_00002...``: one more than
    the highest number present, and the next one whenever ``write`` finds the name taken
    (``FileExistsError``; ``write`` must never replace a file when ``overwrite`` is False), so
    two savers at once never write the same file. Leftover temporary files of writers that died
    are removed from ``folder`` and the target's sub-folder first.
    """
    target = safe_target(folder, name, what)
    try:
        return _save_numbered(folder, target, name, what, write, overwrite=overwrite)
    except (IsADirectoryError, NotADirectoryError) as error:  # a folder or file in the way
        raise type(error)(error.errno, f"{what}: {error.strerror}", error.filename) from None


def _save_numbered(folder: str, target: str, name: str, what: str, write, *, overwrite: bool) -> str:
    sc.check_folder_path(os.path.dirname(target))
    for place in {folder, os.path.dirname(target)}:
        sc.clean_temp_files(place)  # a missing folder has nothing to clean
    if overwrite:
        _check_name_length(target, name, what)
        write(target, overwrite=True)
        return target
    stem = target[: -len(".safetensors")]
    number = highest_number(stem) + 1
    for _ in range(_MAX_NUMBER_TRIES):
        path = f"{stem}_{number:05d}.safetensors"
        _check_name_length(path, name, what)
        try:
            write(path, overwrite=False)
            return path
        except FileExistsError:
            number += 1  # another saver took this name meanwhile
    raise FileExistsError(f"{what}: {_MAX_NUMBER_TRIES} numbered names after {stem}_* were taken "
                          "while saving; nothing was written")


def highest_number(stem: str, tail: str = "") -> int:
    """The highest ``N`` of the files ``stem_N<tail>.safetensors`` present (0 if none; ``tail``
    a regular expression, e.g. ``_step\\d+``)."""
    folder, base = os.path.split(stem)
    pattern = re.compile(re.escape(base) + r"_(\d{5,})" + tail + r"\.safetensors")
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    return max((int(m.group(1)) for m in map(pattern.fullmatch, names) if m), default=0)


def _check_name_length(path: str, name: str, what: str) -> None:
    length = len(os.fsencode(os.path.basename(path)))
    if length > _MAX_NAME_BYTES:
        raise ValueError(f"{what}: file name {name!r} is too long: {os.path.basename(path)[:40]}... "
                         f"would have {length} bytes, at most {_MAX_NAME_BYTES} are allowed")


def listed_file(folder_name: str, filename: str, what: str) -> str:
    """The real path (links resolved) of ``filename`` chosen from the model folder
    ``folder_name``; refused unless it is a regular file inside one of that folder's configured
    paths, so a link can not make a loader read a file elsewhere."""
    path = os.path.realpath(folder_paths.get_full_path_or_raise(folder_name, filename))
    roots = [os.path.realpath(p) for p in folder_paths.get_folder_paths(folder_name)]
    if not any(_inside(root, path) for root in roots):
        raise ValueError(f"{what}: {filename!r} is a link to a file outside the {folder_name} "
                         "folders; only files inside them are read (copy the file in, or add its "
                         "folder to extra_model_paths.yaml)")
    if not os.path.isfile(path):
        raise ValueError(f"{what}: {filename!r} is not a regular file")
    return path


def check_finite(node: str, **values) -> None:
    """Refuse a number input that is NaN or infinite (ComfyUI's min/max check lets NaN through),
    naming the node, the input and the value."""
    for input_name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{node}: {input_name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{node}: {input_name} must be a finite number, got {value!r}")


def latent_images(latent, name: str, node: str, model=None) -> torch.Tensor:
    """The image batch ``(B, C, H, W)`` of ``node``'s LATENT input ``name``: at least one image,
    finite and, given ``model``, of its channels and a size it runs
    (:func:`check_latent_for_model`); else a ValueError that names the input. The one check of a
    LATENT input, for every node."""
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.ndim < 4 or samples.shape[0] == 0:
        got = (type(latent).__name__ if not isinstance(samples, torch.Tensor) else
               "an empty batch" if samples.ndim >= 4 else f"shape {tuple(samples.shape)}")
        raise ValueError(f"{node}: {name} must be a LATENT with at least one image, got {got}")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"{node}: {name} contains NaN or inf")
    if model is not None:
        check_latent_for_model(model, samples, name, node)
    return samples


def conditioning_per_image(conditioning, count: int, name: str, images: str, node: str) -> list:
    """``node``'s CONDITIONING input ``name`` as one entry per image of its ``count`` images
    (input ``images``): its one entry repeated, or its entries, one per image."""
    if not conditioning:
        raise ValueError(f"{node}: {name} is empty")
    if len(conditioning) not in (1, count):
        raise ValueError(f"{node}: {name} has {len(conditioning)} entries for {count} images in "
                         f"{images}: give one, or one per image")
    return [conditioning[0]] * count if len(conditioning) == 1 else list(conditioning)


def check_latent_for_model(model, samples: torch.Tensor, input_name: str, node: str) -> None:
    """``samples (B, C, H, W)`` must have the channels of ``model``'s latents
    (``latent_format.latent_channels``) and a size its diffusion model can run (see
    :data:`LATENT_RULES`), or a ValueError says which input is wrong and what would do."""
    expected = getattr(getattr(model.model, "latent_format", None), "latent_channels", None)
    architecture = model_family(model)[1]
    if expected is not None and samples.ndim >= 2 and samples.shape[1] != expected:
        raise ValueError(f"{node}: {input_name} has {samples.shape[1]} channels (shape "
                         f"{tuple(samples.shape)}), but this {architecture} model takes "
                         f"{expected}-channel latents (a latent made for another model? encode "
                         "the images with this model's VAE)")
    rule = LATENT_RULES.get(type(model.model.diffusion_model).__name__)
    if rule is not None and samples.ndim == 4:
        height, width = samples.shape[-2:]
        ratio = getattr(model.model.latent_format, "spacial_downscale_ratio", 8)
        problem = rule(model.model.diffusion_model, height, width, ratio)
        if problem:
            raise ValueError(f"{node}: {input_name} is {height}x{width} latent pixels "
                             f"({height * ratio}x{width * ratio} px), which this {architecture} "
                             f"model cannot run: {problem}")


def _pixart_latent_problem(diffusion, height: int, width: int, ratio: int) -> str | None:
    """ComfyUI's ``PixArtMS.forward_orig`` divides by ``round(((H + W) // 2) / 64)`` (zero below a
    mean side of 33 latent pixels) and embeds positions for ``H // p`` by ``W // p`` patches while
    its patch embedding pads an odd side (a shape mismatch)."""
    patch = diffusion.patch_size
    if height % patch or width % patch:
        return (f"its sides must be multiples of {patch} latent pixels ({patch * ratio} px); "
                "resize the images")
    if round(((height + width) // 2) / 64) == 0:
        smallest = 33 + (-33) % patch  # the smallest multiple of the patch size from 33
        return (f"its mean side must be at least 33 latent pixels (the smallest square it runs "
                f"is {smallest * ratio}x{smallest * ratio} px); use larger images")
    return None


# Diffusion models (by class name) with sizes they cannot run: the problem, or None.
LATENT_RULES = {"PixArtMS": _pixart_latent_problem}


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


def loss_curve(losses: list[float], *, validation=(), width: int = 480,
               height: int = 240) -> torch.Tensor:
    """The training loss per step as an IMAGE (log scale when it spans a decade or more), with
    the held-out ``validation`` losses ``[(steps done, loss)]`` in orange."""
    return rgb_to_image(np.asarray(loss_picture(losses, validation=validation, width=width,
                                                height=height)))


def loss_picture(losses: list[float], *, validation=(), width: int = 480, height: int = 240):
    """:func:`loss_curve` as a PIL image (what the node shows while training runs)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = 48, 12, width - 12, height - 28
    draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
    values = np.asarray([v for v in losses if np.isfinite(v)], dtype=np.float64)
    held = [(s, v) for s, v in validation if np.isfinite(v)]
    if len(values):
        every = np.concatenate([values, [v for _, v in held]])
        low, high = float(every.min()), float(every.max())
        use_log = low > 0 and high / low >= 10
        scale = np.log10 if use_log else (lambda x: np.asarray(x, dtype=np.float64))
        lo, hi = float(scale(every).min()), float(scale(every).max())
        span = hi - lo or 1.0
        xs = left + (right - left) * np.arange(len(values)) / max(1, len(values) - 1)
        ys = bottom - (bottom - top) * (scale(values) - lo) / span
        draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(31, 119, 180), width=2)
        if held:
            steps = np.asarray([s for s, _ in held], dtype=np.float64)
            hx = left + (right - left) * np.clip(steps - 1, 0, None) / max(1, len(values) - 1)
            hy = bottom - (bottom - top) * (scale([v for _, v in held]) - lo) / span
            points = list(zip(hx.tolist(), hy.tolist()))
            if len(points) > 1:
                draw.line(points, fill=(230, 120, 20), width=2)
            for x, y in points:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(230, 120, 20))
        draw.text((4, top), f"{high:.3g}", fill=(40, 40, 40))
        draw.text((4, bottom - 10), f"{low:.3g}", fill=(40, 40, 40))
        legend = f"loss per step ({len(values)} steps{', log' if use_log else ''})"
        draw.text((left, bottom + 8), legend + ("; validation in orange" if held else ""),
                  fill=(40, 40, 40))
    return canvas
