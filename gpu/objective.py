"""Row losses on the device (mirrors decoupleq_ref/objective.py):

    ℓ_i = (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ = Σ_j (R H)_ij R_ij,   R = Ŵ − W

One fused kernel per stack of residual matrices: a block owns TILE rows and sweeps all column
tiles of R H (H tiles in shared memory), multiplying each finished tile by R in its epilogue, so
R H is never stored. The per-row sum is reduced in a fixed order (deterministic, no atomics).
"""

from __future__ import annotations

import math

import numpy as np

from ._cuda import blocks, cuda, jit, require
from .linalg import TILE, launch_2d, sum_tile_rows


@jit(device=True, inline=True)
def safe_den(s):
    """safe_div's denominator: max(|s|, 1e-15) with s's sign (0 counts as positive)."""
    sgn = -1.0 if s < 0 else 1.0
    return max(abs(s), 1e-15) * sgn


@jit(device=True, inline=True)
def rtn_code(w, s, z, maxq):
    """clamp(⌊(w − z)/s + ½⌋, 0, maxq): the reference's quantize_rtn / gptq rounding, one value."""
    c = math.floor((w - z) / safe_den(s) + 0.5)  # float in CUDA (np.floor is not a CUDA function)
    return min(max(c, 0.0), float(maxq))


@jit
def _row_quad_kernel(R, H, losses):
    """losses[p, i] = Σ_j (R_p H)_ij R_p[i, j] for a stack R (K, out, n); block = (TILE rows, p)."""
    Rs = cuda.shared.array((TILE, TILE), np.float64)
    Hs = cuda.shared.array((TILE, TILE), np.float64)
    red = cuda.shared.array((TILE, TILE), np.float64)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    p = cuda.blockIdx.y
    i = cuda.blockIdx.x * TILE + ty
    out, n = R.shape[1], R.shape[2]
    total = 0.0
    for j0 in range(0, n, TILE):
        acc = 0.0
        for k0 in range(0, n, TILE):
            Rs[ty, tx] = R[p, i, k0 + tx] if i < out and k0 + tx < n else 0.0
            Hs[ty, tx] = H[k0 + ty, j0 + tx] if k0 + ty < n and j0 + tx < n else 0.0
            cuda.syncthreads()
            for t in range(TILE):
                acc += Rs[ty, t] * Hs[t, tx]
            cuda.syncthreads()
        if i < out and j0 + tx < n:
            total += acc * R[p, i, j0 + tx]
    red[ty, tx] = total
    sum_tile_rows(red, ty, tx, TILE)
    if tx == 0 and i < out:
        losses[p, i] = red[ty, 0]


def row_quad(R, H):
    """Device (K, out) losses of a device stack R (K, out, n) of residuals."""
    K, out, _ = R.shape
    losses = cuda.device_array((K, out), np.float64)
    _row_quad_kernel[(blocks(out, TILE), K), (TILE, TILE)](R, H, losses)
    return losses


@jit
def _residual_kernel(W, q, scale, zero, R):
    """R[0] = scale·q + zero − W with (scale, zero) expanded over each row's groups."""
    j = cuda.blockIdx.x * TILE + cuda.threadIdx.x
    i = cuda.blockIdx.y * TILE + cuda.threadIdx.y
    out, n = W.shape
    if i < out and j < n:
        g = j // (n // scale.shape[1])
        R[0, i, j] = scale[i, g] * q[i, j] + zero[i, g] - W[i, j]


def residual(W, q, scale, zero):
    """Device (1, out, n) residual Ŵ − W of codes q and (scale, zero)."""
    R = cuda.device_array((1,) + tuple(W.shape), np.float64)
    grid, block = launch_2d(W.shape)
    _residual_kernel[grid, block](W, q, scale, zero, R)
    return R


def layer_row_losses(W, q, scale, zero, H):
    """Device (out,) ℓ_i of the codes q with (scale, zero) on H: the solver's objective."""
    return row_quad(residual(W, q, scale, zero), H)[0]


def row_losses(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ℓ_i = (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ for every row (host arrays in and out, float64)."""
    require()
    R = np.ascontiguousarray((np.asarray(W_hat, np.float64) - np.asarray(W, np.float64))[None])
    return row_quad(cuda.to_device(R), cuda.to_device(np.ascontiguousarray(H, np.float64))).copy_to_host()[0]
