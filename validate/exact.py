"""Exact oracles for tiny layers: independent solutions of decoupleQ's sub-problems and of the
whole mixed-integer problem, to check the reference solver (decoupleq_ref) against.

Everything here is written from the mathematics in docs/ALGORITHM.md, not from the solver's
code, and uses its own helpers (no decoupleq_ref function is called):

* ``float_step_qp``  — the float step (q fixed, minimise over (s, z)) as a convex QP in cvxpy;
                        checks ``decoupleq_ref.closed_form_scale_zero``.
* ``box_qp``         — the box-relaxed integer step min_w (w − W) H (w − W)ᵀ, lo ≤ w ≤ hi, in
                        cvxpy; checks the projected Adam of ``decoupleq_ref.relax_box``.
* ``global_optimum`` — the exact optimum of the whole problem (q, s, z) for tiny per-channel
                        layers, by enumerating every integer row q and solving its (s, z) in
                        closed form; vectorised NumPy, no cvxpy.
* ``optimality_gap`` — loss(result) / optimum on the same H.

Which H.  Every function here minimises on exactly the H it is given. The reference solver makes
its decisions on the damped H_d = H + damp·mean(diag H)·I (``decoupleq_ref.damp_hessian``) and
reports ``res.objective`` on H_d but ``res.loss`` on the raw H. A fair gap therefore compares
``res.objective`` with ``global_optimum(W, H_d, ...)`` (or, with ``damp = 0`` on a full-rank H,
``res.loss`` with ``global_optimum(W, H, ...)``); ``optimality_gap`` evaluates the result's loss
itself on the H passed in, so pass it H_d to get the solver's own objective ratio.

cvxpy is imported lazily: ``global_optimum`` and ``optimality_gap`` work without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

#: Largest number of integer rows (2^bits)^in that ``global_optimum`` enumerates per layer row
#: (65536 = 2 bits with in = 8, or 1 bit with in = 16).
MAX_CANDIDATES = 1 << 16

#: Relative size below which a squared norm in the H metric counts as zero (collinear basis).
RANK_TOL = 1e-10


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------

def quadratic_loss(W: np.ndarray, W_hat: np.ndarray, H: np.ndarray) -> np.ndarray:
    """Per-row (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ, computed directly from the residual (out,)."""
    R = np.asarray(W_hat, dtype=np.float64) - np.asarray(W, dtype=np.float64)
    return np.einsum("ij,jk,ik->i", R, H, R)


def hessian_factor(H: np.ndarray) -> np.ndarray:
    """A square factor F with Fᵀ F = H for symmetric PSD H (negative eigenvalues, i.e. rounding
    noise of a PSD matrix, are clipped to 0), so (r H rᵀ) = ‖F rᵀ‖². Works for singular H, where
    a Cholesky factor does not exist."""
    Hs = (np.asarray(H, dtype=np.float64) + np.asarray(H, dtype=np.float64).T) / 2
    lam, V = np.linalg.eigh(Hs)
    return np.sqrt(np.clip(lam, 0.0, None))[:, None] * V.T


def n_groups_of(n_in: int, group_size: int) -> int:
    """Groups per row; -1 = per-channel. Raises ValueError for ragged groups."""
    if group_size == -1:
        return 1
    if group_size < 1 or n_in % group_size:
        raise ValueError(f"group_size: {group_size} must be -1 or a positive divisor of in = {n_in}")
    return n_in // group_size


def design_matrix(q_row: np.ndarray, G: int, bits: int, symmetric: bool) -> np.ndarray:
    """(in, n) basis B with Ŵ_row = B θ for the float step's unknowns θ.

    Asymmetric: θ = (s_1..s_G, z_1..z_G), columns q masked to group g, then group indicators.
    Symmetric:  θ = (s_1..s_G), columns (q − 2^(b−1)) masked to group g (z_g = −s_g·2^(b−1)).
    """
    n_in = q_row.shape[0]
    gs = n_in // G
    ind = np.zeros((n_in, G))
    for g in range(G):
        ind[g * gs:(g + 1) * gs, g] = 1.0
    qf = q_row.astype(np.float64)[:, None]
    if symmetric:
        return (qf - float(1 << (bits - 1))) * ind
    return np.concatenate([qf * ind, ind], axis=1)


def theta_to_scale_zero(theta: np.ndarray, G: int, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split θ into (scale, zero) of shape (G,) each (symmetric: zero = −scale·2^(b−1))."""
    s = theta[:G]
    z = -s * float(1 << (bits - 1)) if symmetric else theta[G:2 * G]
    return s, z


def positive_scale(x: np.ndarray) -> float:
    """max |x|, or 1 if x is all zero: a normalisation constant that is never 0."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    return m if m > 0 else 1.0


def require_cvxpy() -> Any:
    """Import cvxpy or raise ImportError with the install hint."""
    try:
        import cvxpy as cp
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("validate.exact: cvxpy is needed here; pip install 'decoupleq-ref[exact]'") from e
    return cp


def solve_problem(problem: Any, solver: str | None) -> None:
    """Solve a cvxpy problem with tight tolerances (Clarabel by default); raise if not optimal."""
    cp = require_cvxpy()
    name = solver or ("CLARABEL" if "CLARABEL" in cp.installed_solvers() else None)
    opts: dict[str, Any] = {}
    if name == "CLARABEL":
        opts = dict(tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10,
                    max_iter=500)
    problem.solve(solver=name, **opts)
    if problem.status not in ("optimal", "optimal_inaccurate"):
        raise RuntimeError(f"validate.exact: cvxpy ended with status {problem.status!r}")


# ----------------------------------------------------------------------------------------------
# 1. float step as a QP
# ----------------------------------------------------------------------------------------------

def float_step_qp(
    q: np.ndarray,
    W: np.ndarray,
    H: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    solver: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """argmin over (s, z) of Σ_i (s·q_i + z − W_i) H (…)ᵀ with q fixed, one cvxpy problem per row.

    The objective is written as ‖F (B θ − W_iᵀ)‖² with F = ``hessian_factor(H)`` (FᵀF = H), which
    is convex for any PSD H, singular included. The data are normalised (W by max|W|, F by
    √max diag H) before solving and θ scaled back, so the solver's absolute tolerances are
    relative ones. Where θ is not unique (a constant group, or singular H) any minimiser may
    come back: compare losses there, not parameters. Returns (scale, zero), each (out, G).
    """
    cp = require_cvxpy()
    W = np.asarray(W, dtype=np.float64)
    out, n_in = W.shape
    G = n_groups_of(n_in, group_size)
    F = hessian_factor(H)
    F = F / np.sqrt(positive_scale(np.diag(H)))
    scale, zero = np.empty((out, G)), np.empty((out, G))
    for i in range(out):
        c = positive_scale(W[i])
        B = design_matrix(np.asarray(q[i]), G, bits, symmetric)
        theta = cp.Variable(B.shape[1])
        problem = cp.Problem(cp.Minimize(cp.sum_squares(F @ (B @ theta) - F @ (W[i] / c))))
        solve_problem(problem, solver)
        scale[i], zero[i] = theta_to_scale_zero(c * np.asarray(theta.value), G, bits, symmetric)
    return scale, zero


# ----------------------------------------------------------------------------------------------
# 2. box-relaxed integer step as a QP
# ----------------------------------------------------------------------------------------------

def grid_box(scale_e: np.ndarray, zero_e: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise [lo, hi] spanned by s·q + z over q ∈ [0, 2^b − 1] (s may be negative)."""
    end = zero_e + scale_e * float((1 << bits) - 1)
    return np.minimum(zero_e, end), np.maximum(zero_e, end)


def box_qp(
    W: np.ndarray, scale_e: np.ndarray, zero_e: np.ndarray, H: np.ndarray, bits: int, solver: str | None = None
) -> np.ndarray:
    """argmin_w Σ_i (w_i − W_i) H (w_i − W_i)ᵀ subject to lo ≤ w ≤ hi element-wise, via cvxpy.

    [lo, hi] = [min(z, z + s·maxq), max(z, z + s·maxq)] with ``scale_e``, ``zero_e`` already
    expanded to (out, in). Rows are independent; one problem holds them all. Normalised like
    ``float_step_qp``. Returns w (out, in), clipped into the box (removes solver slack ~1e-12).
    """
    cp = require_cvxpy()
    W = np.asarray(W, dtype=np.float64)
    lo, hi = grid_box(np.asarray(scale_e, dtype=np.float64), np.asarray(zero_e, dtype=np.float64), bits)
    c = positive_scale(np.concatenate([W.ravel(), lo.ravel(), hi.ravel()]))
    F = hessian_factor(H) / np.sqrt(positive_scale(np.diag(H)))
    w = cp.Variable(W.shape)
    problem = cp.Problem(cp.Minimize(cp.sum_squares((w - W / c) @ F.T)), [w >= lo / c, w <= hi / c])
    solve_problem(problem, solver)
    return np.clip(c * np.asarray(w.value), lo, hi)


# ----------------------------------------------------------------------------------------------
# 3. global optimum by enumeration
# ----------------------------------------------------------------------------------------------

@dataclass
class GlobalOptimum:
    """Exact minimiser of Σ_i (s_i·q_i + z_i − W_i) H (…)ᵀ over integer q and float (s, z),
    per-channel (one (s, z) per row), on the H given to ``global_optimum``.

    row_loss  (out,) optimal loss per row          q      uint8 (out, in)
    scale     (out, 1), ≥ 0 (asymmetric)           zero   (out, 1)
    loss      row_loss.sum()
    """

    row_loss: np.ndarray
    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    loss: float
    bits: int = 2
    symmetric: bool = False

    def dequantize(self) -> np.ndarray:
        """Ŵ = s·q + z (out, in)."""
        return self.scale * self.q.astype(np.float64) + self.zero


def check_enumerable(n_in: int, bits: int, max_candidates: int) -> int:
    """Number of integer rows (2^bits)^in, or ValueError naming the limit."""
    if not isinstance(bits, (int, np.integer)) or not 1 <= int(bits) <= 8:
        raise ValueError(f"bits: must be an integer in 1..8, got {bits!r}")
    count = (1 << int(bits)) ** n_in
    if count > max_candidates:
        raise ValueError(
            f"global_optimum: (2^bits)^in = {1 << bits}^{n_in} = {count} candidate integer rows exceeds "
            f"the limit max_candidates = {max_candidates} (MAX_CANDIDATES: e.g. in <= 8 at 2 bits, "
            f"in <= 16 at 1 bit); enumeration is exponential in in"
        )
    return count


def candidate_rows(n_in: int, bits: int, symmetric: bool) -> np.ndarray:
    """Every integer row q ∈ [0, 2^b − 1]^in (float64, (K, in)), halved when asymmetric.

    Asymmetric: q and maxq − q span the same {s·q + z} (s → −s, z → z + s·maxq), so only rows
    with q_0 < 2^(b−1) are kept; their mirrors have q_0 ≥ 2^(b−1). Symmetric mode has no such
    symmetry (q − 2^(b−1) ranges over [−2^(b−1), 2^(b−1) − 1]) and keeps all of them.
    """
    levels = 1 << bits
    lead = levels // 2 if not symmetric else levels
    count = lead * levels ** (n_in - 1)
    idx = np.arange(count, dtype=np.int64)
    powers = levels ** np.arange(n_in - 1, -1, -1, dtype=np.int64)  # digit 0 is the most significant
    return ((idx[:, None] // powers[None, :]) % levels).astype(np.float64)


def profiled_losses(A: np.ndarray, W: np.ndarray, H: np.ndarray, symmetric: bool) -> np.ndarray:
    """(K, out) array of min_{s,z} (s·a_k + z·1 − W_i) H (…)ᵀ for every basis row a_k and row W_i.

    Asymmetric, with ⟨u, v⟩ = u H vᵀ: project out the constant direction first,
        base_i = ⟨w,w⟩ − ⟨1,w⟩²/⟨1,1⟩,   v_k = a_k − (⟨a_k,1⟩/⟨1,1⟩)·1,
        loss = base_i − ⟨v_k, w_i⟩² / ⟨v_k, v_k⟩     (a Schur complement of the 2×2 system),
    where ⟨v_k, v_k⟩ ≈ 0 (a_k constant, or a_k − c·1 in the null space of a singular H) means s
    adds nothing: loss = base_i (the best constant z; s = 0). If ⟨1,1⟩ = 0, z adds nothing and
    the formula drops the constant direction. Symmetric (z = −s·2^(b−1), a_k = q_k − 2^(b−1)):
        loss = ⟨w,w⟩ − ⟨a_k,w⟩² / ⟨a_k,a_k⟩   (⟨a_k,a_k⟩ ≈ 0: loss = ⟨w,w⟩, s = 0).
    Clipped at 0. Used to rank candidates; ``global_optimum`` re-evaluates the leaders exactly.
    """
    HW = W @ H                                       # (out, in)
    ww = np.einsum("ij,ij->i", HW, W)                # (out,)
    AH = A @ H
    aa = np.einsum("kj,kj->k", AH, A)                # (K,)
    aw = A @ HW.T                                    # (K, out)
    if symmetric:
        vv, vw, base = aa, aw, ww
    else:
        h1 = H.sum(axis=1)
        oo = float(h1.sum())
        ow = HW.sum(axis=1)                          # (out,)
        if oo > RANK_TOL * positive_scale(np.diag(H)):
            a1 = A @ h1                              # (K,)
            vv = aa - a1 * a1 / oo
            vw = aw - np.outer(a1 / oo, ow)
            base = ww - ow * ow / oo
        else:
            vv, vw, base = aa, aw, ww
    live = vv > RANK_TOL * np.maximum(aa, 1e-300)
    gain = np.where(live[:, None], vw * vw / np.where(live, vv, 1.0)[:, None], 0.0)
    return np.maximum(base[None, :] - gain, 0.0)


def best_scale_zero(q_row: np.ndarray, w_row: np.ndarray, F: np.ndarray, bits: int,
                    symmetric: bool) -> tuple[float, float]:
    """Exact (s, z) for one integer row q, by least squares on the factored objective ‖F(Bθ − w)‖².

    A degenerate q (constant, or ≡ 2^(b−1) when symmetric) has no identifiable scale: s = 0 and
    z is the best constant (asymmetric) or 0 (symmetric), which attains the optimum exactly.
    """
    half = float(1 << (bits - 1))
    if symmetric:
        a = q_row - half
        if not np.any(a):
            return 0.0, 0.0
        s = np.linalg.lstsq(F @ a[:, None], F @ w_row, rcond=None)[0][0]
        return float(s), float(-s * half)
    ones = np.ones_like(q_row)
    if np.all(q_row == q_row[0]):
        z = np.linalg.lstsq(F @ ones[:, None], F @ w_row, rcond=None)[0][0]
        return 0.0, float(z)
    s, z = np.linalg.lstsq(F @ np.stack([q_row, ones], axis=1), F @ w_row, rcond=None)[0]
    return float(s), float(z)


def global_optimum(
    W: np.ndarray,
    H: np.ndarray,
    bits: int,
    symmetric: bool = False,
    max_candidates: int = MAX_CANDIDATES,
    top_k: int = 8,
) -> GlobalOptimum:
    """Exact optimum of the per-channel decoupleQ problem on H (the H passed in, as is).

    Enumerates every integer row q ∈ [0, 2^b − 1]^in (half of them when asymmetric, see
    ``candidate_rows``), ranks them per layer row by the closed-form profiled loss
    (``profiled_losses``), then re-solves the ``top_k`` best per row exactly by least squares and
    evaluates their loss directly from the residual, keeping the best. Asymmetric results are
    reported with s ≥ 0 (q mirrored where needed). H must be symmetric PSD; singular H is fine.

    Pass the damped H (``decoupleq_ref.damp_hessian(H, cfg.damp)``) to compare with a
    solver's ``res.objective``; the raw H to compare with ``res.loss``. Raises ValueError when
    (2^bits)^in exceeds ``max_candidates``.
    """
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    if W.ndim != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise ValueError(f"global_optimum: need W (out, in) and H (in, in), got W {W.shape}, H {H.shape}")
    out, n_in = W.shape
    check_enumerable(n_in, bits, max_candidates)
    H = (H + H.T) / 2
    maxq = (1 << bits) - 1
    Q = candidate_rows(n_in, bits, symmetric)
    A = Q - float(1 << (bits - 1)) if symmetric else Q
    F = hessian_factor(H)
    k = min(top_k, Q.shape[0])
    chunk = max(1, (1 << 22) // Q.shape[0])

    q_best = np.zeros((out, n_in))
    scale, zero, row_loss = np.zeros((out, 1)), np.zeros((out, 1)), np.full(out, np.inf)
    for r0 in range(0, out, chunk):
        rows = np.arange(r0, min(out, r0 + chunk))
        prof = profiled_losses(A, W[rows], H, symmetric)          # (K, rows)
        leaders = np.argpartition(prof, k - 1, axis=0)[:k]       # (k, rows)
        for col, i in enumerate(rows):
            for cand in leaders[:, col]:
                s, z = best_scale_zero(Q[cand], W[i], F, bits, symmetric)
                loss = float(quadratic_loss(W[i:i + 1], (s * Q[cand] + z)[None, :], H)[0])
                if loss < row_loss[i]:
                    row_loss[i], q_best[i], scale[i, 0], zero[i, 0] = loss, Q[cand], s, z
    if not symmetric:  # report s ≥ 0: s·q + z = (−s)·(maxq − q) + (z + s·maxq)
        flip = scale[:, 0] < 0
        q_best[flip] = maxq - q_best[flip]
        zero[flip] = zero[flip] + scale[flip] * maxq
        scale[flip] = -scale[flip]
    return GlobalOptimum(row_loss=row_loss, q=q_best.astype(np.uint8), scale=scale, zero=zero,
                         loss=float(row_loss.sum()), bits=int(bits), symmetric=bool(symmetric))


# ----------------------------------------------------------------------------------------------
# 4. optimality gap
# ----------------------------------------------------------------------------------------------

class Quantized(Protocol):
    """Anything with per-channel q, scale, zero (a decoupleq_ref.QuantResult or GlobalOptimum)."""

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray


def result_bits_symmetric(result: Any) -> tuple[int, bool]:
    """(bits, symmetric) of a QuantResult (from its config) or a GlobalOptimum."""
    cfg = getattr(result, "config", None)
    if cfg is not None:
        return int(cfg.bits), bool(cfg.symmetric)
    return int(result.bits), bool(result.symmetric)


def optimality_gap(W: np.ndarray, H: np.ndarray, result: Quantized,
                   optimum: GlobalOptimum | None = None) -> float:
    """loss(result) / global optimum, both on the H passed in (≥ 1 up to rounding).

    The result's loss is recomputed here from (q, scale, zero) on H, so pass the damped H to
    measure the solver's objective. ``optimum`` may be given to avoid re-enumerating (it must
    have been computed on the same W and H). 0/0 (W exactly representable) gives 1.0, x/0 gives
    inf. Per-channel results only.
    """
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    if np.shape(result.scale)[1] != 1:
        raise ValueError("optimality_gap: per-channel results only (scale must be (out, 1))")
    bits, symmetric = result_bits_symmetric(result)
    W_hat = np.asarray(result.scale) * np.asarray(result.q, dtype=np.float64) + np.asarray(result.zero)
    loss = float(quadratic_loss(W, W_hat, H).sum())
    opt = optimum if optimum is not None else global_optimum(W, H, bits, symmetric)
    if opt.loss > 0:
        return loss / opt.loss
    return 1.0 if loss <= 1e-300 else float("inf")
