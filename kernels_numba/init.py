"""Initialisation (mirrors decoupleq_ref/init.py): min-max (s, z), RTN, and the shrink grid search.

The reference scores each of the ~160 shrink factors p with a full row_losses, i.e. one
(out, in)·(in, in) product per p. ``init_scale_zero`` here picks the same p per row with about
two products in total, using that the codes move little between neighbouring p:

* In exact arithmetic Ŵ_p = s_p·q_p + z_p = p·V_p with V_p = s₁·q_p + z₁ (s₁, z₁ the p = 1
  grid), so with r₁ = V₁ − W and D_p = V_p − V₁ = s₁·(q_p − q₁) (sparse: only changed codes)

      pV_p − W = p·(r₁ + D_p) − (1 − p)·W
      ℓ(p) = p²·(ℓ₁ + 2·D_p·g₁ + D_p H D_pᵀ) − 2p(1 − p)·(r₁·t + D_p·t) + (1 − p)²·W H Wᵀ

  with g₁ = r₁H and t = WH (the two products). D_p·g₁ and D_p·t change by O(1) per changed
  code. D_p H D_pᵀ is kept exactly by rank-1 updates u ← u + d·H_j (u = D_p H), and
  ΔD H Dᵀ = d·(u_old + u_new) needs u only at the changed columns.
* A code changes at most 2^b − 1 times over the grid (|x/p| grows monotonically), measured
  ≈ 0.5–0.75 changes per weight for 2 bits, so the updates cost ≈ 0.7 products instead of 160.
  They are done per panel of PANEL columns of H copied into a thread-local buffer, for a block
  of rows at a time, so H is streamed from memory once per row block. The updates read random
  rows of the panel (one per changed code), so they are bound by cache latency, not flops.
* The codes q_p are computed with the reference's exact float operations (same s_p, z_p,
  safe_div, round-half-up), so every candidate grid and the chosen (s, z) are bit-identical to
  the reference's; only the loss values differ, at rounding level (ε·WHWᵀ).
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.init import minmax_range, minmax_scale_zero, shrink_factors  # O(out·G) glue

from ._blas import matmul
from ._compat import njit, prange, require
from .objective import residual_rows, row_chunk

__all__ = ["grid_search", "init_scale_zero", "minmax_range", "minmax_scale_zero", "quantize_rtn", "shrink_factors"]

PANEL = 128  # columns of H per panel (128·in·8 bytes = 4 MiB per thread for in = 4096): longer
# rank-1 updates than 64 (2.4 vs 2.7 s for a 1024×4096 g64 init, 0.20 vs 0.22 s for 576×1536, one
# development measurement each); 256 gains little more for twice the buffer


@njit(inline="always")
def _den(s):
    """safe_div's denominator: max(|s|, 1e-15) with s's sign (0 counts as positive)."""
    sgn = -1.0 if s < 0 else 1.0
    return max(abs(s), 1e-15) * sgn


@njit(inline="always")
def _clip_code(x, maxq):
    if x < 0:
        return 0
    if x > maxq:
        return maxq
    return int(x)


@njit(parallel=True)
def _rtn_codes(W, scale, zero, maxq):
    """clamp(⌊(W − z)/s + ½⌋) with the reference's exact operations (quantize_rtn), uint8."""
    out, n = W.shape
    G = scale.shape[1]
    gs = n // G
    q = np.empty((out, n), np.uint8)
    for i in prange(out):
        for g in range(G):
            z = zero[i, g]
            den = _den(scale[i, g])
            for j in range(g * gs, (g + 1) * gs):
                q[i, j] = _clip_code(np.floor((W[i, j] - z) / den + 0.5), maxq)
    return q


def quantize_rtn(W: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """q = clamp(round((W − z)/s), 0, 2^b − 1) (mirrors decoupleq_ref.quantize_rtn), as uint8
    codes: the compiled solver keeps q as uint8 throughout (8× less memory than float64)."""
    require()
    return _rtn_codes(W, np.ascontiguousarray(scale, dtype=np.float64),
                      np.ascontiguousarray(zero, dtype=np.float64), (1 << bits) - 1)


@njit
def _flag_codes(w, z, inv, maxq, prev, flag):
    """flag[j] = 1 where the reference's code clamp(⌊(w − z)/den + ½⌋) may differ from prev[j],
    in a branch-free (vectorised) loop with a multiply by inv = 1/den: where the fast code
    differs from prev, or where (w − z)/den + ½ is within a few ulps of an integer so the
    multiply and the exact division may floor differently. The caller recomputes flagged
    entries with the exact division; between neighbouring shrink factors few are flagged."""
    for j in range(w.shape[0]):
        f = (w[j] - z) * inv + 0.5
        fl = np.floor(f)
        d = f - fl
        tol = 1e-12 * (abs(f) + 1.0)
        code = min(max(fl, 0.0), maxq)
        flag[j] = np.uint8((d < tol) | (d > 1.0 - tol) | (code != np.float64(prev[j])))


@njit
def _record_changes(W, g1, t, xmin, xmax, s1, q1, ps, maxq, half, symmetric, r0, r1):
    """Phase A of the grid search for rows r0..r1: the code changes between neighbouring shrink
    factors as events (column ej, value ev = s₁·Δq), row ii's step-k events at off[ii, k]..off[ii,
    k+1], and D_p·g₁, D_p·t kept cumulatively (cumg, cumt)."""
    n = W.shape[1]
    G = xmin.shape[1]
    gs = n // G
    K = ps.shape[0]
    m = r1 - r0
    cap = m * n // 2 + 1024
    ej = np.empty(cap, np.int32)
    ev = np.empty(cap)
    off = np.empty((m, K + 1), np.int64)
    cumg = np.zeros((m, K))
    cumt = np.zeros((m, K))
    prev = np.empty(n, np.uint8)
    flag = np.zeros((gs + 7) // 8 * 8, np.uint8)  # scanned 8 at a time as uint64; the tail stays 0
    flag8 = flag.view(np.uint64)
    ne = 0
    for ii in range(m):
        i = r0 + ii
        for j in range(n):
            prev[j] = q1[i, j]
        off[ii, 0] = ne
        off[ii, 1] = ne
        dg = 0.0
        dt = 0.0
        for k in range(1, K):
            if ne + n > cap:  # room for a step's worth of events (kept out of the column loop:
                cap = 2 * cap + n  # a reassigned array there costs reference counting per column)
                ej2 = np.empty(cap, np.int32)
                ev2 = np.empty(cap)
                ej2[:ne] = ej[:ne]
                ev2[:ne] = ev[:ne]
                ej = ej2
                ev = ev2
            p = ps[k]
            for g in range(G):
                lo = p * xmin[i, g]
                s = (p * xmax[i, g] - lo) / maxq
                z = -s * half if symmetric else lo
                den = _den(s)
                inv = 1.0 / den
                sg = s1[i, g]
                j0 = g * gs
                _flag_codes(W[i, j0:j0 + gs], z, inv, float(maxq), prev[j0:j0 + gs], flag)
                for b in range(flag8.shape[0]):
                    if flag8[b] == 0:  # the common case: eight codes that did not move
                        continue
                    for j in range(j0 + 8 * b, min(j0 + 8 * b + 8, j0 + gs)):
                        if not flag[j - j0]:
                            continue
                        c = _clip_code(np.floor((W[i, j] - z) / den + 0.5), maxq)  # the reference's operation
                        if c != prev[j]:
                            v = sg * (np.float64(c) - np.float64(prev[j]))
                            ej[ne] = j
                            ev[ne] = v
                            ne += 1
                            dg += v * g1[i, j]
                            dt += v * t[i, j]
                            prev[j] = c
            off[ii, k + 1] = ne
            cumg[ii, k] = dg
            cumt[ii, k] = dt
    return ej, ev, off, cumg, cumt


@njit
def _quadratic_increments(H, ej, ev, off, K, panel):
    """Phase B: da[ii, k] = Δ(D H Dᵀ) from step k − 1 to k, as d·(u_old + u_new) at the changed
    columns, with u = D H kept per panel of H's columns (copied once into a local buffer)."""
    m = off.shape[0]
    n = H.shape[0]
    da = np.zeros((m, K))
    Hp = np.empty((n, panel))
    up = np.empty(panel)
    for p0 in range(0, n, panel):
        w = min(panel, n - p0)
        for l in range(n):
            for c in range(w):
                Hp[l, c] = H[l, p0 + c]
        for ii in range(m):
            for c in range(w):
                up[c] = 0.0
            for k in range(1, K):
                e0 = off[ii, k]
                e1 = off[ii, k + 1]
                if e0 == e1:
                    continue
                acc = 0.0
                for e in range(e0, e1):
                    jj = ej[e] - p0
                    if jj >= 0 and jj < w:
                        acc += ev[e] * up[jj]
                for e in range(e0, e1):
                    v = ev[e]
                    jr = ej[e]
                    for c in range(w):
                        up[c] += v * Hp[jr, c]
                for e in range(e0, e1):
                    jj = ej[e] - p0
                    if jj >= 0 and jj < w:
                        acc += ev[e] * up[jj]
                da[ii, k] += acc
    return da


@njit
def _pick_factor(W, R1, g1, t, ps, cumg, cumt, da, r0, kbest, best):
    """Phase C: every row's ℓ(p) from the expansion (module docstring) and its best p (strict <:
    ties keep the larger p, as the reference)."""
    n = W.shape[1]
    K = ps.shape[0]
    for ii in range(da.shape[0]):
        i = r0 + ii
        l1 = 0.0
        e1r = 0.0
        cw = 0.0
        for j in range(n):
            l1 += R1[i, j] * g1[i, j]
            e1r += R1[i, j] * t[i, j]
            cw += W[i, j] * t[i, j]
        b = l1
        kb = 0
        a = 0.0
        for k in range(1, K):
            a += da[ii, k]
            p = ps[k]
            A = l1 + 2.0 * cumg[ii, k] + a
            B = e1r + cumt[ii, k]
            loss = p * p * A - 2.0 * p * (1.0 - p) * B + (1.0 - p) * (1.0 - p) * cw
            if loss < b:
                b = loss
                kb = k
        best[i] = b
        kbest[i] = kb


@njit
def _grid_block(W, R1, g1, t, H, xmin, xmax, s1, q1, ps, maxq, half, symmetric, r0, r1, panel, kbest, best):
    """Rows r0..r1 of the grid search (one task; see the module docstring): record the code
    changes, accumulate D_p H D_pᵀ, then each row picks its p."""
    ej, ev, off, cumg, cumt = _record_changes(W, g1, t, xmin, xmax, s1, q1, ps, maxq, half, symmetric, r0, r1)
    da = _quadratic_increments(H, ej, ev, off, ps.shape[0], panel)
    _pick_factor(W, R1, g1, t, ps, cumg, cumt, da, r0, kbest, best)


@njit(parallel=True)
def _grid_kernel(W, R1, g1, t, H, xmin, xmax, s1, q1, ps, maxq, half, symmetric, rb, panel):
    """Best shrink-factor index and its loss per row; one prange task per block of rb rows."""
    out = W.shape[0]
    kbest = np.zeros(out, np.int64)
    best = np.empty(out)
    nblk = (out + rb - 1) // rb
    for blk in prange(nblk):
        _grid_block(W, R1, g1, t, H, xmin, xmax, s1, q1, ps, maxq, half, symmetric,
                    blk * rb, min(out, blk * rb + rb), panel, kbest, best)
    return kbest, best


def _row_block(out: int) -> int:
    """Rows per grid task: ≥ 4 tasks for 2 threads, ≤ 256 rows (event buffers stay small)."""
    return int(max(1, min(256, -(-out // 4))))


def init_scale_zero(W: np.ndarray, H: np.ndarray, bits: int, group_size: int, symmetric: bool, grid: int,
                    max_shrink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink grid search (mirrors decoupleq_ref.init_scale_zero): the same p per row, hence
    bitwise the same (s, z); the returned losses agree to rounding (see the module docstring)."""
    require()
    return grid_search(W, H, matmul(W, H), bits, group_size, symmetric, grid, max_shrink)


def grid_search(W: np.ndarray, H: np.ndarray, t: np.ndarray, bits: int, group_size: int, symmetric: bool, grid: int,
                max_shrink: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """init_scale_zero with t = W·H given (the solver computes it once per layer): (scale, zero,
    ℓ of RTN on that grid per row, from the incremental formula)."""
    xmin, xmax = minmax_range(W, group_size, symmetric)
    s1, z1 = minmax_scale_zero(xmin, xmax, bits, symmetric)
    ps = shrink_factors(grid, max_shrink)
    maxq = (1 << bits) - 1
    q1 = _rtn_codes(W, s1, z1, maxq)
    out, n = W.shape
    kbest = np.empty(out, np.int64)
    loss = np.empty(out)
    step = row_chunk(n)
    for r0 in range(0, out, step):
        r1 = min(out, r0 + step)
        R1 = residual_rows(q1, s1, z1, W, r0, r1)
        sl = slice(r0, r1)
        kbest[sl], loss[sl] = _grid_kernel(W[sl], R1, matmul(R1, H), t[sl], H, xmin[sl], xmax[sl], s1[sl], q1[sl], ps,
                                           maxq, float(1 << (bits - 1)), bool(symmetric), _row_block(r1 - r0), PANEL)
    p = ps[kbest][:, None]
    scale, zero = minmax_scale_zero(p * xmin, p * xmax, bits, symmetric)
    return scale, zero, loss
