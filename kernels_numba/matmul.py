"""y = x @ Ŵᵀ straight from the packed codes (docs/FORMAT.md), float32 activations.

Batches up to GEMV_MAX_BATCH never build Ŵ. For b ∈ {1, 2, 4, 8} a 32-bit word of a packed row
holds C = 32/b whole codes, word j holding columns C·j … C·j + C − 1. With x transposed to
xT[r, j] = x[C·j + r] (once per call), word j's share of x·q is

    P[j] = Σ_r ((w_j >> b·r) & (2^b − 1)) · xT[r, j]

and the loop over j reads w_j and each xT[r, ·] contiguously, so LLVM vectorises it across
words: per code position r, one mask, int→float conversion and fused multiply-add for 8 (AVX2)
or 16 (AVX-512) words at once. The mask is w & ((2^b − 1) << b·r), i.e. the code times 2^(b·r),
met by xT[r] prescaled by 2^(−b·r) (exact; skipped when that would make some x subnormal).
Partial sums per word keep the adds out of one dependency chain: the word loop is compiled
without reassociation, which would merge them again. Rows go through in pairs, each xT load
serving both (the loop is bound by the vector pipes while xT sits in L1; a long row's xT does
not, and its loads from L2 then cost a third more). Then
y_i = Σ_g s_g·Σ_{j in g} P[j] + z_g·Σ_{k in g} x_k. Only the packed words (b/32 of a float32
weight) are read. (The kernel before looked up one 256-entry table per byte; table loads do not
vectorise, and it was 3-4x slower.) Bit widths whose codes straddle words (3, 5, 6, 7) and
groups that do not start on a word decode each row into a small buffer first (_gemv_generic).

Larger batches (GEMM) dequantize tiles of TILE_ROWS rows to float32, one tile per thread, and
multiply each with single-threaded BLAS: the full Ŵ is never materialised.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.checks import is_float_dtype
from decoupleq_ref.matmul import PackedLayer

from ._blas import one_blas_thread
from ._compat import njit, prange, require
from .packing import _unpack_rows

__all__ = ["GEMV_MAX_BATCH", "dequantize", "packed_matmul"]

GEMV_MAX_BATCH = 48  # the word GEMV up to here: its cost grows with the batch; the tiles for BLAS
# catch up at about 64 (bench/bench_numba.py --only matmul, BENCHMARKS.md §3)
GENERIC_GEMV_MAX_BATCH = 4  # the row-decoding GEMV for widths and groups that do not fit a word
TILE_ROWS = 128
GEMV_ROWS = 64  # rows per task of the word GEMV (one P buffer each)
SUB_BYTES = 64  # float32 partial sums run over at most this many bytes (generic path)
# fast-math without reassociation: LLVM may fuse multiply-adds but must keep the partial sums
# of _word_dots2 apart (with reassoc it folds them back into one serial chain)
NO_REASSOC = {"contract", "nnan", "ninf", "nsz", "arcp"}


def _make_word_gemv(bits: int, prescaled: bool):
    """The word GEMV for one bit width: C = 32/b is a compile-time constant, so the loop over a
    word's C codes unrolls and the loop over words vectorises. `prescaled`: xT[r] holds
    x·2^(−b·r) for r < C − 1 (see _code)."""
    C = 32 // bits
    M = (1 << bits) - 1

    @njit(inline="always")
    def _code(w, k):
        """Code k of word w as float32 — times 2^(b·k) when prescaled: w & (M << b·k) is one
        operation where a shift and a mask are two, and exact (at most b significant bits). The
        top code, whose mask holds the sign bit, is always shifted."""
        if prescaled and k < C - 1:
            return np.float32(np.int32(w & (M << (bits * k))))
        return np.float32(np.int32((w >> (bits * k)) & M))

    @njit(fastmath=NO_REASSOC)
    def _word_dots2(xT, row0, row1, P0, P1):
        """P[j] = Σ_r ((row[j] >> b·r) & (2^b − 1)) · x[C·j + r] for every word j of two packed
        rows in one pass, each xT load serving both: a long row's xT does not fit L1 (11008
        columns at b = 2 are 44 KB), and the loads from L2 bounded a one-row pass there. Two
        partial sums per row."""
        for j in range(row0.shape[0]):
            w0 = row0[j]
            w1 = row1[j]
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            b0 = np.float32(0.0)
            b1 = np.float32(0.0)
            for r in range(0, C, 2):
                x0 = xT[r, j]
                x1 = xT[r + 1, j]
                a0 += _code(w0, r) * x0
                a1 += _code(w0, r + 1) * x1
                b0 += _code(w1, r) * x0
                b1 += _code(w1, r + 1) * x1
            P0[j] = a0 + a1
            P1[j] = b0 + b1

    @njit(parallel=True, fastmath=True)
    def _gemv_words(xT, xs, words, scale, zero, y):
        """y[t, i] = Σ_g s_ig·Σ_{j in g} P_t[j] + z_ig·xs[t, g], P_t from _word_dots2 on row i;
        threads take blocks of GEMV_ROWS rows, each with its own P, and pair row k of a block's
        first half with row k of its second half (an odd last row with itself, so every row is
        summed the same way wherever it sits). Pairing
        adjacent rows instead made 11008×4096 twice as slow once its 11 MiB left L2 (two streams
        1 KB apart; measured, cause not pinned down)."""
        out, nw = words.shape
        wg = nw // scale.shape[1]
        for blk in prange((out + GEMV_ROWS - 1) // GEMV_ROWS):
            P = np.empty((2, nw), np.float32)
            i0 = blk * GEMV_ROWS
            i1 = min(out, i0 + GEMV_ROWS)
            h = (i1 - i0) // 2
            for i in range(i0, i0 + h):
                for t in range(xT.shape[0]):
                    _word_dots2(xT[t], words[i], words[i + h], P[0], P[1])
                    y[t, i] = _scaled_group_sums(P[0], scale[i], zero[i], xs[t], wg)
                    y[t, i + h] = _scaled_group_sums(P[1], scale[i + h], zero[i + h], xs[t], wg)
            if (i1 - i0) % 2:
                for t in range(xT.shape[0]):
                    _word_dots2(xT[t], words[i1 - 1], words[i1 - 1], P[0], P[1])
                    y[t, i1 - 1] = _scaled_group_sums(P[0], scale[i1 - 1], zero[i1 - 1], xs[t], wg)

    return _gemv_words


@njit(fastmath=True)
def _scaled_group_sums(P, s, z, xs, wg):
    """Σ_g s[g]·Σ_{j in g} P[j] + z[g]·xs[g] for groups of wg words. Read-only loops with
    the small group widths spelled out, which LLVM vectorises across groups (an in-place pairwise
    fold does not vectorise: its stores may alias its loads)."""
    G = s.shape[0]
    tot = 0.0
    if G == 1:
        a = np.float32(0.0)
        for j in range(P.shape[0]):
            a += P[j]
        return s[0] * np.float64(a) + z[0] * xs[0]
    if wg == 1:
        for g in range(G):
            tot += s[g] * np.float64(P[g]) + z[g] * xs[g]
    elif wg == 2:
        for g in range(G):
            tot += s[g] * np.float64(P[2 * g] + P[2 * g + 1]) + z[g] * xs[g]
    elif wg == 4:
        for g in range(G):
            tot += s[g] * np.float64((P[4 * g] + P[4 * g + 1]) + (P[4 * g + 2] + P[4 * g + 3])) + z[g] * xs[g]
    else:
        for g in range(G):
            a = np.float32(0.0)
            for j in range(g * wg, (g + 1) * wg):
                a += P[j]
            tot += s[g] * np.float64(a) + z[g] * xs[g]
    return tot


_WORD_GEMV: dict = {}


def _word_gemv(bits: int, prescaled: bool):
    if (bits, prescaled) not in _WORD_GEMV:
        _WORD_GEMV[bits, prescaled] = _make_word_gemv(bits, prescaled)
    return _WORD_GEMV[bits, prescaled]


def _transposed_x(x: np.ndarray, bits: int, nw: int) -> tuple[np.ndarray, bool]:
    """xT[t, r, j] = x[t, C·j + r] (zero past the last column, where the padding codes are 0),
    prescaled by 2^(−b·r) for r < C − 1 unless that would make a value subnormal (|x| < 2^−96)
    and lose bits; returns (xT, prescaled)."""
    C = 32 // bits
    batch, n = x.shape
    xT = np.zeros((batch, nw * C), np.float32)
    xT[:, :n] = x
    xT = np.ascontiguousarray(xT.reshape(batch, nw, C).transpose(0, 2, 1))
    ax = np.abs(x)
    prescaled = not np.any((ax < 2.0 ** -96) & (ax > 0))
    if prescaled:
        xT[:, :-1] *= (2.0 ** (-bits * np.arange(C - 1, dtype=np.float32)))[:, None]
    return xT, prescaled


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
    if x.ndim != 2 or not is_float_dtype(x.dtype):
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
    C = 32 // layer.bits if 32 % layer.bits == 0 else 0
    on_words = C and (scale.shape[1] == 1 or gs % C == 0)  # groups start on a 32-bit word
    if batch <= (GEMV_MAX_BATCH if on_words else GENERIC_GEMV_MAX_BATCH):
        xs = x.reshape(batch, -1, gs).sum(axis=2, dtype=np.float64)
        if on_words:
            words = layer.packed.view(np.int32)  # little-endian words, docs/FORMAT.md
            xT, prescaled = _transposed_x(x, layer.bits, words.shape[1])
            _word_gemv(layer.bits, prescaled)(xT, xs, words, scale, zero, y)
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
