"""The layer-wise objective (paper eq. 5): Σ_i (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ."""

from __future__ import annotations

import numpy as np

from .format import dequantize_parts


def row_losses(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ℓ_i = (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ for every row i.

    Computed as the row sums of (R H) ∘ R with R = Ŵ − W, which costs one (out, in)·(in, in)
    product and never forms the (out, out) matrix R H Rᵀ.
    """
    R = W_hat - W
    return np.einsum("ij,ij->i", R @ H, R)


def layer_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> float:
    """Σ_i (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ = tr(R H Rᵀ), the total layer loss."""
    W = np.asarray(W, dtype=np.float64)
    W_hat = np.asarray(W_hat, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    if W.shape != W_hat.shape or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(
            f"layer_loss: shapes W {W.shape}, W_hat {W_hat.shape}, H {H.shape} do not fit; "
            f"need W and W_hat (out, in) and H (in, in)"
        )
    return float(row_losses(W, W_hat, H).sum())


def damping(H: np.ndarray, damp: float) -> float:
    """λ = damp · mean(diag H), or ``damp`` itself if diag(H) is all zero (no calibration
    signal: the objective becomes plain MSE instead of an all-zero matrix)."""
    mean_diag = float(np.mean(np.diag(H)))
    return damp * (mean_diag if mean_diag > 0 else 1.0)


def damp_hessian(H: np.ndarray, damp: float) -> np.ndarray:
    """H + λ·I with λ = damping(H, damp): keeps H positive definite (GPTQ's percdamp)."""
    Hd = H.copy()
    Hd[np.diag_indices_from(Hd)] += damping(H, damp)
    return Hd


def residual_norms(W: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """‖s·q_i + z − W_i‖² for every row."""
    R = dequantize_parts(q, scale, zero) - W
    return np.einsum("ij,ij->i", R, R)


def undamped_losses(damped: np.ndarray, residual_sq: np.ndarray, lam: float) -> np.ndarray:
    """ℓ_i on H from ℓ_i on H + λI: r H rᵀ = r (H + λI) rᵀ − λ‖r‖². Where the difference is
    within rounding of the damped value (H singular along r, e.g. H = 0) it is 0."""
    loss = damped - lam * residual_sq
    return np.where(loss > 8 * np.finfo(np.float64).eps * np.abs(damped), loss, 0.0)
