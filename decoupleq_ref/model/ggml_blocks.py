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


#: K-quant type → bytes per super-block of 256
KQUANT_BYTES = {"Q2_K": 84, "Q4_K": 144, "Q5_K": 176}


def _pack_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(n, 8) 6-bit sub-scales and sub-mins → ggml's 12 bytes: bytes 0–3 hold sc[0:4] with the top
    two bits of sc[4:8] in bits 6–7, bytes 4–7 the same for m, bytes 8–11 the low nibbles of
    sc[4:8] (low) and m[4:8] (high)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    first = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    second = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    third = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1)


def encode_kquant(layer) -> np.ndarray:
    """A decoupleq_ref.kquant.KQuantLayer → its tensor's bytes, (rows, in/256 · block bytes).

    Q2_K block: 16 bytes of (sc | m << 4) per sub-block of 16, 64 bytes of 2-bit codes (value
    128h + 32s + b in bits 2s of byte 32h + b), fp16 d, fp16 dmin. Q4_K: fp16 d, fp16 dmin, 12
    bytes of 6-bit sub-scales / sub-mins, 128 bytes of nibbles (sub-block 2p in the low nibbles of
    bytes 32p … 32p + 31, 2p + 1 in the high). Q5_K: as Q4_K with 32 bytes of fifth bits (bit j of
    byte b = bit 4 of column b of sub-block j) before the nibbles."""
    name, spec = layer.spec.name, layer.spec
    rows, cols = layer.q.shape
    n = rows * (cols // 256)
    q = layer.q.reshape(n, 256).astype(np.uint8)
    sc, m = layer.sc.reshape(n, spec.n_sub).astype(np.uint8), layer.m.reshape(n, spec.n_sub).astype(np.uint8)
    d, dmin = _fp16_bytes(layer.d.reshape(-1)), _fp16_bytes(layer.dmin.reshape(-1))
    if name == "Q2_K":
        v = q.reshape(n, 2, 4, 32)
        qs = (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, 64)
        parts = [(sc & 0x0F) | (m << 4), qs, d, dmin]
    else:
        v = q.reshape(n, 4, 2, 32)
        ql = ((v[:, :, 0] & 0x0F) | ((v[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
        parts = [d, dmin, _pack_scales_6bit(sc, m)]
        if name == "Q5_K":
            high = (q.reshape(n, 8, 32) >> 4) & 1
            parts.append(np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[None, :, None], axis=1))
        parts.append(ql)
    raw = np.concatenate([p.astype(np.uint8) for p in parts], axis=1)
    assert raw.shape[1] == KQUANT_BYTES[name]
    return raw.reshape(rows, -1)
