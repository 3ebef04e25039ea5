"""Bit packing (mirrors decoupleq_ref/packing.py, docs/FORMAT.md), compiled: one row per task.

Each row is a little-endian bit stream (value k at stream bits [k·b, k·b + b)), zero-padded to
``packed_row_bytes`` so every row starts on a 32-bit word.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.checks import check_bits
from decoupleq_ref.packing import packed_row_bytes

from ._compat import njit, prange, require

__all__ = ["pack", "packed_row_bytes", "unpack"]


@njit(parallel=True)
def _pack_rows(q, bits, row_bytes):
    out, n = q.shape
    packed = np.zeros((out, row_bytes), np.uint8)
    for i in prange(out):
        acc = np.uint64(0)
        held = 0
        o = 0
        for k in range(n):
            acc |= np.uint64(q[i, k]) << np.uint64(held)
            held += bits
            while held >= 8:
                packed[i, o] = np.uint8(acc & np.uint64(0xFF))
                acc >>= np.uint64(8)
                held -= 8
                o += 1
        if held > 0:
            packed[i, o] = np.uint8(acc & np.uint64(0xFF))
    return packed


@njit(parallel=True)
def _unpack_rows(packed, bits, n):
    out = packed.shape[0]
    mask = np.uint64((1 << bits) - 1)
    q = np.empty((out, n), np.uint8)
    for i in prange(out):
        acc = np.uint64(0)
        held = 0
        o = 0
        for k in range(n):
            while held < bits:
                acc |= np.uint64(packed[i, o]) << np.uint64(held)
                held += 8
                o += 1
            q[i, k] = np.uint8(acc & mask)
            acc >>= np.uint64(bits)
            held -= bits
    return q


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes q (out, in), 0 ≤ q < 2^bits, into uint8 (out, packed_row_bytes(in, bits))."""
    require()
    bits = check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype.kind not in "ui":
        raise ValueError(f"q: expected a 2-D integer (out, in) array, got {q.dtype} {q.shape}")
    lo, hi = (int(q.min()), int(q.max())) if q.size else (0, 0)
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"q: codes must be in [0, {(1 << bits) - 1}] for bits={bits}, got [{lo}, {hi}]; "
                         f"pass the bits the codes were quantized with")
    return _pack_rows(np.ascontiguousarray(q, dtype=np.uint8), bits, packed_row_bytes(q.shape[1], bits))


def unpack(packed: np.ndarray, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of pack: uint8 (out, row_bytes) → uint8 codes of shape (out, in)."""
    require()
    bits = check_bits(bits)
    out, n_in = shape
    want = (out, packed_row_bytes(n_in, bits))
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.shape != want:
        raise ValueError(f"packed: expected uint8 {want} for shape={tuple(shape)}, bits={bits}; "
                         f"got {packed.dtype} {packed.shape}")
    return _unpack_rows(np.ascontiguousarray(packed), bits, n_in)
