"""Training data as it reaches Train Sparse Concept, and the :class:`Dataset` the trainer and
the effect measurement take.

A node with list inputs (``is_input_list``) gets every input as a list, so Train takes the lists
current ComfyUI's dataset nodes give (``MakeTrainingDataset``: one LATENT and one CONDITIONING
per image, sizes mixed; ``ResolutionBucket``: one batch per size) as well as the single LATENT
batch and CONDITIONING of the pinned nodes, a list of one. Images of several sizes train as one
bucket per size (:class:`ImagesBySize`)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

import comfy.samplers

from .common import latent_images

NODE = "Train Sparse Concept"
WEIGHT_KEY = "training_weight"  # in a LATENT: how often its images are drawn (Join Training Data)


@dataclass
class Dataset:
    """Latents as ComfyUI holds them (before ``process_latent_in``): one batch ``(N, C, H, W)``,
    or a list of batches for images of several sizes (each size trains as its own bucket); one
    CONDITIONING entry for all images or one per image (in batch order); and optionally a
    sampling ``weight`` per image (``(N,)``, > 0: how often it is drawn relative to the others;
    none: all alike)."""

    latents: torch.Tensor | list
    conds: list
    weights: torch.Tensor | None = None

    @property
    def batches(self) -> list[torch.Tensor]:
        return [self.latents] if isinstance(self.latents, torch.Tensor) else list(self.latents)

    def __len__(self) -> int:
        return sum(len(batch) for batch in self.batches)

    def largest_size(self) -> Dataset:
        """The images of the most common size (the first such on a tie), with their prompts."""
        batches = self.batches
        conds = broadcast_conds(self.conds, len(self), "the data set")
        sizes = [batch.shape[1:] for batch in batches]
        count = {size: sum(len(b) for b, s in zip(batches, sizes) if s == size) for size in sizes}
        size = max(count, key=count.get)
        offsets = torch.tensor([0] + [len(b) for b in batches]).cumsum(0).tolist()
        keep = [k for k, s in enumerate(sizes) if s == size]
        return Dataset(torch.cat([batches[k] for k in keep]),
                       [c for k in keep for c in conds[offsets[k]:offsets[k + 1]]])

def broadcast_conds(conds: list, count: int, what: str) -> list:
    if len(conds) == 1:
        return [conds[0]] * count
    if len(conds) != count:
        raise ValueError(f"{what}: {len(conds)} conditionings for {count} latents; give one "
                         "conditioning for all latents or one per latent")
    return list(conds)

def distinct_conds(conds: list) -> tuple[list, list[int]]:
    """The distinct conditioning objects and, per latent, the position of its own among them
    (identical entries share one forward pass)."""
    unique, cond_of = [], []
    for cond in conds:
        match = next((i for i, seen in enumerate(unique) if seen is cond), None)
        if match is None:
            unique.append(cond)
            match = len(unique) - 1
        cond_of.append(match)
    return unique, cond_of

class ImagesBySize:
    """The training images by size: a bucket per size, each a batch the model runs at once.

    ``first_batch`` is every image of the first image's size, in order (with one size, all of
    them, as one batch); :meth:`prepare` gives, in the sampler, each bucket's latents through
    ``process_latent_in`` and the prompts encoded for its size (the guider encoded them for the
    first), and where each image is: ``(bucket, row)``."""

    def __init__(self, batches: list[torch.Tensor]):
        first = batches[0].shape[1:]
        images = [(batch.shape[1:], row) for batch in batches for row in range(len(batch))]
        self.first_batch = torch.cat([b for b in batches if b.shape[1:] == first])
        self.others, self.where = {}, []
        rows = {first: 0}
        for index, (size, _) in enumerate(images):
            if size not in rows:
                rows[size] = 0
                self.others[size] = []
            self.where.append((size, rows[size]))
            rows[size] += 1
        for size in self.others:
            self.others[size] = torch.cat([b for b in batches if b.shape[1:] == size])
        self.first = first

    def prepare(self, model_wrap, x0_first, conds, seed):
        """``({size: latents}, {size: encoded prompts}, [(size, row)] per image)``."""
        inner = model_wrap.inner_model
        latents, encoded = {self.first: x0_first}, {self.first: conds}
        for size, raw in self.others.items():
            raw = raw.to(x0_first)
            latents[size] = inner.process_latent_in(raw) if torch.count_nonzero(raw) > 0 else raw
            original = {"positive": [c.copy() for c in model_wrap.original_conds["positive"]]}
            encoded[size] = comfy.samplers.process_conds(inner, torch.zeros_like(raw), original,
                                                         x0_first.device, raw, None,
                                                         seed)["positive"]
        return latents, encoded, self.where



def single(value, name: str):
    """The one value of a widget or a single input on a list-input node (each arrives as a
    list); a list of several different values is refused by name."""
    if not isinstance(value, list):
        return value
    if not value:
        raise ValueError(f"{NODE}: {name} is an empty list")
    first = value[0]
    for other in value[1:]:
        same = other is first or (isinstance(first, (numbers.Number, str)) and other == first)
        if not same:
            raise ValueError(f"{NODE}: {name} got a list of {len(value)} different values; it "
                             "takes one")
    return first


def dataset(model, latents, conditioning, latent_name: str, cond_name: str) -> Dataset:
    """A :class:`Dataset` from a list of LATENT (batches of any sizes) and a list of
    CONDITIONING whose entries are, all together, one for every image or a single one; or one
    CONDITIONING per LATENT, each one entry or one per image of its LATENT."""
    latents = latents if isinstance(latents, list) else [latents]
    if _is_conditioning(conditioning):  # one CONDITIONING, not a list of them
        conditioning = [conditioning]
    if not latents:
        raise ValueError(f"{NODE}: {latent_name} is an empty list")
    batches, weights = [], []
    for k, latent in enumerate(latents):
        where = latent_name if len(latents) == 1 else f"{latent_name} (item {k + 1} of the list)"
        samples = latent_images(latent, where, NODE, model)
        if batches and samples.shape[1:-2] != batches[0].shape[1:-2]:
            raise ValueError(f"{NODE}: {where} has images of shape {tuple(samples.shape[1:])}, "
                             f"the first {tuple(batches[0].shape[1:])}: they must match but "
                             "for their size")
        batches.append(samples)
        weights.append(_weights(latent, len(samples), where))
    count = sum(len(b) for b in batches)
    conds = _per_image(conditioning, [len(b) for b in batches], count, latent_name, cond_name)
    same_size = all(b.shape[1:] == batches[0].shape[1:] for b in batches)
    merged = torch.cat(batches) if same_size and len(batches) > 1 else batches[0]
    image_weights = None
    if any(w is not None for w in weights):
        image_weights = torch.cat([torch.ones(len(b)) if w is None else w
                                   for b, w in zip(batches, weights)])
    return Dataset(merged if same_size else batches, conds, image_weights)


def single_conditioning(value, name: str):
    """The one CONDITIONING of a list input (or the CONDITIONING itself)."""
    if value is None or _is_conditioning(value):
        return value
    return single(value, name)


def _is_conditioning(value) -> bool:
    """A CONDITIONING is a list of ``[tensor, dict]`` entries; a list input is a list of them."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(entry, (list, tuple)) and len(entry) == 2 and
        isinstance(entry[0], torch.Tensor) and isinstance(entry[1], dict) for entry in value)


def _per_image(conditioning: list, sizes: list[int], count: int, latent_name: str,
               cond_name: str) -> list:
    if not conditioning or not all(conditioning):
        raise ValueError(f"{NODE}: {cond_name} is empty")
    entries = [entry for cond in conditioning for entry in cond]
    if len(entries) in (1, count):
        return entries
    if len(conditioning) == len(sizes) and all(len(c) in (1, n) for c, n in zip(conditioning, sizes)):
        return [entry for cond, n in zip(conditioning, sizes) for entry in
                (cond * n if len(cond) == 1 else cond)]
    raise ValueError(f"{NODE}: {cond_name} has {len(entries)} entries for {count} images in "
                     f"{latent_name}: give one, or one per image (or one per LATENT of a list)")


def _weights(latent: dict, count: int, where: str) -> torch.Tensor | None:
    weight = latent.get(WEIGHT_KEY)
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
    if weight.numel() == 1:
        weight = weight.expand(count).clone()
    if weight.numel() != count or not bool(torch.isfinite(weight).all()) or bool((weight <= 0).any()):
        raise ValueError(f"{NODE}: {where} has training weights {weight.tolist()[:8]} for {count} "
                         "images: give one weight > 0 per image")
    return weight
