"""What Train Sparse Concept shows while it runs: the loss curve and, from Sparse Training Samples,
images sampled every N steps from given prompts with the model's own sampler and scheduler.

A sample is what a KSampler with the same seed, steps, cfg, sampler and scheduler draws from the
model as it is at that step (``W + delta W`` through the atoms' weight wrappers): the prompts are
encoded by the training guider together with the training prompts, and
:func:`draw_samples` runs ComfyUI's sampler object over them with classifier-free guidance
(``comfy.samplers.sampling_function``), with no gradients and without touching the training's
random streams. The same noise every time, so the pictures of one prompt compare across steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import comfy.model_patcher
import comfy.sample
import comfy.samplers
from comfy_api.latest import io

from .common import CATEGORY, TrainingSamplesType, check_finite, latent_images, loss_picture
from .explorer import to_rgb

NODE = "Sparse Training Samples"
PREVIEW_SECONDS = 2.0  # the live picture is redrawn at most this often (and after the last step)


@dataclass
class SampleRequest:
    """One prompt to sample every ``every`` steps: CONDITIONING entries ``positive`` (and
    ``negative``, for ``cfg`` != 1), ``latent`` ``(B, C, H, W)`` as ComfyUI holds it (its size
    and image count; all zeros for an empty latent), the KSampler settings, and the ``vae`` that
    decodes the returned images (none: the latent preview, exact for the digits model)."""

    positive: list
    negative: list | None
    latent: torch.Tensor
    every: int
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    vae: object = None

    def due(self, steps_done: int, total: int) -> bool:
        """Sampled before training, every ``every`` steps, and after the last step."""
        return steps_done == 0 or steps_done % self.every == 0 or steps_done == total


class SparseTrainingSamples(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SparseAtoms_TrainingSamples", display_name=NODE, category=CATEGORY,
            description="Images sampled from a prompt every N steps while Train Sparse Concept "
                        "runs (shown on the node, returned as its samples output). Chain nodes "
                        "for more prompts.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="The prompt to sample (one entry)."),
                io.Latent.Input("latent", tooltip="Size and image count, e.g. Empty Latent "
                                                  "Image; the training images' size."),
                io.Int.Input("every", default=50, min=1, max=100000,
                             tooltip="Sample every this many steps (and before the first and "
                                     "after the last)."),
                io.Int.Input("seed", default=0, min=0, max=2**63 - 1,
                             tooltip="The noise, the same at every step so the pictures compare."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampler steps."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1,
                               tooltip="Classifier-free guidance; other than 1 needs negative."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS,
                               tooltip="The sampler, as in KSampler."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS,
                               tooltip="The noise schedule, as in KSampler."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The negative prompt (one entry), for cfg other than 1."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the returned images; without it they are latent "
                                     "previews (the image itself for the digits model)."),
                TrainingSamplesType.Input("previous", optional=True,
                                          tooltip="Another Sparse Training Samples node: its "
                                                  "prompts are sampled too."),
            ],
            outputs=[TrainingSamplesType.Output("samples", display_name="SAMPLES")],
        )

    @classmethod
    def execute(cls, positive, latent, every, seed, steps, cfg, sampler_name, scheduler,
                negative=None, vae=None, previous=None):
        check_finite(NODE, cfg=cfg)
        if not positive or len(positive) != 1:
            raise ValueError(f"{NODE}: positive must be one prompt (got "
                             f"{len(positive or [])} entries); chain nodes for more prompts")
        if negative is not None and len(negative) != 1:
            raise ValueError(f"{NODE}: negative must be one prompt (got {len(negative)} entries)")
        if negative is None and abs(cfg - 1.0) > 1e-9:
            raise ValueError(f"{NODE}: cfg {cfg:g} guides away from the negative prompt: wire "
                             "negative, or set cfg to 1")
        samples = latent_images(latent, "latent", NODE)
        for name, value, options in (
                ("sampler_name", sampler_name, comfy.samplers.KSampler.SAMPLERS),
                ("scheduler", scheduler, comfy.samplers.KSampler.SCHEDULERS)):
            if value not in options:
                raise ValueError(f"{NODE}: {name} {value!r} is not one of {list(options)}")
        requests = list(previous or [])
        if requests and requests[0].vae is not vae:
            raise ValueError(f"{NODE}: chained nodes must all get the same vae (or none), so "
                             "their images share one size")
        request = SampleRequest(positive[0], None if negative is None else negative[0],
                                samples.detach().clone(), every, seed, steps, cfg, sampler_name,
                                scheduler, vae)
        return io.NodeOutput((*requests, request))  # a tuple: one value, not a list input


def check_requests(requests, sizes: list) -> list[SampleRequest]:
    """The requests of a Sparse Training Samples chain, each latent of one of the training
    images' shapes ``sizes`` (the prompts are encoded for the training batches)."""
    if not isinstance(requests, tuple) or not all(isinstance(r, SampleRequest) for r in requests):
        raise ValueError(f"Train Sparse Concept: samples must come from a {NODE} node")
    for k, request in enumerate(requests):
        if request.latent.shape[1:] not in sizes:
            shapes = " or ".join(str(tuple(size)) for size in sizes)
            raise ValueError(f"{NODE} #{k + 1}: latent has shape {tuple(request.latent.shape[1:])} "
                             f"per image, the training latents {shapes}: sample at a training "
                             "images' size")
    return list(requests)


class _Guided:
    """What a ComfyUI sampler calls (as it calls a guider): the denoised prediction with
    classifier-free guidance from CONDITIONING already processed by the training guider."""

    def __init__(self, inner_model, positive, negative, cfg):
        self.inner_model, self.positive, self.negative, self.cfg = inner_model, positive, negative, cfg

    def __call__(self, x, sigma, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        return comfy.samplers.sampling_function(self.inner_model, x, sigma, self.negative,
                                                self.positive, self.cfg,
                                                model_options=model_options, seed=seed)


def draw_samples(inner_model, request: SampleRequest, positive: dict, negative: dict | None,
                 model_options: dict, autocast, device) -> torch.Tensor:
    """The request's images from the model as it is now: latents ``(B, C, H, W)`` (CPU, fp32,
    as ComfyUI holds them), drawn as ``KSampler`` draws them (noise from ``prepare_noise`` with the
    request's seed, the sampler object and its sigmas, ``process_latent_in``/``out``). The global
    random state is left as it was."""
    latent = request.latent.float()
    sampler = comfy.samplers.sampler_object(request.sampler_name)
    discard = request.sampler_name in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
    sigmas = comfy.samplers.calculate_sigmas(inner_model.model_sampling, request.scheduler,
                                             request.steps + int(discard))
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    with torch.random.fork_rng(devices=[]):
        noise = comfy.sample.prepare_noise(latent, request.seed)
        latent = latent.to(device)
        if torch.count_nonzero(latent) > 0:  # as a sampler: an empty latent is not shifted
            latent = inner_model.process_latent_in(latent)
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options.setdefault("transformer_options", {})["sample_sigmas"] = sigmas.to(device)
        guided = _Guided(inner_model, [positive], None if negative is None else [negative],
                         request.cfg)
        with torch.no_grad(), autocast:
            out = sampler.sample(guided, sigmas.to(device), {"model_options": options,
                                                             "seed": request.seed},
                                 None, noise.to(device), latent, None, True)
    return inner_model.process_latent_out(out.float()).cpu()


class LiveCurve:
    """The picture on the node while it trains: the loss curve (and validation losses) with the
    latest samples under it; redrawn at most every :data:`PREVIEW_SECONDS` (drawing costs a few
    milliseconds), after new samples and after the last step."""

    def __init__(self, losses, to_rgb=None):
        self.losses, self.shown, self.to_rgb = list(losses), 0.0, to_rgb
        self.samples, self.fresh = None, False

    def add_samples(self, steps_done: int, latents: list[torch.Tensor]) -> None:
        self.samples, self.fresh = (steps_done, torch.cat([self.to_rgb(x) for x in latents])), True

    def add(self, loss: float, last: bool, validation=()):
        self.losses.append(loss)
        now = time.monotonic()
        if not (last or self.fresh) and now - self.shown < PREVIEW_SECONDS:
            return None
        self.shown, self.fresh = now, False
        return ("PNG", self.picture(validation), 480)  # ComfyUI's progress-preview tuple

    def picture(self, validation=()):
        curve = loss_picture(self.losses, validation=validation)
        if self.samples is None:
            return curve
        return _with_samples(curve, *self.samples)


def _with_samples(curve, steps_done: int, images: torch.Tensor):
    """``curve`` (PIL) with a row of ``images`` ``(B, H, W, 3)`` in [0, 1] under it."""
    from PIL import Image, ImageDraw

    width = curve.width
    count = min(len(images), 8)
    cell = max(16, min(width // count, 160))
    row = Image.new("RGB", (width, cell + 16), (250, 250, 250))
    for k in range(count):
        pixels = (images[k].clamp(0, 1) * 255).round().byte().cpu().numpy()
        tile = Image.fromarray(pixels).resize((cell, cell), Image.NEAREST)
        row.paste(tile, (k * cell, 16))
    ImageDraw.Draw(row).text((4, 2), f"samples at step {steps_done}", fill=(40, 40, 40))
    canvas = Image.new("RGB", (width, curve.height + row.height), (250, 250, 250))
    canvas.paste(curve, (0, 0))
    canvas.paste(row, (0, curve.height))
    return canvas


def sample_images(model, samples: list) -> torch.Tensor:
    """Train's samples output: ``RunState.samples`` as one IMAGE ``(N, H, W, 3)``, in the order
    sampled (by step, then prompt), each request's latents decoded by its vae (or previewed);
    an empty batch when nothing was sampled."""
    images = [to_rgb(model, latents, request.vae) for _, requests, taken in samples
              for request, latents in zip(requests, taken)]
    return torch.cat(images) if images else torch.zeros(0, 64, 64, 3)


NODES = [SparseTrainingSamples]
