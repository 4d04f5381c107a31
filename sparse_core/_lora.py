"""LoRA interop: export atoms as a LoRA, and "atomize" a LoRA into atoms.

Export (exact, since ``delta W`` has rank <= the number of kept atoms), for layer key ``K``:

- ``diff``: ``K.diff = delta W`` (full matrix, weight-shaped);
- ``lora``: ``K.lora_up.weight = D.T @ diag(s)  (out, r)``, ``K.lora_down.weight = C (r, in')``,
  ``K.alpha = r`` (so the loader's scale ``alpha / r`` is 1); conv weights get the usual
  ``(out, r, 1, 1)`` / ``(r, in, kh, kw)`` shapes. Only atoms with non-zero coefficients are
  written; a layer without any is left out.

Atomize: each layer's ``delta W`` (from ``up @ down * alpha / rank`` or ``diff``) is factored by
SVD, ``delta W = U diag(sigma) V.T``; atoms are the columns of ``U``, read-outs the rows of ``V.T``
and coefficients ``sigma``. Keeping every atom reproduces ``delta W``; keeping the top ``k`` is the
best rank-``k`` approximation (Eckart-Young), so an imported LoRA prunes like trained atoms.
A low-rank LoRA is factored through QR of its factors, never as a full matrix.

Bad input is refused by name: non-tensor values (numpy arrays included), NaN or inf, factors that
are not matrices, rank 0, an ``alpha`` that is not one number, an export dtype that is not
floating point or that the values do not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch

from ._atoms import AtomLayer, AtomsInfo, SparseAtoms

__all__ = ["LowRankDelta", "to_lora", "atomize", "lora_deltas", "atomize_lora", "LORA_FORMATS"]

LORA_FORMATS = ("lora", "diff")


@dataclass
class LowRankDelta:
    """``delta W = up @ down`` reshaped to ``weight_shape``; ``up (out, r)``, ``down (r, in')``."""

    up: torch.Tensor
    down: torch.Tensor
    weight_shape: tuple[int, ...]


def to_lora(atoms: SparseAtoms, *, format: str = "lora",
            dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A LoRA state dict whose module names are the layer keys, tensors in ``dtype`` (floating
    point). Raises ``ValueError`` for atoms with NaN or inf and for values ``dtype`` cannot hold."""
    if not isinstance(atoms, SparseAtoms):
        raise TypeError(f"atoms must be SparseAtoms, got {type(atoms).__name__}")
    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {LORA_FORMATS}, got {format!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype (a LoRA stores real weights), "
                        f"got {dtype!r}")
    for key, layer in atoms.layers.items():
        for field in ("atoms", "readouts", "coefficients"):
            if not bool(torch.isfinite(getattr(layer, field)).all()):
                raise ValueError(f"layer {key!r}: {field} contains NaN or inf; nothing exported")
    state = _lora_state(atoms, format, dtype)
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"LoRA tensor {name!r} does not fit {dtype} (values overflow it); "
                             "export in float32")
    return state


def _lora_state(atoms: SparseAtoms, format: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unchecked :func:`to_lora`."""
    state = {}
    for key, layer in atoms.layers.items():
        active = layer.coefficients != 0
        if not bool(active.any()):
            continue
        if format == "diff":
            state[f"{key}.diff"] = layer.delta().to(dtype).contiguous()
            continue
        up, down = layer.select(active).factors()  # (out, r), (r, in'): delta W = up @ down
        rank = up.shape[1]
        kernel = layer.weight_shape[2:]
        if kernel:  # conv: kohya-style shapes, which every LoRA loader reshapes the same way
            up = up.reshape(up.shape[0], rank, *([1] * len(kernel)))
            down = down.reshape(rank, layer.weight_shape[1], *kernel)
        state[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        state[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    return state


def lora_deltas(state_dict: Mapping[str, torch.Tensor],
                weight_shapes: Mapping[str, tuple[int, ...]] | None = None
                ) -> dict[str, LowRankDelta | torch.Tensor]:
    """Each module's update from a LoRA state dict in the ``lora_up``/``lora_down``/``alpha`` or
    ``diff`` layout: a :class:`LowRankDelta` or a full weight-shaped tensor.

    ``weight_shapes`` (module -> weight shape) reshapes linear-looking factors of conv layers;
    without it the shape follows the factors.

    Raises ``TypeError`` for values that are not torch tensors (convert numpy arrays with
    ``torch.from_numpy``) and ``ValueError``, naming the tensor, for NaN or inf, factors that are
    not matrices, rank 0 and an ``alpha`` that is not one number.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of name -> tensor, got {type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        _check_lora_tensor(name, tensor)
    deltas: dict[str, LowRankDelta | torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name.endswith(".diff"):
            if tensor.ndim < 2:
                raise ValueError(f"LoRA tensor {name!r} must be weight-shaped (ndim >= 2), got "
                                 f"shape {tuple(tensor.shape)}")
            deltas[name[: -len(".diff")]] = tensor
    for name in state_dict:
        if not name.endswith(".lora_up.weight"):
            continue
        key = name[: -len(".lora_up.weight")]
        down_name = f"{key}.lora_down.weight"
        if down_name not in state_dict:
            raise ValueError(f"LoRA tensor {name!r} has no matching {down_name!r}")
        up = state_dict[name].float()
        down = state_dict[down_name].float()
        for factor_name, factor in ((name, up), (down_name, down)):
            if factor.ndim < 2:
                raise ValueError(f"LoRA tensor {factor_name!r} must be a matrix (or conv kernel), "
                                 f"got shape {tuple(factor.shape)}")
        rank = down.shape[0]
        if up.shape[1] != rank or math.prod(up.shape[1:]) != rank:
            raise ValueError(f"LoRA {key!r}: lora_up {tuple(up.shape)} does not match the rank "
                             f"{rank} of lora_down {tuple(down.shape)}")
        if rank == 0:
            raise ValueError(f"LoRA {key!r} has rank 0 (lora_down {tuple(down.shape)}): it "
                             "changes nothing")
        alpha = state_dict.get(f"{key}.alpha")
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"LoRA tensor '{key}.alpha' must hold one number, got shape "
                             f"{tuple(alpha.shape)}")
        scale = float(alpha) / rank if alpha is not None else 1.0
        shape = tuple(weight_shapes[key]) if weight_shapes and key in weight_shapes else (
            (up.shape[0], *down.shape[1:]))
        deltas[key] = LowRankDelta(up.reshape(up.shape[0], rank) * scale,
                                   down.reshape(rank, -1), shape)
    suffixes = (".diff", ".lora_up.weight", ".lora_down.weight", ".alpha")
    leftovers = [n for n in state_dict
                 if not any(n.endswith(s) and n[: -len(s)] in deltas for s in suffixes)]
    if leftovers:
        raise ValueError(f"LoRA tensor {leftovers[0]!r} is not in the lora_up/lora_down/alpha "
                         f"or diff layout ({len(leftovers)} such tensors)")
    return deltas


def atomize(deltas: Mapping[str, LowRankDelta | torch.Tensor], *, rtol: float = 1e-6,
            info: AtomsInfo | None = None) -> SparseAtoms:
    """Atoms with coefficients from each layer's update (see the module docstring). Singular
    values below ``rtol * sigma_max`` are dropped as numerical zeros."""
    layers = {}
    for key, delta in deltas.items():
        parts = (delta.up, delta.down) if isinstance(delta, LowRankDelta) else (delta,)
        if not all(isinstance(part, torch.Tensor) for part in parts):
            raise TypeError(f"delta for {key!r} must be a LowRankDelta of tensors or a tensor")
        if not all(bool(torch.isfinite(part).all()) for part in parts):
            raise ValueError(f"delta for {key!r} contains NaN or inf")
        if isinstance(delta, LowRankDelta):
            if delta.up.ndim != 2 or delta.down.ndim != 2 or delta.up.shape[1] != delta.down.shape[0]:
                raise ValueError(f"delta for {key!r}: up {tuple(delta.up.shape)} and down "
                                 f"{tuple(delta.down.shape)} must be (out, r) and (r, in')")
            if delta.down.shape[0] == 0:
                raise ValueError(f"delta for {key!r} has rank 0: it changes nothing")
            U, sigma, Vh = _low_rank_svd(delta.up.double(), delta.down.double())
            shape = tuple(delta.weight_shape)
        elif isinstance(delta, torch.Tensor) and delta.ndim >= 2:
            U, sigma, Vh = torch.linalg.svd(delta.double().reshape(delta.shape[0], -1),
                                            full_matrices=False)
            shape = tuple(delta.shape)
        else:
            raise TypeError(f"delta for {key!r} must be a LowRankDelta or a weight-shaped tensor")
        if U.shape[0] != shape[0] or Vh.shape[1] != math.prod(shape[1:]):
            raise ValueError(f"delta for {key!r} does not match weight shape {shape}")
        largest = float(sigma.max()) if sigma.numel() else 0.0
        if largest > _FLOAT32_MAX:
            raise ValueError(f"delta for {key!r} is too large for float32 atoms (its largest "
                             f"singular value is {largest:.3g}); the LoRA's factors are out of range")
        keep = sigma > rtol * largest
        U, sigma, Vh = U[:, keep], sigma[keep], Vh[keep]
        layers[key] = AtomLayer(
            atoms=U.T.float().contiguous(), readouts=Vh.float().contiguous(),
            coefficients=sigma.float(), index=torch.arange(int(sigma.numel())), weight_shape=shape,
        )
    if not layers:
        raise ValueError("no layer to atomize: the LoRA has no lora_up/lora_down or diff tensors")
    if not any(layer.n_atoms for layer in layers.values()):
        raise ValueError(f"every update is zero ({len(layers)} layers; an alpha of 0?): the LoRA "
                         "changes nothing, so there are no atoms")
    info = info if info is not None else AtomsInfo(dictionary_method="lora")
    return SparseAtoms(layers, info)


def atomize_lora(state_dict: Mapping[str, torch.Tensor], **kwargs) -> SparseAtoms:
    """:func:`atomize` of :func:`lora_deltas`."""
    shapes = kwargs.pop("weight_shapes", None)
    return atomize(lora_deltas(state_dict, shapes), **kwargs)


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _check_lora_tensor(name, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        hint = " (convert numpy arrays with torch.from_numpy)" if hasattr(tensor, "__array__") else ""
        raise TypeError(f"LoRA tensor {name!r} must be a torch.Tensor, got "
                        f"{type(tensor).__module__}.{type(tensor).__name__}{hint}")
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(f"LoRA tensor {name!r} must hold real numbers, got dtype {tensor.dtype}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"LoRA tensor {name!r} contains NaN or inf")


def _low_rank_svd(up: torch.Tensor, down: torch.Tensor):
    """SVD of ``up @ down`` via QR of both factors: ``up = Qu Ru``, ``down.T = Qd Rd``, so
    ``up @ down = Qu (Ru Rd.T) Qd.T`` and only an ``r x r`` matrix is decomposed."""
    Qu, Ru = torch.linalg.qr(up)
    Qd, Rd = torch.linalg.qr(down.T)
    u, sigma, vh = torch.linalg.svd(Ru @ Rd.T)
    return Qu @ u, sigma, vh @ Qd.T
