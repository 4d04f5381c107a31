"""The atom adapter: a whole model's sparse weight updates.

For a frozen weight ``W (out, in, *kernel)`` a layer holds ``m`` atoms::

    atoms        D (m, out)   output-feature directions (unit norm)
    readouts     C (m, in')   which input features drive each atom, in' = in * prod(kernel)
    coefficients s (m,)       sparse; zero at initialisation
    index          (m,)       each atom's id in the layer's dictionary (survives masking)
    effect         (m,)       optional: each atom's measured effect (>= 0), or None

    delta W = D.T @ diag(s) @ C          (reshaped to W's shape)

so the change of the layer's output is ``sum_i s_i (c_i . x) d_i``: a sparse combination of atoms.
:meth:`AtomLayer.factors` is the one source of ``delta W``: :meth:`AtomLayer.delta` multiplies
them out (training's weight wrappers, export, importance), patching merges them into the weight.

An atom's **importance** is its measured **effect** (``AtomLayer.effect``): how much the model's
prediction on calibration data changes when the atom is removed (see :mod:`sparse_core._effects`).
Atoms without measured effects fall back to the **weight norm** ``|s_i| * ||d_i|| * ||c_i||`` (the
Frobenius norm of the atom's share of ``delta W``), which does not predict what an atom does across
layers whose outputs enter the network differently; :attr:`SparseAtoms.importance_kind` says which
one is in use. One ranking (:meth:`SparseAtoms.ranking`) serves density, top-k, budgets, masks and
the heat-map. Masking keeps any subset of atoms (rows), so an atom keeps its identity
``(layer key, index)``; people see it as ``L{layer number}[{index}]``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from dataclasses import dataclass, field, replace
from typing import Iterator, Mapping

import numpy as np
import torch

from ._checks import check_int

__all__ = ["AtomLayer", "AtomsInfo", "AtomRanking", "SparseAtoms"]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """fp64 stays fp64; everything else is computed in fp32 (half-precision products of many
    small atoms lose the small ones)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


@dataclass
class AtomLayer:
    """The atoms of one adapted weight. See the module docstring for the shapes."""

    atoms: torch.Tensor
    readouts: torch.Tensor
    coefficients: torch.Tensor
    index: torch.Tensor
    weight_shape: tuple[int, ...]
    effect: torch.Tensor | None = None

    def __post_init__(self):
        self.weight_shape = tuple(int(n) for n in self.weight_shape)
        out_features, in_features = self.out_features, self.in_features
        m = self.atoms.shape[0] if self.atoms.ndim == 2 else -1
        expected = {
            "atoms": (m, out_features),
            "readouts": (m, in_features),
            "coefficients": (m,),
            "index": (m,),
        }
        for name, shape in expected.items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape} for a weight of shape {self.weight_shape}, "
                    f"got {tuple(value.shape)}"
                )
        for name in ("atoms", "readouts", "coefficients"):
            if not getattr(self, name).is_floating_point():
                raise TypeError(f"{name} must be floating point, got {getattr(self, name).dtype}")
        names = ("atoms", "readouts", "coefficients")
        finite = torch.stack([torch.isfinite(getattr(self, name).detach()).all().cpu()
                              for name in names])
        if not bool(finite.all()):  # one check of all three (on a GPU: one synchronisation)
            name = names[int((~finite).nonzero()[0])]
            value = getattr(self, name).detach()
            raise ValueError(f"{name} contains NaN or inf "
                             f"({int((~torch.isfinite(value)).sum())} entries)")
        if self.index.dtype != torch.int64:
            raise TypeError(f"index must be int64, got {self.index.dtype}")
        if self.effect is not None:
            if not isinstance(self.effect, torch.Tensor) or not self.effect.is_floating_point():
                raise TypeError(f"effect must be a floating-point torch.Tensor or None, got "
                                f"{getattr(self.effect, 'dtype', type(self.effect).__name__)}")
            if tuple(self.effect.shape) != (m,):
                raise ValueError(f"effect must have shape ({m},), got {tuple(self.effect.shape)}")
            effect = self.effect.detach()
            if effect.numel() and not bool((torch.isfinite(effect) & (effect >= 0)).all()):
                raise ValueError("effect must be finite and >= 0")

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return math.prod(self.weight_shape[1:])

    @property
    def n_atoms(self) -> int:
        return int(self.atoms.shape[0])

    def factors(self, device=None, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(up (out, m), down (m, in'))`` with ``delta W = up @ down``: ``up = D.T`` and
        ``down = diag(s) @ C``. The small factors are moved to ``device`` first and cast to
        ``dtype`` (default fp32, fp64 stays fp64: products of many small atoms in half precision
        lose the small ones), so ``delta W`` is only ever built where it is used. Differentiable."""
        dtype = dtype or _compute_dtype(self.atoms)
        up = self.atoms.to(device=device, dtype=dtype).T  # (out, m)
        down = (self.readouts.to(device=device, dtype=dtype)
                * self.coefficients.to(device=device, dtype=dtype)[:, None])  # (m, in')
        return up, down

    def delta(self, device=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``delta W = D.T @ diag(s) @ C`` with the weight's shape, built on ``device`` in ``dtype``
        from :meth:`factors` (the one source of ``delta W``); callers cast the result to
        the weight's dtype."""
        up, down = self.factors(device, dtype)
        return (up @ down).reshape(self.weight_shape)  # (out, in') -> weight_shape

    def importance(self) -> torch.Tensor:
        """The measured effect ``(m,)`` when there is one, else :meth:`weight_norm`. An atom whose
        coefficient is 0 changes nothing, so its importance is 0 whatever effect is stored for it
        (a file may carry effects measured before pruning)."""
        if self.effect is not None:
            effect = self.effect.detach().to(_compute_dtype(self.atoms))
            return torch.where(self.coefficients.detach().to(effect.device) != 0, effect, 0.0)
        return self.weight_norm()

    def weight_norm(self) -> torch.Tensor:
        """``|s_i| * ||d_i|| * ||c_i||`` ``(m,)`` in fp32 (fp64 stays fp64)."""
        dtype = _compute_dtype(self.atoms)
        return (
            self.coefficients.detach().to(dtype).abs()
            * self.atoms.detach().to(dtype).norm(dim=1)
            * self.readouts.detach().to(dtype).norm(dim=1)
        )

    def select(self, keep: torch.Tensor) -> "AtomLayer":
        """The atoms where ``keep (m,)`` is True, with their ids."""
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
            raise TypeError(f"keep must be a bool tensor, got {type(keep).__name__}")
        if tuple(keep.shape) != (self.n_atoms,):
            raise ValueError(f"keep must have shape ({self.n_atoms},), got {tuple(keep.shape)}")
        keep = keep.to(self.atoms.device)
        effect = None if self.effect is None else self.effect[keep.to(self.effect.device)]
        return AtomLayer(self.atoms[keep], self.readouts[keep], self.coefficients[keep],
                         self.index[keep], self.weight_shape, effect)

    def map_tensors(self, fn) -> "AtomLayer":
        """A layer whose float tensors are ``fn(tensor)`` (e.g. a device or dtype move); the
        effects stay float32 on the coefficients' device."""
        coefficients = fn(self.coefficients)
        effect = None if self.effect is None else fn(self.effect).to(torch.float32)
        return AtomLayer(fn(self.atoms), fn(self.readouts), coefficients,
                         self.index.to(coefficients.device), self.weight_shape, effect)


@dataclass
class AtomsInfo:
    """Provenance saved with the atoms: what model, how the dictionary was built, how trained."""

    architecture: str = ""
    dictionary_method: str = ""
    prompt: str = ""
    training: dict = field(default_factory=dict)
    effects: dict = field(default_factory=dict)  # how the stored effects were measured


@dataclass
class AtomRanking:
    """All atoms of a model sorted by importance, most important first.

    ``layer[i]`` is a position in ``keys``, ``position[i]`` a row in that layer, ``atom_id[i]`` the
    atom's id in its dictionary; all ``(N,)``.
    """

    keys: list[str]
    layer: torch.Tensor
    position: torch.Tensor
    atom_id: torch.Tensor
    importance: torch.Tensor

    def label(self, i: int) -> str:
        return f"L{int(self.layer[i])}[{int(self.atom_id[i])}]"


class SparseAtoms:
    """A model's atoms: an ordered mapping ``layer key -> AtomLayer`` plus :class:`AtomsInfo`.

    Layer keys are the adapted weights' names without ``.weight`` (for ComfyUI models, e.g.
    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k``). The layer number shown
    to people (``L{n}``) is the key's position in this mapping.
    """

    def __init__(self, layers: Mapping[str, AtomLayer], info: AtomsInfo | None = None):
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping of key -> AtomLayer, got {type(layers).__name__}")
        for key, layer in layers.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"layer keys must be non-empty strings, got {key!r}")
            if not isinstance(layer, AtomLayer):
                raise TypeError(f"layer {key!r} must be an AtomLayer, got {type(layer).__name__}")
        self.layers: dict[str, AtomLayer] = dict(layers)
        self.info = info if info is not None else AtomsInfo()

    # -- mapping ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __getitem__(self, key: str) -> AtomLayer:
        try:
            return self.layers[key]
        except KeyError:
            raise KeyError(f"no layer {key!r} in these atoms ({len(self)} layers)") from None

    def keys(self) -> list[str]:
        return list(self.layers)

    def layer_number(self, key: str) -> int:
        return self.keys().index(key)

    def label(self, key: str, atom_id: int) -> str:
        """``L{layer number}[{atom id}]``, the name people use for an atom."""
        return f"L{self.layer_number(key)}[{int(atom_id)}]"

    # -- counts ----------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return sum(layer.n_atoms for layer in self.layers.values())

    @property
    def n_active(self) -> int:
        """Atoms with a non-zero coefficient (the ones that change the model)."""
        return sum(int((layer.coefficients != 0).sum()) for layer in self.layers.values())

    def n_parameters(self, *, atoms: bool = True, readouts: bool = True,
                     coefficients: bool = True) -> int:
        """Number of stored (or, with flags, trainable) scalars."""
        total = 0
        for layer in self.layers.values():
            total += coefficients * layer.coefficients.numel()
            total += atoms * layer.atoms.numel() + readouts * layer.readouts.numel()
        return int(total)

    def fingerprint(self) -> str:
        """Identity of the adapted layers (names and weight shapes), not of the values: atoms
        built for one model match any file trained or masked from them."""
        listing = json.dumps([[key, list(layer.weight_shape)] for key, layer in self.layers.items()])
        return hashlib.sha256(listing.encode()).hexdigest()

    # -- the update ------------------------------------------------------------------------
    def delta(self, key: str) -> torch.Tensor:
        """``delta W`` of one layer (see :meth:`AtomLayer.delta`)."""
        return self[key].delta()

    @property
    def importance_kind(self) -> str:
        """``"effect"`` when every layer with atoms has measured effects, else ``"weight norm"``
        (one definition for the whole model: effects and weight norms are not comparable)."""
        layers = [layer for layer in self.layers.values() if layer.n_atoms]
        if layers and all(layer.effect is not None for layer in layers):
            return "effect"
        return "weight norm"

    def importance(self) -> dict[str, torch.Tensor]:
        """``{key: importance (m,)}`` of the kind :attr:`importance_kind` names."""
        use_effect = self.importance_kind == "effect"
        return {key: layer.importance() if use_effect else layer.weight_norm()
                for key, layer in self.layers.items()}

    def without_effects(self) -> "SparseAtoms":
        """The same atoms with no stored effects (after they change, e.g. by training)."""
        layers = {key: replace(layer, effect=None) for key, layer in self.layers.items()}
        return SparseAtoms(layers, replace(self.info, effects={}))

    def ranking(self, scores: Mapping[str, torch.Tensor] | None = None) -> AtomRanking:
        """Every atom of the model, most important first; ties keep layer then row order.
        ``scores`` (``{key: (m,)}`` for every layer) ranks by other values than the importance
        (the trainer's budget ranks by accumulated Taylor scores)."""
        keys = self.keys()
        parts = [value.detach().cpu().double() for value in self._scores(scores).values()]
        importance = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        layer = torch.cat([torch.full((len(p),), n, dtype=torch.long) for n, p in enumerate(parts)]
                          ) if parts else torch.zeros(0, dtype=torch.long)
        position = torch.cat([torch.arange(len(p)) for p in parts]) if parts else layer.clone()
        atom_id = torch.cat([lay.index.cpu() for lay in self.layers.values()]) if parts else layer.clone()
        order = torch.sort(-importance, stable=True).indices
        return AtomRanking(keys, layer[order], position[order], atom_id[order], importance[order])

    # -- masks -----------------------------------------------------------------------------
    def select(self, keep: Mapping[str, torch.Tensor]) -> "SparseAtoms":
        """Keep the atoms where ``keep[key] (m,)`` is True; layers missing from ``keep`` are kept
        whole. Unknown keys are an error."""
        unknown = [key for key in keep if key not in self.layers]
        if unknown:
            raise KeyError(f"mask names layer {unknown[0]!r}, which these atoms do not have")
        layers = {
            key: layer.select(keep[key]) if key in keep else layer
            for key, layer in self.layers.items()
        }
        return SparseAtoms(layers, self.info)

    def _scores(self, scores: Mapping[str, torch.Tensor] | None) -> Mapping[str, torch.Tensor]:
        if scores is None:
            return self.importance()
        for key, layer in self.layers.items():
            if key not in scores or tuple(scores[key].shape) != (layer.n_atoms,):
                raise ValueError(f"scores must give ({layer.n_atoms},) values for layer {key!r}")
        return {key: scores[key] for key in self.layers}

    def top_k_mask(self, k: int, *, per_layer: bool = False,
                   scores: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Masks keeping the ``k`` most important atoms of the model (or of each layer); by
        ``scores`` instead of the importance when given (see :meth:`ranking`)."""
        k = check_int("k", k)
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        if per_layer:
            masks = {}
            for key, importance in self._scores(scores).items():
                mask = torch.zeros(len(importance), dtype=torch.bool)
                order = torch.sort(-importance.detach().cpu(), stable=True).indices
                mask[order[:k]] = True
                masks[key] = mask
            return masks
        ranking = self.ranking(scores)
        masks = {key: torch.zeros(layer.n_atoms, dtype=torch.bool) for key, layer in self.layers.items()}
        keys = ranking.keys
        for layer_no, position in zip(ranking.layer[:k].tolist(), ranking.position[:k].tolist()):
            masks[keys[layer_no]][position] = True
        return masks

    def top_k(self, k: int, *, per_layer: bool = False) -> "SparseAtoms":
        return self.select(self.top_k_mask(k, per_layer=per_layer))

    def density_mask(self, density: float, *, per_layer: bool = False) -> dict[str, torch.Tensor]:
        """Masks keeping the top ``ceil(density * N)`` atoms by importance, ``N`` counted over the
        model (or per layer)."""
        if isinstance(density, (bool, np.bool_)) or not isinstance(density, numbers.Real):
            raise TypeError(f"density must be a number in [0, 1], got {type(density).__name__}")
        density = float(density)
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {density}")
        if per_layer:
            masks = {}
            for key, importance in self.importance().items():
                order = torch.sort(-importance.cpu(), stable=True).indices
                mask = torch.zeros(len(importance), dtype=torch.bool)
                mask[order[: math.ceil(density * len(importance))]] = True
                masks[key] = mask
            return masks
        return self.top_k_mask(math.ceil(density * self.n_atoms))

    def density(self, density: float, *, per_layer: bool = False) -> "SparseAtoms":
        return self.select(self.density_mask(density, per_layer=per_layer))

    # -- tensors ---------------------------------------------------------------------------
    def map_tensors(self, fn) -> "SparseAtoms":
        return SparseAtoms({k: layer.map_tensors(fn) for k, layer in self.layers.items()}, self.info)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "SparseAtoms":
        return self.map_tensors(lambda t: t.to(device=device, dtype=dtype))

    def clone(self) -> "SparseAtoms":
        return SparseAtoms(
            {k: layer.map_tensors(lambda t: t.detach().clone()) for k, layer in self.layers.items()},
            replace(self.info, training=dict(self.info.training), effects=dict(self.info.effects)),
        )

    def __repr__(self) -> str:
        return (f"SparseAtoms({len(self)} layers, {self.n_atoms} atoms, {self.n_active} active, "
                f"architecture={self.info.architecture!r})")
