"""Beyond the official solver: exact-descent integer refinement and certified lower bounds.

``refine_integers`` is a local search on q with (s, z) fixed: change one code by ±1 when that
lowers ℓ_i exactly. With the residual gradient g_i = (Ŵ_i − W_i) H kept up to date, the change
of ℓ_i for q_ij → q_ij + δ is

    Δ = 2 δ s_ij g_ij + δ² s_ij² H_jj                                    (exact, no approximation)

and accepting it costs one rank-1 update g_i += δ s_ij H_j, so a sweep over all columns costs
O(in) per row plus O(in) per accepted move.

``box_lower_bound`` certifies how much any integer step could still gain at fixed (s, z):
the box-relaxed QP is convex, so for any feasible w its optimum is at least
f(w) + min_{y ∈ box} ∇f(w)·(y − w) (the Frank-Wolfe dual bound), and the relaxed optimum is a
lower bound of the integer problem.
"""

from __future__ import annotations

import numpy as np

from .format import expand_groups
from .integer_step import box_bounds


def refine_integers(
    q: np.ndarray,
    W: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    H: np.ndarray,
    bits: int,
    sweeps: int,
    rel_tol: float = 1e-12,
) -> tuple[np.ndarray, int]:
    """Coordinate descent on q ∈ [0, 2^b − 1] with (s, z) fixed; returns (q, moves accepted).

    Columns are visited in index order; in each, every row takes the better of ±1 if it lowers
    ℓ_i by more than ``rel_tol``·ℓ_i (a tie tolerance, so float noise can never make it cycle).
    Stops after ``sweeps`` sweeps or the first sweep with no move. The loss never increases.
    """
    maxq = (1 << bits) - 1
    n = W.shape[1]
    s_e, z_e = expand_groups(scale, n), expand_groups(zero, n)
    q = q.astype(np.float64).copy()
    R = s_e * q + z_e - W
    g = R @ H
    loss = np.einsum("ij,ij->i", g, R)
    h_diag = np.diag(H)
    moves = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(n):
            s_j = s_e[:, j]
            best_gain = -rel_tol * np.abs(loss)
            best_step = np.zeros_like(s_j)
            for step in (-1.0, 1.0):
                gain = 2.0 * step * s_j * g[:, j] + s_j * s_j * h_diag[j]
                take = (gain < best_gain) & (q[:, j] + step >= 0) & (q[:, j] + step <= maxq)
                best_gain = np.where(take, gain, best_gain)
                best_step = np.where(take, step, best_step)
            rows = np.nonzero(best_step)[0]
            if rows.size:
                step = best_step[rows]
                q[rows, j] += step
                g[rows] += (step * s_j[rows])[:, None] * H[j]
                loss[rows] += best_gain[rows]
                moved += rows.size
        moves += moved
        if moved == 0:
            break
    return q, moves


def box_lower_bound(
    W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int, w: np.ndarray | None = None
) -> np.ndarray:
    """Per-row certified lower bound of min_{q integer} ℓ_i(q; s, z) at fixed (s, z).

    For f(w) = (w − W) H (w − W)ᵀ on the box [lo, hi] of the grid and any feasible w (default:
    W clipped to the box), min_box f ≥ f(w) + Σ_j min(∇f_j·(lo_j − w_j), ∇f_j·(hi_j − w_j)),
    ∇f = 2 (w − W) H. Clipped at 0 (ℓ ≥ 0 always holds).
    """
    n = W.shape[1]
    lo, hi = box_bounds(expand_groups(scale, n), expand_groups(zero, n), bits)
    w = np.clip(W if w is None else w, lo, hi)
    R = w - W
    grad = 2.0 * (R @ H)
    f = 0.5 * np.einsum("ij,ij->i", grad, R)
    fw_gap = np.minimum(grad * (lo - w), grad * (hi - w)).sum(axis=1)
    return np.maximum(f + fw_gap, 0.0)



def profiled_loss_scalar(aa: float, a1: float, aw: float, oHo: float, oHw: float, wHw: float,
                         symmetric: bool) -> float:
    """One row's min_{s,z} ℓ from its code sums (aHaᵀ, aH1ᵀ, aHwᵀ) and the row constants: the
    scalar form of ``profile`` in refine_profiled, same operations in the same order. Plain
    Python on purpose: the compiled backends compile this one source (kernels_numba with njit,
    gpu as a CUDA device function) instead of each keeping a copy."""
    if symmetric:
        return wHw - (aw * aw / aa if aa > 0 else 0.0)
    det = aa * oHo - a1 * a1
    if det > 1e-12 * abs(aa * oHo):
        return wHw - (aw * aw * oHo - 2 * a1 * aw * oHw + aa * oHw * oHw) / det
    return wHw - oHw * oHw / oHo  # constant a: only z is identifiable


def refine_profiled(
    q: np.ndarray, W: np.ndarray, H: np.ndarray, bits: int, symmetric: bool, sweeps: int, rel_tol: float = 1e-12
) -> tuple[np.ndarray, int]:
    """Per-channel coordinate descent on the profiled loss f(q) = min_{s,z} ℓ_i(q, s, z).

    With a = q (asymmetric) or a = q − 2^(b−1) (symmetric) the float step is the 2×2 (1×1)
    system of ALGORITHM.md §3, so f(q) = wHwᵀ − yᵀP⁻¹y needs only aHaᵀ, aH1ᵀ, aHwᵀ. A move
    a_j += δ changes them by 2δ(Ha)_j + δ²H_jj, δ(H1)_j, δ(Hw)_j: O(1) per candidate, and the
    accepted move updates Ha by δ·H_j (O(in)). Unlike refine_integers, (s, z) follow every move,
    so codes can move together with the grid. Returns (q, moves accepted); f never increases.
    """
    maxq = (1 << bits) - 1
    a = q.astype(np.float64) - (float(1 << (bits - 1)) if symmetric else 0.0)
    q = q.astype(np.float64).copy()
    h1, Hw = H.sum(axis=1), W @ H
    u = a @ H
    aHa, aH1, aHw = np.einsum("ij,ij->i", u, a), a @ h1, np.einsum("ij,ij->i", Hw, a)
    oHo, oHw, wHw = h1.sum(), Hw.sum(axis=1), np.einsum("ij,ij->i", Hw, W)
    h_diag = np.diag(H)

    def profile(aa: np.ndarray, a1: np.ndarray, aw: np.ndarray) -> np.ndarray:
        if symmetric:
            return wHw - np.where(aa > 0, aw * aw / np.where(aa > 0, aa, 1.0), 0.0)
        det = aa * oHo - a1 * a1
        ok = det > 1e-12 * np.abs(aa * oHo)
        full = (aw * aw * oHo - 2 * a1 * aw * oHw + aa * oHw * oHw) / np.where(ok, det, 1.0)
        return wHw - np.where(ok, full, oHw * oHw / oHo)  # constant a: only z is identifiable

    f = profile(aHa, aH1, aHw)
    moves = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(W.shape[1]):
            best = f - rel_tol * np.abs(f)
            best_step = np.zeros_like(f)
            for step in (-1.0, 1.0):
                cand = profile(aHa + 2 * step * u[:, j] + h_diag[j], aH1 + step * h1[j], aHw + step * Hw[:, j])
                take = (cand < best) & (q[:, j] + step >= 0) & (q[:, j] + step <= maxq)
                best = np.where(take, cand, best)
                best_step = np.where(take, step, best_step)
            rows = np.nonzero(best_step)[0]
            if rows.size:
                step = best_step[rows]
                aHa[rows] += 2 * step * u[rows, j] + h_diag[j]
                aH1[rows] += step * h1[j]
                aHw[rows] += step * Hw[rows, j]
                u[rows] += step[:, None] * H[j]
                q[rows, j] += step
                f[rows] = best[rows]
                moved += rows.size
        moves += moved
        if moved == 0:
            break
    return q, moves
