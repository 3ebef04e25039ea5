"""Initialisation on the device (mirrors decoupleq_ref/init.py): the shrink grid search.

For every shrink factor p the residual of RTN on the grid [p·xmin, p·xmax] is built by an
element-wise kernel (a chunk of p at a time, batched in the grid's z dimension) and scored by
the fused row-loss kernel; each row keeps the first p of smallest loss (ties keep the larger p,
as the reference's strict ``<`` does). The codes use the reference's exact float operations

    s_p = (p·xmax − p·xmin) / (2^b − 1),   z_p = p·xmin  (symmetric: −s_p·2^(b−1)),
    q = clamp(⌊(W − z_p)/s_p + ½⌋, 0, 2^b − 1)

so every candidate grid is bit-identical to the reference's; losses differ at rounding level.
min-max ranges and the winning (s, z) are O(out·G) host glue (reference functions).
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.init import minmax_range, minmax_scale_zero, shrink_factors

from ._cuda import blocks, cuda, jit, require
from .linalg import TILE
from .objective import layer_row_losses, row_quad, rtn_code

CHUNK_ELEMENTS = 1 << 26  # residual stack of at most 2^26 float64 (512 MiB) per chunk of p


@jit
def _grid_residual_kernel(W, xmin, xmax, pvals, p0, maxq, half, symmetric, R):
    """R[k] = RTN(W; p·xmin, p·xmax) − W for p = pvals[p0 + k]; k = blockIdx.z."""
    j = cuda.blockIdx.x * TILE + cuda.threadIdx.x
    i = cuda.blockIdx.y * TILE + cuda.threadIdx.y
    k = cuda.blockIdx.z
    out, n = W.shape
    if i < out and j < n:
        g = j // (n // xmin.shape[1])
        p = pvals[p0 + k]
        lo = p * xmin[i, g]
        s = (p * xmax[i, g] - lo) / maxq
        z = -s * half if symmetric else lo
        R[k, i, j] = s * rtn_code(W[i, j], s, z, maxq) + z - W[i, j]


@jit
def _keep_first_min_kernel(losses, p0, best, best_k):
    """Row i keeps candidate p0 + k if its loss is strictly below the best so far."""
    i = cuda.grid(1)
    if i < losses.shape[1]:
        for k in range(losses.shape[0]):
            if p0 + k == 0 or losses[k, i] < best[i]:
                best[i] = losses[k, i]
                best_k[i] = p0 + k


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
    """Device (best loss, best index into pvals) per row over the shrink factors pvals."""
    out, n = dW.shape
    maxq, half = (1 << bits) - 1, float(1 << (bits - 1))
    dxmin, dxmax, dp = cuda.to_device(xmin), cuda.to_device(xmax), cuda.to_device(pvals)
    best = cuda.device_array(out, np.float64)
    best_k = cuda.device_array(out, np.int64)
    chunk = max(1, min(len(pvals), CHUNK_ELEMENTS // (out * n)))
    R = cuda.device_array((chunk, out, n), np.float64)
    for p0 in range(0, len(pvals), chunk):
        k = min(chunk, len(pvals) - p0)
        _grid_residual_kernel[(blocks(n, TILE), blocks(out, TILE), k), (TILE, TILE)](
            dW, dxmin, dxmax, dp, p0, float(maxq), half, symmetric, R)
        losses = row_quad(R[:k], dH)
        _keep_first_min_kernel[blocks(out, 128), 128](losses, p0, best, best_k)
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
