"""Packed low-bit matmul on the device: y = x @ Ŵᵀ, Ŵ = s·q + z, straight from docs/FORMAT.md's
layout (no repacking: each row's bytes are read as little-endian uint32 words, word m holding
columns m·c … m·c + c − 1, c = 32/b codes, column m·c + r in bits [r·b, r·b + b)).

b ∈ {1, 2, 4, 8} (no code straddles a word); b = 3 is rejected with a ValueError. Activations
are fp16 or fp32, accumulation is fp32 and y is fp32.

* GEMV (batch ≤ 8): a warp per output row, a lane per word, so a warp reads 128 contiguous
  bytes of codes; the block stages the matching chunk of x in shared memory (one column of
  padding per word: no bank conflicts). When a group spans whole words (g a multiple of c) each
  word contributes s·Σ x·q + z·Σ x, one scale/zero load per word.
* GEMM (batch > 8): tiles of x and of dequantized Ŵ (fp32) in shared memory, TILE×TILE outputs
  per block.
* fp16 branch (FORMAT.md, optional): y += x[:, idx] @ Bᵀ by a second small kernel, one thread
  per output, B (out, k) held as fp32 (exact from fp16).
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.matmul import PackedLayer

from ._cuda import blocks, cuda, jit, require
from .linalg import TILE, sum_tile_rows

GEMV_MAX_BATCH = 8
WARP = 32
GEMV_WARPS = 4
CHUNK_WORDS = WARP  # words per row per step: one per lane
XS_STRIDE = 33  # ≥ codes per word + 1 (skew against bank conflicts), for b ≥ 1
MM_K = 32  # columns per GEMM step
SUPPORTED_BITS = (1, 2, 4, 8)


@jit
def _gemv_kernel(x, words, scale, zero, bits, gs, y):
    xs = cuda.shared.array((GEMV_MAX_BATCH, CHUNK_WORDS * XS_STRIDE), np.float32)
    red = cuda.shared.array((GEMV_WARPS, WARP), np.float32)
    acc = cuda.local.array(GEMV_MAX_BATCH, np.float32)
    dq = cuda.local.array(GEMV_MAX_BATCH, np.float32)
    sx = cuda.local.array(GEMV_MAX_BATCH, np.float32)
    tid = cuda.threadIdx.x
    warp, lane = tid // WARP, tid % WARP
    o = cuda.blockIdx.x * GEMV_WARPS + warp
    batch, n = x.shape
    out, nwords = words.shape
    cpw = 32 // bits
    mask = (1 << bits) - 1
    whole_words = gs % cpw == 0
    for bb in range(GEMV_MAX_BATCH):
        acc[bb] = 0.0
    for w0 in range(0, nwords, CHUNK_WORDS):
        c0 = w0 * cpw
        for e in range(tid, batch * CHUNK_WORDS * cpw, cuda.blockDim.x):
            bb, c = e // (CHUNK_WORDS * cpw), e % (CHUNK_WORDS * cpw)
            col = c0 + c
            xs[bb, (c // cpw) * XS_STRIDE + c % cpw] = np.float32(x[bb, col]) if col < n else np.float32(0.0)
        cuda.syncthreads()
        m = w0 + lane
        if o < out and m < nwords and m * cpw < n:
            word = words[o, m]
            base = lane * XS_STRIDE
            if whole_words:
                for bb in range(batch):
                    dq[bb] = 0.0
                    sx[bb] = 0.0
                for r in range(cpw):
                    code = np.float32((word >> (r * bits)) & mask)
                    for bb in range(batch):
                        v = xs[bb, base + r]
                        dq[bb] += v * code
                        sx[bb] += v
                g = (m * cpw) // gs
                s, z = scale[o, g], zero[o, g]
                for bb in range(batch):
                    acc[bb] += s * dq[bb] + z * sx[bb]
            else:
                for r in range(cpw):
                    col = m * cpw + r
                    if col < n:
                        g = col // gs
                        wv = scale[o, g] * np.float32((word >> (r * bits)) & mask) + zero[o, g]
                        for bb in range(batch):
                            acc[bb] += xs[bb, base + r] * wv
        cuda.syncthreads()
    for bb in range(batch):  # fixed-order tree over the lanes of each warp
        red[warp, lane] = acc[bb]
        sum_tile_rows(red, warp, lane, WARP)
        if lane == 0 and o < out:
            y[bb, o] = red[warp, 0]
        cuda.syncthreads()


@jit
def _gemm_kernel(x, words, scale, zero, bits, gs, y):
    """Block = TILE batch rows × TILE outputs; per step MM_K columns of x and of Ŵ in shared memory."""
    xs = cuda.shared.array((TILE, MM_K + 1), np.float32)
    ws = cuda.shared.array((TILE, MM_K + 1), np.float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    tid = ty * TILE + tx
    b0, o0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    batch, n = x.shape
    out = words.shape[0]
    cpw = 32 // bits
    mask = (1 << bits) - 1
    acc = np.float32(0.0)
    for k0 in range(0, n, MM_K):
        for e in range(tid, TILE * MM_K, TILE * TILE):
            r, c = e // MM_K, e % MM_K
            col = k0 + c
            xs[r, c] = np.float32(x[b0 + r, col]) if b0 + r < batch and col < n else np.float32(0.0)
            o = o0 + r
            if o < out and col < n:
                g = col // gs
                code = (words[o, col // cpw] >> ((col % cpw) * bits)) & mask
                ws[r, c] = scale[o, g] * np.float32(code) + zero[o, g]
            else:
                ws[r, c] = 0.0
        cuda.syncthreads()
        for t in range(MM_K):
            acc += xs[ty, t] * ws[tx, t]
        cuda.syncthreads()
    if b0 + ty < batch and o0 + tx < out:
        y[b0 + ty, o0 + tx] = acc


@jit
def _branch_kernel(x, idx, B, y):
    """y[b, o] += Σ_j x[b, idx[j]]·B[o, j]: the fp16 branch's k columns (fp32 accumulation)."""
    o, b = cuda.grid(2)
    if b < y.shape[0] and o < y.shape[1]:
        acc = np.float32(0.0)
        for j in range(idx.shape[0]):
            acc += np.float32(x[b, idx[j]]) * B[o, j]
        y[b, o] += acc


class DevicePackedLayer:
    """A PackedLayer on the device: uint32 words (out, row_bytes/4), fp32 scale and zero, and
    the fp16 branch (int32 indices, B as fp32) when the layer has one."""

    def __init__(self, layer: PackedLayer):
        if not isinstance(layer, PackedLayer):
            raise ValueError(f"layer: expected a decoupleq_ref.PackedLayer, got {type(layer).__name__}; "
                             f"build one with PackedLayer.from_result(res)")
        if layer.bits not in SUPPORTED_BITS:
            raise ValueError(f"layer.bits: packed_matmul supports bits in {SUPPORTED_BITS} (codes that never "
                             f"straddle a 32-bit word); got {layer.bits}: use decoupleq_ref.matmul")
        require()
        self.shape, self.bits = layer.shape, layer.bits
        self.group_size = layer.shape[1] if layer.group_size == -1 else layer.group_size
        self.words = cuda.to_device(np.ascontiguousarray(layer.packed).view("<u4"))
        self.scale = cuda.to_device(np.ascontiguousarray(layer.scale, np.float32))
        self.zero = cuda.to_device(np.ascontiguousarray(layer.zero, np.float32))
        self.hp_index = self.hp_weight = None
        if layer.hp_channels:
            self.hp_index = cuda.to_device(np.ascontiguousarray(layer.hp_index, np.int32))
            self.hp_weight = cuda.to_device(np.ascontiguousarray(layer.hp_weight, np.float32))


def _check_x(x, n_in: int):
    dtype, shape = np.dtype(x.dtype), tuple(x.shape)
    if dtype not in (np.float16, np.float32):
        raise ValueError(f"x: expected float16 or float32 activations, got {dtype}; convert with x.astype(np.float16)")
    if len(shape) != 2 or shape[0] == 0:
        raise ValueError(f"x: expected a non-empty 2-D (batch, in) array, got shape {shape}")
    if shape[1] != n_in:
        raise ValueError(f"x: has {shape[1]} columns but the layer's input dimension is {n_in}")


def packed_matmul(x, layer: PackedLayer | DevicePackedLayer):
    """y = x @ Ŵᵀ (fp32) for x (batch, in) fp16/fp32, a numpy or numba device array; with the
    fp16 branch, y = x @ (s·q + z)ᵀ + x[:, idx] @ Bᵀ.

    A host x gives a host y; a device x gives a device y (what benchmarks time). GEMV kernel for
    batch ≤ 8, tiled GEMM above."""
    dev = layer if isinstance(layer, DevicePackedLayer) else DevicePackedLayer(layer)
    _check_x(x, dev.shape[1])
    on_host = isinstance(x, np.ndarray)
    dx = cuda.to_device(np.ascontiguousarray(x)) if on_host else x
    batch, out = dx.shape[0], dev.shape[0]
    y = cuda.device_array((batch, out), np.float32)
    if batch <= GEMV_MAX_BATCH:
        _gemv_kernel[blocks(out, GEMV_WARPS), GEMV_WARPS * WARP](dx, dev.words, dev.scale, dev.zero, dev.bits,
                                                                 dev.group_size, y)
    else:
        _gemm_kernel[(blocks(out, TILE), blocks(batch, TILE)), (TILE, TILE)](dx, dev.words, dev.scale, dev.zero,
                                                                           dev.bits, dev.group_size, y)
    if dev.hp_index is not None:
        _branch_kernel[(blocks(out, TILE), blocks(batch, TILE)), (TILE, TILE)](dx, dev.hp_index, dev.hp_weight, y)
    return y.copy_to_host() if on_host else y
