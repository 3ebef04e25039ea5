"""Bit packing of q (docs/FORMAT.md).

Each row is one little-endian bit stream: value k of the row occupies stream bits
[k·b, k·b + b), least significant bit first, and stream bit t is bit (t mod 8) of byte t // 8.
Rows are padded with zero bits to a multiple of 4 bytes so every row starts on a 32-bit word.
For b ∈ {1, 2, 4, 8} no value straddles a byte: byte j of a 2-bit row holds values 4j..4j+3
in bits 0-1, 2-3, 4-5, 6-7.
"""

from __future__ import annotations

import numpy as np

from .checks import check_bits

ROW_ALIGN_BYTES = 4


def packed_row_bytes(n_in: int, bits: int) -> int:
    """Bytes per packed row: ceil(n_in·bits / 8) rounded up to a multiple of 4."""
    raw = (n_in * bits + 7) // 8
    return -(-raw // ROW_ALIGN_BYTES) * ROW_ALIGN_BYTES


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes q (out, in), 0 <= q < 2**bits, into uint8 (out, packed_row_bytes)."""
    bits = check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"q: expected a 2-D (out, in) array, got shape {q.shape}")
    if q.dtype.kind not in "ui":
        raise ValueError(f"q: expected an integer array, got dtype {q.dtype}")
    if q.size and (q.min() < 0 or q.max() >= (1 << bits)):
        raise ValueError(f"q: values must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
                         f"got range [{q.min()}, {q.max()}]")
    out, n_in = q.shape
    # (out, in, bits) array of the bits of each value, LSB first, then flattened per row
    stream = ((q[:, :, None].astype(np.uint16) >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    stream = stream.reshape(out, n_in * bits)
    nbytes = packed_row_bytes(n_in, bits)
    padded = np.zeros((out, nbytes * 8), dtype=np.uint8)
    padded[:, : n_in * bits] = stream
    return np.packbits(padded, axis=1, bitorder="little")


def unpack(packed: np.ndarray, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of pack: uint8 (out, row_bytes) -> uint8 codes of the given (out, in) shape."""
    bits = check_bits(bits)
    packed = np.asarray(packed)
    out, n_in = shape
    if packed.dtype != np.uint8 or packed.shape != (out, packed_row_bytes(n_in, bits)):
        raise ValueError(
            f"packed: expected uint8 of shape {(out, packed_row_bytes(n_in, bits))} for shape={shape}, "
            f"bits={bits}; got {packed.dtype} {packed.shape}"
        )
    stream = np.unpackbits(packed, axis=1, bitorder="little")[:, : n_in * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(out, n_in, bits).astype(np.uint16) @ weights).astype(np.uint8)
