"""Initialisation on the device (mirrors decoupleq_ref/init.py): the shrink grid search.

The reference scores each of the ~160 shrink factors p with a full row_losses, one
(out, in)·(in, in) product per p. This is the numba backend's incremental search
(kernels_numba/init.py, whose docstring derives it) on the device: the same p per row from two
products and rank-1 updates.

* With s₁, z₁ the p = 1 grid, V_p = s₁·q_p + z₁, r₁ = V₁ − W, D_p = V_p − V₁ = s₁·(q_p − q₁)
  (sparse), g₁ = r₁H and t = WH (the two products, ``linalg.gemm``):

      ℓ(p) = p²·(ℓ₁ + 2·D_p·g₁ + D_p H D_pᵀ) − 2p(1 − p)·(r₁·t + D_p·t) + (1 − p)²·W H Wᵀ

* ``_grid_kernel``: a block per row (rows strided over the grid, per-block scratch). Per step
  p_{k−1} → p_k each thread computes the codes of its own contiguous segment of columns; a
  block-wide prefix sum of the per-thread change counts writes the changed columns (j, s₁·Δq)
  in column order; u = D_p H is kept in global scratch by rank-1 updates u += Δ H (threads on
  consecutive columns of H's rows: coalesced), and Δ(D H Dᵀ) = Δ·(u_old + u_new) needs u only at
  the changed columns. A code changes at most 2^b − 1 times over the grid, so the updates cost
  about one product in total instead of 160. Every sum is a fixed-order tree: deterministic.
* The codes use the reference's exact float operations (a multiply by 1/s where that provably
  gives the same floor, as the numba backend)

      s_p = (p·xmax − p·xmin) / (2^b − 1),   z_p = p·xmin  (symmetric: −s_p·2^(b−1)),
      q = clamp(⌊(W − z_p)/s_p + ½⌋, 0, 2^b − 1)

  so every candidate grid is bit-identical to the reference's and each row keeps the first p of
  smallest loss (strict ``<``: ties keep the larger p, as the reference). Only the loss values
  differ, at rounding level (ε·WHWᵀ). min-max ranges and the winning (s, z) are O(out·G) host
  glue (reference functions).
"""

from __future__ import annotations

import math

import numpy as np

from decoupleq_ref.init import minmax_range, minmax_scale_zero, shrink_factors

from ._cuda import blocks, cuda, jit, require, simulator
from .linalg import TILE, gemm
from .objective import residual, rtn_code, safe_den

# Threads per row block (a power of two: the prefix sum and the reductions are trees). 16 under
# the simulator, where every thread is a Python thread; literal for CUDA's shared-array shapes.
GRID_THREADS = 16 if simulator() else 256
# Blocks of the grid kernel, each walking rows blockIdx.x, + gridDim.x, …; bounds the per-block
# scratch (codes, u and the change list: 22 bytes per column, 236 MiB at 1024 blocks × 11008
# columns).
# 3 under the simulator so that the tests walk several rows per block.
GRID_BLOCKS = 3 if simulator() else 1024


@jit(device=True)
def _sum3_tree(red, tid):
    """red[r, 0] = Σ_t red[r, t] for r < 3 by a fixed-order tree over GRID_THREADS; every thread
    of the block calls it (it synchronises before and after each level)."""
    cuda.syncthreads()
    step = GRID_THREADS // 2
    while step > 0:
        if tid < step:
            for r in range(3):
                red[r, tid] += red[r, tid + step]
        cuda.syncthreads()
        step //= 2


@jit(device=True, inline=True)
def _step_code(w, s, z, inv, maxq, prev):
    """The reference's code clamp(⌊(w − z)/s + ½⌋) on a step's grid, mostly without a division:
    the multiply by inv = 1/safe_den(s) gives the same floor unless (w − z)/s + ½ lies within a
    few ulps of an integer, and a code that moves is recomputed too, so every code that differs
    from prev comes from the reference's exact operation (kernels_numba.init._flag_codes)."""
    f = (w - z) * inv + 0.5
    fl = math.floor(f)
    d = f - fl
    tol = 1e-12 * (abs(f) + 1.0)
    code = min(max(fl, 0.0), maxq)
    if d < tol or d > 1.0 - tol or code != prev:
        return rtn_code(w, s, z, maxq)
    return code


@jit
def _grid_kernel(W, R1, g1, t, H, xmin, xmax, s1, q1, ps, maxq, half, symmetric, prev, cur, u, ej, ev,
                 best, best_k):
    """best[i], best_k[i]: the smallest ℓ(p) over ps and its first index, per row (module docstring).

    Block b walks rows b, b + gridDim.x, …; prev, cur (uint8), u (float64), ej (int32) and ev
    (float64) are its (gridDim.x, n) scratch rows: the codes at p_{k−1} and p_k, D_p H, and the
    changed columns of the step with their s₁·Δq."""
    cnt = cuda.shared.array(GRID_THREADS, np.int32)
    red = cuda.shared.array((3, GRID_THREADS), np.float64)
    tid = cuda.threadIdx.x
    b = cuda.blockIdx.x
    out, n = W.shape
    gs = n // xmin.shape[1]
    K = ps.shape[0]
    seg = (n + GRID_THREADS - 1) // GRID_THREADS
    j0 = min(n, tid * seg)
    j1 = min(n, j0 + seg)
    for i in range(b, out, cuda.gridDim.x):
        l1 = 0.0
        e1r = 0.0
        cw = 0.0
        for j in range(tid, n, GRID_THREADS):
            prev[b, j] = q1[i, j]
            u[b, j] = 0.0
            l1 += R1[i, j] * g1[i, j]
            e1r += R1[i, j] * t[i, j]
            cw += W[i, j] * t[i, j]
        red[0, tid] = l1
        red[1, tid] = e1r
        red[2, tid] = cw
        _sum3_tree(red, tid)
        l1 = red[0, 0]
        e1r = red[1, 0]
        cw = red[2, 0]
        cumg = 0.0
        cumt = 0.0
        a = 0.0
        lbest = l1
        kb = 0
        cuda.syncthreads()  # everyone has read red before it is reused
        for k in range(1, K):
            p = ps[k]
            nc = 0
            g_at = -1
            s = z = inv = 0.0
            for j in range(j0, j1):
                g = j // gs
                if g != g_at:  # the step's grid for this group: the reference's (s_p, z_p)
                    lo = p * xmin[i, g]
                    s = (p * xmax[i, g] - lo) / maxq
                    z = -s * half if symmetric else lo
                    inv = 1.0 / safe_den(s)
                    g_at = g
                c = _step_code(W[i, j], s, z, inv, maxq, np.float64(prev[b, j]))
                cur[b, j] = np.uint8(c)
                if cur[b, j] != prev[b, j]:
                    nc += 1
            cnt[tid] = nc
            cuda.syncthreads()
            step = 1  # inclusive prefix sum of the counts (Hillis-Steele)
            while step < GRID_THREADS:
                v = cnt[tid - step] if tid >= step else 0
                cuda.syncthreads()
                cnt[tid] += v
                cuda.syncthreads()
                step *= 2
            total = cnt[GRID_THREADS - 1]
            pos = cnt[tid] - nc
            dg = 0.0
            dt = 0.0
            for j in range(j0, j1):
                if cur[b, j] != prev[b, j]:
                    v = s1[i, j // gs] * (np.float64(cur[b, j]) - np.float64(prev[b, j]))
                    ej[b, pos] = j
                    ev[b, pos] = v
                    pos += 1
                    dg += v * g1[i, j]
                    dt += v * t[i, j]
                    prev[b, j] = cur[b, j]
            cuda.syncthreads()
            acc = 0.0
            for e in range(tid, total, GRID_THREADS):  # Δ·u_old
                acc += ev[b, e] * u[b, ej[b, e]]
            cuda.syncthreads()
            if total > 0:
                for col in range(tid, n, GRID_THREADS):  # u += Δ H, rank 1 per changed code
                    x = u[b, col]
                    for e in range(total):
                        x += ev[b, e] * H[ej[b, e], col]
                    u[b, col] = x
            cuda.syncthreads()
            for e in range(tid, total, GRID_THREADS):  # Δ·u_new
                acc += ev[b, e] * u[b, ej[b, e]]
            red[0, tid] = dg
            red[1, tid] = dt
            red[2, tid] = acc
            _sum3_tree(red, tid)
            cumg += red[0, 0]
            cumt += red[1, 0]
            a += red[2, 0]
            A = l1 + 2.0 * cumg + a
            B = e1r + cumt
            loss = p * p * A - 2.0 * p * (1.0 - p) * B + (1.0 - p) * (1.0 - p) * cw
            if loss < lbest:
                lbest = loss
                kb = k
            cuda.syncthreads()  # everyone has read red and cnt before the next step
        if tid == 0:
            best[i] = lbest
            best_k[i] = kb


@jit
def _rtn_codes_kernel(W, scale, zero, maxq, q):
    j = cuda.blockIdx.x * TILE + cuda.threadIdx.x
    i = cuda.blockIdx.y * TILE + cuda.threadIdx.y
    out, n = W.shape
    if i < out and j < n:
        g = j // (n // scale.shape[1])
        q[i, j] = np.uint8(rtn_code(W[i, j], scale[i, g], zero[i, g], maxq))


def rtn_codes(dW, dscale, dzero, bits: int):
    """Device uint8 codes q = clamp(⌊(W − z)/s + ½⌋) (the reference's quantize_rtn)."""
    out, n = dW.shape
    q = cuda.device_array((out, n), np.uint8)
    _rtn_codes_kernel[(blocks(n, TILE), blocks(out, TILE)), (TILE, TILE)](dW, dscale, dzero, (1 << bits) - 1, q)
    return q


def grid_search(dW, dH, xmin: np.ndarray, xmax: np.ndarray, pvals: np.ndarray, bits: int, symmetric: bool):
    """Device (best loss, best index into pvals) per row over the shrink factors pvals
    (pvals[0] = 1: the min-max grid the increments start from)."""
    out, n = dW.shape
    maxq, half = (1 << bits) - 1, float(1 << (bits - 1))
    s1, z1 = minmax_scale_zero(xmin, xmax, bits, symmetric)
    ds1 = cuda.to_device(np.ascontiguousarray(s1, np.float64))
    q1 = rtn_codes(dW, ds1, cuda.to_device(np.ascontiguousarray(z1, np.float64)), bits)
    R1 = residual(dW, q1, ds1, cuda.to_device(np.ascontiguousarray(z1, np.float64)))[0]
    g1 = cuda.device_array((out, n), np.float64)
    t = cuda.device_array((out, n), np.float64)
    gemm(R1, dH, g1)
    gemm(dW, dH, t)
    nb = min(out, GRID_BLOCKS)
    prev, cur = (cuda.device_array((nb, n), np.uint8) for _ in range(2))
    u, ev = (cuda.device_array((nb, n), np.float64) for _ in range(2))
    ej = cuda.device_array((nb, n), np.int32)
    best = cuda.device_array(out, np.float64)
    best_k = cuda.device_array(out, np.int64)
    _grid_kernel[nb, GRID_THREADS](dW, R1, g1, t, dH, cuda.to_device(np.ascontiguousarray(xmin, np.float64)),
                                   cuda.to_device(np.ascontiguousarray(xmax, np.float64)), ds1, q1,
                                   cuda.to_device(np.ascontiguousarray(pvals, np.float64)), float(maxq), half,
                                   bool(symmetric), prev, cur, u, ej, ev, best, best_k)
    return best, best_k


def init_scale_zero(
    W: np.ndarray, H: np.ndarray, bits: int, group_size: int, symmetric: bool, grid: int, max_shrink: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink grid search: each row keeps the p minimising ℓ_i(RTN(W; p·xmin, p·xmax)).

    Same contract as decoupleq_ref.init_scale_zero: returns host (scale, zero, row_loss)."""
    require()
    W = np.ascontiguousarray(W, np.float64)
    (s, z), loss = init_on_device(cuda.to_device(W), cuda.to_device(np.ascontiguousarray(H, np.float64)),
                                  W, bits, group_size, symmetric, grid, max_shrink)
    return s, z, loss.copy_to_host()


def init_on_device(dW, dH, W: np.ndarray, bits: int, group_size: int, symmetric: bool, grid: int,
                   max_shrink: float):
    """Grid search with W, H already on the device; returns host (scale, zero) and device losses."""
    xmin, xmax = minmax_range(W, group_size, symmetric)
    pvals = shrink_factors(grid, max_shrink)
    best, best_k = grid_search(dW, dH, xmin, xmax, pvals, bits, symmetric)
    p = pvals[best_k.copy_to_host()][:, None]
    # p = 1 is exactly the reference's unscaled min-max (1.0·x == x), so one formula serves all p
    scale, zero = minmax_scale_zero(p * xmin, p * xmax, bits, symmetric)
    return (scale, zero), best
