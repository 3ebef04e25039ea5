"""Starts for the constrained K-quant solve, and the format's own quantizer.

``llamacpp_kquant`` is llama.cpp's K-quant algorithm, written from its
description (not its code), with the diagonal of H as the importance, the way ``--imatrix``
feeds it (an importance matrix is the mean of x² per input channel: diag(XᵀX/N) = diag(H)).

Per sub-block (16 or 32 weights x, importances a):

1. weights  w_c = a_c · sqrt(σ² + x_c²),  σ² = κ · mean over the super-block of x²
   (κ = 2 for Q4_K / Q5_K, 1 for Q2_K);
2. a weighted min-max search: start from min = min(x, 0), max = max(x) and the grid
   L = round((x − min)·n_max / (max − min)); then for each of ``nstep`` + 1 trial inverse scales
   (n_max + rmin + rdelta·i) / (max − min) round L, fit (scale, min) to x by weighted least squares
   (min clamped to ≤ 0, scale refitted then), keep the trial with the lowest Σ w (scale·L + min − x)²;
3. per super-block: d = max_j scale_j / (2^t − 1), sc_j = round(scale_j / d); dmin likewise
   from the mins (stored as −min ≥ 0); d and dmin rounded to fp16;
4. the codes re-rounded on the final grid: q = clip(round((x + dmin·m_j) / (d·sc_j)), 0, n_max).

(llama.cpp's importance path also weighs the rounding of the sub-scales themselves; step 3 is
its plain path.) The result is a decoupleq_ref.kquant.KQuantLayer: the baseline the constrained
decoupleQ solve is compared with (bench/kquant_vs_llamacpp.py), and one of the two starts
``kquant_start`` chooses between per row, so the solve is never worse than the format's own
quantizer on the objective.
"""

from __future__ import annotations

import numpy as np

from .kquant import SUPER, KQuantLayer, KSpec, check_kquant_shape
from .objective import damp_hessian, row_losses

#: (rmin, rdelta, nstep, κ) per type
SEARCH = {"Q2_K": (-0.9, 0.05, 36, 1.0), "Q4_K": (-0.9, 0.05, 36, 2.0), "Q5_K": (-0.9, 0.05, 36, 2.0)}


def weighted_minmax_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(scale, −min) per row of x (N, n) with weights w (N, n): step 2 of the module docstring."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0)

    def grid(iscale: np.ndarray) -> np.ndarray:
        return np.clip(np.floor(iscale[:, None] * (x - lo[:, None]) + 0.5), 0, nmax)

    def err(scale: np.ndarray, mn: np.ndarray, L: np.ndarray) -> np.ndarray:
        return (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(axis=1)

    best_L = grid(nmax / span)
    best_scale, best_min = span / nmax, lo.copy()
    best_err = err(best_scale, best_min, best_L)
    sw = w.sum(axis=1)
    sx = (w * x).sum(axis=1)
    for i in range(nstep + 1):
        L = grid((rmin + rdelta * i + nmax) / span)
        sl, sl2, sxl = (w * L).sum(axis=1), (w * L * L).sum(axis=1), (w * x * L).sum(axis=1)
        D = sw * sl2 - sl * sl
        ok = D > 0
        safe_D = np.where(ok, D, 1.0)
        scale = (sw * sxl - sx * sl) / safe_D
        mn = (sl2 * sx - sl * sxl) / safe_D
        positive = mn > 0
        scale = np.where(positive, np.divide(sxl, sl2, out=np.zeros_like(sxl), where=sl2 > 0), scale)
        mn = np.where(positive, 0.0, mn)
        e = err(scale, mn, L)
        better = ok & (e < best_err)
        best_err = np.where(better, e, best_err)
        best_scale, best_min = np.where(better, scale, best_scale), np.where(better, mn, best_min)
        best_L = np.where(better[:, None], L, best_L)
    flat = hi <= lo
    return np.where(flat, 0.0, best_scale), np.where(flat, -lo, -best_min)


def llamacpp_kquant(W: np.ndarray, importance: np.ndarray, spec: KSpec) -> KQuantLayer:
    """Quantize W (out, in; in a multiple of 256) on ``spec``'s grid the way llama.cpp does with an
    importance vector (module docstring)."""
    W = np.asarray(W, np.float64)
    out, n_in = W.shape
    check_kquant_shape(n_in, spec)
    rmin, rdelta, nstep, kappa = SEARCH[spec.name]
    nmax = (1 << spec.bits) - 1
    sigma2 = kappa * (W.reshape(out, -1, SUPER) ** 2).mean(axis=2)  # (out, S)
    sigma2 = np.repeat(sigma2, SUPER, axis=1)
    weights = np.asarray(importance, np.float64)[None, :] * np.sqrt(sigma2 + W ** 2)
    x, w = W.reshape(-1, spec.sub), weights.reshape(-1, spec.sub)
    scale, neg_min = weighted_minmax_search(x, w, nmax, rmin, rdelta, nstep)
    scale, neg_min = scale.reshape(out, -1, spec.n_sub), neg_min.reshape(out, -1, spec.n_sub)

    def to_ints(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        peak = v.max(axis=2)
        f = (peak / spec.top).astype(np.float16)
        f64 = f.astype(np.float64)[..., None]
        ints = np.clip(np.floor(np.divide(v, f64, out=np.zeros_like(v), where=f64 > 0) + 0.5), 0, spec.top)
        return f, ints.reshape(out, -1).astype(np.uint8)

    d, sc = to_ints(np.maximum(scale, 0.0))
    dmin, m = to_ints(np.maximum(neg_min, 0.0))
    step = np.repeat(np.repeat(d.astype(np.float64), spec.n_sub, axis=1) * sc, spec.sub, axis=1)
    low = np.repeat(np.repeat(dmin.astype(np.float64), spec.n_sub, axis=1) * m, spec.sub, axis=1)
    q = np.clip(np.floor(np.divide(W + low, step, out=np.zeros_like(W), where=step > 0) + 0.5), 0, nmax)
    return KQuantLayer(spec, q.astype(np.uint8), sc, m, d, dmin)


def kquant_start(W: np.ndarray, H: np.ndarray, projected: KQuantLayer, damp: float = 0.01) -> KQuantLayer:
    """Per row, the better start on Σ (Ŵ_i − W_i)(H + λI)(Ŵ_i − W_i)ᵀ of ``projected`` (a free
    decoupleQ solution rounded onto the grid, ``kquant.project_to_kgrid``) and llama.cpp's own
    quantization with diag(H) as importance (``llamacpp_kquant``). Rows of a K-quant layer are
    independent (each holds its own super-blocks), so the mix is a valid layer; ties keep
    ``projected``. The solve from here keeps only what lowers the objective, so it never ends
    above the format's own quantizer."""
    W = np.asarray(W, np.float64)
    H = np.asarray(H, np.float64)
    Hd = damp_hessian(H, damp)
    own = llamacpp_kquant(W, np.diag(H), projected.spec)
    take = row_losses(W, own.dequantize(), Hd) < row_losses(W, projected.dequantize(), Hd)
    pick = {name: np.where(take[:, None], getattr(own, name), getattr(projected, name))
            for name in ("q", "sc", "m", "d", "dmin")}
    return KQuantLayer(projected.spec, **pick)
