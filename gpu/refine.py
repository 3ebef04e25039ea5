"""Exact-descent polish on the device (mirrors decoupleq_ref/refine.py, same names and results).

Rows are independent in both descents, so one thread owns one row and walks its columns in
index order exactly as the reference does; a row that moves nothing in a sweep would move
nothing in the next one either, so stopping per row equals the reference's global stop.

``refine_integers`` (fixed (s, z)): for q_ij → q_ij + δ, with g_i = (Ŵ_i − W_i) H kept current,

    Δ = 2 δ s_ij g_ij + δ² s_ij² H_jj,          accepted: g_i += δ s_ij H_j

``refine_profiled`` (per-channel, (s, z) follow every move): with a = q (or q − 2^(b−1)),

    f(a) = wHwᵀ − yᵀ P⁻¹ y,   P = [[aHaᵀ, aH1ᵀ], [aH1ᵀ, 1H1ᵀ]],  y = [aHwᵀ, 1Hwᵀ]

and a move changes aHaᵀ, aH1ᵀ, aHwᵀ by 2δ(aH)_j + δ²H_jj, δ(H1)_j, δ(wH)_j.

The per-row vectors g = R·H and u = a·H come from the tiled GEMM and are stored transposed
(column j of all rows contiguous), so a warp's threads touch consecutive addresses; H_j is read
by every thread of a warp at once (a broadcast).
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.checks import check_layer
from decoupleq_ref.refine import profiled_loss_scalar

from ._cuda import blocks, cuda, jit, require
from .linalg import gemm, transpose

ROW_THREADS = 64


@jit
def _refine_integers_kernel(q, W, scale, zero, H, Gt, maxq, sweeps, rel_tol, moves):
    i = cuda.grid(1)
    out, n = W.shape
    if i >= out:
        return
    gs = n // scale.shape[1]
    loss = 0.0
    for j in range(n):
        loss += Gt[j, i] * (scale[i, j // gs] * q[i, j] + zero[i, j // gs] - W[i, j])
    total = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(n):
            s = scale[i, j // gs]
            qj = float(q[i, j])
            best_gain = -rel_tol * abs(loss)
            best_step = 0.0
            for t in range(2):
                step = 2.0 * t - 1.0
                gain = 2.0 * step * s * Gt[j, i] + s * s * H[j, j]
                if gain < best_gain and qj + step >= 0.0 and qj + step <= maxq:
                    best_gain = gain
                    best_step = step
            if best_step != 0.0:
                q[i, j] = np.uint8(qj + best_step)
                c = best_step * s
                for k in range(n):
                    Gt[k, i] += c * H[j, k]
                loss += best_gain
                moved += 1
        total += moved
        if moved == 0:
            break
    moves[i] = total


_profile = jit(device=True)(profiled_loss_scalar)  # the reference's scalar source, as a device function


@jit
def _refine_profiled_kernel(q, W, H, Ut, HwT, h1, oHo, offset, symmetric, maxq, sweeps, rel_tol, moves):
    i = cuda.grid(1)
    out, n = W.shape
    if i >= out:
        return
    aHa = 0.0
    aH1 = 0.0
    aHw = 0.0
    oHw = 0.0
    wHw = 0.0
    for j in range(n):
        a = q[i, j] - offset
        aHa += Ut[j, i] * a
        aH1 += a * h1[j]
        aHw += HwT[j, i] * a
        oHw += HwT[j, i]
        wHw += HwT[j, i] * W[i, j]
    f = _profile(aHa, aH1, aHw, oHo, oHw, wHw, symmetric)
    total = 0
    for _ in range(sweeps):
        moved = 0
        for j in range(n):
            qj = float(q[i, j])
            best = f - rel_tol * abs(f)
            best_step = 0.0
            for t in range(2):
                step = 2.0 * t - 1.0
                cand = _profile(aHa + 2 * step * Ut[j, i] + H[j, j], aH1 + step * h1[j], aHw + step * HwT[j, i],
                                oHo, oHw, wHw, symmetric)
                if cand < best and qj + step >= 0.0 and qj + step <= maxq:
                    best = cand
                    best_step = step
            if best_step != 0.0:
                aHa += 2 * best_step * Ut[j, i] + H[j, j]
                aH1 += best_step * h1[j]
                aHw += best_step * HwT[j, i]
                for k in range(n):
                    Ut[k, i] += best_step * H[j, k]
                q[i, j] = np.uint8(qj + best_step)
                f = best
                moved += 1
        total += moved
        if moved == 0:
            break
    moves[i] = total


@jit
def _codes_minus_kernel(q, offset, A):
    """A = q − offset as float64 (the profiled descent's a)."""
    j, i = cuda.grid(2)
    if i < q.shape[0] and j < q.shape[1]:
        A[i, j] = q[i, j] - offset


def _copy(a):
    c = cuda.device_array_like(a)
    c.copy_to_device(a)
    return c


def _row_launch(out: int) -> tuple[int, int]:
    return blocks(out, ROW_THREADS), ROW_THREADS


def refine_integers_on_device(dW, dq, dscale, dzero, dH, bits: int, sweeps: int, rel_tol: float = 1e-12):
    """Device (q_new, moves) of refine_integers; dq is left unchanged."""
    from .objective import residual

    out, n = dW.shape
    G = cuda.device_array((out, n), np.float64)
    gemm(residual(dW, dq, dscale, dzero)[0], dH, G)
    q_new, moves = _copy(dq), cuda.device_array(out, np.int64)
    _refine_integers_kernel[_row_launch(out)](q_new, dW, dscale, dzero, dH, transpose(G), float((1 << bits) - 1),
                                              sweeps, rel_tol, moves)
    return q_new, int(moves.copy_to_host().sum())


def refine_profiled_on_device(dW, dq, dH, HwT, h1, oHo: float, bits: int, symmetric: bool, sweeps: int,
                              rel_tol: float = 1e-12):
    """Device (q_new, moves) of refine_profiled; HwT = (W·H)ᵀ, h1 = H·1 and oHo = 1ᵀH1 are the
    layer's constants (device, device, host float)."""
    from .linalg import launch_2d

    out, n = dW.shape
    offset = float(1 << (bits - 1)) if symmetric else 0.0
    A = cuda.device_array((out, n), np.float64)
    grid, block = launch_2d((out, n))
    _codes_minus_kernel[grid, block](dq, offset, A)
    U = cuda.device_array((out, n), np.float64)
    gemm(A, dH, U)
    q_new, moves = _copy(dq), cuda.device_array(out, np.int64)
    _refine_profiled_kernel[_row_launch(out)](q_new, dW, dH, transpose(U), HwT, h1, float(oHo), offset,
                                              bool(symmetric), float((1 << bits) - 1), sweeps, rel_tol, moves)
    return q_new, int(moves.copy_to_host().sum())


def refine_integers(q: np.ndarray, W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int,
                    sweeps: int, rel_tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """decoupleq_ref.refine_integers on the GPU (host arrays in and out): (q, moves accepted)."""
    require()
    W, H = check_layer(W, H, -1)
    dq = cuda.to_device(np.ascontiguousarray(q, np.uint8))
    q_new, moves = refine_integers_on_device(cuda.to_device(W), dq, cuda.to_device(np.ascontiguousarray(scale, np.float64)),
                                             cuda.to_device(np.ascontiguousarray(zero, np.float64)),
                                             cuda.to_device(H), bits, sweeps, rel_tol)
    return q_new.copy_to_host(), moves


def refine_profiled(q: np.ndarray, W: np.ndarray, H: np.ndarray, bits: int, symmetric: bool, sweeps: int,
                    rel_tol: float = 1e-12) -> tuple[np.ndarray, int]:
    """decoupleq_ref.refine_profiled on the GPU (host arrays in and out): (q, moves accepted)."""
    require()
    W, H = check_layer(W, H, -1)
    dW, dH = cuda.to_device(W), cuda.to_device(H)
    h1 = H.sum(axis=1)
    q_new, moves = refine_profiled_on_device(dW, cuda.to_device(np.ascontiguousarray(q, np.uint8)), dH,
                                             cuda.to_device(np.ascontiguousarray((W @ H).T)), cuda.to_device(h1),
                                             float(h1.sum()), bits, symmetric, sweeps, rel_tol)
    return q_new.copy_to_host(), moves
