"""Sparse dictionary learning by approximate K-SVD.

Problem::

    minimize_{D, A}  ||X - A @ D||_F^2   subject to   ||a_i||_0 <= n_nonzero_coefs  (OMP codes)
                                          or  + alpha * ||A||_1                     (lasso codes)
    with unit-norm atoms (rows of D).

Each iteration codes every signal over the current atoms (batched :func:`omp` or :func:`lasso`),
then updates the atoms one at a time on the signals that use them (Aharon, Elad & Bruckstein,
2006, *K-SVD*; the single power step of Rubinstein, Zibulevsky & Elad, 2008): with ``E`` the
residual of those signals without atom ``j`` and ``g`` their coefficients on it,
``d_j <- E.T @ g / ||E.T @ g||`` and ``g <- E @ d_j``. Atoms that no signal uses, and atoms that
duplicate another (``|cos| > 0.99``), are replaced by the worst-represented signals; the signals
that used a replaced atom drop it from their codes, so the codes always match the atoms.
Signals are scaled by a power of two first (exact), so no magnitude overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import (
    check_finite,
    check_matrix,
    check_nonnegative_float,
    check_not_empty,
    check_positive_int,
    compute_dtype,
    power_of_two_exponent,
    times_power_of_two,
    unscale_codes,
)
from ._lasso import lasso
from ._omp import omp

__all__ = ["DictionaryLearningResult", "learn_dictionary"]

_DUPLICATE_COSINE = 0.99


@dataclass
class DictionaryLearningResult:
    """What :func:`learn_dictionary` returns.

    Attributes:
        atoms: ``(n_components, n_features)``, unit-norm rows.
        codes: ``(n_samples, n_components)``, the codes of ``X`` over the returned atoms (after
            the last atom update and replacement).
        errors: ``(n_iter,)``, relative squared residual ``||X - A D||^2 / ||X||^2`` after each
            iteration; the last one is that of the returned atoms and codes.
        n_replaced: atoms replaced (unused or duplicate) over all iterations.
    """

    atoms: torch.Tensor
    codes: torch.Tensor
    errors: torch.Tensor
    n_replaced: int

    @property
    def n_iter(self) -> int:
        return int(self.errors.numel())


def learn_dictionary(
    X: torch.Tensor,
    n_components: int,
    *,
    n_nonzero_coefs: int | None = None,
    alpha: float | None = None,
    n_iter: int = 30,
    tol: float = 0.0,
    init: torch.Tensor | None = None,
    seed: int = 0,
    callback=None,
) -> DictionaryLearningResult:
    """Learn ``n_components`` unit-norm atoms that sparsely code the rows of ``X``.

    Args:
        X: signals ``(n_samples, n_features)``.
        n_components: number of atoms; may exceed ``n_features`` (overcomplete).
        n_nonzero_coefs: code with OMP at this many atoms per signal (the default, with
            ``max(1, min(n_components, n_features) // 10)``).
        alpha: code with the lasso at this l1 weight instead (give one of the two).
        n_iter: coding + update rounds.
        tol: stop early when the relative error improves by less than this fraction.
        init: optional initial atoms ``(n_components, n_features)``; by default distinct random
            signals (normalised), drawn with ``seed``.
        seed: seeds the initialisation and the replacement of unused atoms.
        callback: optional ``callback(iteration, atoms, error)`` after each iteration; returning
            ``True`` stops the learning there.

    Returns:
        :class:`DictionaryLearningResult`.
    """
    check_matrix("X", X)
    check_not_empty("X", X, 0, "signals (rows)")
    check_not_empty("X", X, 1, "features (columns)")
    check_finite("X", X)
    n_samples, n_features = X.shape
    check_positive_int("n_components", n_components)
    n_iter = check_positive_int("n_iter", n_iter)
    tol = check_nonnegative_float("tol", tol)
    if n_nonzero_coefs is not None and alpha is not None:
        raise ValueError(
            f"give n_nonzero_coefs (OMP) or alpha (lasso), not both; got n_nonzero_coefs="
            f"{n_nonzero_coefs}, alpha={alpha}"
        )
    if alpha is None:
        if n_nonzero_coefs is None:
            n_nonzero_coefs = max(1, min(n_components, n_features) // 10)
        check_positive_int("n_nonzero_coefs", n_nonzero_coefs,
                           upper=min(n_components, n_features),
                           upper_name=f"min(n_components={n_components}, n_features={n_features})")
    else:
        alpha = check_nonnegative_float("alpha", alpha)
    if init is not None:
        check_matrix("init", init, n_cols=n_features, cols_of="X (n_features)")
        check_finite("init", init)
        if init.shape[0] != n_components:
            raise ValueError(f"init must have n_components={n_components} rows, got {tuple(init.shape)}")

    dtype = compute_dtype(X)
    exponent = power_of_two_exponent(X)
    signals = times_power_of_two(X.to(dtype), -exponent)  # exact; codes scale back at the end
    generator = torch.Generator().manual_seed(seed)
    atoms = _initial_atoms(signals, n_components, init, generator)
    total = float((signals * signals).sum()) or 1.0
    errors, replaced = [], 0
    for iteration in range(n_iter):
        if alpha is None:
            codes = omp(signals, atoms, n_nonzero_coefs)
        else:
            codes = lasso(signals, atoms, alpha)
        residual = signals - codes @ atoms
        unused = _update_atoms(signals, atoms, codes, residual)
        replaced += _replace_atoms(atoms, codes, residual, unused, generator)
        error = float((residual * residual).sum()) / total
        errors.append(error)
        if callback is not None and callback(iteration, atoms, error):
            break
        if tol and len(errors) > 1 and errors[-2] - error <= tol * errors[-2]:
            break
    return DictionaryLearningResult(
        atoms=atoms.to(X.dtype), codes=unscale_codes(codes, exponent, X.dtype),
        errors=torch.tensor(errors, dtype=torch.float64), n_replaced=replaced,
    )


def _initial_atoms(signals, n_components, init, generator) -> torch.Tensor:
    """Distinct random signals, normalised; random directions where signals run out or vanish."""
    n_samples, n_features = signals.shape
    if init is not None:
        atoms = init.to(signals.dtype).clone()
    else:
        picks = torch.randperm(n_samples, generator=generator)[:n_components].to(signals.device)
        atoms = torch.randn(n_components, n_features, generator=generator, dtype=signals.dtype)
        atoms = atoms.to(signals.device)
        atoms[: len(picks)] = signals[picks]
    norms = atoms.norm(dim=1, keepdim=True)
    weak = norms.squeeze(1) <= torch.finfo(signals.dtype).eps
    if bool(weak.any()):
        fresh = torch.randn(int(weak.sum()), n_features, generator=generator, dtype=signals.dtype)
        atoms[weak] = fresh.to(signals.device)
        norms = atoms.norm(dim=1, keepdim=True)
    return atoms / norms


def _update_atoms(signals, atoms, codes, residual) -> torch.Tensor:
    """One approximate K-SVD sweep, in place on ``atoms``, ``codes`` and ``residual``.

    Returns a bool mask ``(n_components,)`` of atoms no signal uses (or whose update vanished).
    """
    n_components = atoms.shape[0]
    user, atom = codes.nonzero(as_tuple=True)  # sorted by signal
    order = torch.argsort(atom, stable=True)
    user, atom = user[order], atom[order]  # grouped by atom
    weights = codes[user, atom]  # (nnz,) each atom's coefficients, in its group
    new_weights = torch.empty_like(weights)
    counts = torch.bincount(atom, minlength=n_components)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    tiny = torch.finfo(atoms.dtype).tiny
    for j in range(n_components):
        start, end = bounds[j], bounds[j + 1]
        if start == end:
            continue
        users, g = user[start:end], weights[start:end]
        # (addcmul_ of a column by a row: several times faster than addr_ on CPU)
        errors = residual.index_select(0, users).addcmul_(g[:, None], atoms[j][None, :])  # (u, d)
        direction = errors.T @ g
        direction /= direction.norm().clamp_min(tiny)
        g_new = torch.mv(errors, direction, out=new_weights[start:end])
        residual.index_copy_(0, users, errors.addcmul_(g_new[:, None], direction[None, :], value=-1))
        atoms[j] = direction
    codes[user, atom] = new_weights
    return (counts == 0) | (atoms.norm(dim=1) < 0.5)


def _replace_atoms(atoms, codes, residual, unused, generator) -> int:
    """Replace unused atoms and near-duplicates by the worst-represented signals, in place on
    ``atoms (m, d)``, ``codes (n, m)`` and ``residual (n, d)``.

    A replaced atom that signals still use (a near-duplicate) leaves their codes first: its share
    ``codes[:, j] d_j`` goes back into their residual, so ``residual = X - codes @ atoms`` holds
    after the replacement too.
    """
    cosines = (atoms @ atoms.T).abs().triu_(diagonal=1)
    duplicate = (cosines > _DUPLICATE_COSINE).any(0)
    replace = (unused | duplicate).nonzero().squeeze(1)
    if replace.numel() == 0:
        return 0
    count = min(replace.numel(), residual.shape[0])
    replace = replace[:count]
    # New atoms from the residuals as they were (a signal that loses a duplicate below would
    # otherwise seed the duplicate's direction again).
    worst = (residual * residual).sum(1).topk(count).indices
    fresh = residual[worst]
    norms = fresh.norm(dim=1, keepdim=True)
    noise = torch.randn(fresh.shape, generator=generator, dtype=fresh.dtype).to(fresh.device)
    fresh = torch.where(norms > torch.finfo(fresh.dtype).eps, fresh, noise)
    residual.addmm_(codes[:, replace], atoms[replace])  # (n, r) @ (r, d)
    codes[:, replace] = 0
    atoms[replace] = fresh / fresh.norm(dim=1, keepdim=True)
    return count
