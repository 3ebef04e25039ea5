"""Integer refinement (mirrors decoupleq_ref/refine.py), one row per task.

The reference sweeps columns with all rows vectorised and stops after the first sweep in which
no row moved. A row that made no move in a sweep is unchanged, so its later sweeps move nothing
either: running each row's sweeps on its own (and stopping it at its first idle sweep) makes the
same moves. Setup products (R·H, a·H, W·H) are BLAS, per row chunk; the descent's arithmetic is
the reference's, in its order.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.refine import profiled_loss_scalar

from ._blas import matmul
from ._compat import njit, prange, require
from .objective import residual_rows, row_chunk

__all__ = ["descend_fixed", "descend_profiled", "refine_integers", "refine_profiled"]


@njit(parallel=True)
def _descend_fixed(q, g, loss, scale, H, maxq, sweeps, rel_tol, r0, moves):
    """±1 exact descent at fixed (s, z) for rows r0 + k (g, loss: their residual gradient and ℓ)."""
    n = q.shape[1]
    gs = n // scale.shape[1]
    for k in prange(g.shape[0]):
        i = r0 + k
        total = 0
        for _ in range(sweeps):
            moved = 0
            for j in range(n):
                s_j = scale[i, j // gs]
                best_gain = -rel_tol * abs(loss[k])
                best_step = 0.0
                for step in (-1.0, 1.0):
                    gain = 2.0 * step * s_j * g[k, j] + s_j * s_j * H[j, j]
                    if gain < best_gain and 0 <= q[i, j] + step <= maxq:
                        best_gain = gain
                        best_step = step
                if best_step != 0.0:
                    q[i, j] += best_step
                    d = best_step * s_j
                    for c in range(n):
                        g[k, c] += d * H[j, c]
                    loss[k] += best_gain
                    moved += 1
            total += moved
            if moved == 0:
                break
        moves[i] = total


def refine_integers(q: np.ndarray, W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int,
                    sweeps: int, rel_tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Coordinate descent on q with (s, z) fixed (mirrors decoupleq_ref.refine_integers)."""
    require()
    q, moves = descend_fixed(q, W, scale, zero, H, bits, sweeps, rel_tol)
    return q, int(moves.sum())


def descend_fixed(q: np.ndarray, W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int,
                  sweeps: int, rel_tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """refine_integers with the moves per row: (uint8 codes, int64 (out,) moves made)."""
    out, n = W.shape
    codes = q.astype(np.float64)  # float codes so ±1 steps never wrap
    moves = np.zeros(out, np.int64)
    step = row_chunk(n)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        R = residual_rows(codes, scale, zero, W, r0, r1)
        g = matmul(R, H)
        _descend_fixed(codes, g, np.einsum("ij,ij->i", g, R), scale, H, (1 << bits) - 1, sweeps, rel_tol, r0, moves)
    return codes.astype(np.uint8), moves


_profile = njit(inline="always")(profiled_loss_scalar)  # the reference's scalar source, compiled


@njit(parallel=True)
def _descend_profiled(q, u, stats, Hw, h1, H, oHo, maxq, symmetric, sweeps, rel_tol, r0, moves):
    """Per-channel descent on the profiled loss for rows r0 + k; stats[k] = (aHa, aH1, aHw, oHw, wHw)."""
    n = q.shape[1]
    for k in prange(u.shape[0]):
        i = r0 + k
        aHa, aH1, aHw, oHw, wHw = stats[k, 0], stats[k, 1], stats[k, 2], stats[k, 3], stats[k, 4]
        f = _profile(aHa, aH1, aHw, oHo, oHw, wHw, symmetric)
        total = 0
        for _ in range(sweeps):
            moved = 0
            for j in range(n):
                best = f - rel_tol * abs(f)
                best_step = 0.0
                for step in (-1.0, 1.0):
                    cand = _profile(aHa + 2 * step * u[k, j] + H[j, j], aH1 + step * h1[j], aHw + step * Hw[k, j],
                                    oHo, oHw, wHw, symmetric)
                    if cand < best and 0 <= q[i, j] + step <= maxq:
                        best = cand
                        best_step = step
                if best_step != 0.0:
                    aHa += 2 * best_step * u[k, j] + H[j, j]
                    aH1 += best_step * h1[j]
                    aHw += best_step * Hw[k, j]
                    for c in range(n):
                        u[k, c] += best_step * H[j, c]
                    q[i, j] += best_step
                    f = best
                    moved += 1
            total += moved
            if moved == 0:
                break
        moves[i] = total


def refine_profiled(q: np.ndarray, W: np.ndarray, H: np.ndarray, bits: int, symmetric: bool, sweeps: int,
                    rel_tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """Per-channel descent on min_{s,z} ℓ (mirrors decoupleq_ref.refine_profiled)."""
    require()
    q, moves = descend_profiled(q, W, H, matmul(W, H), bits, symmetric, sweeps, rel_tol)
    return q, int(moves.sum())


def descend_profiled(q: np.ndarray, W: np.ndarray, H: np.ndarray, t: np.ndarray, bits: int, symmetric: bool,
                     sweeps: int, rel_tol: float = 1e-12) -> tuple[np.ndarray, np.ndarray]:
    """refine_profiled with t = W·H given and the moves per row: (uint8 codes, int64 (out,) moves)."""
    out, n = W.shape
    codes = q.astype(np.float64)
    shift = float(1 << (bits - 1)) if symmetric else 0.0
    h1 = H.sum(axis=1)
    oHo = h1.sum()
    moves = np.zeros(out, np.int64)
    step = row_chunk(n)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        a = codes[r0:r1] - shift
        u = matmul(a, H)
        Hw = np.ascontiguousarray(t[r0:r1])
        stats = np.stack([np.einsum("ij,ij->i", u, a), a @ h1, np.einsum("ij,ij->i", Hw, a),
                          Hw.sum(axis=1), np.einsum("ij,ij->i", Hw, W[r0:r1])], axis=1)
        _descend_profiled(codes, u, stats, Hw, h1, H, oHo, (1 << bits) - 1, bool(symmetric), sweeps, rel_tol, r0,
                          moves)
    return codes.astype(np.uint8), moves
