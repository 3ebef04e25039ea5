"""The usual layout mistakes of packed low-bit kernels, each as the weight it would produce.

Given a PackedLayer in this project's format (docs/FORMAT.md), ``layout_mistakes`` returns, for
every mistake listed here and in ``validate.layout_maps``, the effective weight Ŵ' (out, in) that a kernel making
that mistake computes from the same bytes. ``validate.kernel`` measures the kernel's effective
weight with one-hot inputs and names the mistake whose Ŵ' matches it.

Every candidate reads the *same stored tensors* the correct kernel reads; only the reading is
wrong. A candidate identical to the correct Ŵ on this layer (e.g. transposed scales of a
per-channel layer, whose (out, 1) buffer reads the same either way) is left out: it cannot be
told apart on this layer.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer
from decoupleq_ref.packing import packed_row_bytes, unpack

from .layout_maps import Mistake, map_mistakes


def _dequant(codes: np.ndarray, s_cols: np.ndarray, z_cols: np.ndarray) -> np.ndarray:
    """Ŵ = s·q + z with per-column (already expanded) scale and zero."""
    return s_cols * codes.astype(np.float64) + z_cols


def _expand(per_group: np.ndarray, group_of_col: np.ndarray) -> np.ndarray:
    """(out, G) -> (out, in) by an explicit group index per column."""
    return per_group.astype(np.float64)[:, group_of_col]


def _permute_in_chunks(codes: np.ndarray, chunk: int, perm: np.ndarray) -> np.ndarray:
    """Column base+k of the result is column base+perm[k] of ``codes``, for every full chunk."""
    out = codes.copy()
    n = codes.shape[1] // chunk * chunk
    if n:
        blocks = codes[:, :n].reshape(codes.shape[0], -1, chunk)
        out[:, :n] = blocks[:, :, perm].reshape(codes.shape[0], n)
    return out


def _reverse_code_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Each b-bit code with its bits in the opposite order (MSB read as LSB)."""
    rev = np.zeros_like(codes, dtype=np.int64)
    for t in range(bits):
        rev |= ((codes.astype(np.int64) >> t) & 1) << (bits - 1 - t)
    return rev


def _column_major_codes(layer: PackedLayer) -> np.ndarray:
    """Codes a kernel gets when it reads the packed buffer as if Ŵᵀ (in, out) had been packed,
    i.e. one bit stream per input column (bytes beyond the buffer read as zero)."""
    out, n_in = layer.shape
    rb = packed_row_bytes(out, layer.bits)
    flat = np.zeros(n_in * rb, dtype=np.uint8)
    src = layer.packed.reshape(-1)[: n_in * rb]
    flat[: src.size] = src
    return unpack(flat.reshape(n_in, rb), layer.bits, (n_in, out)).T


def layout_mistakes(layer: PackedLayer, dense: np.ndarray | None = None) -> Iterator[Mistake]:
    """Every listed mistake that changes Ŵ on this layer (see the module doc): the format
    mistakes below, then the tile, row and chunk mistakes of validate.layout_maps (and, when the
    layer's unquantized weights ``dense`` are given, using them instead of the packed ones)."""
    yield from _format_mistakes(layer)
    yield from map_mistakes(layer, dense)


def _format_mistakes(layer: PackedLayer) -> list[Mistake]:
    """Mistakes in reading the format: bit order, packing, scale layout, zero meaning, signedness."""
    out, n_in = layer.shape
    b = layer.bits
    g = effective_group_size(n_in, layer.group_size)
    G = n_in // g
    q = layer.codes().astype(np.int64)
    s, z = layer.scale.astype(np.float64), layer.zero.astype(np.float64)
    col_group = np.arange(n_in) // g
    S, Z = _expand(s, col_group), _expand(z, col_group)
    W = _dequant(q, S, Z)
    cands: list[Mistake] = []

    def add(name: str, desc: str, W_c: np.ndarray) -> None:
        if W_c.shape == W.shape and not np.array_equal(W_c, W):
            cands.append(Mistake(name, desc, W_c))

    # --- bit and value order inside bytes / words
    if b in (1, 2, 4):
        per_byte = 8 // b
        add("reversed_bit_order", f"values inside each byte are read in reverse order (column 0 of a byte "
            f"taken from its top {b} bits instead of bits 0-{b - 1}: MSB-first instead of LSB-first)",
            _dequant(_permute_in_chunks(q, per_byte, np.arange(per_byte)[::-1]), S, Z))
    if b >= 2:
        add("reversed_code_bits", f"the {b} bits of each code are read in reverse order",
            _dequant(_reverse_code_bits(q, b), S, Z))
    if b in (1, 2, 4):
        per_word = 32 // b
        evens_odds = np.r_[np.arange(0, per_word, 2), np.arange(1, per_word, 2)]
        desc = (f"values are read interleaved: in each 32-bit word ({per_word} columns) the kernel expects "
                "the even columns first, then the odd ones (AWQ/GPTQ-style interleaved nibbles), but the "
                "format stores them in order")
        add("interleaved_nibbles", desc, _dequant(_permute_in_chunks(q, per_word, evens_odds), S, Z))
        add("interleaved_nibbles", desc, _dequant(_permute_in_chunks(q, per_word, np.argsort(evens_odds)), S, Z))
    add("column_major_packing", "the packed codes are read column-major (one bit stream per input column, "
        "as if Ŵᵀ had been packed) but the format packs each output row as one stream",
        _dequant(_column_major_codes(layer), S, Z))

    # --- scales and zeros: layout
    if G > 1 or out > 1:
        sT = s.reshape(-1).reshape(G, out).T
        zT = z.reshape(-1).reshape(G, out).T
        o, gg = (1, 0) if out > 1 else (0, 1)
        k = gg * out + o  # flat index the kernel reads for (o, gg)
        add("transposed_scales", f"scales and zeros are read transposed, as a (G, out) buffer: output channel "
            f"{o} group {gg} uses the scale of row {k // G} group {k % G}; the format stores (out, G) row-major",
            _dequant(q, _expand(sT, col_group), _expand(zT, col_group)))
    for g2 in sorted({g // 2, 2 * g, 32, 64, 128} - {g, 0}):
        if g2 <= n_in:
            idx = np.minimum(np.arange(n_in) // g2, G - 1)
            add("group_misaligned", f"scales/zeros are expanded with group size {g2} instead of {g} "
                "(columns take the scale of the wrong group)", _dequant(q, _expand(s, idx), _expand(z, idx)))
    for name_shift, idx in (("(c + 1) // g", np.minimum((np.arange(n_in) + 1) // g, G - 1)),
                            ("(c - 1) // g", np.maximum((np.arange(n_in) - 1) // g, 0)),
                            ("c // (g + 1)", np.minimum(np.arange(n_in) // (g + 1), G - 1))):
        add("off_by_one_group", f"off-by-one group expansion: column c uses group {name_shift} instead of "
            "c // g (the first or last column of each group takes its neighbour's scale and zero)",
            _dequant(q, _expand(s, idx), _expand(z, idx)))

    # --- what zero means, signedness
    add("negated_zero", "zero is subtracted (Ŵ = s·q − z); the format adds it (Ŵ = s·q + z)", _dequant(q, S, -Z))
    add("zero_point", "zero is used as an integer zero-point (Ŵ = s·(q − z)); the format stores a float "
        "offset in weight units (Ŵ = s·q + z, GPTQ's zp is −z/s)", _dequant(q, S, -S * Z))
    add("swapped_scale_zero", "scale and zero are swapped (Ŵ = z·q + s)", _dequant(q, Z, S))
    half = 1 << (b - 1)
    add("signed_codes", f"codes are read as signed {b}-bit two's complement ([−{half}, {half - 1}]); the "
        f"format's codes are unsigned [0, {(1 << b) - 1}]", _dequant(np.where(q >= half, q - (1 << b), q), S, Z))
    add("signed_offset", f"2^(b−1) = {half} is subtracted from the codes (the official code's signed range); "
        "the format's zero already holds that offset", _dequant(q - half, S, Z))

    # --- the fp16 branch: every mistake above is on top of a correct branch, plus a missing branch
    if layer.hp_channels:
        B = layer.hp_weight.astype(np.float64)
        for c in cands:
            c.W[:, layer.hp_index] += B
        cands.append(Mistake("missing_hp_branch", f"the fp16 branch (x[:, hp_index] @ hp_weightᵀ on "
                             f"{layer.hp_channels} columns) is not added", W))
    return cands
