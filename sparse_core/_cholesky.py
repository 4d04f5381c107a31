"""A batch of growing Cholesky factors of Gram sub-matrices, shared by OMP and the lasso path.

For each of ``b`` signals with picked atoms ``I`` (in pick order) keep

- ``L (b, k, k)``: lower-triangular, ``G[I, I] = L @ L.T``;
- ``U (k, b, m)``: ``U[t]`` holds column ``t`` of ``G[:, I] @ L^-T`` for every signal (step-major, so
  each step writes one contiguous slab).

Because ``U[:, I] = L`` (row-wise: ``U[t, I]`` is row ``t`` of ``L.T``), appending atom ``j`` needs no
triangular solve: the new row of ``L`` is ``U[:t, j]``, its pivot is ``sqrt(G[j, j] - ||U[:t, j]||^2)``
and the new row of ``U`` is ``(G[j] - U[:t, j] @ U[:t]) / pivot``. Any vector ``y_I`` then maps to
``L^-1 y_I`` one entry per step: ``(y_j - l_row @ previous) / pivot``.

The atoms a signal may pick can be all ``m`` atoms or a per-signal candidate list (a working set of
``w`` atoms); :class:`GramRows` hands out the Gram rows restricted to it, and every index here is a
position in that list.
"""

from __future__ import annotations

import torch


class GramRows:
    """Rows of ``gram (m, m)`` seen by each signal: ``G[c[j], c]`` for its candidates ``c``.

    ``candidates (b, w)`` lists each signal's atoms; ``None`` means all ``m`` atoms (``w = m``).
    """

    def __init__(self, gram: torch.Tensor, candidates: torch.Tensor | None = None):
        self.gram = gram
        self.candidates = candidates
        self.width = gram.shape[0] if candidates is None else candidates.shape[1]

    def global_index(self, j: torch.Tensor) -> torch.Tensor:
        """Atom ids ``(b,)`` of positions ``j (b,)`` in the candidate lists."""
        return self.global_index_all(j[:, None]).squeeze(1)

    def global_index_all(self, positions: torch.Tensor) -> torch.Tensor:
        """Atom ids ``(b, t)`` of positions ``(b, t)`` in the candidate lists."""
        return positions if self.candidates is None else self.candidates.gather(1, positions)

    def restrict(self, values: torch.Tensor) -> torch.Tensor:
        """Per-atom values ``(b, m)`` at each signal's candidates ``(b, w)``."""
        return values if self.candidates is None else values.gather(1, self.candidates)

    def diag(self, j: torch.Tensor) -> torch.Tensor:
        """``G[c[j], c[j]]`` ``(b,)``."""
        return self.gram.diagonal()[self.global_index(j)]

    def rows(self, j: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``G[c[j], c]`` ``(b, w)``, written to ``out`` where possible."""
        if self.candidates is None:
            return torch.index_select(self.gram, 0, j, out=out)
        flat = self.global_index(j)[:, None] * self.gram.shape[0] + self.candidates  # (b, w)
        return out.copy_(self.gram.view(-1)[flat])


class BatchedCholesky:
    """Growing factors for ``batch`` signals, each over ``width`` candidate atoms."""

    def __init__(self, width: int, batch: int, capacity: int, *, dtype: torch.dtype,
                 device: torch.device):
        self.eps = torch.finfo(dtype).eps
        # Work buffers are allocated once and reused by every chunk (reset): on these machines
        # fresh pages cost more than the arithmetic done on them.
        self._U = torch.empty(capacity, batch, width, dtype=dtype, device=device)
        self._L = torch.empty(batch, capacity, capacity, dtype=dtype, device=device)
        self._picked = torch.empty(batch, capacity, dtype=torch.long, device=device)
        self._rows = torch.arange(batch, device=device)
        self._product = torch.empty(batch, 1, width, dtype=dtype, device=device)
        self.reset(GramRows(torch.zeros(width, width, dtype=dtype, device=device)), batch)

    def reset(self, gram_rows: GramRows, batch: int) -> None:
        """Start over for ``batch`` signals (at most the batch given at construction)."""
        assert gram_rows.width == self._U.shape[2], (gram_rows.width, self._U.shape)
        self.gram_rows = gram_rows
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
        gram_jj = self.gram_rows.diag(j)
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
        t = self.size
        if t == self.U.shape[0]:
            self._grow()
        # Rows of U at or beyond ``size`` are never read, so U needs no zeroing on reset.
        pivot = torch.where(keep, pivot_sq.clamp_min(self.eps).sqrt(), torch.ones_like(pivot_sq))
        l_row = l_row * keep[:, None]
        # New slab of U: (G[j] - l_row @ U[:t]) / pivot, written in place.
        u = self.gram_rows.rows(j, out=self.U[t])
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
        """Dense codes ``(b, m)`` over all atoms from per-step values ``(b, t)``. Identity steps
        carry zeros, so ``scatter_add`` never overwrites a real coefficient."""
        picked = self.gram_rows.global_index_all(self.picked[:, : self.size])
        codes = values.new_zeros(values.shape[0], m)
        return codes.scatter_add_(1, picked, values)

    def _grow(self) -> None:
        """Double the capacity (the lasso path does not know its length in advance)."""
        k, b, w = self._U.shape
        new_k = min(2 * k, w)
        U = self._U.new_empty(new_k, b, w)
        U[:k] = self._U
        L = self._L.new_zeros(b, new_k, new_k)
        L[:, :k, :k] = self._L
        picked = self._picked.new_empty(b, new_k)
        picked[:, :k] = self._picked
        self._U, self._L, self._picked = U, L, picked
        batch = self.U.shape[1]
        self.U, self.L, self.picked = U[:, :batch], L[:batch], picked[:batch]
