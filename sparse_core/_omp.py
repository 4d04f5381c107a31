"""Batched orthogonal matching pursuit (OMP) on a precomputed Gram matrix.

Problem, per signal ``x`` (a row of ``X``)::

    minimize_a  ||x - a @ D||_2^2   subject to   ||a||_0 <= n_nonzero_coefs

solved greedily: pick the atom most correlated with the residual, re-fit all picked atoms by least
squares, repeat. This is "Batch-OMP" (Rubinstein, Zibulevsky & Elad, 2008, *Efficient
implementation of the K-SVD algorithm using Batch Orthogonal Matching Pursuit*), run for all
signals of a chunk at once.

The least-squares re-fit never solves a system from scratch. With ``G = D @ D.T`` and the picked
set ``I``, keep the Cholesky factor ``G[I, I] = L @ L.T`` and the matrix ``U = G[:, I] @ L^-T``
(one row per atom). Then

- the new row of ``L`` for a newly picked atom ``j`` is simply ``U[j]`` (because ``U[I] = L``);
- ``z = L^-1 @ Xy[I]`` grows by one entry per step;
- the correlations with the residual are ``Xy - U @ z`` and shrink by one rank-1 update per step;
- the coefficients come from one triangular solve at the end, ``L.T @ a[I] = z``;
- the squared residual norm is ``||x||^2 - ||z||^2``, which gives the ``tol`` stopping rule free.

Conventions follow scikit-learn: signals are rows ``X (n_samples, n_features)``, atoms are rows
``D (n_components, n_features)``, codes are ``A (n_samples, n_components)`` with ``X ≈ A @ D``.
"""

from __future__ import annotations

import warnings

import torch

from ._cholesky import BatchedCholesky
from ._select import argmax_abs
from ._checks import (
    check_chunk_size,
    check_finite,
    check_matrix,
    check_nonnegative_float,
    check_not_empty,
    check_positive_int,
    check_same_device,
    compute_dtype,
    gram_scaling,
    power_of_two_exponent,
    scaled_float,
    times_power_of_two,
    unscale_codes,
)

__all__ = ["omp", "omp_gram"]

# Budget for one chunk's largest buffer, ``U (chunk, k, n_components)``. The per-step work streams
# ``U`` once (memory-bound either way), so big chunks win by amortising the per-step overhead.
_CHUNK_BYTES = 128 * 2**20


def omp(
    X: torch.Tensor,
    dictionary: torch.Tensor,
    n_nonzero_coefs: int,
    *,
    tol: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sparse codes of ``X`` over ``dictionary`` by orthogonal matching pursuit.

    Args:
        X: signals, ``(n_samples, n_features)``.
        dictionary: atoms as rows, ``(n_components, n_features)``. Atoms need not be unit-norm;
            selection uses raw correlations as scikit-learn does.
        n_nonzero_coefs: at most this many non-zero coefficients per signal
            (``1 <= n_nonzero_coefs <= min(n_components, n_features)``).
        tol: optional; a signal stops early once its squared residual norm is ``<= tol``.
        chunk_size: signals solved together (a positive int); by default sized so the work
            buffers stay small.

    Returns:
        codes ``(n_samples, n_components)`` in the dtype of ``X`` with ``X ≈ codes @ dictionary``,
        at most ``n_nonzero_coefs`` non-zeros per row; ``(0, n_components)`` for no signals.

    Raises:
        ValueError: for bad arguments, and when the codes do not fit the dtype of ``X``. Inputs
            are scaled by powers of two before any product, so large or tiny magnitudes neither
            overflow nor underflow.

    Warns:
        RuntimeWarning: when a signal stops early because the atoms it would pick next are
            linearly dependent on those already picked (the residual is then not yet negligible).
    """
    check_matrix("X", X)
    check_matrix("dictionary", dictionary, n_cols=X.shape[1], cols_of="X (n_features)")
    check_same_device(X=X, dictionary=dictionary)
    check_not_empty("X", X, 1, "features (columns)")
    check_not_empty("dictionary", dictionary, 0, "atoms (rows)")
    check_finite("X", X)
    check_finite("dictionary", dictionary)
    k = _check_k(n_nonzero_coefs, dictionary.shape)
    tol = None if tol is None else check_nonnegative_float("tol", tol)
    chunk_size = check_chunk_size(chunk_size)
    dtype = compute_dtype(X, dictionary)
    # X' = X 2^-x_exp, D' = D 2^-d_exp: entries below 1, so no product overflows; codes of the
    # scaled problem are the codes times 2^(d_exp - x_exp), residuals scale by 2^(-2 x_exp).
    x_exp, d_exp = power_of_two_exponent(X), power_of_two_exponent(dictionary)
    D = times_power_of_two(dictionary.to(dtype), -d_exp)
    Xc = times_power_of_two(X.to(dtype), -x_exp)
    gram = D @ D.T  # (n_components, n_components)
    Xy = Xc @ D.T  # (n_samples, n_components)
    norms = (Xc * Xc).sum(1) if tol is not None else None
    tol = None if tol is None else scaled_float(tol, -2 * x_exp)
    codes = _omp_gram_chunks(gram, Xy, k, norms, tol, chunk_size)
    return unscale_codes(codes, x_exp - d_exp, X.dtype)


def omp_gram(
    gram: torch.Tensor,
    Xy: torch.Tensor,
    n_nonzero_coefs: int,
    *,
    norms_squared: torch.Tensor | None = None,
    tol: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """OMP from precomputed products: ``gram = D @ D.T`` and ``Xy = X @ D.T``.

    Args:
        gram: ``(n_components, n_components)``, symmetric.
        Xy: ``(n_samples, n_components)`` (note: rows are signals, unlike scikit-learn's
            ``orthogonal_mp_gram`` which takes ``Xy`` with signals as columns).
        n_nonzero_coefs: at most this many non-zeros per signal.
        norms_squared: ``(n_samples,)`` squared norms of the signals; needed with ``tol``.
        tol: optional early stop on the squared residual norm.
        chunk_size: signals solved together (a positive int).

    Returns:
        codes ``(n_samples, n_components)`` in the dtype of ``Xy``. Inputs are scaled by powers
        of two first (as in :func:`omp`).
    """
    check_matrix("gram", gram)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (n_components, n_components), got {tuple(gram.shape)}")
    check_not_empty("gram", gram, 0, "atoms (rows)")
    check_matrix("Xy", Xy, n_cols=gram.shape[0], cols_of="gram (n_components)")
    check_same_device(gram=gram, Xy=Xy)
    check_finite("gram", gram)
    check_finite("Xy", Xy)
    if not bool(torch.allclose(gram, gram.T, rtol=1e-4, atol=1e-6 * float(gram.abs().max()))):
        raise ValueError("gram must be symmetric (D @ D.T), got an asymmetric matrix")
    k = check_positive_int("n_nonzero_coefs", n_nonzero_coefs, upper=gram.shape[0],
                           upper_name="the number of atoms")
    if tol is not None:
        tol = check_nonnegative_float("tol", tol)
        if norms_squared is None:
            raise ValueError("tol needs norms_squared (the squared norm of each signal), got None")
    if norms_squared is not None:
        if not isinstance(norms_squared, torch.Tensor) or tuple(norms_squared.shape) != (Xy.shape[0],):
            shape = tuple(norms_squared.shape) if isinstance(norms_squared, torch.Tensor) else None
            raise ValueError(f"norms_squared must be a tensor of shape ({Xy.shape[0]},), got {shape}")
        check_same_device(gram=gram, norms_squared=norms_squared)
        check_finite("norms_squared", norms_squared)
    chunk_size = check_chunk_size(chunk_size)
    dtype = compute_dtype(gram, Xy)
    scale = gram_scaling(gram, Xy, norms_squared)
    norms = None if norms_squared is None else times_power_of_two(norms_squared.to(dtype),
                                                                    -2 * scale.signals)
    tol = None if tol is None else scaled_float(tol, -2 * scale.signals)
    codes = _omp_gram_chunks(times_power_of_two(gram.to(dtype), -2 * scale.atoms),
                             times_power_of_two(Xy.to(dtype), -scale.products), k, norms, tol,
                             chunk_size)
    return unscale_codes(codes, scale.signals - scale.atoms, Xy.dtype)


def _check_k(n_nonzero_coefs, dictionary_shape) -> int:
    n_components, n_features = dictionary_shape
    return check_positive_int(
        "n_nonzero_coefs", n_nonzero_coefs, upper=min(n_components, n_features),
        upper_name=f"min(n_components={n_components}, n_features={n_features})",
    )


def _omp_gram_chunks(gram, Xy, k, norms_squared, tol, chunk_size) -> torch.Tensor:
    """Unchecked: codes ``(n, m)`` for ``Xy (n, m)`` in chunks that share one set of buffers."""
    n, m = Xy.shape
    if n == 0:
        return Xy.new_zeros(0, m)
    chunk = min(n, chunk_size or max(16, min(2048, _CHUNK_BYTES // (4 * (k + 4) * m))))
    factors = BatchedCholesky(gram, chunk, k)
    codes = torch.empty_like(Xy)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        factors.reset(Xy[rows].shape[0])
        norms = None if norms_squared is None else norms_squared[rows]
        codes[rows] = _omp_gram_core(factors, Xy[rows], k, norms, tol)
    return codes


def _omp_gram_core(
    factors: BatchedCholesky,
    Xy: torch.Tensor,
    k: int,
    norms_squared: torch.Tensor | None,
    tol: float | None,
) -> torch.Tensor:
    """Unchecked Batch-OMP for one chunk ``Xy (b, m)`` -> codes ``(b, m)``."""
    b, m = Xy.shape
    floor = 64 * factors.eps * Xy.abs().amax(1)  # correlations below this are rounding noise
    correlations = Xy.clone()  # (b, m): D @ residual for every signal
    z = Xy.new_zeros(b, k)  # L^-1 Xy[I]
    stopped = torch.zeros(b, dtype=torch.bool, device=Xy.device)
    dependent = torch.zeros_like(stopped)
    residual = norms_squared.clone() if norms_squared is not None else None

    for t in range(k):
        if tol is not None:
            stopped |= residual <= tol
        j = argmax_abs(correlations)  # (b,)
        l_row, pivot_sq, gram_jj = factors.next_row(j)
        is_dependent = factors.is_dependent(pivot_sq, gram_jj)
        negligible = correlations.gather(1, j[:, None]).squeeze(1).abs() <= floor
        dependent |= is_dependent & ~negligible & ~stopped
        stopped |= is_dependent | negligible
        keep = ~stopped
        pivot, l_row = factors.append(j, l_row, pivot_sq, keep)
        xy_j = Xy.gather(1, j[:, None]).squeeze(1)
        z_t = (xy_j - (l_row * z[:, :t]).sum(1)) / pivot * keep
        correlations.addcmul_(factors.new_u(), z_t[:, None], value=-1)
        z[:, t] = z_t
        if residual is not None:
            residual = residual - z_t * z_t

    if bool(dependent.any()):
        warnings.warn(
            f"OMP stopped early for {int(dependent.sum())} signal(s): the next atom was linearly "
            "dependent on the atoms already picked; their residual may exceed what "
            "n_nonzero_coefs atoms could reach with a better-conditioned dictionary.",
            RuntimeWarning,
            stacklevel=3,
        )
    return factors.scatter(factors.solve_upper(z), m)
