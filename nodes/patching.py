"""Atoms in ComfyUI's model patcher: the weight patch, the training-time weight wrapper, and the
checks that atoms fit a model before anything is patched.

Both patch paths build ``delta W`` from :meth:`sparse_core.AtomLayer.factors`, the single source
(``AtomLayer.delta`` and the LoRA export use it too).
"""

from __future__ import annotations

import torch

import comfy.lora
import comfy.model_management
import comfy.utils
from comfy.weight_adapter import WeightAdapterBase

import sparse_core as sc

from .presets import family_of


class SparseAtomsAdapter(WeightAdapterBase):
    """A ``ModelPatcher.add_patches`` value: ``W + strength * delta W`` for one layer, merged into
    the weight when the model loads (no per-step cost), stacked with any other patch (LoRAs)."""

    name = "sparse_atoms"

    def __init__(self, layer: sc.AtomLayer):
        self.layer = layer
        self.loaded_keys = set()
        self.weights = [layer]

    @classmethod
    def load(cls, *args, **kwargs):
        return None  # not a LoRA-file format: files are read by "Load Sparse Atoms"

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """``weight += function(strength * up @ down)`` in place, ``weight (out, in, *kernel)``.

        Dtype policy: the small factors ``up (out, m)``, ``down (m, in')`` travel to the weight's
        device in ComfyUI's intermediate dtype (fp32 unless the user chose otherwise) and are
        multiplied there, as ComfyUI's LoRA adapter does. Cost policy: at model load the weight is
        ComfyUI's fp32 working copy and ``function`` the identity, so the product accumulates into
        it with one ``addmm_`` and no weight-sized temporary (allocating those, not the
        multiplication, is what patching a full-size model spends its time on); otherwise
        ``strength * delta W`` is built once (``strength`` folded into ``down``), mapped by
        ``function`` and cast to the weight's dtype."""
        if offset is not None:
            raise ValueError(f"sparse atoms patch {key!r}: sliced (offset) patches are not supported")
        up, down = self.layer.factors(weight.device, intermediate_dtype)  # (out, m), (m, in')
        if _is_identity(function) and weight.dtype == up.dtype and weight.is_contiguous():
            weight.view(up.shape[0], down.shape[1]).addmm_(up, down, alpha=strength)  # (out, in')
            return weight
        delta = (up @ (strength * down)).reshape(weight.shape)  # (out, in') -> (out, in, *kernel)
        weight += function(delta).to(weight.dtype)
        return weight


def _is_identity(function) -> bool:
    """Whether ``function`` is ``lambda a: a`` (same bytecode): what ComfyUI passes for a patch
    registered without one, as :func:`apply_to_model` registers them."""
    code = getattr(function, "__code__", None)
    return code is not None and code.co_argcount == 1 and code.co_code == _IDENTITY_CODE


_IDENTITY_CODE = (lambda a: a).__code__.co_code


class AtomsWeightWrapper(torch.nn.Module):
    """Training-time ``ModelPatcher.add_weight_wrapper`` function: ``w -> w + delta W``, evaluated
    at every forward so gradients reach the atoms."""

    def __init__(self, layer: sc.AtomLayer):
        super().__init__()
        self.layer = layer

    def __call__(self, weight):
        # delta W in fp32 on the weight's device (from the small factors), added in the weight's
        # compute dtype.
        return weight + self.layer.delta(weight.device).to(weight.dtype)

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        layer = self.layer
        return layer.atoms, layer.readouts, layer.coefficients, layer.index

    def passive_memory_usage(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def move_to(self, device=None):
        """ComfyUI moves weight functions with their module: the atoms follow (in place, so the
        optimizer's tensors stay the same objects). Returns the bytes held on ``device``."""
        if device is None:
            return 0
        for tensor in self._tensors():
            if tensor.device != torch.device(device):
                tensor.data = tensor.data.to(device)
                if tensor.grad is not None:
                    tensor.grad.data = tensor.grad.data.to(device)
        return self.passive_memory_usage()


def adaptable_layers(model_patcher) -> dict[str, torch.nn.Module]:
    """``{"diffusion_model.<module>": module}`` for every linear or convolution layer."""
    layers = {}
    for name, module in model_patcher.model.diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and \
                isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            layers[f"diffusion_model.{name}"] = module
    return layers


def model_family(model_patcher) -> tuple[str, str]:
    """(preset family, architecture name) of a MODEL, e.g. ``("unet", "SDXL")``."""
    diffusion = type(model_patcher.model.diffusion_model).__name__
    config = getattr(model_patcher.model, "model_config", None)
    name = getattr(config, "sparse_atoms_architecture", None) or (
        type(config).__name__ if config is not None else type(model_patcher.model).__name__)
    return family_of(diffusion), name


def model_weights(model_patcher, keys) -> dict[str, torch.Tensor]:
    """``{key: weight (out, in, *kernel)}`` for layer ``keys`` (``"diffusion_model.<module>"``) as
    this MODEL holds them: the checkpoint's weight plus this patcher's own patches (a LoRA loaded
    before, say), computed as loading computes them (``comfy.lora.calculate_weight``, fp32).

    Not the module's ``weight`` as it stands: clones of one model share its modules, and the clone
    ComfyUI loaded last (the patched model a sampler just ran) keeps its patches merged into them
    until another clone loads; ComfyUI's backup of the weights (shared by all clones) holds the
    checkpoint's own meanwhile."""
    weights = {}
    for key in keys:
        name = f"{key}.weight"
        saved = model_patcher.backup.get(name)
        weight = saved.weight if saved is not None else comfy.utils.get_attr(model_patcher.model, name)
        if name in model_patcher.patches:
            weight = comfy.lora.calculate_weight(model_patcher.patches[name],
                                                 weight.to(torch.float32, copy=True), name)
        weights[key] = weight.detach()
    return weights


def check_fit(model_patcher, atoms: sc.SparseAtoms) -> None:
    """Every layer of ``atoms`` exists in the model with the same weight shape, or a clear error
    naming the first mismatch (nothing is patched before this passes)."""
    layers = adaptable_layers(model_patcher)
    _, architecture = model_family(model_patcher)
    made_for = f" (they were made for {atoms.info.architecture})" if atoms.info.architecture else ""
    for key, layer in atoms.layers.items():
        module = layers.get(key)
        if module is None:
            raise ValueError(f"these atoms do not fit this {architecture} model{made_for}: layer "
                             f"{key!r} does not exist in it")
        if tuple(module.weight.shape) != tuple(layer.weight_shape):
            raise ValueError(f"these atoms do not fit this {architecture} model{made_for}: layer "
                             f"{key!r} has shape {tuple(module.weight.shape)}, the atoms expect "
                             f"{tuple(layer.weight_shape)}")


def apply_to_model(model_patcher, atoms: sc.SparseAtoms, strength: float):
    """A clone of the MODEL with ``W + strength * delta W`` patched into every layer of ``atoms``."""
    check_fit(model_patcher, atoms)
    patched = model_patcher.clone()
    patches = {f"{key}.weight": SparseAtomsAdapter(layer) for key, layer in atoms.layers.items()
               if layer.n_atoms}
    accepted = patched.add_patches(patches, strength)
    if len(accepted) != len(patches):
        missing = sorted(set(patches) - set(accepted))
        raise ValueError(f"the model refused the patch for {missing[0]!r}")
    return patched


def release(model_patcher) -> None:
    """Unload a (training) clone from ComfyUI's model management and drop its weight wrappers
    from the shared modules, so nothing of it lingers in the base model."""
    loaded = comfy.model_management.current_loaded_models
    for entry in list(loaded):
        if entry.model is model_patcher:
            entry.model_unload()
            loaded.remove(entry)
    for module in model_patcher.model.modules():
        functions = getattr(module, "weight_function", None)
        if functions:
            module.weight_function = [f for f in functions if not isinstance(f, AtomsWeightWrapper)]
