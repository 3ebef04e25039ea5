"""Integer step (paper eq. 7): q with (s, z) fixed.

1. ``relax_box``: the box-relaxed problem min_w (w − W) H (w − W)ᵀ s.t. w ∈ [z, z + s·(2^b − 1)]
   by projected Adam (official settings skip it: relax_iters = 0).
2. ``gptq_round``: GPTQ's sequential rounding of w onto the grid s·q + z, each rounding error
   spread over the not-yet-rounded columns through the upper Cholesky factor of H⁻¹.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .format import expand_groups
from .init import round_half_up, safe_div
from .layer_input import certify_factor, not_psd, psd_shifts


def box_bounds(scale_e: np.ndarray, zero_e: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise [lo, hi] of the grid s·q + z, q ∈ [0, 2^b − 1] (s may be negative)."""
    a, b = zero_e, zero_e + scale_e * ((1 << bits) - 1)
    return np.minimum(a, b), np.maximum(a, b)


def relax_box(
    W: np.ndarray, scale_e: np.ndarray, zero_e: np.ndarray, H: np.ndarray, bits: int, iters: int, lr: float
) -> np.ndarray:
    """Projected Adam on min_w (w − W) H (w − W)ᵀ, w clamped to the grid's box after each step.

    Gradient (w − W) H (the factor 2 is absorbed by Adam's normalisation); Adam with
    β = (0.9, 0.999), ε = 1e-5 as in the official solver. Starts at w = W.
    """
    lo, hi = box_bounds(scale_e, zero_e, bits)
    w = np.clip(W, lo, hi)
    m = np.zeros_like(W)
    v = np.zeros_like(W)
    b1, b2, eps = 0.9, 0.999, 1e-5
    for t in range(1, iters + 1):
        g = (w - W) @ H
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = lr / (1 - b1**t)
        w = w - step * m / (np.sqrt(v / (1 - b2**t)) + eps)
        np.clip(w, lo, hi, out=w)
    return w


def act_order_perm(H: np.ndarray, act_order: bool) -> np.ndarray:
    """Column order for GPTQ: decreasing diag(H) (stable, so ties keep their index order)."""
    n = H.shape[0]
    return np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(n)


def inverse_cholesky_upper(H: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor U of (H + λI)⁻¹, U ᵀU = (H + λI)⁻¹, λ = damp·mean(diag H).

    GPTQ adds this damping on top of the objective's (as the official code does); if the
    factorisation fails with damp < 1 %, λ becomes 1 %·mean(diag H) (a singular PSD H at
    damp = 0). A failure after that is a certificate that H is not PSD: HessianNotPSD.
    """
    n = H.shape[0]
    mean_diag = float(np.mean(np.diag(H))) or 1.0
    for factor in psd_shifts(damp):
        try:
            L = scipy.linalg.cholesky(H + factor * mean_diag * np.eye(n), lower=True)
            Hinv = scipy.linalg.cho_solve((L, True), np.eye(n))
            U = scipy.linalg.cholesky(Hinv, lower=False)
        except np.linalg.LinAlgError:
            continue
        certify_factor(U.__matmul__, U.T.__matmul__, n, factor * mean_diag)
        return U
    raise not_psd(f"GPTQ's Cholesky of the damped H + {factor * mean_diag:.3g}·I failed")


def gptq_factor(H: np.ndarray, act_order: bool, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(perm, U): GPTQ's column order and the inverse Cholesky factor of H permuted by it.

    Depends on H only, so a solve computes it once and reuses it in every integer step."""
    perm = act_order_perm(H, act_order)
    return perm, inverse_cholesky_upper(H[np.ix_(perm, perm)], damp)


def gptq_round(
    W: np.ndarray,
    scale_e: np.ndarray,
    zero_e: np.ndarray,
    H: np.ndarray,
    bits: int,
    act_order: bool,
    block_size: int,
    damp: float,
    factor: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """GPTQ sequential rounding with lazy block updates; returns q (out, in), float-valued.

    For each column j (in act-order): q_j = clamp(round((w_j − z_j)/s_j)),
    e_j = (w_j − ŵ_j) / U_jj, and w_k −= e_j U_jk for the later columns k. Within a block the
    update touches only the block; the rest of the matrix is updated once per block.
    ``factor``: (perm, U) from ``gptq_factor`` when the caller rounds many times on one H.
    """
    maxq = (1 << bits) - 1
    perm, U = factor if factor is not None else gptq_factor(H, act_order, damp)
    Wp = W[:, perm].copy()
    s, z = scale_e[:, perm], zero_e[:, perm]
    n = Wp.shape[1]
    Q = np.empty_like(Wp)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Wb = Wp[:, i1:i2]  # a view: updates land in Wp
        Err = np.empty_like(Wb)
        for j in range(i2 - i1):
            c = i1 + j
            q = np.clip(round_half_up(safe_div(Wb[:, j] - z[:, c], s[:, c])), 0, maxq)
            Q[:, c] = q
            err = (Wb[:, j] - (s[:, c] * q + z[:, c])) / U[c, c]
            Wb[:, j:] -= np.outer(err, U[c, c:i2])
            Err[:, j] = err
        Wp[:, i2:] -= Err @ U[i1:i2, i2:]
    q = np.empty_like(Q)
    q[:, perm] = Q
    return q


def integer_step(
    W: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    H: np.ndarray,
    bits: int,
    act_order: bool,
    block_size: int,
    damp: float,
    relax_iters: int,
    relax_lr: float,
    factor: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Integer step for all rows: optional box relaxation, then GPTQ rounding of its result."""
    n_in = W.shape[1]
    s_e, z_e = expand_groups(scale, n_in), expand_groups(zero, n_in)
    start = relax_box(W, s_e, z_e, H, bits, relax_iters, relax_lr) if relax_iters > 0 else W
    return gptq_round(start, s_e, z_e, H, bits, act_order, block_size, damp, factor)
