"""High-precision branch on the k most sensitive input channels (docs/ALGORITHM.md §8).

The layer is stored as Ŵ = (s·q + z) + B, where B is non-zero only on k input columns S and is
kept in fp16 (dense (out, k) block + the k column indices). Writing Q = s·q + z for the quantized
part, R for the other columns and r = Q − W per row, the loss of one row is

    ℓ = r_S H_SS r_Sᵀ + 2 r_S H_SR r_Rᵀ + r_R H_RR r_Rᵀ      (r_S = Q_S + B − W_S on S).

B's columns are free, so for a fixed quantized part the optimum sets ∂ℓ/∂r_S = 0:

    r_S* = − r_R H_RS H_SS⁻¹,   i.e.   B = (W_S − Q_S) − (Q_R − W_R) H_RS H_SS⁻¹,

and substituting back leaves the quantized part with the Schur-complement Hessian on R:

    min_B ℓ = r_R (H_RR − H_RS H_SS⁻¹ H_SR) r_Rᵀ.

So the joint problem is the usual decoupleQ problem on the block-diagonal Hessian
H_eff = [[Schur on R, 0], [0, λ·I on S]]: Q_S no longer affects the joint loss, and the λ term
only makes Q_S a plain least-squares fit of W_S, so that B stays a small correction and H_eff
stays positive definite. The solver's objective on H_eff is then exactly the joint objective
plus λ‖Q_S − W_S‖², and every keep-if-better decision is taken on that sum. So λ must be a tie-
break and nothing more (TIE_BREAK · mean diag, not the damping amount): with λ at the damping
amount, a step could raise the joint loss and lower the λ term by more, and at damp ≥ 0.01 on
low-rank or ill-conditioned H the final joint objective exceeded RTN's by up to 20 %. With the
tie-break, final joint objective ≤ RTN's + λ‖Q_S^rtn − W_S‖², a bound 1e-8 times the scale of
the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .config import HP_SELECT
from .init import minmax_range, minmax_scale_zero, quantize_rtn
from .format import dequantize_parts


def _solve_ss(H_SS: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """H_SS⁻¹ · rhs by Cholesky; a singular H_SS (damp = 0) falls back to least squares, which
    gives the same minimiser because rhs lies in the range of H_SS for a PSD H."""
    try:
        return scipy.linalg.cho_solve(scipy.linalg.cho_factor(H_SS, lower=True), rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(H_SS, rhs, rcond=None)[0]


def channel_scores(W: np.ndarray, Hd: np.ndarray, how: str, bits: int = 2, group_size: int = -1) -> np.ndarray:
    """Sensitivity of each input column j (higher = more deserving of the fp16 branch).

    hessian    diag(H)_j · ‖W_:,j‖²              (weight energy the calibration data sees)
    obs        ‖W_:,j‖² / [H⁻¹]_jj              (OBS saliency: loss of removing column j with
                                                 the others compensating)
    magnitude  ‖W_:,j‖²                          (H-blind baseline)
    error      ‖(R H)_:,j‖² / H_jj,  R = RTN(W) − W   (loss removed by freeing column j alone
                                                 from a min-max RTN quantization)
    """
    col_energy = np.einsum("ij,ij->j", W, W)
    if how == "hessian":
        return np.diag(Hd) * col_energy
    if how == "obs":
        return col_energy / np.diag(_solve_ss(Hd, np.eye(Hd.shape[0])))
    if how == "magnitude":
        return col_energy
    if how == "error":
        scale, zero = minmax_scale_zero(*minmax_range(W, group_size, False), bits, False)
        R = dequantize_parts(quantize_rtn(W, scale, zero, bits), scale, zero) - W
        RH = R @ Hd
        return np.einsum("ij,ij->j", RH, RH) / np.maximum(np.diag(Hd), 1e-300)
    raise ValueError(f"hp_select: unknown selection {how!r}; choose one of {HP_SELECT}")


def select_channels(W: np.ndarray, Hd: np.ndarray, k: int, how: str, bits: int = 2,
                    group_size: int = -1) -> np.ndarray:
    """The k columns with the highest ``channel_scores`` (ties: lower index first), sorted ascending."""
    if not 0 < k < W.shape[1]:
        raise ValueError(f"hp_channels: must be in 1..{W.shape[1] - 1} for a layer with {W.shape[1]} "
                         f"input columns, got {k}; use hp_channels=0 to turn the branch off")
    order = np.argsort(-channel_scores(W, Hd, how, bits, group_size), kind="stable")
    return np.sort(order[:k]).astype(np.int64)


def branch_hessian(Hd: np.ndarray, idx: np.ndarray, lam: float) -> np.ndarray:
    """H_eff: the Schur complement H_RR − H_RS H_SS⁻¹ H_SR on the rest R, λ·I on S, 0 between."""
    rest = np.setdiff1d(np.arange(Hd.shape[0]), idx)
    H_RS = Hd[np.ix_(rest, idx)]
    schur = Hd[np.ix_(rest, rest)] - H_RS @ _solve_ss(Hd[np.ix_(idx, idx)], H_RS.T)
    H_eff = np.zeros_like(Hd)
    H_eff[np.ix_(rest, rest)] = (schur + schur.T) / 2
    H_eff[idx, idx] = lam
    return H_eff


def branch_weight(W: np.ndarray, W_q: np.ndarray, Hd: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """B (out, k) = (W_S − Q_S) − (Q_R − W_R) H_RS H_SS⁻¹: the optimal fp16 block for a fixed Q."""
    rest = np.setdiff1d(np.arange(W.shape[1]), idx)
    r_R = W_q[:, rest] - W[:, rest]
    comp = _solve_ss(Hd[np.ix_(idx, idx)], Hd[np.ix_(idx, rest)] @ r_R.T).T
    return (W[:, idx] - W_q[:, idx]) - comp


def add_branch(W_q: np.ndarray, idx: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Ŵ = Q + B scattered onto the columns idx (a new array)."""
    W_hat = W_q.copy()
    W_hat[:, idx] += B
    return W_hat


#: λ on the branch's columns in H_eff, as a fraction of mean(diag H_d): a tie-break for Q_S only.
TIE_BREAK = 1e-8


@dataclass(frozen=True)
class Branch:
    """The selected columns and the Hessian the quantized part is solved on."""

    index: np.ndarray  # int64 (k,), ascending
    hessian: np.ndarray  # H_eff (in, in)
    tie_break: float  # λ on S in H_eff: objective on H_eff = joint objective + λ‖Q_S − W_S‖²

    @classmethod
    def prepare(cls, W: np.ndarray, Hd: np.ndarray, k: int, how: str, bits: int,
                group_size: int) -> "Branch":
        """Select k columns of W by ``how`` on the damped Hd and build H_eff (λ = TIE_BREAK·mean diag Hd)."""
        idx = select_channels(W, Hd, k, how, bits, group_size)
        lam = TIE_BREAK * (float(np.mean(np.diag(Hd))) or 1.0)
        return cls(idx, branch_hessian(Hd, idx, lam), lam)
