"""y = x @ Ŵᵀ straight from the packed codes (docs/FORMAT.md), float32 activations.

Small batches (GEMV, batch ≤ GEMV_MAX_BATCH) never build Ŵ. For b ∈ {1, 2, 4, 8} a byte holds
c = 8/b whole codes, so byte j of any row contributes T[j, byte] = Σ_r code_r(byte)·x[c·j + r]
to that row's x·q: one 256-entry table per byte position, built once per call (256·in/c adds),
turns the GEMV into one table lookup and one add per byte (c codes) instead of c
decode-multiply-adds; then y_i = Σ_g s_g·(group sum) + z_g·Σ_{k in g} x_k. Only the packed
bytes (b/32 of a float32 weight) stream from memory. Sums run in float32 over one 16-byte slab,
then in float64. Bit widths whose codes straddle bytes (3, 5, 6, 7) or groups that do not start
on a 32-bit word decode each row into a small buffer first.

Larger batches (GEMM) dequantize tiles of TILE_ROWS rows to float32, one tile per thread, and
multiply each with single-threaded BLAS: the full Ŵ is never materialised.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.matmul import PackedLayer

from ._blas import one_blas_thread
from ._compat import njit, prange, require
from .packing import _unpack_rows

__all__ = ["GEMV_MAX_BATCH", "dequantize", "packed_matmul"]

GEMV_MAX_BATCH = 4
TILE_ROWS = 128
SUB_BYTES = 64  # float32 partial sums run over at most this many bytes (generic path)
SLAB = 4  # words (16 bytes) of each row per pass of the table GEMV: a 16 KiB slice of the tables


@njit(parallel=True)
def _byte_tables(x, bits):
    """T[t, j, v] = Σ_r code_r(v) · x[t, c·j + r]: byte j's contribution to x·q for every byte value
    v (c = 8/b codes per byte). Built from two 16-entry nibble tables (bit k of v is worth
    2^(k mod b) · x[c·j + k // b]), so 256 adds per byte instead of 256·c products."""
    batch, n = x.shape
    c = 8 // bits
    nb = n // c
    T = np.empty((batch, nb, 256), np.float32)
    for j in prange(nb):
        lo = np.zeros(16, np.float32)
        hi = np.zeros(16, np.float32)
        for t in range(batch):
            for v in range(16):
                a = np.float32(0.0)
                b = np.float32(0.0)
                for k in range(4):
                    if (v >> k) & 1:
                        a += np.float32(1 << (k % bits)) * x[t, c * j + k // bits]
                        b += np.float32(1 << ((k + 4) % bits)) * x[t, c * j + (k + 4) // bits]
                lo[v] = a
                hi[v] = b
            for v in range(256):
                T[t, j, v] = lo[v & 15] + hi[v >> 4]
    return T


@njit(inline="always")
def _word_sum(Tt, w, base):
    """Σ over the 4 bytes of packed word w of their table entries (T rows base/256 … +3)."""
    return ((Tt[base + (w & 255)] + Tt[base + 256 + ((w >> 8) & 255)])
            + (Tt[base + 512 + ((w >> 16) & 255)] + Tt[base + 768 + (w >> 24)]))


@njit(parallel=True, fastmath=True)
def _gemv_tables(T, xs, words, scale, zero, wg, y):
    """y[t, i] = Σ_g s_ig · Σ_{bytes j of g} T[t, j, p_ij] + z_ig · xs[t, g], reading the packed
    row as uint32 words (wg words per group; byte k of word m is packed byte 4m + k).

    Threads take row ranges; within one, the loop runs group by group and SLAB words at a time
    over all its rows, so the 4·SLAB × 256 slice of T in use stays in L1."""
    out = words.shape[0]
    batch = T.shape[0]
    G = scale.shape[1]
    Tf = T.reshape(batch, -1)
    parts = min(out, 8)
    for p in prange(parts):
        r0 = p * out // parts
        r1 = (p + 1) * out // parts
        acc = np.zeros((batch, r1 - r0))
        dot = np.empty((batch, r1 - r0))
        for g in range(G):
            dot[:] = 0.0
            for m0 in range(g * wg, (g + 1) * wg, SLAB):
                m1 = min(m0 + SLAB, (g + 1) * wg)
                for t in range(batch):
                    Tt = Tf[t]
                    for i in range(r0, r1):
                        part = np.float32(0.0)
                        if m1 - m0 == SLAB:  # fixed trip count: fully unrolled
                            for mm in range(SLAB):
                                part += _word_sum(Tt, words[i, m0 + mm], (m0 + mm) << 10)
                        else:
                            for m in range(m0, m1):
                                part += _word_sum(Tt, words[i, m], m << 10)
                        dot[t, i - r0] += part
            for t in range(batch):
                for i in range(r0, r1):
                    acc[t, i - r0] += scale[i, g] * dot[t, i - r0] + zero[i, g] * xs[t, g]
        for t in range(batch):
            for i in range(r0, r1):
                y[t, i] = acc[t, i - r0]


@njit(parallel=True, fastmath=True)
def _gemv_generic(x, xs, packed, scale, zero, bits, gs, y):
    """Any b and group size: decode each row's codes into a buffer, then group dot products."""
    out = packed.shape[0]
    batch, n = x.shape
    G = scale.shape[1]
    for i in prange(out):
        codes = _unpack_rows(packed[i:i + 1], bits, n)[0]
        for t in range(batch):
            total = 0.0
            for g in range(G):
                dot = 0.0
                for k0 in range(g * gs, (g + 1) * gs, 4 * SUB_BYTES):
                    part = np.float32(0.0)
                    for k in range(k0, min(k0 + 4 * SUB_BYTES, (g + 1) * gs)):
                        part += np.float32(codes[k]) * x[t, k]
                    dot += part
                total += scale[i, g] * dot + zero[i, g] * xs[t, g]
            y[t, i] = total


@njit
def _dequant_tile(packed, scale, zero, bits, r0, r1, n):
    """Ŵ[r0:r1] (quantized part) in float32; byte-aligned widths decode c = 8/b codes per byte
    with shifts, the others through the bit-stream unpacker."""
    gs = n // scale.shape[1]
    T = np.empty((r1 - r0, n), np.float32)
    if 8 % bits == 0 and gs % (8 // bits) == 0:  # every byte inside one group
        c = 8 // bits
        mask = (1 << bits) - 1
        nbytes = n // c
        for k in range(r1 - r0):
            for jb in range(nbytes):
                g = (jb * c) // gs
                s = scale[r0 + k, g]
                z = zero[r0 + k, g]
                p = np.int32(packed[r0 + k, jb])
                for r in range(c):
                    T[k, jb * c + r] = s * np.float32((p >> (bits * r)) & mask) + z
        return T
    codes = _unpack_rows(packed[r0:r1], bits, n)
    for k in range(r1 - r0):
        for j in range(n):
            T[k, j] = np.float32(scale[r0 + k, j // gs] * codes[k, j] + zero[r0 + k, j // gs])
    return T


@njit(parallel=True)
def _gemm_tiles(x, packed, scale, zero, bits, y):
    out = packed.shape[0]
    n = x.shape[1]
    n_tiles = (out + TILE_ROWS - 1) // TILE_ROWS
    for t in prange(n_tiles):
        r0 = t * TILE_ROWS
        r1 = min(out, r0 + TILE_ROWS)
        Y = np.dot(x, _dequant_tile(packed, scale, zero, bits, r0, r1, n).T)
        y[:, r0:r1] = Y


def _check_x(x: np.ndarray, n_in: int) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind != "f":
        raise ValueError(f"x: expected a 2-D float (batch, in) array, got {x.dtype} {x.shape}; "
                         f"reshape a single vector with x[None, :]")
    if x.shape[1] != n_in:
        raise ValueError(f"x: has {x.shape[1]} columns but the layer's input dimension is {n_in}")
    return np.ascontiguousarray(x, dtype=np.float32)


def packed_matmul(x: np.ndarray, layer: PackedLayer) -> np.ndarray:
    """y = x @ Ŵᵀ in float32 for x (batch, in), from the packed layer (plus its fp16 branch
    x[:, hp_index] @ hp_weightᵀ when it has one). Agrees with decoupleq_ref.matmul to float32
    rounding."""
    require()
    out, n = layer.shape
    x = _check_x(x, n)
    batch = x.shape[0]
    gs = n // layer.scale.shape[1]
    scale = np.ascontiguousarray(layer.scale, dtype=np.float32)
    zero = np.ascontiguousarray(layer.zero, dtype=np.float32)
    y = np.empty((batch, out), np.float32)
    if batch == 0:
        return y
    if batch <= GEMV_MAX_BATCH:
        xs = x.reshape(batch, -1, gs).sum(axis=2, dtype=np.float64)
        c = 8 // layer.bits if 8 % layer.bits == 0 else 0
        per_channel = scale.shape[1] == 1
        if c and (per_channel or gs % (4 * c) == 0):  # groups start on a 32-bit word
            row_bytes = layer.packed.shape[1]
            xp = np.zeros((batch, row_bytes * c), np.float32)  # the padding codes are 0 and meet x = 0
            xp[:, :n] = x
            words = layer.packed.view(np.uint32)
            _gemv_tables(_byte_tables(xp, layer.bits), xs, words, scale, zero, words.shape[1] // scale.shape[1], y)
        else:
            _gemv_generic(x, xs, layer.packed, scale, zero, layer.bits, gs, y)
    else:
        with one_blas_thread():
            _gemm_tiles(x, layer.packed, scale, zero, layer.bits, y)
    if layer.hp_channels:
        y += x[:, layer.hp_index] @ layer.hp_weight.astype(np.float32).T
    return y


def dequantize(layer: PackedLayer) -> np.ndarray:
    """Ŵ (out, in) float64 from the packed layer, fp16 branch included (mirrors
    PackedLayer.dequantize; the codes are unpacked by the compiled kernel)."""
    require()
    out, n = layer.shape
    reps = n // layer.scale.shape[1]
    W_hat = (np.repeat(layer.scale.astype(np.float64), reps, axis=1) * _unpack_rows(layer.packed, layer.bits, n)
             + np.repeat(layer.zero.astype(np.float64), reps, axis=1))
    if layer.hp_channels:
        W_hat[:, layer.hp_index] += layer.hp_weight.astype(np.float64)
    return W_hat
