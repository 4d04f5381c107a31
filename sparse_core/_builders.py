"""Dictionaries built from a model's weights, before training.

Per weight ``W (out, in, *kernel)``, flattened to ``(out, in')``:

- ``svd``: the principal directions of ``W``. Atoms are the top left singular vectors, read-outs
  the matching right singular vectors; ``m <= min(out, in')``.
- ``sparse``: sparse dictionary learning on the columns of ``W`` (each input feature's weight
  vector is a signal in the output space): ``W ~ D.T @ A`` with few atoms per column, possibly
  overcomplete (``m > out``). Read-outs start from the codes ``A``.
- ``random``: orthonormal random atoms (random unit atoms when ``m > out``), random read-outs.

Atoms and read-outs are unit-norm rows; coefficients start at exactly zero, so an untrained update
is exactly zero. Signs are fixed (each atom's largest entry positive) so results are reproducible.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Callable

import torch

from ._atoms import AtomLayer, AtomsInfo, SparseAtoms
from ._checks import check_finite, check_int, check_positive_int
from ._dictionary import learn_dictionary

__all__ = ["DICTIONARY_METHODS", "build_layer", "build_atoms"]

DICTIONARY_METHODS = ("svd", "sparse", "random")


def build_layer(weight: torch.Tensor, n_atoms: int, method: str = "svd", *, seed: int = 0,
                n_iter: int = 10) -> AtomLayer:
    """A dictionary of ``n_atoms`` atoms for ``weight (out, in, *kernel)``; coefficients zero.

    ``n_iter`` bounds the dictionary-learning iterations of the ``sparse`` method.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.ndim < 2 or not weight.is_floating_point():
        raise ValueError(
            f"weight must be a floating-point matrix or conv kernel (ndim >= 2), got shape "
            f"{tuple(weight.shape)} and dtype {weight.dtype}"
        )
    if weight.numel() == 0:
        raise ValueError(f"weight is empty (shape {tuple(weight.shape)}): no directions to build "
                         "atoms from")
    check_positive_int("n_atoms", n_atoms)
    if method not in DICTIONARY_METHODS:
        raise ValueError(f"method must be one of {DICTIONARY_METHODS}, got {method!r}")
    matrix = weight.detach().reshape(weight.shape[0], -1).float()  # (out, in')
    check_finite("weight", matrix)
    out_features, in_features = matrix.shape
    generator = torch.Generator().manual_seed(seed)
    if method == "svd":
        atoms, readouts = _svd(matrix, n_atoms)
    elif method == "sparse":
        atoms, readouts = _sparse(matrix, n_atoms, seed, n_iter, generator)
    else:
        atoms = _random_directions(n_atoms, out_features, generator, orthonormal=True)
        readouts = _random_directions(n_atoms, in_features, generator, orthonormal=False)
    atoms, readouts = _fix_signs(atoms, readouts)
    device = weight.device
    return AtomLayer(
        atoms=atoms.to(device), readouts=readouts.to(device),
        coefficients=torch.zeros(n_atoms, device=device),
        index=torch.arange(n_atoms, device=device), weight_shape=tuple(weight.shape),
    )


def build_atoms(weights: Mapping[str, torch.Tensor], n_atoms: int, method: str = "svd", *,
                seed: int = 0, info: AtomsInfo | None = None, fit_to_layer: bool = False,
                progress: Callable[[int, int, str], None] | None = None) -> SparseAtoms:
    """Dictionaries for several weights ``{layer key: weight}``. Each layer's seed is derived
    from ``seed`` and its key, so a layer's atoms do not depend on which other layers are built.
    With ``fit_to_layer``, ``svd`` dictionaries of layers smaller than ``n_atoms`` get
    ``min(out, in')`` atoms instead of an error. ``progress(done, total, key)`` is called after
    each layer."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a mapping {{layer key: weight tensor}}, got "
                        f"{type(weights).__name__}")
    if not weights:
        raise ValueError("weights is empty: no layer to build a dictionary for")
    n_atoms, seed = check_positive_int("n_atoms", n_atoms), check_int("seed", seed)
    layers = {}
    for done, (key, weight) in enumerate(weights.items(), start=1):
        if not isinstance(key, str):
            raise TypeError(f"layer keys must be strings (module paths), got {type(key).__name__} "
                            f"{key!r}")
        count = n_atoms
        if fit_to_layer and method == "svd" and isinstance(weight, torch.Tensor) and weight.ndim >= 2:
            count = max(1, min(n_atoms, weight.shape[0], weight[0].numel()))
        try:
            layers[key] = build_layer(weight, count, method, seed=layer_seed(seed, key))
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {key!r}: {error}") from error
        if progress is not None:
            progress(done, len(weights), key)
    info = info if info is not None else AtomsInfo()
    info = AtomsInfo(info.architecture, method, info.prompt, dict(info.training))
    return SparseAtoms(layers, info)


def layer_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _svd(matrix: torch.Tensor, n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``n_atoms`` singular directions. A full SVD when the matrix is small or most of its
    directions are wanted; otherwise a randomized range finder with power iterations (Halko,
    Martinsson & Tropp, 2011) followed by the exact SVD of the small projected matrix, which is
    many times faster on large layers and exact up to the power iterations' accuracy."""
    rank_bound = min(matrix.shape)
    if n_atoms > rank_bound:
        raise ValueError(
            f"n_atoms={n_atoms} exceeds min(out, in)={rank_bound}, the most singular directions "
            f"a weight of shape {tuple(matrix.shape)} has; use method 'sparse' or 'random' for "
            "an overcomplete dictionary"
        )
    if rank_bound <= 256 or 4 * n_atoms >= rank_bound:
        U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
        return U[:, :n_atoms].T.contiguous(), Vh[:n_atoms].contiguous()
    generator = torch.Generator(device="cpu").manual_seed(0)
    sketch = torch.randn(matrix.shape[1], 2 * n_atoms + 8, generator=generator).to(matrix)
    basis = torch.linalg.qr(matrix @ sketch).Q  # (out, q): the range of W
    for _ in range(4):  # power iterations sharpen the top directions
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.T @ basis).Q).Q
    u, _, Vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)  # (q, in), small
    return (basis @ u[:, :n_atoms]).T.contiguous(), Vh[:n_atoms].contiguous()


def _sparse(matrix, n_atoms, seed, n_iter, generator):
    out_features, in_features = matrix.shape
    columns = matrix.T.contiguous()  # (in', out): one signal per input feature
    k = max(1, min(n_atoms, out_features) // 8)
    result = learn_dictionary(columns, n_atoms, n_nonzero_coefs=k, n_iter=n_iter, seed=seed)
    readouts = result.codes.T.contiguous()  # (m, in')
    norms = readouts.norm(dim=1)
    unused = norms <= torch.finfo(readouts.dtype).eps
    if bool(unused.any()):  # an atom no column uses still gets a read-out, so it can train
        readouts[unused] = _random_directions(int(unused.sum()), in_features, generator,
                                              orthonormal=False)
        norms = readouts.norm(dim=1)
    return result.atoms, readouts / norms[:, None]


def _random_directions(n: int, dim: int, generator, *, orthonormal: bool) -> torch.Tensor:
    gaussian = torch.randn(dim, n, generator=generator)
    if orthonormal and n <= dim:
        q, r = torch.linalg.qr(gaussian)
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()
    return (gaussian / gaussian.norm(dim=0)).T.contiguous()


def _fix_signs(atoms: torch.Tensor, readouts: torch.Tensor):
    """Flip (atom, read-out) pairs together so each atom's largest-magnitude entry is positive."""
    peak = atoms.gather(1, atoms.abs().argmax(1, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0)
    return atoms * sign, readouts * sign
