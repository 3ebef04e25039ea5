"""Dense building blocks shared by the solver kernels: a shared-memory tiled GEMM and
deterministic reductions (fixed summation order, no atomics: same inputs give the same bits)."""

from __future__ import annotations

import numpy as np

from ._cuda import blocks, cuda, jit, simulator

# TILE×TILE threads per block, one output per thread, tiles of both operands staged in shared
# memory. 16 on a GPU; 8 under the simulator, where every thread is a Python thread and 256 of
# them per block make the tests 4× slower (the kernels are written for any TILE).
TILE = 8 if simulator() else 16
REDUCE_THREADS = 256
# Shared-array shapes must be literal constants in CUDA (an expression like TILE + 1 inside the
# kernel types as a runtime int64), hence a named constant: +1 column against bank conflicts.
TILE_PAD = TILE + 1


@jit(device=True)
def sum_tile_rows(buf, row, col, width):
    """buf[row, 0] = Σ_c buf[row, c] over c < width (a power of two) by a fixed-order tree; every
    thread of the block must call it (it synchronises)."""
    cuda.syncthreads()
    step = width // 2
    while step > 0:
        if col < step:
            buf[row, col] += buf[row, col + step]
        cuda.syncthreads()
        step //= 2


@jit
def _gemm_kernel(A, B, C, alpha, beta):
    """C = alpha·A@B + beta·C. Tiles of A (rows i, cols k) and B (rows k, cols j) are read with
    consecutive threads on consecutive columns (coalesced) into shared memory."""
    As = cuda.shared.array((TILE, TILE), np.float64)
    Bs = cuda.shared.array((TILE, TILE), np.float64)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    i = cuda.blockIdx.y * TILE + ty
    j = cuda.blockIdx.x * TILE + tx
    M, K = A.shape
    N = B.shape[1]
    acc = 0.0
    for k0 in range(0, K, TILE):
        As[ty, tx] = A[i, k0 + tx] if i < M and k0 + tx < K else 0.0
        Bs[ty, tx] = B[k0 + ty, j] if k0 + ty < K and j < N else 0.0
        cuda.syncthreads()
        for t in range(TILE):
            acc += As[ty, t] * Bs[t, tx]
        cuda.syncthreads()
    if i < M and j < N:
        C[i, j] = alpha * acc + (beta * C[i, j] if beta != 0.0 else 0.0)


def gemm(A, B, C, alpha: float = 1.0, beta: float = 0.0) -> None:
    """C = alpha·A@B + beta·C on device arrays (views with strides are fine). beta = 0 ignores C's
    old content (NaN-safe)."""
    M, N = C.shape
    _gemm_kernel[(blocks(N, TILE), blocks(M, TILE)), (TILE, TILE)](A, B, C, float(alpha), float(beta))


@jit
def _sum_and_count_kernel(values, flags, result):
    """result = [Σ values, Σ flags] by one block: strided per-thread sums, then a tree."""
    acc = cuda.shared.array(REDUCE_THREADS, np.float64)
    cnt = cuda.shared.array(REDUCE_THREADS, np.float64)
    t = cuda.threadIdx.x
    a = 0.0
    c = 0.0
    for k in range(t, values.shape[0], REDUCE_THREADS):
        a += values[k]
        c += flags[k]
    acc[t] = a
    cnt[t] = c
    cuda.syncthreads()
    step = REDUCE_THREADS // 2
    while step > 0:
        if t < step:
            acc[t] += acc[t + step]
            cnt[t] += cnt[t + step]
        cuda.syncthreads()
        step //= 2
    if t == 0:
        result[0] = acc[0]
        result[1] = cnt[0]


def sum_and_count(values, flags) -> tuple[float, int]:
    """(Σ values, Σ flags) of two device vectors; only these two numbers reach the host."""
    result = cuda.device_array(2, np.float64)
    _sum_and_count_kernel[1, REDUCE_THREADS](values, flags, result)
    total, count = result.copy_to_host()
    return float(total), int(round(count))


@jit
def _transpose_kernel(A, At):
    """At = Aᵀ through a shared tile, so reads and writes are both coalesced."""
    tile = cuda.shared.array((TILE, TILE_PAD), np.float64)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    i = cuda.blockIdx.y * TILE + ty
    j = cuda.blockIdx.x * TILE + tx
    if i < A.shape[0] and j < A.shape[1]:
        tile[ty, tx] = A[i, j]
    cuda.syncthreads()
    i2 = cuda.blockIdx.x * TILE + ty
    j2 = cuda.blockIdx.y * TILE + tx
    if i2 < A.shape[1] and j2 < A.shape[0]:
        At[i2, j2] = tile[tx, ty]


def transpose(A):
    """A new device array Aᵀ."""
    M, N = A.shape
    At = cuda.device_array((N, M), A.dtype)
    _transpose_kernel[(blocks(N, TILE), blocks(M, TILE)), (TILE, TILE)](A, At)
    return At


def launch_2d(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Grid and block for an element-wise kernel over (rows, cols), x on the column (coalesced)."""
    rows, cols = shape
    return (blocks(cols, TILE), blocks(rows, TILE)), (TILE, TILE)
