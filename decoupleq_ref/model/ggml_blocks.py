"""ggml's block layouts for the types decoupleQ's Ŵ = s·q + z maps onto: encode codes and
per-block (d, m) into the bytes llama.cpp reads (docs/FORMAT.md, "GGUF export").

* Q4_1: per block of 32 columns, fp16 d, fp16 m, 16 bytes of nibbles (low nibbles columns 0–15,
  high nibbles 16–31); w = d·q + m, q ∈ {0..15}. 20 bytes per block.
* Q5_1: fp16 d, fp16 m, 4 bytes holding bit 4 of the 32 codes (little-endian bit order), then the
  low nibbles as Q4_1; q ∈ {0..31}. 24 bytes per block.

Decoding is left to the other side's code (gguf.quants.dequantize), which the tests use as proof.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # columns per Q4_1 / Q5_1 block
#: ggml type → (largest code, bytes per block)
LEGACY_TYPES = {"Q4_1": (15, 20), "Q5_1": (31, 24)}


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes → (n, 16) bytes: low nibble column j, high nibble column j + 16."""
    q = q.astype(np.uint8)
    return (q[:, :16] & np.uint8(0x0F)) | ((q[:, 16:] & np.uint8(0x0F)) << np.uint8(4))


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) values → (n, 2) little-endian fp16 bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(-1, 2)


def encode_blocks(ggml_type: str, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Codes q (rows, cols) and per-block d, m (rows, cols/32, already fp16-representable) →
    the tensor's bytes, (rows, cols/32 · bytes per block) uint8, blocks in row order."""
    top, size = LEGACY_TYPES[ggml_type]
    rows, cols = q.shape
    if cols % BLOCK:
        raise ValueError(f"q: {ggml_type} rows hold whole blocks of {BLOCK} columns, got {cols}")
    if q.size and int(q.max()) > top:
        raise ValueError(f"q: codes up to {int(q.max())} do not fit {ggml_type} (at most {top})")
    qb = q.reshape(-1, BLOCK)
    parts = [_fp16_bytes(d.reshape(-1)), _fp16_bytes(m.reshape(-1))]
    if ggml_type == "Q5_1":
        high = (qb >> np.uint8(4)).astype(np.uint8) & np.uint8(1)
        parts.append(np.packbits(high, axis=-1, bitorder="little"))
    parts.append(_nibbles(qb))
    raw = np.concatenate(parts, axis=-1)
    assert raw.shape[1] == size
    return raw.reshape(rows, cols // BLOCK * size)
