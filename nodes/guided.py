"""Running ComfyUI's diffusion model with gradients: what training and effect measurement both
need from a model that was loaded for inference (weights that are inference tensors, models that
update activations in place, gradient checkpointing)."""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.utils._pytree
import torch.utils.checkpoint

import comfy.model_management
import comfy_extras.nodes_custom_sampler as custom_sampler

from .patching import AtomsWeightWrapper, release

log = logging.getLogger("sparse_atoms")


class Cancelled(comfy.model_management.InterruptProcessingException):
    """The user cancelled a guided run; ``atoms`` are the wired atoms as the last completed
    model call left them (CPU), for the caller to keep."""

    def __init__(self, atoms):
        super().__init__()
        self.atoms = atoms


def run_guided(model, atoms, latents: torch.Tensor, conds: list, make_sampler, *, seed: int,
               bf16: bool = False, checkpointing: bool = False, what: str = "this run"):
    """Run a sampler body with gradients on a clone of ComfyUI's ``model``: ``atoms`` (if any)
    are cloned to fp32 on the model's device and wired in as differentiable weight wrappers
    (``W + delta W``), the model's own weights copied where they are inference tensors, the
    prompts ``conds`` (CONDITIONING entries) encoded by a ``Guider_Basic`` for ``latents``
    ``(N, C, H, W)`` (which it passes through ``process_latent_in``), and
    ``make_sampler(wired, copy_saved)`` (a ``comfy.samplers.Sampler``) run where sampling would
    run. Returns ``(wired atoms, the sampler)``; the clone is released either way.

    ``bf16`` computes in bfloat16; ``checkpointing`` recomputes each block in backward. A model
    that updates activations in place (ComfyUI's Flux) makes autograd refuse: the run starts
    again keeping copies of what backward needs (``copy_saved``), and the log says so. Cancelling
    raises :class:`Cancelled` with the wired atoms."""
    try:
        return _run_guided(model, atoms, latents, conds, make_sampler, seed, bf16, checkpointing,
                           copy_saved=False)
    except RuntimeError as error:
        if "modified by an inplace operation" not in str(error):
            raise
        log.warning("%s: this model changes tensors in place that backward needs (%s); running "
                    "again from the start, keeping copies of them (more memory)", what,
                    str(error).splitlines()[0][:200])
        return _run_guided(model, atoms, latents, conds, make_sampler, seed, bf16, checkpointing,
                           copy_saved=True)


def _run_guided(model, atoms, latents, conds, make_sampler, seed, bf16, checkpointing, copy_saved):
    patcher = model.clone()
    if bf16:
        patcher.set_model_compute_dtype(torch.bfloat16)
    with torch.inference_mode(False), torch.enable_grad():
        wired = None if atoms is None else atoms.clone().to(patcher.load_device, dtype=torch.float32)
        for key, layer in ({} if wired is None else wired.layers).items():
            patcher.add_weight_wrapper(f"{key}.weight", AtomsWeightWrapper(layer))
        copy_inference_weights(patcher, set() if wired is None else set(wired.layers))
        patcher.model.requires_grad_(False)
        data = latents.detach().clone().float()
        guider = custom_sampler.Guider_Basic(patcher)
        guider.set_conds([clone_cond(cond) for cond in conds])
        sampler = make_sampler(wired, copy_saved)
        try:
            with checkpointed(patcher.model.diffusion_model, checkpointing, copy_saved):
                guider.sample(torch.zeros_like(data), data, sampler, torch.arange(len(data)),
                              seed=seed, disable_pbar=True)
        except comfy.model_management.InterruptProcessingException:
            raise Cancelled(None if wired is None else wired.to("cpu")) from None
        finally:
            release(patcher)
    return wired, sampler


def copy_inference_weights(patcher, adapted: set[str]) -> None:
    """Checkpoints loaded inside a ComfyUI graph hold inference-mode tensors, which autograd may
    not save for backward. A weight of one of ComfyUI's ops gets an identity weight wrapper, which
    makes the op use a copy (as the atoms' own wrappers do for the adapted layers); any other
    parameter or buffer (MMDiT's RMSNorm and Flux's QKNorm scales, PixArt's modulation tables:
    plain tensors that ``cast_to`` returns as they are when the dtypes agree) gets a plain copy as
    an object patch, put in while the clone is loaded and taken out when it is unloaded."""
    for name, module in patcher.model.diffusion_model.named_modules():
        key = f"diffusion_model.{name}" if name else "diffusion_model"
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for field, tensor in own:
            if tensor is None or not tensor.is_inference():
                continue
            if hasattr(module, f"{field}_function"):
                if not (key in adapted and field == "weight"):
                    patcher.add_weight_wrapper(f"{key}.{field}", _identity)
            elif isinstance(tensor, torch.nn.Parameter):
                patcher.add_object_patch(f"{key}.{field}",
                                         torch.nn.Parameter(tensor.clone(), requires_grad=False))
            else:
                patcher.add_object_patch(f"{key}.{field}", tensor.clone())


def _identity(tensor):
    return tensor


def saved_tensor_copies(enabled: bool):
    """Autograd keeps copies of the tensors backward needs, immune to later in-place updates."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)


def clone_cond(cond):
    """Upstream tensors are inference tensors; training needs plain copies."""
    tensor, extra = cond
    extra = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in extra.items()}
    return [tensor.detach().clone(), extra]


@contextlib.contextmanager
def checkpointed(diffusion_model: torch.nn.Module, enabled: bool, copy_inputs: bool = False):
    """Gradient checkpointing: recompute each top-level block in the backward pass instead of
    keeping its activations. Restores the original forwards afterwards.

    ``copy_inputs`` (for models that update activations in place, like Flux's blocks with
    ``x += ...``): each block runs on copies of its tensor inputs, so the inputs checkpointing
    keeps for the recomputation are still the ones the forward pass saw."""
    if not enabled:
        yield
        return
    blocks = []

    def collect(module):
        for child in module.children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                collect(child)
            else:
                blocks.append(child)

    collect(diffusion_model)
    originals = []
    for block in blocks:
        forward = _on_copies(block.forward) if copy_inputs else block.forward
        originals.append((block, block.__dict__.get("forward")))

        def run_checkpointed(*args, __forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(__forward, *args, use_reentrant=False, **kwargs)

        block.forward = run_checkpointed
    try:
        yield
    finally:
        for block, own_forward in originals:
            if own_forward is None:
                del block.forward
            else:
                block.forward = own_forward


def _on_copies(forward):
    """``forward`` called on copies of the tensors among its arguments (nested ones included)."""
    def run(*args, **kwargs):
        args, kwargs = torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        return forward(*args, **kwargs)
    return run
