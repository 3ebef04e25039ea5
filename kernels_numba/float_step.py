"""Float step (mirrors decoupleq_ref/float_step.py): the exact (s, z) per row for fixed q.

The normal equations P θ = y (ALGORITHM.md §3) are assembled per row chunk without the
reference's redundant work: W·H is computed once per layer (``solve_scale_zero`` takes it),
the A·H·Eᵀ block from the (in, G) group sums of H (no product with a ones matrix), and A·H·Aᵀ
only for group pairs h ≥ g (P is symmetric: half the flops of q·H). The contraction runs
compiled over rows; the batched solve with its degenerate-group handling is the reference's own
``solve_rows``. The solver's operations object asks for the rows that need solving only, and for
their losses from the normal equations (``quadratic_losses``).
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.float_step import degenerate_groups, solve_rows

from ._blas import matmul
from ._compat import njit, prange, require

__all__ = ["closed_form_scale_zero", "normal_equations", "quadratic_losses", "solve_scale_zero"]

CHUNK_BYTES = 64 << 20  # rows per Gram pass: fewer, larger BLAS calls
SOLVE_BYTES = 16 << 20  # rows per batched solve: solve_rows makes ~4 copies of its systems


@njit(parallel=True)
def _gram_upper(V, A, g, gs, P):
    """P[i, g, h] = P[i, h, g] = Σ_{k in group h} V[i, k − g·gs] A[i, k] for every group h ≥ g,
    with V = A[:, group g] · H[group g, g·gs:]."""
    m, n = A.shape
    G = n // gs
    for i in prange(m):
        for h in range(g, G):
            acc = 0.0
            for k in range(h * gs, (h + 1) * gs):
                acc += V[i, k - g * gs] * A[i, k]
            P[i, g, h] = acc
            P[i, h, g] = acc


@njit(parallel=True)
def _group_dots(A, L, gs, out_a, out_1):
    """out_a[i, g] = Σ_{k in g} L[i, k] A[i, k];  out_1[i, g] = Σ_{k in g} L[i, k]."""
    m, n = A.shape
    for i in prange(m):
        for g in range(n // gs):
            acc = 0.0
            tot = 0.0
            for k in range(g * gs, (g + 1) * gs):
                acc += L[i, k] * A[i, k]
                tot += L[i, k]
            out_a[i, g] = acc
            out_1[i, g] = tot


@njit(parallel=True)
def _basis(q, rows, shift):
    """q[rows] − shift as float64 (shift = 2^(b−1) gives the symmetric basis c = q − 2^(b−1))."""
    A = np.empty((rows.shape[0], q.shape[1]))
    for k in prange(rows.shape[0]):
        for j in range(q.shape[1]):
            A[k, j] = q[rows[k], j] - shift
    return A


def normal_equations(A: np.ndarray, L: np.ndarray, panels: list[np.ndarray], Hs: np.ndarray,
                     P22: np.ndarray | None, G: int) -> tuple[np.ndarray, np.ndarray]:
    """P (m, n, n) and y (m, n) for the basis rows A (q, or q − 2^(b−1) when P22 is None:
    symmetric), L = W·H on the same rows, panels[g] = H[group g, g·gs:] (contiguous) and
    Hs = H·Eᵀ the (in, G) group sums of H."""
    m, n_in = A.shape
    gs = n_in // G
    P11 = np.empty((m, G, G))
    for g in range(G):
        cols = slice(g * gs, (g + 1) * gs)
        _gram_upper(matmul(A[:, cols], panels[g]), A, g, gs, P11)
    ya, y1 = np.empty((m, G)), np.empty((m, G))
    _group_dots(A, L, gs, ya, y1)
    if P22 is None:
        return P11, ya
    P = np.empty((m, 2 * G, 2 * G))
    P[:, :G, :G] = P11
    for g in range(G):  # (A H Eᵀ)[i, g, h] = Σ_{k in g} A_ik Hs_kh
        cols = slice(g * gs, (g + 1) * gs)
        P[:, g, G:] = matmul(A[:, cols], Hs[cols])
    P[:, G:, :G] = P[:, :G, G:].transpose(0, 2, 1)
    P[:, G:, G:] = P22
    return P, np.concatenate([ya, y1], axis=1)


def closed_form_scale_zero(q: np.ndarray, W: np.ndarray, H: np.ndarray, bits: int, group_size: int,
                           symmetric: bool, scale: np.ndarray, row_chunk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """argmin_{s,z} Σ_i (s·q_i + z − W_i) H (…)ᵀ for fixed q (mirrors
    decoupleq_ref.closed_form_scale_zero, including the degenerate-group fallback)."""
    require()
    s, z, _ = solve_scale_zero(q, W, H, matmul(W, H), bits, group_size, symmetric, scale, row_chunk=row_chunk)
    return s, z


def solve_scale_zero(q: np.ndarray, W: np.ndarray, H: np.ndarray, L: np.ndarray, bits: int, group_size: int,
                     symmetric: bool, scale: np.ndarray, rows: np.ndarray | None = None, c: np.ndarray | None = None,
                     row_chunk: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The float step on the rows ``rows`` (all when None): their (s, z), (len(rows), G) each, and
    with c = (W_i H W_iᵀ)_i also their losses ℓ_i from the normal equations (quadratic_losses).
    L = W·H (the caller's, computed once per layer); ``scale`` is held for degenerate groups."""
    out, n_in = q.shape
    G = 1 if group_size == -1 else n_in // group_size
    gs = n_in // G
    half = float(1 << (bits - 1))
    todo = np.arange(out) if rows is None else np.asarray(rows, np.int64)
    new_s, new_z = np.empty((todo.size, G)), np.empty((todo.size, G))
    losses = None if c is None else np.empty(todo.size)
    if not todo.size:
        return new_s, new_z, losses
    degenerate = degenerate_groups(q, G, bits, symmetric)
    Hs = H.reshape(n_in, G, gs).sum(axis=2)
    panels = [np.ascontiguousarray(H[g * gs:(g + 1) * gs, g * gs:]) for g in range(G)]
    P22 = None if symmetric else H.reshape(G, gs, G, gs).sum(axis=(1, 3))
    n_unk = G if symmetric else 2 * G
    chunk = row_chunk or max(1, min(4096, CHUNK_BYTES // (8 * max(n_in, n_unk * n_unk))))
    solve_chunk = max(1, SOLVE_BYTES // (8 * n_unk * n_unk))
    for c0 in range(0, todo.size, chunk):
        part = slice(c0, c0 + chunk)
        rows_c = todo[part]
        A = _basis(q, rows_c, half if symmetric else 0.0)
        contiguous = rows_c[-1] - rows_c[0] + 1 == rows_c.size  # views, not copies, when all rows are solved
        sel = slice(rows_c[0], rows_c[-1] + 1) if contiguous else rows_c
        P, y = normal_equations(A, L[sel], panels, Hs, P22, G)
        fixed = np.zeros((rows_c.size, n_unk), dtype=bool)
        fixed[:, :G] = degenerate[rows_c]
        value = np.zeros((rows_c.size, n_unk))
        value[:, :G] = scale[rows_c]
        theta = np.empty_like(y)
        for k0 in range(0, rows_c.size, solve_chunk):  # solve_rows copies its systems ~4 times
            k = slice(k0, k0 + solve_chunk)
            theta[k] = solve_rows(P[k], y[k], fixed[k], value[k])
        new_s[part] = theta[:, :G]
        new_z[part] = -theta[:, :G] * (1 << (bits - 1)) if symmetric else theta[:, G:]
        if c is not None:
            losses[part] = quadratic_losses(P, y, theta, c[sel])
    return new_s, new_z, losses


def quadratic_losses(P: np.ndarray, y: np.ndarray, theta: np.ndarray, c: np.ndarray) -> np.ndarray:
    """ℓ_i = θ_iᵀ P_i θ_i − 2 θ_iᵀ y_i + c_i with c_i = W_i H W_iᵀ: the objective of row i at θ_i,
    since Ŵ_i = θ_i·basis and P, y are basis·H·basisᵀ and basis·H·W_iᵀ (for any θ, so the
    degenerate groups' fixed entries are covered). O(G²) per row instead of O(in²)."""
    return np.einsum("ij,ij->i", theta, np.einsum("ijk,ik->ij", P, theta) - 2.0 * y) + c
