"""Atoms on a plain ``torch.nn.Module`` (outside ComfyUI, whose model patcher does this there).

Layer keys are module names, optionally behind a ``prefix`` (ComfyUI names a diffusion model's
layers ``diffusion_model.<module>``, so atoms trained here load there unchanged).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from ._atoms import SparseAtoms

__all__ = ["linear_weights", "patched_weights", "apply_atoms"]


def linear_weights(module: torch.nn.Module, pattern: str = ".*", *,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """``{prefix + module name: weight}`` of the linear and convolution layers whose prefixed name
    matches ``pattern`` (``re.search``)."""
    regex = re.compile(pattern)
    found = {}
    for name, child in module.named_modules():
        weight = getattr(child, "weight", None)
        if isinstance(child, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)) and weight is not None:
            key = prefix + name
            if regex.search(key):
                found[key] = weight
    return found


def patched_weights(module: torch.nn.Module, atoms: SparseAtoms, strength: float = 1.0, *,
                    prefix: str = "") -> dict[str, torch.Tensor]:
    """``{parameter name: W + strength * delta W}`` for ``torch.func.functional_call``;
    differentiable with respect to the atoms (the training path)."""
    parameters = dict(module.named_parameters())
    patched = {}
    for key in atoms:
        name = _parameter_name(key, prefix)
        if name not in parameters:
            raise KeyError(f"atoms layer {key!r} has no weight {name!r} in this module")
        weight = parameters[name]
        patched[name] = weight + (strength * atoms.delta(key)).to(weight.dtype)
    return patched


@contextlib.contextmanager
def apply_atoms(module: torch.nn.Module, atoms: SparseAtoms, strength: float = 1.0, *,
                prefix: str = "") -> Iterator[torch.nn.Module]:
    """Merge ``W += strength * delta W`` in place for the block's duration, then restore the
    original weights bit-exactly (from a copy, not by subtraction)."""
    parameters = dict(module.named_parameters())
    backups = {}
    try:
        with torch.no_grad():
            for key in atoms:
                name = _parameter_name(key, prefix)
                if name not in parameters:
                    raise KeyError(f"atoms layer {key!r} has no weight {name!r} in this module")
                weight = parameters[name]
                backups[name] = weight.detach().clone()
                weight.add_((strength * atoms.delta(key)).to(weight.dtype))
        yield module
    finally:
        with torch.no_grad():
            for name, original in backups.items():
                parameters[name].copy_(original)


def _parameter_name(key: str, prefix: str) -> str:
    if prefix and not key.startswith(prefix):
        raise KeyError(f"atoms layer {key!r} does not start with {prefix!r}")
    return key[len(prefix):] + ".weight"
