"""A torch re-implementation of how the official decoupleQ layer solver behaves, to compare with.

Written from reading the official code (github.com/bytedance/decoupleQ, ``decoupleQ/quant.py``
``decoupleQ.startquant`` and ``decoupleQ/moq_quant.py``), reproducing its behaviour under the
published settings (``run_llama.sh``: asymmetric, ``--max-iter-num 4``, ``--round-fn gptq``,
``--act-order``, percdamp 0.01, quantizer grid 200 / maxshrink 0.8 / iters_for_scale 4). It is
not a copy: the structure, names and the lazy-block GPTQ update are ours; the decisions (what is
tried, in which order, what is kept) follow the official code:

    Hd = H + perdamp·mean(diag H)·I           every loss below is measured on Hd
    (s, z) = min-max;  q = RTN;  loss = ℓ(q)  (iters_for_scale = 0: no grid search here)
    GPTQ(W; s, z)                              rows keep it where it is strictly better
    for it in range(max_iter_num − 1):
        it == 0:  (s', z') = least-squares (s, z) for the RTN codes of the shrink-grid-searched
                  scale (grid 200, maxshrink 0.8, scored on the H-loss)
        it >  0:  (s', z') = current (s, z)
        GPTQ(W; s', z')                        rows keep (q, s', z') where strictly better
        stop if fewer than 1e-4 of the rows improved
        closed-form (s, z) for the current q   rows keep it where strictly better
        stop if fewer than 1e-4 of the rows improved

Details kept from the official code: signed codes q ∈ [−2^(b−1), 2^(b−1) − 1] with
z = xmin − s·(−2^(b−1)); rounding ties upwards; GPTQ adds its own damping (1 % of mean diag of the
already damped H, ×10 escalation if the factorisation fails), uses the upper Cholesky factor of
the inverse, starts from the float W and reads the codes back from its dequantized output; the
per-channel least-squares fit is a 2×2 solve in the working precision whose determinant is
clamped to |det| ≥ 1e-5; the grouped fit assembles the normal equations in the working precision,
symmetrises them, solves in float64 (with 1 % diagonal damping of every row's system if a solve
fails) and casts back to float32. Runs in float32 by default like the official code.

The result is converted to this project's unsigned convention: q_u = q_s − min_bound,
zero_u = zero_s + scale·min_bound (min_bound = −2^(b−1)), so Ŵ = scale·q_u + zero_u is the
official Ŵ = scale·q_s + zero_s.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["official_quantize"]

_DET_FLOOR = 1e-5  # the official 2×2 solve clamps |det| to at least this
_STOP_RATE = 1e-4  # fraction of improved rows below which the alternation stops


def _round_up_ties(x: torch.Tensor) -> torch.Tensor:
    """Nearest integer, exact halves going up (not to even)."""
    fl = torch.floor(x)
    return torch.where(x - fl == 0.5, fl + 1.0, torch.round(x))


def _div(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x / y with |y| ≥ 1e-15, the sign of y kept (y = 0 counts as positive)."""
    sgn = torch.where(y < 0, -1.0, 1.0).to(y.dtype)
    return x / (y.abs().clamp(min=1e-15) * sgn)


def _spread(per_group: torch.Tensor, n_in: int) -> torch.Tensor:
    """(out, G) → (out, in), each group's value over its columns."""
    return per_group.repeat_interleave(n_in // per_group.shape[1], dim=1)


def _row_loss(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """ℓ_i = (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ per row."""
    R = W_hat - W
    return ((R @ H) * R).sum(dim=1)


class _Codes:
    """The signed integer grid of b bits: [−2^(b−1), 2^(b−1) − 1]."""

    def __init__(self, bits: int) -> None:
        self.lo = -(1 << (bits - 1))
        self.hi = (1 << (bits - 1)) - 1

    def rtn(self, W: torch.Tensor, s_e: torch.Tensor, z_e: torch.Tensor) -> torch.Tensor:
        return _round_up_ties(_div(W - z_e, s_e)).clamp(self.lo, self.hi)

    def grid_from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Min-max (s, z): the grid s·q + z, q ∈ [lo, hi], runs from xmin to xmax."""
        s = (xmax - xmin) / (self.hi - self.lo)
        return s, xmin - s * self.lo


def _range(W: torch.Tensor, gs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group [xmin, xmax] widened to contain 0; an all-zero group gets [−1, 1]."""
    out, n_in = W.shape
    Wg = W.reshape(out, n_in // gs, gs)
    xmin = Wg.amin(dim=2).clamp(max=0.0)
    xmax = Wg.amax(dim=2).clamp(min=0.0)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin).to(W.dtype)
    xmax = torch.where(flat, 1.0, xmax).to(W.dtype)
    return xmin, xmax


def _rtn_loss(W, H, s, z, codes: _Codes) -> tuple[torch.Tensor, torch.Tensor]:
    n_in = W.shape[1]
    s_e, z_e = _spread(s, n_in), _spread(z, n_in)
    q = codes.rtn(W, s_e, z_e)
    return q, _row_loss(W, s_e * q + z_e, H)


def _shrink_search(W, H, xmin, xmax, s, z, loss, codes: _Codes, grid: int, max_shrink: float):
    """Rows keep the shrink p = 1 − i/grid (i < max_shrink·grid) whose RTN H-loss is strictly lowest;
    the incumbent (s, z, loss) is the min-max one (p = 1)."""
    s, z, loss = s.clone(), z.clone(), loss.clone()
    for i in range(1, int(max_shrink * grid)):
        p = 1.0 - i / grid
        s1, z1 = codes.grid_from_range(p * xmin, p * xmax)
        _, l1 = _rtn_loss(W, H, s1, z1, codes)
        win = l1 < loss
        s[win], z[win], loss[win] = s1[win], z1[win], l1[win]
    return s, z, loss


def _lsq_per_channel(q: torch.Tensor, W: torch.Tensor, H: torch.Tensor):
    """min over (s, z) of ℓ_i(s·q_i + z) for each row: a 2×2 system solved by Cramer's rule in the
    working precision, |det| clamped to ≥ 1e-5 (as the official code does)."""
    Hs = (H + H.T) / 2
    h1 = Hs.sum(dim=1)
    qH = q @ Hs
    a_qq = (qH * q).sum(dim=1)
    a_q1 = q @ h1
    a_11 = h1.sum()
    r_q = (qH * W).sum(dim=1)
    r_1 = W @ h1
    det = a_qq * a_11 - a_q1 * a_q1
    small = det.abs() < _DET_FLOOR
    det = torch.where(small, torch.where(det < 0, -_DET_FLOOR, _DET_FLOOR).to(det.dtype), det)
    s = (r_q * a_11 - a_q1 * r_1) / det
    z = (a_qq * r_1 - r_q * a_q1) / det
    if not (torch.isfinite(s).all() and torch.isfinite(z).all()):
        raise FloatingPointError("official_quantize: non-finite least-squares scale/zero")
    s, z = s[:, None], z[:, None]
    return s, z, _row_loss(W, s * q + z, Hs)


def _lsq_grouped(q: torch.Tensor, W: torch.Tensor, H: torch.Tensor, gs: int):
    """min over per-group (s_g, z_g) of ℓ_i: the 2G×2G normal equations per row, assembled in the
    working precision, symmetrised, solved in float64, cast back (float32 → float32)."""
    out, n_in = q.shape
    G = n_in // gs
    dt = W.dtype
    qg = q.reshape(out, G, gs)
    P = torch.empty((out, 2 * G, 2 * G), dtype=dt)
    for g in range(G):
        cols = slice(g * gs, (g + 1) * gs)
        T = (q[:, cols] @ H[cols, :]).reshape(out, G, gs)  # (q restricted to group g) H
        P[:, g, :G] = (T * qg).sum(dim=2)
        P[:, g, G:] = T.sum(dim=2)
    P[:, G:, :G] = P[:, :G, G:].transpose(1, 2)
    P[:, G:, G:] = H.reshape(G, gs, G, gs).sum(dim=(1, 3))
    WH = (W @ H).reshape(out, G, gs)
    y = torch.cat([(WH * qg).sum(dim=2), WH.sum(dim=2)], dim=1)
    P = ((P + P.transpose(1, 2)) / 2).double()
    y = y.double()
    try:
        theta = torch.linalg.solve(P, y)
    except RuntimeError:  # singular system somewhere: damp every row's diagonal by 1 % and retry
        idx = torch.arange(2 * G)
        P[:, idx, idx] += 0.01 * P[:, idx, idx].mean(dim=1, keepdim=True)
        theta = torch.linalg.solve(P, y)
    theta = theta.to(dt)
    s, z = theta[:, :G], theta[:, G:]
    return s, z, _row_loss(W, _spread(s, n_in) * q + _spread(z, n_in), H)


def _lsq(q, W, H, gs):
    return _lsq_per_channel(q, W, H) if gs == W.shape[1] else _lsq_grouped(q, W, H, gs)


def _inv_chol_upper(Hp: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper U with UᵀU = (Hp + λI)⁻¹, λ = t·mean(diag Hp), t = damp, then ×10 up to 100, in float64."""
    H64 = Hp.double()
    mean_diag = H64.diagonal().mean()
    eye = torch.eye(H64.shape[0], dtype=torch.float64)
    for t in (damp, 0.1, 1.0, 10.0, 100.0):
        if t < damp:
            continue
        L, info = torch.linalg.cholesky_ex(H64 + t * mean_diag * eye)
        if int(info) != 0:
            continue
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if int(info) == 0 and not torch.isnan(U).any():
            return U
    raise np.linalg.LinAlgError("official_quantize: H is not positive definite even with 100× damping")


def _gptq(W, s_e, z_e, H, perm, codes: _Codes, damp: float = 0.01, block: int = 128):
    """GPTQ rounding from the float W onto the grid s·q + z in column order ``perm``.

    Returns the signed codes (original column order) and the per-row loss of the dequantized result
    on H. The codes are read back from the dequantized weights, as the official code does.
    """
    Wp = W[:, perm].clone()
    sp, zp = s_e[:, perm], z_e[:, perm]
    Hp = H[perm][:, perm]
    U = _inv_chol_upper(Hp, damp).to(W.dtype)
    n = Wp.shape[1]
    Q = torch.empty_like(Wp)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        Wb = Wp[:, b0:b1].clone()
        E = torch.empty_like(Wb)
        for j in range(b1 - b0):
            c = b0 + j
            w = Wb[:, j]
            qhat = codes.rtn(w, sp[:, c], zp[:, c]) * sp[:, c] + zp[:, c]
            Q[:, c] = qhat
            e = (w - qhat) / U[c, c]
            Wb[:, j:] -= torch.outer(e, U[c, c:b1])
            E[:, j] = e
        Wp[:, b1:] -= E @ U[b0:b1, b1:]
    loss = _row_loss(W[:, perm], Q, Hp)
    q_p = codes.rtn(Q, sp, zp)
    q = torch.empty_like(q_p)
    q[:, perm] = q_p
    return q, loss


def official_quantize(
    W: np.ndarray,
    H: np.ndarray,
    bits: int = 2,
    group_size: int = -1,
    max_iter_num: int = 4,
    perdamp: float = 0.01,
    act_order: bool = True,
    dtype: torch.dtype = torch.float32,
    grid: int = 200,
    max_shrink: float = 0.8,
) -> dict:
    """Quantize W (out, in) under the H-loss the way the official decoupleQ solver does.

    Returns a dict:
        q            uint8 (out, in), codes in [0, 2^b − 1] (this project's convention)
        scale, zero  float64 (out, G), Ŵ = scale·q + zero
        q_signed     int8 (out, in), the official codes in [−2^(b−1), 2^(b−1) − 1]
        zero_signed  float64 (out, G), the official zero (Ŵ = scale·q_signed + zero_signed)
        loss_damped  Σ_i ℓ_i on the damped H, computed in ``dtype`` as the official final loss
        row_loss     per-row final loss on the damped H (``dtype`` precision, as float64)
        history      [(step, total loss, fraction of rows improved)] after every step
    """
    W_t = torch.as_tensor(np.asarray(W), dtype=dtype).clone()
    H_t = torch.as_tensor(np.asarray(H), dtype=dtype).clone()
    out, n_in = W_t.shape
    gs = n_in if group_size in (-1, n_in) else group_size
    if n_in % gs:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {n_in}")
    codes = _Codes(bits)

    Hd = H_t.clone()
    Hd.diagonal().add_(perdamp * H_t.diagonal().mean())
    perm = (torch.argsort(-Hd.diagonal(), stable=True) if act_order else torch.arange(n_in))

    xmin, xmax = _range(W_t, gs)
    s, z = codes.grid_from_range(xmin, xmax)
    q, loss = _rtn_loss(W_t, Hd, s, z, codes)
    minmax_s, minmax_z, minmax_loss = s.clone(), z.clone(), loss.clone()
    history = [("minmax", float(loss.sum()), 1.0)]

    def take(name, better, q_new=None, s_new=None, z_new=None, l_new=None) -> float:
        if q_new is not None:
            q[better] = q_new[better]
        if s_new is not None:
            s[better], z[better] = s_new[better], z_new[better]
        loss[better] = l_new[better]
        rate = float(better.double().mean())
        history.append((name, float(loss.sum()), rate))
        return rate

    if max_iter_num >= 1:  # one GPTQ pass on the min-max grid (max_iter_num = 1 is plain GPTQ)
        q1, l1 = _gptq(W_t, _spread(s, n_in), _spread(z, n_in), Hd, perm, codes)
        take("gptq[minmax]", l1 < loss, q_new=q1, l_new=l1)

    for it in range(max_iter_num - 1):
        if it == 0:
            sg, zg, _ = _shrink_search(W_t, Hd, xmin, xmax, minmax_s, minmax_z, minmax_loss,
                                       codes, grid, max_shrink)
            q_rtn, _ = _rtn_loss(W_t, Hd, sg, zg, codes)
            s_try, z_try, _ = _lsq(q_rtn, W_t, Hd, gs)
        else:
            s_try, z_try = s.clone(), z.clone()
        q1, l1 = _gptq(W_t, _spread(s_try, n_in), _spread(z_try, n_in), Hd, perm, codes)
        if take(f"gptq[{it}]", l1 < loss, q_new=q1, s_new=s_try, z_new=z_try, l_new=l1) < _STOP_RATE:
            break
        s1, z1, l1 = _lsq(q, W_t, Hd, gs)
        if take(f"lsq[{it}]", l1 < loss, s_new=s1, z_new=z1, l_new=l1) < _STOP_RATE:
            break

    final = _row_loss(W_t, _spread(s, n_in) * q + _spread(z, n_in), Hd)
    s64, z64 = s.double().numpy(), z.double().numpy()
    q_s = q.double().numpy()
    return {
        "q": (q_s - codes.lo).astype(np.uint8),
        "scale": s64,
        "zero": z64 + s64 * codes.lo,
        "q_signed": q_s.astype(np.int8),
        "zero_signed": z64,
        "loss_damped": float(final.double().sum()),
        "row_loss": final.double().numpy(),
        "history": history,
    }
