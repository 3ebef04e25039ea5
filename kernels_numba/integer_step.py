"""Integer step (mirrors decoupleq_ref/integer_step.py): box relaxation and GPTQ rounding.

GPTQ's column loop runs compiled, one row per task (rows never interact), on the permuted
weights; the trailing update of each block is the reference's own BLAS product
``W[:, i2:] −= Err · U[i1:i2, i2:]``. Every float operation is the reference's, in its order,
so the codes are bitwise the reference's. Scales and zeros stay (out, G) (no (out, in) copies);
codes are uint8.
"""

from __future__ import annotations

import numpy as np

import scipy.linalg.lapack as lapack

from decoupleq_ref.integer_step import act_order_perm
from decoupleq_ref.layer_input import certify_factor, not_psd, psd_shifts

from ._blas import all_blas_threads, matmul
from ._compat import get_num_threads, njit, prange, require
from .init import _clip_code, _den

__all__ = ["act_order_perm", "gptq_codes", "gptq_factor", "gptq_losses", "gptq_round", "integer_step",
           "inverse_cholesky_upper", "lean_factor", "relax_box"]


@njit(parallel=True)
def _antitranspose_upper(A):
    """A[i, j] ← A[n−1−j, n−1−i] on the upper triangle (an involution of it), zeros below."""
    n = A.shape[0]
    for i in prange(n):
        for j in range(i, n):
            i2, j2 = n - 1 - j, n - 1 - i
            if (i, j) < (i2, j2):
                A[i, j], A[i2, j2] = A[i2, j2], A[i, j]
        for j in range(i):
            A[i, j] = 0.0


def inverse_cholesky_upper(H: np.ndarray, damp: float, perm: np.ndarray | None = None) -> np.ndarray:
    """Upper Cholesky factor U of (H_pp + λI)⁻¹, H_pp = H[perm][:, perm] (mirrors decoupleq_ref's,
    same damping ladder), in one (in, in) buffer and half the reference's flops: with J the
    reversal, J·H_pp·J = L̃L̃ᵀ gives H_pp⁻¹ = (J L̃⁻¹ J)ᵀ(J L̃⁻¹ J), and J L̃⁻¹ J is upper
    triangular, so U = J L̃⁻¹ J: LAPACK potrf + trtri (n³/3 each) on the reversed matrix instead of
    potrf → potri → potrf (4n³/3). The reference holds 4 more (in, in) arrays (512 MiB at
    in = 4096). Agrees with it to rounding."""
    return _inverse_cholesky(H, damp, perm)[0]


def _inverse_cholesky(H: np.ndarray, damp: float, perm: np.ndarray | None) -> tuple[np.ndarray, float]:
    """(U, λ): inverse_cholesky_upper's factor and the shift λ of H_pp + λI it succeeded with."""
    n = H.shape[0]
    perm = np.arange(n) if perm is None else perm
    mean_diag = float(np.mean(np.diag(H)[perm])) or 1.0
    rev = perm[::-1]
    for factor in psd_shifts(damp):
        A = np.ascontiguousarray(H[np.ix_(rev, rev)], dtype=np.float64)  # J H_pp J; fresh: a failure destroys it
        A[np.diag_indices(n)] += factor * mean_diag
        F = A.T  # Fortran-ordered view of the same memory, equal to A by symmetry
        with all_blas_threads():
            ok = lapack.dpotrf(F, lower=1, overwrite_a=1)[1] == 0  # F's lower triangle: L̃
            ok = ok and lapack.dtrtri(F, lower=1, overwrite_c=1)[1] == 0  # F's lower triangle: L̃⁻¹
        if ok:
            # A's upper triangle holds (L̃⁻¹)ᵀ; U[i, j] = L̃⁻¹[n−1−i, n−1−j] = A[n−1−j, n−1−i].
            _antitranspose_upper(A)
            certify_factor(A.__matmul__, A.T.__matmul__, n, factor * mean_diag)
            return A, factor * mean_diag
        del A, F
    raise not_psd(f"GPTQ's Cholesky of the damped H + {factor * mean_diag:.3g}·I failed")


def gptq_factor(H: np.ndarray, act_order: bool, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(perm, U) for GPTQ (mirrors decoupleq_ref.gptq_factor) with the lean factorisation."""
    perm, U, _ = lean_factor(H, act_order, damp)
    return perm, U


def lean_factor(H: np.ndarray, act_order: bool, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(perm, U, λ): gptq_factor and the λ that U = chol((H_pp + λI)⁻¹) was built with
    (gptq_losses needs it to take GPTQ's added damping back out)."""
    perm = act_order_perm(H, act_order)
    U, shift = _inverse_cholesky(H, damp, perm)
    return perm, U, shift


@njit(parallel=True)
def _gptq_block(Wp, Q, Err, scale, zero, gidx, U, i1, i2, maxq, parts):
    """Columns i1..i2 of GPTQ for every row: round, error, in-block update (reference order).

    Each task copies its rows of the block transposed, so the update w_k −= e·U_ck of one
    column runs over contiguous rows (vectorised), as the reference's np.outer does."""
    out = Wp.shape[0]
    b = i2 - i1
    for p in prange(parts):
        r0 = p * out // parts
        r1 = (p + 1) * out // parts
        m = r1 - r0
        T = np.empty((b, m))
        for i in range(m):
            for k in range(b):
                T[k, i] = Wp[r0 + i, i1 + k]
        e = np.empty(m)
        for c in range(b):
            col = i1 + c
            g = gidx[col]
            for i in range(m):
                s = scale[r0 + i, g]
                z = zero[r0 + i, g]
                code = _clip_code(np.floor((T[c, i] - z) / _den(s) + 0.5), maxq)
                Q[r0 + i, col] = code
                e[i] = (T[c, i] - (s * code + z)) / U[col, col]
            for k in range(c, b):
                u = U[col, i1 + k]
                for i in range(m):
                    T[k, i] -= e[i] * u
            for i in range(m):
                Err[r0 + i, c] = e[i]
        for i in range(m):
            for k in range(b):
                Wp[r0 + i, i1 + k] = T[k, i]


@njit(parallel=True)
def _trailing_update(Wp, Err, Ub, i2, parts):
    """Wp[:, i2:] −= Err · Ub (the reference's product and subtraction), rows split over threads."""
    m = Wp.shape[0]
    for p in prange(parts):
        r0 = p * m // parts
        r1 = (p + 1) * m // parts
        if r1 > r0:
            T = np.dot(Err[r0:r1], Ub)
            for i in range(r0, r1):
                for k in range(T.shape[1]):
                    Wp[i, i2 + k] -= T[i - r0, k]


def _parts(rows: int) -> int:
    return max(1, min(2 * get_num_threads(), rows // 32))


@njit(parallel=True)
def _permute_cols(A, perm):
    out = np.empty((A.shape[0], perm.shape[0]))
    for i in prange(A.shape[0]):
        for c in range(perm.shape[0]):
            out[i, c] = A[i, perm[c]]
    return out


@njit(parallel=True)
def _unpermute_cols(Q, perm):
    q = np.empty_like(Q)
    for i in prange(Q.shape[0]):
        for c in range(perm.shape[0]):
            q[i, perm[c]] = Q[i, c]
    return q


def gptq_round(W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int, act_order: bool,
               block_size: int, damp: float, factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """GPTQ sequential rounding with lazy block updates (mirrors decoupleq_ref.gptq_round, but
    takes the per-group (out, G) scale and zero); returns uint8 codes (out, in)."""
    require()
    perm, U = factor if factor is not None else gptq_factor(H, act_order, damp)
    return gptq_codes(W, scale, zero, bits, perm, U, block_size)[0]


def gptq_codes(W: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, perm: np.ndarray, U: np.ndarray,
               block_size: int, errors: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """gptq_round with the factor given: (uint8 codes, and with ``errors`` ‖e_i‖² per row, the
    sum of squared scaled rounding errors gptq_losses turns into the loss)."""
    maxq = (1 << bits) - 1
    n = W.shape[1]
    gidx = (perm // (n // scale.shape[1])).astype(np.int64)
    Wp = _permute_cols(W, perm)
    Q = np.empty(W.shape, np.uint8)
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    zero = np.ascontiguousarray(zero, dtype=np.float64)
    err_sq = np.zeros(W.shape[0]) if errors else None
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        Err = np.empty((W.shape[0], i2 - i1))
        _gptq_block(Wp, Q, Err, scale, zero, gidx, U, i1, i2, maxq, _parts(W.shape[0]))
        if errors:
            err_sq += np.einsum("ij,ij->i", Err, Err)
        if i2 < n:
            _trailing_update(Wp, Err, np.ascontiguousarray(U[i1:i2, i2:]), i2, _parts(W.shape[0]))
    return _unpermute_cols(Q, perm), err_sq


def gptq_losses(err_sq: np.ndarray, shift: float, res_sq: np.ndarray) -> np.ndarray:
    """ℓ_i = ‖e_i‖² − λ‖ŵ_i − w_i‖²: GPTQ's loss identity. With U the upper Cholesky factor of
    (H + λI)⁻¹, the rounding errors e_c = (w'_c − ŵ_c)/U_cc satisfy ŵ − w = −e·U, so
    (ŵ − w)(H + λI)(ŵ − w)ᵀ = e·U(H + λI)Uᵀ·eᵀ = ‖e‖²; the λ GPTQ adds is taken back out."""
    return err_sq - shift * res_sq


@njit(parallel=True)
def _adam_update(w, g, m, v, lo, hi, t, lr):
    """One projected Adam step, element by element in the reference's operation order."""
    b1, b2, eps = 0.9, 0.999, 1e-5
    step = lr / (1 - b1 ** t)
    corr = 1 - b2 ** t
    for i in prange(w.shape[0]):
        for j in range(w.shape[1]):
            gij = g[i, j]
            m[i, j] = b1 * m[i, j] + (1 - b1) * gij
            v[i, j] = b2 * v[i, j] + (1 - b2) * gij * gij
            x = w[i, j] - step * m[i, j] / (np.sqrt(v[i, j] / corr) + eps)
            w[i, j] = min(max(x, lo[i, j]), hi[i, j])


def relax_box(W: np.ndarray, scale_e: np.ndarray, zero_e: np.ndarray, H: np.ndarray, bits: int, iters: int,
              lr: float) -> np.ndarray:
    """Projected Adam on the box-relaxed problem (mirrors decoupleq_ref.relax_box)."""
    require()
    a, b = zero_e, zero_e + scale_e * ((1 << bits) - 1)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    w = np.clip(W, lo, hi)
    m, v = np.zeros_like(W), np.zeros_like(W)
    for t in range(1, iters + 1):
        _adam_update(w, matmul(w - W, H), m, v, lo, hi, float(t), float(lr))
    return w


def integer_step(W: np.ndarray, scale: np.ndarray, zero: np.ndarray, H: np.ndarray, bits: int, act_order: bool,
                 block_size: int, damp: float, relax_iters: int, relax_lr: float,
                 factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Optional box relaxation, then GPTQ rounding (mirrors decoupleq_ref.integer_step); uint8."""
    start = W
    if relax_iters > 0:
        n_in = W.shape[1]
        reps = n_in // scale.shape[1]
        start = relax_box(W, np.repeat(scale, reps, axis=1), np.repeat(zero, reps, axis=1), H, bits,
                          relax_iters, relax_lr)
    return gptq_round(start, scale, zero, H, bits, act_order, block_size, damp, factor)
