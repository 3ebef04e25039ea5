"""The layer objective (mirrors decoupleq_ref/objective.py) without (out, in) float64 Ŵ copies.

``exact_losses`` forms the residual R = s·q + z − W one row chunk at a time in a compiled
kernel (same operations as the reference's dequantize_parts, so R is bitwise the reference's)
and takes ℓ_i = Σ_j (R H)_ij R_ij with the same BLAS product and einsum as the reference;
``losses_of_rows`` does the same for a subset of the rows.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.format import dequantize_parts
from decoupleq_ref.objective import damp_hessian, layer_loss, row_losses  # not hot: reused as is

from ._blas import matmul
from ._compat import njit, prange

__all__ = ["damp_hessian", "exact_losses", "layer_loss", "losses_of_rows", "row_losses", "residual_norms",
           "residual_rows", "row_chunk"]

ROW_CHUNK_BYTES = 16 << 20  # (chunk, in) float64 temporaries stay around 16 MiB


def row_chunk(n_in: int) -> int:
    """Rows per chunk so a (chunk, n_in) float64 temporary is about ROW_CHUNK_BYTES."""
    return max(16, ROW_CHUNK_BYTES // (8 * max(n_in, 1)))


@njit(inline="always")
def _residual(q, scale, zero, W, i, j, gs):
    """(s·q + z − W)[i, j]: s·q first, then + z, then − W, as the reference rounds it."""
    g = j // gs
    return (scale[i, g] * q[i, j] + zero[i, g]) - W[i, j]


@njit(parallel=True)
def residual_rows(q, scale, zero, W, r0, r1):
    """(s·q + z − W)[r0:r1], rounded as the reference's dequantize_parts(q, s, z) − W."""
    n = q.shape[1]
    gs = n // scale.shape[1]
    R = np.empty((r1 - r0, n))
    for k in prange(r1 - r0):
        for j in range(n):
            R[k, j] = _residual(q, scale, zero, W, r0 + k, j, gs)
    return R


@njit(parallel=True)
def _residual_sq(q, scale, zero, W):
    n = q.shape[1]
    gs = n // scale.shape[1]
    out = np.empty(q.shape[0])
    for i in prange(q.shape[0]):
        acc = 0.0
        for j in range(n):
            r = _residual(q, scale, zero, W, i, j, gs)
            acc += r * r
        out[i] = acc
    return out


def residual_norms(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """‖s·q_i + z − W_i‖² per row (mirrors decoupleq_ref.objective.residual_norms, no (out, in) copy)."""
    return _residual_sq(q, np.ascontiguousarray(scale, dtype=np.float64), np.ascontiguousarray(zero, dtype=np.float64), W)


def exact_losses(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ℓ_i = (s·q_i + z − W_i) H (…)ᵀ for every row by the residual product (mirrors
    decoupleq_ref.layer_ops.proposal_losses), never from a step's formula."""
    out, n = W.shape
    res = np.empty(out)
    step = row_chunk(n)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        R = residual_rows(q, scale, zero, W, r0, r1)
        res[r0:r1] = np.einsum("ij,ij->i", matmul(R, H), R)
    return res


def losses_of_rows(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray,
                   rows: np.ndarray) -> np.ndarray:
    """ℓ_i by the residual product for the rows ``rows`` only (index array), in that order."""
    res = np.empty(rows.size)
    step = row_chunk(W.shape[1])
    for r0 in range(0, rows.size, step):
        r = rows[r0:r0 + step]
        R = dequantize_parts(q[r], scale[r], zero[r]) - W[r]
        res[r0:r0 + step] = np.einsum("ij,ij->i", matmul(R, H), R)
    return res
