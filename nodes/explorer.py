"""The atom-effect explorer: renders of the model with one atom removed and with it alone, laid out
as a labelled grid IMAGE (what the paper did by hand to find which atom tints a face).

Renders are sampled with ComfyUI's own sampler on the model patched by "Apply Sparse Atoms"'s
path (:func:`nodes.patching.apply_to_model`), so a cell shows exactly what a user would get with
that mask. Latents become pictures through the VAE when one is given, the digits model's own
latent->image for the digits model, and otherwise the model's latent preview (ComfyUI's
Latent2RGB factors), which needs no VAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import comfy.sample

import sparse_core as sc

from .common import rgb_to_image
from .patching import apply_to_model

MAX_STRIP = 4  # images of a batch shown per cell
LABEL_WIDTH = 200
TITLE_HEIGHT = 22


@dataclass
class SamplerSettings:
    seed: int = 0
    steps: int = 20
    cfg: float = 7.0
    sampler_name: str = "euler"
    scheduler: str = "normal"


def sample(model, positive, negative, latent: torch.Tensor, settings: SamplerSettings,
           on_step=None) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` sampled from ``model`` like KSampler does (denoise 1).
    ``on_step()`` runs after every sampling step (progress and cancel)."""
    latent = comfy.sample.fix_empty_latent_channels(model, latent)
    noise = comfy.sample.prepare_noise(latent, settings.seed, None)

    def callback(step, x0, x, total_steps):
        if on_step is not None:
            on_step()

    return comfy.sample.sample(model, noise, settings.steps, settings.cfg, settings.sampler_name,
                               settings.scheduler, positive, negative, latent, callback=callback,
                               disable_pbar=True, seed=settings.seed)


def variants(atoms: sc.SparseAtoms, top_n: int, alone_strength: float) -> list[tuple]:
    """``(title, atoms or None, strength)`` per render: all atoms, the base model, then for each of
    the ``top_n`` most important atoms the model without it and with it alone."""
    ranking = atoms.ranking()
    renders = [("all atoms", atoms, 1.0), ("base model", None, 1.0)]
    for i in range(min(top_n, len(ranking.importance))):
        key, row = ranking.keys[int(ranking.layer[i])], int(ranking.position[i])
        without = {k: torch.ones(layer.n_atoms, dtype=torch.bool) for k, layer in atoms.layers.items()}
        without[key][row] = False
        alone = {k: torch.zeros(layer.n_atoms, dtype=torch.bool) for k, layer in atoms.layers.items()}
        alone[key][row] = True
        renders += [("without", atoms.select(without), 1.0),
                    ("alone", atoms.select(alone), alone_strength)]
    return renders


def render(model, renders: list[tuple], positive, negative, latent, settings, on_step=None):
    """One latent batch per ``(title, atoms, strength)`` of :func:`variants`."""
    results = []
    for _, chosen, strength in renders:
        patched = model if chosen is None else apply_to_model(model, chosen, strength)
        results.append(sample(patched, positive, negative, latent, settings, on_step))
    return results


def to_rgb(model, samples: torch.Tensor, vae=None) -> torch.Tensor:
    """Latents ``(B, C, H, W)`` -> images ``(B, H', W', 3)`` float in [0, 1]."""
    latent_format = model.get_model_object("latent_format")
    if vae is not None:
        pixels = vae.decode(samples)
        return pixels.reshape(-1, *pixels.shape[-3:])[..., :3].float().clamp(0, 1)
    x = latent_format.process_in(samples.float())
    if x.ndim == 5:  # (B, C, T, H, W): the first frame
        x = x[:, :, 0]
    factors = latent_format.latent_rgb_factors
    if factors is None:
        rgb = x.mean(1, keepdim=True).movedim(1, -1).repeat(1, 1, 1, 3)
    else:
        bias = latent_format.latent_rgb_factors_bias
        rgb = F.linear(x.movedim(1, -1), torch.tensor(factors, dtype=x.dtype).T,
                       None if bias is None else torch.tensor(bias, dtype=x.dtype))
    return ((rgb + 1) / 2).clamp(0, 1)  # as ComfyUI's latent previews


def grid(images: list[torch.Tensor], labels: list[str], *, alone_strength: float,
         cell: int = 96) -> torch.Tensor:
    """The explorer IMAGE ``(1, H, W, 3)``: a row "all atoms | base model", then per atom its
    label (``labels[i]``) and the renders without it and with it alone. ``images`` are the
    :func:`to_rgb` pictures in :func:`variants` order."""
    from PIL import Image, ImageDraw

    strips = [_strip(pictures, cell) for pictures in images]
    width = max(s.shape[1] for s in strips)
    height = max(s.shape[0] for s in strips)
    columns = [LABEL_WIDTH, width + 8, width + 8]
    rows = len(labels) + 1
    canvas = Image.new("RGB", (sum(columns), TITLE_HEIGHT + rows * (height + 8)), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    amplified = "" if alone_strength == 1 else f" (strength {alone_strength:g})"
    for column, title in ((1, "without the atom"), (2, "the atom alone" + amplified)):
        draw.text((sum(columns[:column]) + 4, 5), title, fill=(230, 230, 230))
    names = [("all atoms", "(left) / base model (right)")] + [(text, "") for text in labels]
    for row, (name, note) in enumerate(names):
        top = TITLE_HEIGHT + row * (height + 8)
        draw.text((6, top + height // 2 - 12), name, fill=(250, 250, 250))
        draw.text((6, top + height // 2 + 2), note, fill=(170, 170, 170))
        for column in (1, 2):
            strip = strips[2 * row + column - 1]
            canvas.paste(Image.fromarray(strip), (sum(columns[:column]) + 4, top + 4))
    return rgb_to_image(np.asarray(canvas))


def note(text: str) -> torch.Tensor:
    """A small IMAGE ``(1, 48, W, 3)`` that says ``text`` (when there is nothing to render)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (max(160, 7 * len(text) + 16), 48), (32, 32, 32))
    ImageDraw.Draw(canvas).text((8, 18), text, fill=(230, 230, 230))
    return rgb_to_image(np.asarray(canvas))


def _strip(pictures: torch.Tensor, cell: int) -> np.ndarray:
    """Up to :data:`MAX_STRIP` images ``(B, H, W, 3)`` side by side, each fitted into a
    ``cell`` x ``cell`` box (nearest-neighbour when enlarged, so small latents stay crisp)."""
    shown = pictures[:MAX_STRIP].permute(0, 3, 1, 2).float()  # (b, 3, H, W)
    scale = cell / max(shown.shape[-2:])
    size = (max(1, round(shown.shape[-2] * scale)), max(1, round(shown.shape[-1] * scale)))
    mode = "nearest" if scale >= 1 else "area"
    fitted = F.interpolate(shown, size=size, mode=mode).clamp(0, 1)
    row = torch.cat(list(fitted), dim=-1)  # (3, h, b * w)
    return (row.permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy()
