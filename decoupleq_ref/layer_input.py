"""What every backend's ``quantize_layer`` does around its solve, written once: validate the input,
check that H is positive semi-definite, move the problem to a safe magnitude by powers of two,
and check and scale back the result (docs/ALGORITHM.md, "Failure modes").

The reference, kernels_numba (through the reference's entry point) and gpu all call
``solve_layer``; their own code only ever sees validated, safely scaled float64 input.

Scaling: the layer problem is equivariant under W → 2^a·W, H → 2^c·H (q unchanged; s, z scale by
2^a; every loss by 2^(2a+c)), and a power of two scales every float operation exactly. So a layer
whose magnitudes would overflow (W ≳ 1e154: the loss squares it) or underflow (W ≲ 1e-15: the
scale clamp of ``init.safe_div``) is solved at a safe magnitude (W_BAND) and scaled back exactly;
where a scaled-back number is not representable in float64 the call is refused.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.linalg

from .checks import check_layer
from .config import QuantConfig
from .format import QuantResult
from .objective import damping

#: GPTQ's Cholesky of H_d + f·mean(diag H_d)·I is tried at f = damp, then (damp < PSD_SHIFT only)
#: at f = PSD_SHIFT. For a PSD H_d the shifted matrix's smallest eigenvalue is then ≥ 1 % of the
#: mean diagonal, far above rounding, so a failure there certifies that H_d is not PSD.
PSD_SHIFT = 0.01

#: Magnitudes solved as they are: max |W| and max diag H inside these bands cannot overflow or
#: hit the scale clamp, so results are bit-for-bit those of the plain solve. Outside, the layer is
#: moved to max |W| ∈ [2^100, 2^101) and max diag H ∈ [½, 1): W large (losses ≲ 2^240 there) so
#: that rows far smaller than the largest stay clear of the absolute 1e-15 scale clamp.
W_BAND = (2.0**-20, 2.0**200)
H_BAND = (2.0**-100, 2.0**100)
W_TARGET_EXP = 101
H_TARGET_EXP = 0


class HessianNotPSD(np.linalg.LinAlgError):
    """H is not positive semi-definite (a LinAlgError, hence also a ValueError)."""


def not_psd(detail: str) -> HessianNotPSD:
    """The error for an H that is not positive semi-definite: what was seen, why, and the fix."""
    return HessianNotPSD(
        f"H: not positive semi-definite ({detail}). A Hessian built as H = X.T @ X / N from finite "
        f"activations always is; the usual causes are an H not computed that way (a difference or "
        f"an edited sum of such matrices), float16/float32 accumulation over many tokens, an "
        f"asymmetric H, or NaN/Inf in X. Fix: rebuild H = X.T @ X / N with float64 accumulation; "
        f"if H is only slightly off, pass decoupleq_ref.project_psd(H) (nearest PSD matrix) or a "
        f"larger QuantConfig.damp")


def psd_shifts(damp: float) -> tuple[float, ...]:
    """The shifts f (× mean(diag H_d)) GPTQ's Cholesky is tried at, in order (see PSD_SHIFT)."""
    return (damp,) if damp >= PSD_SHIFT else (damp, PSD_SHIFT)


#: Power iterations of certify_factor (each two (in, in) matrix-vector products), and the margin
#: above 1/δ that counts as a certificate (rounding in the factor is ~1e-10 relative at in = 4096).
CERTIFY_ITERS = 20
CERTIFY_RTOL = 1e-4


def certify_factor(apply: Callable[[np.ndarray], np.ndarray], apply_t: Callable[[np.ndarray], np.ndarray],
                   n: int, shift: float) -> None:
    """Raise HessianNotPSD if H_d has a negative eigenvalue, seen through a factor of H_d + δI.

    ``apply`` is x ↦ M·x (``apply_t``: Mᵀ·x) for a factor with MᵀM = (H_d + δI)⁻¹ (GPTQ's U, or
    L⁻¹ of a Cholesky L). A successful Cholesky only proves λ_min(H_d) > −δ; every Rayleigh
    quotient ‖Mx‖²/‖x‖² of the inverse is ≤ 1/δ exactly when H_d is PSD, so one above it is a
    certificate that it is not. Power iteration (a fixed-seed start, so the check is
    deterministic) pushes x towards the most negative direction; O(in²) per step."""
    if shift <= 0:  # H_d itself factored: positive definite
        return
    x = np.random.default_rng(0).standard_normal(n)
    x /= np.linalg.norm(x)
    prev = 0.0
    for _ in range(CERTIFY_ITERS):
        y = apply(x)
        rho = float(y @ y)
        if rho * shift > 1 + CERTIFY_RTOL:
            raise not_psd(f"H_d has a negative eigenvalue, about {1 / rho - shift:.3g}")
        if abs(rho - prev) <= 1e-3 * rho:
            return
        prev = rho
        x = apply_t(y)
        x /= np.linalg.norm(x)


def check_psd(H: np.ndarray, damp: float) -> None:
    """Raise HessianNotPSD unless H_d = H + λI is PSD, by the test GPTQ's own factorisation applies
    (for solves that do not factor H_d): Cholesky of H_d + δI, δ = f·mean(diag H_d) for f in
    psd_shifts(damp), then certify_factor."""
    lam = damping(H, damp)
    mean_diag = (float(np.mean(np.diag(H))) + lam) or 1.0
    for f in psd_shifts(damp):
        A = H.copy()
        A[np.diag_indices_from(A)] += lam + f * mean_diag
        try:
            L = scipy.linalg.cholesky(A, lower=True, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        certify_factor(lambda x: scipy.linalg.solve_triangular(L, x, lower=True),
                       lambda x: scipy.linalg.solve_triangular(L, x, lower=True, trans="T"),
                       H.shape[0], f * mean_diag)
        return
    raise not_psd(f"Cholesky of the damped H + {psd_shifts(damp)[-1] * mean_diag:.3g}·I failed")


def project_psd(H: np.ndarray) -> np.ndarray:
    """The nearest (Frobenius) positive semi-definite matrix to the symmetric part of H: its
    eigendecomposition with negative eigenvalues set to 0. An explicit opt-in for an H known to
    be only slightly indefinite (float32 accumulation); costs one O(in³) eigendecomposition."""
    from .checks import as_float_matrix

    H = as_float_matrix(H, "H")
    if H.shape[0] != H.shape[1]:
        raise ValueError(f"H: must be square (in, in), got shape {H.shape}")
    w, V = np.linalg.eigh((H + H.T) / 2)
    P = (V * np.maximum(w, 0.0)) @ V.T
    return (P + P.T) / 2


def _exponent(m: float, band: tuple[float, float], target: int) -> int:
    """a with m·2^a ∈ [2^(target−1), 2^target) when m > 0 lies outside ``band``, else 0."""
    if m == 0.0 or band[0] <= m <= band[1]:
        return 0
    return target - math.frexp(m)[1]


@dataclasses.dataclass(frozen=True)
class LayerScaling:
    """The powers of two W and H are solved at: W·2^w_exp, H·2^h_exp."""

    w_exp: int = 0
    h_exp: int = 0

    @classmethod
    def of(cls, W: np.ndarray, H: np.ndarray) -> "LayerScaling":
        return cls(_exponent(float(np.abs(W).max()), W_BAND, W_TARGET_EXP),
                   _exponent(float(np.diag(H).max()), H_BAND, H_TARGET_EXP))

    @property
    def loss_exp(self) -> int:
        return 2 * self.w_exp + self.h_exp

    def apply(self, W: np.ndarray, H: np.ndarray, cfg: QuantConfig) -> tuple[np.ndarray, np.ndarray, QuantConfig]:
        """Scaled W (a new array; the caller's may be a view), H (scaled in place: ours) and cfg
        (relax_lr is in weight units)."""
        if self.w_exp:
            W = np.ldexp(W, self.w_exp)
            cfg = dataclasses.replace(cfg, relax_lr=math.ldexp(cfg.relax_lr, self.w_exp))
        if self.h_exp:
            np.ldexp(H, self.h_exp, out=H)
        return W, H, cfg

    def restore(self, res: QuantResult, cfg: QuantConfig, W_max: float, H_max: float) -> QuantResult:
        """The result in the caller's units (``cfg``: the caller's config); refuses (ValueError
        naming W and H) where a number does not fit float64 there."""
        if not (self.w_exp or self.h_exp):
            return dataclasses.replace(res, config=cfg)
        w, e = -self.w_exp, -self.loss_exp

        def back(x, exp: int, what: str):
            with np.errstate(over="ignore", under="ignore"):
                y = np.ldexp(x, exp)
            if np.any(~np.isfinite(y) | ((y == 0) & (np.asarray(x) != 0))):
                raise ValueError(
                    f"W, H: the {what} of this layer (max |W| = {W_max:.3g}, max diag H = {H_max:.3g}) "
                    f"{'overflows' if exp > 0 else 'underflows'} float64. Quantization is scale-equivariant: "
                    f"quantize 2^k·W (e.g. k = {self.w_exp}; the codes are the same) and multiply the "
                    f"returned scale and zero by 2^-k; losses are then in units of 2^(2k)")
            return y

        return dataclasses.replace(
            res, config=cfg,
            scale=back(res.scale, w, "scales"), zero=back(res.zero, w, "zeros"),
            loss=float(back(res.loss, e, "loss")), row_loss=back(res.row_loss, e, "loss"),
            objective=float(back(res.objective, e, "objective")),
            loss_history=[float(v) for v in back(np.array(res.loss_history), e, "objective")],
            lower_bound=None if res.lower_bound is None else float(np.ldexp(res.lower_bound, e)),  # ≤ objective
            hp_weight=None if res.hp_weight is None else back(res.hp_weight, w, "fp16 branch"),
        )


def check_result(res: QuantResult, W: np.ndarray, h_max: float) -> None:
    """Certificates that something is wrong rather than a silent answer: a negative loss or
    objective (a negative Rayleigh quotient r H rᵀ: H is not PSD) or any non-finite number.
    ``h_max``: max diag H (bounds |H_ij| for a PSD H)."""
    arrays = [res.scale, res.zero, res.row_loss, np.asarray(res.loss_history, dtype=np.float64),
              np.array([res.loss, res.objective])]
    if res.hp_weight is not None:
        arrays.append(res.hp_weight)
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError("H: the solve produced non-finite values; H is too ill-conditioned for float64 "
                         "(condition number near 1e16 or more). Raise QuantConfig.damp")
    r = res.dequantize() - W
    # r H rᵀ is computed to within ~n·eps·‖r‖²·max|H| of its true value, which is ≥ 0 for a PSD H
    tol = 64 * W.shape[1] * np.finfo(np.float64).eps * float(np.einsum("ij,ij->", r, r)) * h_max
    worst = min(res.loss, res.objective, *res.loss_history)
    if worst < -tol:
        raise not_psd(f"the layer loss r·H·rᵀ of the solver's answer is {worst:.3g} < 0")


def solve_layer(solve: Callable[[np.ndarray, np.ndarray, QuantConfig], QuantResult],
                W: object, H: object, cfg: QuantConfig | None) -> QuantResult:
    """Validate (W, H, cfg), run ``solve`` on a fresh, symmetrised, safely scaled float64 copy of H
    (``solve`` may modify it) and return its result checked and in the caller's units.

    ``solve`` factors H_d itself for GPTQ (and raises HessianNotPSD where that fails); for the
    methods that do not (rtn) or that factor another matrix (the fp16 branch's Schur complement)
    the PSD check here factors H_d once."""
    cfg = QuantConfig() if cfg is None else cfg
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"cfg: expected a decoupleq_ref.QuantConfig, got {type(cfg).__name__}; "
                         f"build one with QuantConfig(...) or QuantConfig.from_dict(d)")
    W, H = check_layer(W, H, cfg.group_size)
    W_max, H_max = float(np.abs(W).max()), float(np.diag(H).max())
    scaling = LayerScaling.of(W, H)
    W, H, solve_cfg = scaling.apply(W, H, cfg)
    if cfg.method == "rtn" or cfg.hp_channels:
        check_psd(H, cfg.damp)
    h_max = float(np.diag(H).max()) + damping(H, cfg.damp)  # max diag H_d, before ``solve`` damps H
    res = solve(W, H, solve_cfg)
    check_result(res, W, h_max)
    return scaling.restore(res, cfg, W_max, H_max)
