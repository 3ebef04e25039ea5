"""Initialisation: min-max (s, z) per group, refined by a shrink grid search on the H-loss."""

from __future__ import annotations

import numpy as np

from .format import dequantize_parts
from .objective import row_losses


def safe_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x / y with |y| clamped to >= 1e-15, keeping y's sign (0 counts as positive).

    A zero scale happens when a group is constant; any q then gives the same Ŵ, so the
    clamp only has to keep the division finite.
    """
    sign = np.where(y < 0, -1.0, 1.0)
    return x / (np.maximum(np.abs(y), 1e-15) * sign)


def round_half_up(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties towards +inf (floor(x + 0.5)).

    The official code rounds ties up rather than to even so that mathematically equal
    procedures give equal integers; we keep that convention for bit-exact comparisons.
    """
    return np.floor(x + 0.5)


def minmax_range(W: np.ndarray, group_size: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-group (xmin, xmax) of W, widened to contain 0; all-zero groups get [-1, 1].

    Returns two (out, G) arrays. Symmetric mode uses [-max|x|, max|x|].
    """
    out, n_in = W.shape
    gs = n_in if group_size == -1 else group_size
    Wg = W.reshape(out, n_in // gs, gs)
    xmin = np.minimum(Wg.min(axis=2), 0.0)
    xmax = np.maximum(Wg.max(axis=2), 0.0)
    if symmetric:
        xmax = np.maximum(-xmin, xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin[dead], xmax[dead] = -1.0, 1.0
    return xmin, xmax


def minmax_scale_zero(xmin: np.ndarray, xmax: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """s = (xmax − xmin) / (2^b − 1);  z = xmin  (asymmetric)  or  z = −s·2^(b−1)  (symmetric).

    With q ∈ [0, 2^b − 1] the grid s·q + z then spans [xmin, xmax] exactly (asymmetric).
    """
    maxq = (1 << bits) - 1
    scale = (xmax - xmin) / maxq
    zero = -scale * (1 << (bits - 1)) if symmetric else xmin.copy()
    return scale, zero


def quantize_rtn(W: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """q = clamp(round((W − z) / s), 0, 2^b − 1): round-to-nearest onto the (s, z) grid."""
    n_in = W.shape[1]
    s = np.repeat(scale, n_in // scale.shape[1], axis=1)
    z = np.repeat(zero, n_in // zero.shape[1], axis=1)
    q = round_half_up(safe_div(W - z, s))
    return np.clip(q, 0, (1 << bits) - 1)


def shrink_factors(grid: int, max_shrink: float) -> np.ndarray:
    """p_i = 1 − i/grid for i = 0 .. ⌊max_shrink·grid⌋ − 1 (p = 1 is plain min-max)."""
    if grid == 0:
        return np.ones(1)
    return 1.0 - np.arange(max(int(max_shrink * grid), 1)) / grid


def init_scale_zero(
    W: np.ndarray, H: np.ndarray, bits: int, group_size: int, symmetric: bool, grid: int, max_shrink: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shrink grid search: each row keeps the p minimising ℓ_i(RTN(W; p·xmin, p·xmax)).

    The same p is used for all groups of a row because the H-loss couples a row's groups.
    Returns (scale, zero, row_loss), ties resolved towards the larger p (less clipping).
    """
    xmin, xmax = minmax_range(W, group_size, symmetric)
    best_s, best_z = minmax_scale_zero(xmin, xmax, bits, symmetric)
    best = row_losses(W, dequantize_parts(quantize_rtn(W, best_s, best_z, bits), best_s, best_z), H)
    for p in shrink_factors(grid, max_shrink)[1:]:
        s, z = minmax_scale_zero(p * xmin, p * xmax, bits, symmetric)
        loss = row_losses(W, dequantize_parts(quantize_rtn(W, s, z, bits), s, z), H)
        better = loss < best
        best[better], best_s[better], best_z[better] = loss[better], s[better], z[better]
    return best_s, best_z, best


def placement_candidates(
    xmin: np.ndarray, xmax: np.ndarray, bits: int, symmetric: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Grid placements beyond min-max shrinking, each an (s, z) pair of (out, G) arrays.

    Asymmetric: the grid spans [xmin + a·r, xmin + b·r], r = xmax − xmin, for a ∈ [−0.2, 0.4] and
    b ∈ [0.6, 1.2] (7 × 7): shifted and stretched grids that need not contain both extremes —
    on tiny layers the global optimum often looks like that. Symmetric: s = p·s_minmax for
    p ∈ [0.2, 1.2] (21 values).
    """
    if symmetric:
        s0, _ = minmax_scale_zero(xmin, xmax, bits, True)
        return [(p * s0, -p * s0 * (1 << (bits - 1))) for p in np.linspace(0.2, 1.2, 21)]
    r = xmax - xmin
    maxq = (1 << bits) - 1
    return [((b - a) * r / maxq, xmin + a * r)
            for a in np.linspace(-0.2, 0.4, 7) for b in np.linspace(0.6, 1.2, 7)]


def placement_starts(
    W: np.ndarray, H: np.ndarray, bits: int, group_size: int, symmetric: bool, n: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The n best placement candidates per row, as n (scale, zero) pairs.

    Each candidate is scored per row by its RTN loss and by the loss after the exact float step
    on those RTN codes (whichever is lower); start k gives every row its k-th best candidate.
    """
    from .float_step import closed_form_scale_zero  # local: float_step imports nothing from here

    xmin, xmax = minmax_range(W, group_size, symmetric)
    cands = placement_candidates(xmin, xmax, bits, symmetric)
    scores = np.empty((len(cands), W.shape[0]))
    for k, (s, z) in enumerate(cands):
        q = quantize_rtn(W, s, z, bits)
        s2, z2 = closed_form_scale_zero(q, W, H, bits, group_size, symmetric, s)
        scores[k] = np.minimum(row_losses(W, dequantize_parts(q, s, z), H),
                               row_losses(W, dequantize_parts(q, s2, z2), H))
    order = np.argsort(scores, axis=0, kind="stable")
    rows = np.arange(W.shape[0])
    S = np.stack([c[0] for c in cands])  # (K, out, G)
    Z = np.stack([c[1] for c in cands])
    return [(S[order[k], rows], Z[order[k], rows]) for k in range(min(n, len(cands)))]
