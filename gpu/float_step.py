"""Float step on the device (mirrors decoupleq_ref/float_step.py): exact least squares for (s, z)
per row with q fixed.  For row i, with a_g = q_i masked to group g and e_g its indicator,

    P θ = y,   P = [[A H Aᵀ, A H Eᵀ], [E H Aᵀ, E H Eᵀ]],   y = [A H W_iᵀ; E H W_iᵀ]   (paper eq. 8)

(symmetric: only A H Aᵀ with a_g = q_i − 2^(b−1) on group g, z = −s·2^(b−1)). Kernels:

* ``_gram_kernel``: block (row tile, g, h) forms (a_g H) on group h's columns tile by tile and
  contracts it with a_h and with ones in the epilogue: A H Aᵀ and A H Eᵀ without any (out, in)
  intermediate, flops of one q·H product.
* ``_rhs_kernel``: y from L = W H (computed once per layer) and the degenerate-group mask
  (q constant on the group, or ≡ 2^(b−1) when symmetric) from the same pass over q.
* ``_solve_kernel``: one block per row: builds P, moves held scales to the right-hand side
  (reference ``solve_rows``), then a cooperative Cholesky factorisation and two triangular solves.
  A row whose factorisation fails (singular H with damp = 0) is flagged and solved on the host by
  the reference (minimum-norm least squares) — the documented fallback.
"""

from __future__ import annotations

import math

import numpy as np

from decoupleq_ref.float_step import closed_form_scale_zero as reference_closed_form

from ._cuda import blocks, cuda, jit, require, simulator
from .linalg import TILE, sum_tile_rows

RHS_THREADS = 32
SOLVE_THREADS = 32 if simulator() else 128
MAX_SYSTEM_ENTRIES = 1 << 24  # rows per chunk: chunk·n² ≤ 2^24, as the reference


@jit
def _gram_kernel(q, H, offset, P11, P12):
    """P11[i,g,h] = a_g H a_hᵀ, P12[i,g,h] = a_g H e_hᵀ with a = q − offset; block = (rows, g, h)."""
    As = cuda.shared.array((TILE, TILE), np.float64)
    Hs = cuda.shared.array((TILE, TILE), np.float64)
    r11 = cuda.shared.array((TILE, TILE), np.float64)
    r12 = cuda.shared.array((TILE, TILE), np.float64)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    i = cuda.blockIdx.x * TILE + ty
    g, h = cuda.blockIdx.y, cuda.blockIdx.z
    out, n = q.shape
    gs = n // P11.shape[1]
    g0, h0 = g * gs, h * gs
    t11 = 0.0
    t12 = 0.0
    for k0 in range(h0, h0 + gs, TILE):
        acc = 0.0
        for j0 in range(g0, g0 + gs, TILE):
            j = j0 + tx
            As[ty, tx] = q[i, j] - offset if i < out and j < g0 + gs else 0.0
            jj, k = j0 + ty, k0 + tx
            Hs[ty, tx] = H[jj, k] if jj < g0 + gs and k < h0 + gs else 0.0
            cuda.syncthreads()
            for t in range(TILE):
                acc += As[ty, t] * Hs[t, tx]
            cuda.syncthreads()
        k = k0 + tx
        if i < out and k < h0 + gs:
            t11 += acc * (q[i, k] - offset)
            t12 += acc
    r11[ty, tx] = t11
    r12[ty, tx] = t12
    sum_tile_rows(r11, ty, tx, TILE)
    sum_tile_rows(r12, ty, tx, TILE)
    if tx == 0 and i < out:
        P11[i, g, h] = r11[ty, 0]
        P12[i, g, h] = r12[ty, 0]


@jit
def _rhs_kernel(L, q, offset, symmetric, ys, yz, dead):
    """ys[i,g] = Σ_{k∈g} L_ik (q_ik − offset), yz[i,g] = Σ_{k∈g} L_ik, dead[i,g]: s not identifiable."""
    s1 = cuda.shared.array(RHS_THREADS, np.float64)
    s2 = cuda.shared.array(RHS_THREADS, np.float64)
    lo = cuda.shared.array(RHS_THREADS, np.float64)
    hi = cuda.shared.array(RHS_THREADS, np.float64)
    t = cuda.threadIdx.x
    i, g = cuda.blockIdx.x, cuda.blockIdx.y
    gs = q.shape[1] // ys.shape[1]
    a = 0.0
    b = 0.0
    mn = 1e300
    mx = -1e300
    for k in range(g * gs + t, (g + 1) * gs, RHS_THREADS):
        c = float(q[i, k])
        a += L[i, k] * (c - offset)
        b += L[i, k]
        mn = min(mn, c)
        mx = max(mx, c)
    s1[t], s2[t], lo[t], hi[t] = a, b, mn, mx
    cuda.syncthreads()
    step = RHS_THREADS // 2
    while step > 0:
        if t < step:
            s1[t] += s1[t + step]
            s2[t] += s2[t + step]
            lo[t] = min(lo[t], lo[t + step])
            hi[t] = max(hi[t], hi[t + step])
        cuda.syncthreads()
        step //= 2
    if t == 0:
        ys[i, g] = s1[0]
        yz[i, g] = s2[0]
        dead[i, g] = lo[0] == hi[0] and (not symmetric or lo[0] == offset)


@jit
def _solve_kernel(P11, P12, P22, ys, yz, dead, scale, symmetric, half, A, b, new_s, new_z, failed):
    """Row r = blockIdx.x: assemble P θ = y with held scales fixed, Cholesky-solve, write (s, z)."""
    r = cuda.blockIdx.x
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    G = ys.shape[1]
    n = G if symmetric else 2 * G
    bad = cuda.shared.array(1, np.int32)
    # assemble P and y
    for e in range(t, n * n, nt):
        a, c = e // n, e % n
        if a < G and c < G:
            v = P11[r, a, c]
        elif a < G:
            v = P12[r, a, c - G]
        elif c < G:
            v = P12[r, c, a - G]
        else:
            v = P22[a - G, c - G]
        A[r, a, c] = v
    if t == 0:
        bad[0] = 0
    cuda.syncthreads()
    # held scales: y −= P v over the fixed unknowns, then their rows/columns become θ_g = v_g
    for a in range(t, n, nt):
        v = ys[r, a] if a < G else yz[r, a - G]
        for g in range(G):
            if dead[r, g]:
                v -= A[r, a, g] * scale[r, g]
        b[r, a] = v
    cuda.syncthreads()
    for g in range(G):
        if dead[r, g]:
            for a in range(t, n, nt):
                A[r, g, a] = 0.0
                A[r, a, g] = 0.0
            cuda.syncthreads()
            if t == 0:
                A[r, g, g] = 1.0
                b[r, g] = scale[r, g]
            cuda.syncthreads()
    # Cholesky P = L Lᵀ in the lower triangle (right-looking; threads share each trailing update)
    for k in range(n):
        if t == 0:
            d = A[r, k, k]
            if d > 0.0 and d < math.inf:
                A[r, k, k] = math.sqrt(d)
            else:
                bad[0] = 1
        cuda.syncthreads()
        if bad[0] != 0:
            break
        dk = A[r, k, k]
        for a in range(k + 1 + t, n, nt):
            A[r, a, k] /= dk
        cuda.syncthreads()
        m = n - k - 1
        for e in range(t, m * m, nt):
            a, c = k + 1 + e // m, k + 1 + e % m
            if c <= a:
                A[r, a, c] -= A[r, a, k] * A[r, c, k]
        cuda.syncthreads()
    if bad[0] != 0:
        if t == 0:
            failed[r] = 1
        return
    # L u = y, then Lᵀ θ = u
    for k in range(n):
        if t == 0:
            b[r, k] /= A[r, k, k]
        cuda.syncthreads()
        for a in range(k + 1 + t, n, nt):
            b[r, a] -= A[r, a, k] * b[r, k]
        cuda.syncthreads()
    for k in range(n - 1, -1, -1):
        if t == 0:
            b[r, k] /= A[r, k, k]
        cuda.syncthreads()
        for a in range(t, k, nt):
            b[r, a] -= A[r, k, a] * b[r, k]
        cuda.syncthreads()
    for g in range(t, G, nt):
        new_s[r, g] = b[r, g]
        new_z[r, g] = -b[r, g] * half if symmetric else b[r, G + g]
    if t == 0:
        failed[r] = 0


class FloatStepData:
    """What the float step needs from a layer, computed and moved to the device once:
    L = W·H (for y) and the block sums E H Eᵀ (the same for every row)."""

    def __init__(self, W: np.ndarray, H: np.ndarray, dW, dH, group_size: int):
        from .linalg import gemm

        out, n = W.shape
        self.W, self.H = W, H
        self.G = 1 if group_size == -1 else n // group_size
        gs = n // self.G
        self.L = cuda.device_array((out, n), np.float64)
        gemm(dW, dH, self.L)
        self.P22 = cuda.to_device(np.ascontiguousarray(H.reshape(self.G, gs, self.G, gs).sum(axis=(1, 3))))
        self.dH = dH


def float_step_on_device(data: FloatStepData, dq, dscale, bits: int, group_size: int, symmetric: bool):
    """Device (new_s, new_z) of the exact float step for device codes dq and current scales."""
    out, n = dq.shape
    G = data.G
    nsys = G if symmetric else 2 * G
    half = float(1 << (bits - 1))
    offset = half if symmetric else 0.0
    new_s = cuda.device_array((out, G), np.float64)
    new_z = cuda.device_array((out, G), np.float64)
    failed = cuda.device_array(out, np.int32)
    chunk = max(1, min(out, MAX_SYSTEM_ENTRIES // (nsys * nsys)))
    P11 = cuda.device_array((chunk, G, G), np.float64)
    P12 = cuda.device_array((chunk, G, G), np.float64)
    ys = cuda.device_array((chunk, G), np.float64)
    yz = cuda.device_array((chunk, G), np.float64)
    dead = cuda.device_array((chunk, G), np.bool_)
    A = cuda.device_array((chunk, nsys, nsys), np.float64)
    b = cuda.device_array((chunk, nsys), np.float64)
    for r0 in range(0, out, chunk):
        r1 = min(out, r0 + chunk)
        m = r1 - r0
        q_r = dq[r0:r1]
        _gram_kernel[(blocks(m, TILE), G, G), (TILE, TILE)](q_r, data.dH, offset, P11, P12)
        _rhs_kernel[(m, G), RHS_THREADS](data.L[r0:r1], q_r, offset, symmetric, ys, yz, dead)
        _solve_kernel[m, SOLVE_THREADS](P11, P12, data.P22, ys, yz, dead, dscale[r0:r1], symmetric, half,
                                        A, b, new_s[r0:r1], new_z[r0:r1], failed[r0:r1])
    bad = np.nonzero(failed.copy_to_host())[0]
    if len(bad):  # rare: singular systems, solved on the host by the reference (lstsq fallback)
        q_bad = dq.copy_to_host()[bad]
        s_bad, z_bad = reference_closed_form(q_bad, data.W[bad], data.H, bits, group_size, symmetric,
                                             dscale.copy_to_host()[bad])
        s_host, z_host = new_s.copy_to_host(), new_z.copy_to_host()
        s_host[bad], z_host[bad] = s_bad, z_bad
        new_s, new_z = cuda.to_device(s_host), cuda.to_device(z_host)
    return new_s, new_z


def closed_form_scale_zero(
    q: np.ndarray, W: np.ndarray, H: np.ndarray, bits: int, group_size: int, symmetric: bool, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """argmin_{s,z} Σ_i (s·q_i + z − W_i) H (…)ᵀ for fixed q (host arrays in and out).

    Same contract as decoupleq_ref.closed_form_scale_zero: ``scale`` is held for groups whose
    scale is not identifiable from q."""
    require()
    W = np.ascontiguousarray(W, np.float64)
    H = np.ascontiguousarray(H, np.float64)
    dW, dH = cuda.to_device(W), cuda.to_device(H)
    data = FloatStepData(W, H, dW, dH, group_size)
    s, z = float_step_on_device(data, cuda.to_device(np.ascontiguousarray(q, np.uint8)),
                                cuda.to_device(np.ascontiguousarray(scale, np.float64)), bits, group_size, symmetric)
    return s.copy_to_host(), z.copy_to_host()
