"""Tile, row and chunk mistakes of packed kernels, each as the weight Ŵ' it would produce.

A tiled kernel computes a block of output rows and a chunk of input columns at a time; the
mistakes here are an index computed per tile or chunk instead of globally, so they show only on
layers wider or taller than one tile (validate.kernel_layers' deployment battery):

| name | the kernel … |
|---|---|
| ``output_rows_permuted`` | writes output channel i from row p(i): pairs swapped, interleaved halves |
| ``scale_row_mismatch`` | reads row i's scale and/or zero from row i // k, or i % T (a T-row tile reusing tile 0's) |
| ``one_group_for_all`` | uses group 0's scale and/or zero for every group of a row |
| ``split_k_group_restart`` | restarts the group index per C-column chunk (split-K): column c uses group (c mod C) // g |
| ``codes_tile_reused`` | reads the codes of rows i % T, or of columns c mod C, for every tile / chunk |
| ``dense_weights`` | multiplies by the unquantized float weights, not the packed ones (needs them given) |

Each family is tried at the tile sizes real kernels use (16 … 128 rows, 128 … 1024 columns); a
candidate equal to the correct Ŵ on the layer is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer


@dataclass
class Mistake:
    """name: stable id (``defect.<name>`` in reports); description: one sentence for the user;
    W: the effective weight (out, in) float64 a kernel with this mistake computes."""

    name: str
    description: str
    W: np.ndarray = field(repr=False)


ROW_TILES = (16, 32, 64, 128)
COLUMN_CHUNKS = (128, 256, 512, 1024)
ROW_DIVISORS = (2, 4)
PARTS = {"scale and zero": (True, True), "scale": (True, False), "zero": (False, True)}


def output_permutations(out: int) -> list[tuple[str, np.ndarray]]:
    """(description, p) where output channel i holds Ŵ's row p(i)."""
    i = np.arange(out)
    pairs = np.minimum(i ^ 1, out - 1)  # an odd last row stays
    h = (out + 1) // 2
    interleaved = np.where(i % 2 == 0, i // 2, h + i // 2)      # channels 0, 1, 2, … hold rows 0, h, 1, h+1, …
    deinterleaved = np.argsort(interleaved, kind="stable")      # the inverse
    return [("output rows swapped in pairs (channel 2k holds row 2k+1 and back)", pairs),
            (f"output rows interleaved: channels 0, 1, 2, 3, … hold rows 0, {h}, 1, {h + 1}, … (the two "
             "halves interleaved)", interleaved),
            (f"output rows de-interleaved: channels 0 … {h - 1} hold the even rows, {h} … the odd ones", deinterleaved)]


def _row_maps(out: int) -> list[tuple[str, np.ndarray]]:
    i = np.arange(out)
    maps = [(f"row // {k}", i // k) for k in ROW_DIVISORS if k < out]
    maps += [(f"row % {t} (a {t}-row tile reusing tile 0's)", i % t) for t in ROW_TILES if t < out]
    return maps


def map_mistakes(layer: PackedLayer, dense: np.ndarray | None = None) -> Iterator[Mistake]:
    """The families of the module doc on this layer (lazily: each Ŵ' is one (out, in) array)."""
    out, n_in = layer.shape
    g = effective_group_size(n_in, layer.group_size)
    G = n_in // g
    q = layer.codes().astype(np.float64)
    s, z = layer.scale.astype(np.float64), layer.zero.astype(np.float64)
    col_group = np.arange(n_in) // g
    W = s[:, col_group] * q + z[:, col_group]
    branch = np.zeros_like(W)
    if layer.hp_channels:
        branch[:, layer.hp_index] = layer.hp_weight.astype(np.float64)

    full = W + branch

    def made(name: str, desc: str, W_c: np.ndarray, whole: bool = False) -> Iterator[Mistake]:
        """W_c is the packed part (the branch is added) or, with ``whole``, the full weight."""
        if not np.array_equal(W_c, full if whole else W):
            yield Mistake(name, desc, W_c if whole else W_c + branch)

    for desc, p in output_permutations(out):
        if not np.array_equal(p, np.arange(out)):
            yield from made("output_rows_permuted", desc, full[p], whole=True)
    for how, rows in _row_maps(out):
        for part, (use_s, use_z) in PARTS.items():
            S = (s[rows] if use_s else s)[:, col_group]
            Z = (z[rows] if use_z else z)[:, col_group]
            yield from made("scale_row_mismatch", f"the {part} of output row i are read from row {how}", S * q + Z)
    if G > 1:
        for part, (use_s, use_z) in PARTS.items():
            first = np.zeros(n_in, dtype=np.int64)
            S, Z = s[:, first if use_s else col_group], z[:, first if use_z else col_group]
            yield from made("one_group_for_all", f"group 0's {part} used for every group of a row", S * q + Z)
        for C in COLUMN_CHUNKS:
            if g < C < n_in and C % g == 0:
                idx = (np.arange(n_in) % C) // g
                yield from made("split_k_group_restart", f"the group index restarts in every {C}-column chunk "
                                f"(split-K): column c uses group (c mod {C}) // {g} instead of c // {g}",
                                s[:, idx] * q + z[:, idx])
    S, Z = s[:, col_group], z[:, col_group]
    for t in ROW_TILES:
        if t < out:
            yield from made("codes_tile_reused", f"the codes of rows i % {t} are used for row i (one {t}-row tile's "
                            "codes reused for every tile; scales are the right rows')", S * q[np.arange(out) % t] + Z)
    for C in COLUMN_CHUNKS:
        if C < n_in:
            yield from made("codes_tile_reused", f"the codes of columns c mod {C} are used for column c (one "
                            f"{C}-column chunk's codes reused for every chunk)", S * q[:, np.arange(n_in) % C] + Z)
    if dense is not None and np.shape(dense) == W.shape:
        yield from made("dense_weights", "the kernel multiplies by the unquantized float weights instead of the "
                        "packed ones (Ŵ = s·q + z from packed, scale, zero)", np.asarray(dense, np.float64), whole=True)
