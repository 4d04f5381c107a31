"""A batch of growing Cholesky factors of Gram sub-matrices, shared by OMP and the lasso path.

For each of ``b`` signals with picked atoms ``I`` (in pick order) keep

- ``L (b, k, k)``: lower-triangular, ``G[I, I] = L @ L.T``;
- ``U (k, b, m)``: ``U[t]`` holds column ``t`` of ``G[:, I] @ L^-T`` for every signal (step-major, so
  each step writes one contiguous slab).

Because ``U[:, I] = L`` (row-wise: ``U[t, I]`` is row ``t`` of ``L.T``), appending atom ``j`` needs no
triangular solve: the new row of ``L`` is ``U[:t, j]``, its pivot is ``sqrt(G[j, j] - ||U[:t, j]||^2)``
and the new row of ``U`` is ``(G[j] - U[:t, j] @ U[:t]) / pivot``. Any vector ``y_I`` then maps to
``L^-1 y_I`` one entry per step: ``(y_j - l_row @ previous) / pivot``.

OMP uses :class:`BatchedCholesky`; the lasso path, whose Gram matrix is small enough to stay in
cache, uses :class:`InverseCholesky`, which keeps ``L^-1`` and recomputes combinations of Gram rows
instead of storing ``U``.
"""

from __future__ import annotations

import torch


class BatchedCholesky:
    """Growing factors for ``batch`` signals over the atoms of ``gram (m, m)``, at most
    ``capacity`` steps (OMP's ``n_nonzero_coefs``) each."""

    def __init__(self, gram: torch.Tensor, batch: int, capacity: int):
        dtype, device, width = gram.dtype, gram.device, gram.shape[0]
        self.gram = gram
        self.gram_diag = gram.diagonal()
        self.eps = torch.finfo(dtype).eps
        # Work buffers are allocated once and reused by every chunk (reset): on these machines
        # fresh pages cost more than the arithmetic done on them.
        self._U = torch.empty(capacity, batch, width, dtype=dtype, device=device)
        self._L = torch.empty(batch, capacity, capacity, dtype=dtype, device=device)
        self._picked = torch.empty(batch, capacity, dtype=torch.long, device=device)
        self._rows = torch.arange(batch, device=device)
        self._product = torch.empty(batch, 1, width, dtype=dtype, device=device)
        self.reset(batch)

    def reset(self, batch: int) -> None:
        """Start over for ``batch`` signals (at most the batch given at construction)."""
        self.U = self._U[:, :batch]
        self.L = self._L[:batch]
        self.L.zero_()
        self.picked = self._picked[:batch]
        self.rows = self._rows[:batch]
        self.product = self._product[:batch]
        self.size = 0

    def next_row(self, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For candidate atoms ``j (b,)``: the new row of ``L`` ``(b, t)``, the squared pivot and
        ``G[j, j]``, all ``(b,)`` but the row."""
        t = self.size
        l_row = self.U[:t, self.rows, j].T.contiguous() if t else self.U.new_zeros(len(j), 0)
        gram_jj = self.gram_diag[j]
        return l_row, gram_jj - (l_row * l_row).sum(1), gram_jj

    def is_dependent(self, pivot_sq: torch.Tensor, gram_jj: torch.Tensor) -> torch.Tensor:
        """Atoms (numerically) in the span of those already picked."""
        return pivot_sq <= 100 * self.eps * gram_jj

    def append(self, j: torch.Tensor, l_row: torch.Tensor, pivot_sq: torch.Tensor,
               keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append atom ``j (b,)`` where ``keep``; elsewhere append an identity step (a zero row of
        ``U``, pivot 1) so that the factors stay invertible and that step's coefficient is zero.

        Returns ``pivot (b,)`` and ``l_row (b, t)`` (zeroed where not kept) for the caller's
        ``L^-1`` updates, and stores the new row of ``U``.
        """
        t = self.size  # < capacity: OMP takes at most ``capacity`` steps
        # Rows of U at or beyond ``size`` are never read, so U needs no zeroing on reset.
        pivot = torch.where(keep, pivot_sq.clamp_min(self.eps).sqrt(), torch.ones_like(pivot_sq))
        l_row = l_row * keep[:, None]
        # New slab of U: (G[j] - l_row @ U[:t]) / pivot, written in place.
        u = torch.index_select(self.gram, 0, j, out=self.U[t])
        if t:
            torch.bmm(l_row.unsqueeze(1), self.U[:t].transpose(0, 1), out=self.product)
            u.sub_(self.product.squeeze(1))
        u.mul_((keep / pivot)[:, None])
        self.L[:, t, :t] = l_row
        self.L[:, t, t] = pivot
        self.picked[:, t] = j
        self.size = t + 1
        return pivot, l_row

    def new_u(self) -> torch.Tensor:
        """The slab of ``U`` added by the last :meth:`append`, ``(b, w)``."""
        return self.U[self.size - 1]

    def solve_upper(self, z: torch.Tensor) -> torch.Tensor:
        """``L.T^-1 @ z`` for ``z (b, t)``: coefficients of the picked atoms in pick order."""
        t = self.size
        L = self.L[:, :t, :t]
        return torch.linalg.solve_triangular(L.transpose(1, 2), z.unsqueeze(2), upper=True).squeeze(2)

    def scatter(self, values: torch.Tensor, m: int) -> torch.Tensor:
        """Dense codes ``(b, m)`` from per-step values ``(b, t)``. Identity steps carry zeros,
        so ``scatter_add`` never overwrites a real coefficient."""
        codes = values.new_zeros(values.shape[0], m)
        return codes.scatter_add_(1, self.picked[:, : self.size], values)


class InverseCholesky:
    """Growing inverse Cholesky factors ``Linv = L^-1`` (``G[I, I] = L @ L.T``) for ``batch``
    signals over all atoms of a small Gram matrix, with no ``U``.

    For the lasso path, where ``G`` is small enough to stay in cache: the new row of ``L`` is
    ``Linv @ G[I, j]`` (a gather of ``t`` numbers and a small product), and any combination
    ``G[:, I] @ L^-T @ y`` is recomputed from the cached Gram rows in one fused gather-sum
    (``embedding_bag``) instead of streaming a ``(batch, k, m)`` buffer from memory.
    """

    def __init__(self, gram: torch.Tensor, batch: int, capacity: int):
        self.gram = gram.contiguous()
        self.m = gram.shape[0]
        self.gram_diag = self.gram.diagonal()
        self.eps = torch.finfo(gram.dtype).eps
        self._Linv = gram.new_zeros(batch, capacity, capacity)
        self._picked = torch.zeros(batch, capacity, dtype=torch.long, device=gram.device)
        self.reset(batch)

    def reset(self, batch: int) -> None:
        self.Linv = self._Linv[:batch]
        self.Linv.zero_()
        self.picked = self._picked[:batch]
        self.size = 0

    def next_row(self, j: torch.Tensor):
        """New row of ``L`` ``(b, t)``, squared pivot and ``G[j, j]`` for candidates ``j (b,)``."""
        t = self.size
        gram_jj = self.gram_diag[j]
        if t == 0:
            return j.new_zeros(len(j), 0, dtype=self.gram.dtype), gram_jj, gram_jj
        g = self.gram.view(-1)[self.picked[:, :t] * self.m + j[:, None]]  # G[I, j], (b, t)
        l_row = torch.bmm(self.Linv[:, :t, :t], g.unsqueeze(2)).squeeze(2)
        return l_row, gram_jj - (l_row * l_row).sum(1), gram_jj

    def is_dependent(self, pivot_sq, gram_jj):
        return pivot_sq <= 100 * self.eps * gram_jj

    def append(self, j, l_row, pivot_sq, keep):
        """As :meth:`BatchedCholesky.append`: identity steps where not ``keep``."""
        t = self.size
        if t == self.Linv.shape[1]:
            self._grow()
        pivot = torch.where(keep, pivot_sq.clamp_min(self.eps).sqrt(), torch.ones_like(pivot_sq))
        l_row = l_row * keep[:, None]
        if t:  # row t of L^-1: -(l_row @ Linv[:t, :t]) / pivot
            row = torch.bmm(l_row.unsqueeze(1), self.Linv[:, :t, :t]).squeeze(1)
            self.Linv[:, t, :t] = -row / pivot[:, None]
        self.Linv[:, t, t] = 1.0 / pivot
        self.picked[:, t] = j
        self.size = t + 1
        return pivot, l_row

    def solve_upper(self, z: torch.Tensor) -> torch.Tensor:
        """``L.T^-1 @ z`` ``(b, t)``."""
        t = self.size
        return torch.bmm(self.Linv[:, :t, :t].transpose(1, 2), z.unsqueeze(2)).squeeze(2)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """``G[:, I] @ L^-T @ y`` ``(b, m)`` for ``y (b, t)``."""
        weights = self.solve_upper(y)
        return torch.nn.functional.embedding_bag(self.picked[:, : self.size], self.gram,
                                                 per_sample_weights=weights, mode="sum")

    scatter = BatchedCholesky.scatter

    def _grow(self) -> None:
        b, k, _ = self._Linv.shape
        new_k = min(2 * k, self.m)
        Linv = self._Linv.new_zeros(b, new_k, new_k)
        Linv[:, :k, :k] = self._Linv
        picked = self._picked.new_zeros(b, new_k)
        picked[:, :k] = self._picked
        self._Linv, self._picked = Linv, picked
        batch = self.Linv.shape[0]
        self.Linv, self.picked = Linv[:batch], picked[:batch]
