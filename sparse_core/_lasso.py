"""Batched lasso: an exact homotopy (LARS) path, with working-set FISTA as the fallback.

Problem, per signal ``x`` (a row of ``X``)::

    minimize_a  0.5 * ||x - a @ D||_2^2 + alpha * ||a||_1

scikit-learn's ``sparse_encode(..., algorithm="lasso_cd", alpha=alpha)`` solves the same problem
(it passes ``alpha / n_features`` to ``Lasso``, whose loss carries ``1 / (2 * n_features)``).

Method, for a chunk of signals at once, from precomputed ``G = D @ D.T`` and ``Xy = X @ D.T``:

1. **Homotopy** (Osborne, Presnell & Turlach, 2000; Efron et al., 2004, *Least angle regression*).
   Start at ``lam = max_j |Xy_j|`` where ``a = 0`` and lower ``lam`` to ``alpha``. Along the way
   the active atoms keep ``|correlation| = lam``; the next atom joins when its correlation reaches
   ``lam``. Each join extends the inverse Cholesky factor of ``G[S, S]`` by one row
   (``_cholesky.InverseCholesky``), and the rate at which correlations move,
   ``G[:, S] G[S, S]^-1 sign_S``, is one fused gather-sum over cached Gram rows, so a step costs
   ``O(m * |S|)`` without streaming per-signal buffers. At ``lam = alpha`` the coefficients are
   ``G[S, S]^-1 (Xy[S] - alpha * sign_S)``.
2. **Check**: that point is the lasso optimum exactly when the signs agree with the correlations
   and no inactive atom has ``|correlation| > alpha`` (the optimality conditions). A signal whose
   path had a coefficient cross zero (LARS would drop it there) fails the check.
3. **Fallback** for those signals (and for warm starts): FISTA (Beck & Teboulle, 2009) with
   adaptive restart (O'Donoghue & Candes, 2015) on per-signal working sets (the support plus the
   worst violators), with the exact step ``1 / lambda_max(G[W, W])``, each working set's result
   polished by the same active-set solve, until every signal's duality gap is ``<= tol`` times its
   objective (so ``tol`` bounds the relative suboptimality).
"""

from __future__ import annotations

import math
import warnings

import torch

from ._cholesky import InverseCholesky
from ._select import argmax_abs, min_with_index
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

__all__ = ["lasso", "lasso_gram", "lasso_objective"]

_CHUNK_BYTES = 16 * 2**20


def lasso(
    X: torch.Tensor,
    dictionary: torch.Tensor,
    alpha: float,
    *,
    tol: float = 1e-4,
    max_iter: int = 1000,
    init: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Lasso codes of ``X`` over ``dictionary``.

    Args:
        X: signals ``(n_samples, n_features)``.
        dictionary: atoms as rows ``(n_components, n_features)``.
        alpha: the l1 weight, ``>= 0``, in the objective written in the module docstring.
        tol: stop a signal when its duality gap is ``<= tol * objective``: its objective is then
            within a factor ``1 + tol`` of the optimum.
        max_iter: bound on FISTA iterations per signal, over all working sets.
        init: optional warm start ``(n_samples, n_components)``.
        chunk_size: signals solved together (a positive int); by default sized to keep work
            buffers small.

    Returns:
        codes ``(n_samples, n_components)`` in the dtype of ``X``; ``(0, n_components)`` for no
        signals.

    Raises:
        ValueError: for bad arguments, and when the codes do not fit the dtype of ``X``. The
            problem is solved on inputs scaled by powers of two (``X 2^-p``, ``D 2^-q`` with
            ``alpha 2^-(p+q)``, which has the codes times ``2^(q-p)`` as its solution), so large
            or tiny magnitudes neither overflow nor underflow.

    Warns:
        RuntimeWarning: when some signals reach ``max_iter`` with a gap above the tolerance.
    """
    check_matrix("X", X)
    check_matrix("dictionary", dictionary, n_cols=X.shape[1], cols_of="X (n_features)")
    check_same_device(X=X, dictionary=dictionary)
    check_not_empty("X", X, 1, "features (columns)")
    check_not_empty("dictionary", dictionary, 0, "atoms (rows)")
    check_finite("X", X)
    check_finite("dictionary", dictionary)
    alpha = check_nonnegative_float("alpha", alpha)
    dtype = compute_dtype(X, dictionary)
    x_exp, d_exp = power_of_two_exponent(X), power_of_two_exponent(dictionary)
    D = times_power_of_two(dictionary.to(dtype), -d_exp)
    Xc = times_power_of_two(X.to(dtype), -x_exp)
    gram = D @ D.T
    Xy = Xc @ D.T
    norms = (Xc * Xc).sum(1)
    if isinstance(init, torch.Tensor) and init.is_floating_point():
        init = times_power_of_two(init.to(dtype), d_exp - x_exp)
    codes = lasso_gram(gram, Xy, scaled_float(alpha, -x_exp - d_exp), norms_squared=norms, tol=tol,
                       max_iter=max_iter, init=init, chunk_size=chunk_size)
    return unscale_codes(codes, x_exp - d_exp, X.dtype)


def lasso_gram(
    gram: torch.Tensor,
    Xy: torch.Tensor,
    alpha: float,
    *,
    norms_squared: torch.Tensor,
    tol: float = 1e-4,
    max_iter: int = 1000,
    init: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Lasso from precomputed ``gram = D @ D.T (m, m)``, ``Xy = X @ D.T (n, m)`` and
    ``norms_squared = ||x||^2 (n,)``. Same objective, stopping rule and power-of-two scaling
    as :func:`lasso`."""
    check_matrix("gram", gram)
    if gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be square (n_components, n_components), got {tuple(gram.shape)}")
    check_not_empty("gram", gram, 0, "atoms (rows)")
    check_matrix("Xy", Xy, n_cols=gram.shape[0], cols_of="gram (n_components)")
    if not isinstance(norms_squared, torch.Tensor) or tuple(norms_squared.shape) != (Xy.shape[0],):
        shape = tuple(norms_squared.shape) if isinstance(norms_squared, torch.Tensor) else None
        raise ValueError(f"norms_squared must be a tensor of shape ({Xy.shape[0]},), got {shape}")
    alpha = check_nonnegative_float("alpha", alpha)
    tol = check_nonnegative_float("tol", tol)
    max_iter = check_positive_int("max_iter", max_iter)
    chunk_size = check_chunk_size(chunk_size)
    if init is not None:
        check_matrix("init", init, n_cols=gram.shape[0], cols_of="gram (n_components)")
        if init.shape[0] != Xy.shape[0]:
            raise ValueError(f"init must have {Xy.shape[0]} rows like Xy, got {tuple(init.shape)}")
    check_same_device(gram=gram, Xy=Xy, norms_squared=norms_squared)
    check_finite("gram", gram)
    check_finite("Xy", Xy)
    check_finite("norms_squared", norms_squared)
    if init is not None:
        check_finite("init", init)

    dtype = compute_dtype(gram, Xy)
    n, m = Xy.shape
    if n == 0:
        return Xy.new_zeros(0, m)
    scale = gram_scaling(gram, Xy, norms_squared)
    gram_c = times_power_of_two(gram.to(dtype), -2 * scale.atoms)
    Xy_c = times_power_of_two(Xy.to(dtype), -scale.products)
    norms_c = times_power_of_two(norms_squared.to(dtype), -2 * scale.signals)
    alpha = scaled_float(alpha, -scale.products)
    codes = torch.zeros(n, m, dtype=dtype, device=Xy.device)
    if alpha >= float(Xy_c.abs().amax()):
        # a = 0 is optimal once alpha >= max_j |Xy_j| (no atom's correlation passes alpha); so
        # also for an alpha too large for the compute dtype, which is never used in arithmetic.
        return codes.to(Xy.dtype)
    if init is not None:
        codes.copy_(times_power_of_two(init.to(dtype), scale.atoms - scale.signals))
    chunk = min(n, chunk_size or max(64, min(4096, _CHUNK_BYTES // (4 * m * 4))))
    workspace = None if init is not None else _Workspace(gram_c, chunk, min(m, max_iter))
    unconverged = 0
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        codes[rows], failed = _lasso_gram_core(
            gram_c, Xy_c[rows], norms_c[rows], alpha, tol, max_iter,
            codes[rows], warm=init is not None, workspace=workspace,
        )
        unconverged += failed
    if unconverged:
        warnings.warn(
            f"lasso did not reach tol={tol} for {unconverged} of {n} signals within "
            f"max_iter={max_iter}; increase max_iter or alpha.",
            RuntimeWarning,
            stacklevel=2,
        )
    return unscale_codes(codes, scale.signals - scale.atoms, Xy.dtype)


def lasso_objective(X: torch.Tensor, dictionary: torch.Tensor, codes: torch.Tensor,
                    alpha: float) -> torch.Tensor:
    """Per-signal objective ``0.5 ||x - a D||^2 + alpha ||a||_1`` ``(n_samples,)``."""
    residual = X - codes @ dictionary
    return 0.5 * (residual * residual).sum(1) + alpha * codes.abs().sum(1)


def _soft_threshold(v: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.sign(v) * (v.abs() - threshold).clamp_min(0)


def _duality_gap(codes, grad, Xy, norms, alpha):
    """Per-signal primal, gap. ``grad = codes @ G - Xy`` so ``D @ residual = -grad``."""
    a_xy = (codes * Xy).sum(1)
    a_g_a = (codes * (grad + Xy)).sum(1)  # a G a^T
    residual_sq = (norms - 2 * a_xy + a_g_a).clamp_min(0)
    primal = 0.5 * residual_sq + alpha * codes.abs().sum(1)
    # Dual point theta = s * residual, scaled so that ||D theta||_inf <= alpha.
    dual_norm = grad.abs().amax(1)
    scale = torch.where(dual_norm > alpha, alpha / dual_norm.clamp_min(1e-30), torch.ones_like(dual_norm))
    residual_dot_x = norms - a_xy
    dual = scale * residual_dot_x - 0.5 * scale * scale * residual_sq
    return primal, primal - dual


def _lasso_gram_core(gram, Xy, norms, alpha, tol, max_iter, codes, warm, workspace):
    """Unchecked solve for one chunk. Returns (codes (b, m), number unconverged)."""
    if warm:
        return _working_sets(gram, Xy, norms, alpha, tol, max_iter, codes)
    codes, codes_gram = _homotopy(gram, Xy, alpha, min(Xy.shape[1], max_iter), workspace)
    primal, gap = _duality_gap(codes, codes_gram - Xy, Xy, norms, alpha)
    rest = gap > tol * primal
    if not bool(rest.any()):
        return codes, 0
    codes[rest], fails = _working_sets(gram, Xy[rest], norms[rest], alpha, tol, max_iter,
                                       codes[rest])
    return codes, fails


class _Workspace:
    """The homotopy's buffers for chunks of up to ``batch`` signals, allocated once per call:
    fresh pages cost more than the arithmetic done on them, so every chunk reuses them."""

    def __init__(self, gram: torch.Tensor, batch: int, max_steps: int):
        dtype, device, width = gram.dtype, gram.device, gram.shape[0]
        self.factors = InverseCholesky(gram, batch, min(max_steps, 32))  # grows past 32 steps
        self.planes = torch.empty(4, batch, width, dtype=dtype, device=device)
        self.paths = torch.empty(2, batch, max_steps, dtype=dtype, device=device)

    def take(self, b: int):
        """(correlations, rate, w, n) ``(b, width)`` and (q, z) ``(b, max_steps)`` views."""
        return (*self.planes[:, :b], *self.paths[:, :b])


def _homotopy(gram, Xy, alpha, max_steps, workspace: _Workspace | None = None):
    """The lasso path from ``a = 0`` down to ``alpha`` for ``Xy (b, m)`` without drop steps.

    Returns codes ``(b, m)``, the optimum wherever no coefficient had to leave the path (the
    caller checks the duality gap), and ``codes @ G`` ``(b, m)``.
    """
    b, m = Xy.shape
    tiny = torch.finfo(Xy.dtype).tiny
    if workspace is None:
        workspace = _Workspace(gram, b, max_steps)
    factors = workspace.factors
    factors.reset(b)
    correlations, rate, buffer_w, buffer_n, q, z = workspace.take(b)
    correlations.copy_(Xy)  # c = Xy - a G, the correlations with the residual
    rate.zero_()  # v = G[:, S] G[S, S]^-1 sign_S: dc/dlam along the path
    # q = L^-1 sign_S and z = L^-1 Xy[S]: column t is written before it is read
    j = argmax_abs(correlations)
    lam = correlations.gather(1, j[:, None]).squeeze(1).abs()
    done = lam <= alpha
    for t in range(max_steps):
        l_row, pivot_sq, gram_jj = factors.next_row(j)
        done |= factors.is_dependent(pivot_sq, gram_jj)
        keep = ~done
        pivot, l_row = factors.append(j, l_row, pivot_sq, keep)
        sign_j = torch.sign(correlations.gather(1, j[:, None]).squeeze(1))
        xy_j = Xy.gather(1, j[:, None]).squeeze(1)
        q[:, t] = (sign_j - (l_row * q[:, :t]).sum(1)) / pivot * keep
        z[:, t] = (xy_j - (l_row * z[:, :t]).sum(1)) / pivot * keep
        rate.copy_(factors.combine(q[:, : t + 1]))
        if bool(done.all()):
            break
        # Next join: inactive j reaches |c_j - g v_j| = lam - g at g = (lam - c_j) / (1 - v_j)
        # or (lam + c_j) / (1 + v_j), whichever is positive and smaller. With w = c - lam v and
        # s = sign(w) that is g = lam * N / (N + |w|), N = lam - s c >= 0: fewer passes over
        # memory than evaluating both branches, no division by zero, and the factor lam does
        # not change which atom comes first.
        lam_col = lam[:, None]
        w = torch.addcmul(correlations, rate, lam_col, value=-1, out=buffer_w)
        n = torch.sign(w, out=buffer_n).mul_(correlations).neg_().add_(lam_col).clamp_min_(0)
        ratio = w.abs_().add_(n).clamp_min_(tiny)  # N + |w|
        ratio = torch.div(n, ratio, out=ratio)
        ratio.scatter_(1, factors.picked[:, : t + 1], math.inf)  # active atoms never rejoin
        join_ratio, j = min_with_index(ratio)
        join_step = lam * join_ratio
        to_alpha = lam - alpha
        finishing = (to_alpha <= join_step) & keep
        gamma = torch.where(finishing, to_alpha, join_step) * keep
        correlations.addcmul_(rate, gamma[:, None], value=-1)
        lam = lam - gamma
        done |= finishing | ~torch.isfinite(join_step)
    q, z = q[:, : factors.size], z[:, : factors.size]
    if factors.size == 0:
        zeros = torch.zeros(b, m, dtype=Xy.dtype, device=Xy.device)
        return zeros, zeros.clone()
    # Where a signal stopped before alpha, lam > alpha: use its own lam (a point on its path).
    level = torch.maximum(lam, torch.full_like(lam, alpha))[:, None]
    values = factors.solve_upper(z - level * q)
    # codes @ G from the cached Gram rows of the support (not a dense (b, m) x (m, m) product)
    codes_gram = torch.nn.functional.embedding_bag(factors.picked[:, : factors.size], factors.gram,
                                                   per_sample_weights=values, mode="sum")
    return factors.scatter(values, m), codes_gram


def _working_sets(gram, Xy, norms, alpha, tol, max_iter, codes):
    """Working-set FISTA for the signals of ``Xy (b, m)`` from ``codes``; returns (codes,
    number unconverged)."""
    b, m = Xy.shape
    iterations = torch.zeros(b, dtype=torch.long, device=Xy.device)
    width = min(m, 32)
    todo = torch.arange(b, device=Xy.device)
    for _ in range(64):
        grad = codes[todo] @ gram - Xy[todo]
        primal, gap = _duality_gap(codes[todo], grad, Xy[todo], norms[todo], alpha)
        open_ = (gap > tol * primal) & (iterations[todo] < max_iter)
        todo = todo[open_]
        if todo.numel() == 0:
            break
        grad = grad[open_]
        a = codes[todo]
        support = a != 0
        support_size = int(support.sum(1).max())
        width = min(m, max(width, 2 * support_size + 8))
        score = torch.where(support, torch.full_like(grad, math.inf), grad.abs() - alpha)
        work = score.topk(width, dim=1).indices  # (t, w)
        sub_gram = gram[work.unsqueeze(2), work.unsqueeze(1)]  # (t, w, w)
        sub_xy = Xy[todo].gather(1, work)
        sub_a = a.gather(1, work)
        sub_a, used = _fista_polish(sub_gram, sub_xy, sub_a, alpha, max_iter)
        iterations[todo] += used
        codes[todo] = a.zero_().scatter_(1, work, sub_a)
    final_grad = codes @ gram - Xy
    primal, gap = _duality_gap(codes, final_grad, Xy, norms, alpha)
    return codes, int((gap > tol * primal).sum())


def _fista_polish(G, xy, a, alpha, max_iter, block=10):
    """FISTA with restart on batched sub-problems ``G (t, w, w)``, ``xy (t, w)``, warm start
    ``a (t, w)``; every ``block`` iterations try the exact active-set solution. Returns the codes
    and the iterations used."""
    t_count = G.shape[0]
    lipschitz = torch.linalg.eigvalsh(G)[:, -1].clamp_min(torch.finfo(G.dtype).tiny)  # (t,)
    step = (1.0 / lipschitz)[:, None]
    threshold = alpha * step
    y = a.clone()
    momentum = torch.ones(t_count, 1, dtype=G.dtype, device=G.device)
    done = torch.zeros(t_count, dtype=torch.bool, device=G.device)
    used = 0
    for _ in range(max(1, max_iter // block)):
        for _ in range(block):
            grad = torch.bmm(y.unsqueeze(1), G).squeeze(1) - xy
            a_next = _soft_threshold(y - step * grad, threshold)
            momentum_next = 0.5 * (1 + torch.sqrt(1 + 4 * momentum * momentum))
            restart = ((y - a_next) * (a_next - a)).sum(1, keepdim=True) > 0
            beta = torch.where(restart, torch.zeros_like(momentum), (momentum - 1) / momentum_next)
            momentum = torch.where(restart, torch.ones_like(momentum), momentum_next)
            y = a_next + beta * (a_next - a)
            a = a_next
        used += block
        exact, ok = _active_set_solution(G, xy, a, alpha)
        a = torch.where(ok[:, None], exact, a)
        y = torch.where(ok[:, None], exact, y)
        done |= ok
        if bool(done.all()) or used >= max_iter:
            break
    return a, used


def _active_set_solution(G, xy, a, alpha):
    """Exact minimiser on the support and signs of ``a``; ``ok`` where it is optimal on the
    working set (signs kept, ``|grad_j| <= alpha`` off the support)."""
    sign = torch.sign(a)
    support = sign != 0
    eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
    mask = support.unsqueeze(2) & support.unsqueeze(1)
    system = torch.where(mask, G, eye)  # identity rows/columns off the support
    rhs = torch.where(support, xy - alpha * sign, torch.zeros_like(xy))
    solution, info = torch.linalg.solve_ex(system, rhs)
    solution = solution * support
    grad = torch.bmm(solution.unsqueeze(1), G).squeeze(1) - xy
    slack = 1e-6 * alpha + 1e-12
    ok = (
        (info == 0)
        & torch.isfinite(solution).all(1)
        & ((torch.sign(solution) == sign) | ~support).all(1)
        & ((grad.abs() <= alpha + slack) | support).all(1)
    )
    return solution, ok
