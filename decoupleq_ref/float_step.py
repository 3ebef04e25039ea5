"""Float step (paper eq. 8): exact least squares for (s, z) per row with q fixed.

For row i let a_g be q_i masked to group g and e_g the indicator of group g. With
θ = (s_1..s_G, z_1..z_G), Ŵ_i = Σ_g s_g a_g + z_g e_g is linear in θ, so

    min_θ (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ   ⇔   P θ = y,
    P = [[A H Aᵀ, A H Eᵀ], [E H Aᵀ, E H Eᵀ]],   y = [A H W_iᵀ; E H W_iᵀ],

a symmetric 2G×2G system per row (A, E stack the a_g, e_g). Symmetric mode drops z
(z_g = −s_g·2^(b−1)) and uses c_g = a_g − 2^(b−1)·e_g as the only basis: a G×G system.
docs/ALGORITHM.md derives it.
"""

from __future__ import annotations

import numpy as np


def group_gram(A: np.ndarray, B: np.ndarray, H: np.ndarray, G: int) -> np.ndarray:
    """(out, G, G) with entry [i, g, h] = (A_i restricted to group g) H (B_i restricted to group h)ᵀ.

    One (out, gs)·(gs, in) product per group: the same flops as A @ H, memory O(out·in).
    """
    out, n_in = A.shape
    gs = n_in // G
    res = np.empty((out, G, G))
    Bg = B.reshape(out, G, gs)
    for g in range(G):
        cols = slice(g * gs, (g + 1) * gs)
        V = (A[:, cols] @ H[cols, :]).reshape(out, G, gs)
        res[:, g, :] = np.einsum("igk,igk->ig", V, Bg)
    return res


def normal_equations(
    q: np.ndarray, W: np.ndarray, H: np.ndarray, G: int, bits: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Assemble P (out, n, n) and y (out, n) of the float step; n = 2G (or G if symmetric)."""
    out, n_in = q.shape
    gs = n_in // G
    L = (W @ H).reshape(out, G, gs)  # (W_i H) restricted to each group
    if symmetric:
        C = q - float(1 << (bits - 1))
        return group_gram(C, C, H, G), np.einsum("igk,igk->ig", L, C.reshape(out, G, gs))
    ones = np.ones_like(q)
    P11 = group_gram(q, q, H, G)
    P12 = group_gram(q, ones, H, G)
    P22 = H.reshape(G, gs, G, gs).sum(axis=(1, 3))  # e_g H e_hᵀ: the same for every row
    P = np.empty((out, 2 * G, 2 * G))
    P[:, :G, :G] = P11
    P[:, :G, G:] = P12
    P[:, G:, :G] = P12.transpose(0, 2, 1)
    P[:, G:, G:] = P22
    y = np.concatenate([np.einsum("igk,igk->ig", L, q.reshape(out, G, gs)), L.sum(axis=2)], axis=1)
    return P, y


def degenerate_groups(q: np.ndarray, G: int, bits: int, symmetric: bool) -> np.ndarray:
    """(out, G) mask of groups whose scale is not identifiable from q.

    Asymmetric: q constant on the group (s·a_g and z·e_g are collinear).
    Symmetric: q ≡ 2^(b−1) on the group (its basis c_g is zero).
    """
    out, n_in = q.shape
    qg = q.reshape(out, G, n_in // G)
    if symmetric:
        return np.all(qg == (1 << (bits - 1)), axis=2)
    return np.all(qg == qg[:, :, :1], axis=2)


def solve_rows(P: np.ndarray, y: np.ndarray, fixed: np.ndarray, fixed_value: np.ndarray) -> np.ndarray:
    """Solve P_i θ_i = y_i for every row with θ_i[k] = fixed_value[i, k] wherever fixed[i, k].

    Fixed unknowns are moved to the right-hand side and their equations replaced by θ_k = v_k.
    Rows where the reduced system is singular (H singular and damp = 0) fall back to the
    minimum-norm least-squares solution, so the result is always finite.
    """
    v = np.where(fixed, fixed_value, 0.0)
    y = y - np.einsum("ijk,ik->ij", P, v)
    P = P.copy()
    rows, ks = np.nonzero(fixed)
    P[rows, ks, :] = 0.0
    P[rows, :, ks] = 0.0
    P[rows, ks, ks] = 1.0
    y[rows, ks] = v[rows, ks]
    try:
        theta = np.linalg.solve(P, y[..., None])[..., 0]
        ok = np.all(np.isfinite(theta), axis=1)
    except np.linalg.LinAlgError:
        theta = np.zeros_like(y)
        ok = np.zeros(len(y), dtype=bool)
    for i in np.nonzero(~ok)[0]:
        theta[i] = np.linalg.lstsq(P[i], y[i], rcond=None)[0]
    return theta


def closed_form_scale_zero(
    q: np.ndarray,
    W: np.ndarray,
    H: np.ndarray,
    bits: int,
    group_size: int,
    symmetric: bool,
    scale: np.ndarray,
    row_chunk: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """argmin_{s,z} Σ_i (s·q_i + z − W_i) H (…)ᵀ for fixed q: the exact float step.

    ``scale`` (out, G), the current scales, is kept for groups whose scale is not identifiable
    (see degenerate_groups). Rows are processed in chunks to bound the (chunk, 2G, 2G) system.
    """
    out, n_in = q.shape
    G = 1 if group_size == -1 else n_in // group_size
    qf = q.astype(np.float64)
    new_s = np.empty((out, G))
    new_z = np.empty((out, G))
    chunk = max(1, min(row_chunk, (1 << 24) // (4 * G * G)))
    for r0 in range(0, out, chunk):
        r = slice(r0, min(out, r0 + chunk))
        P, y = normal_equations(qf[r], W[r], H, G, bits, symmetric)
        dead = degenerate_groups(q[r], G, bits, symmetric)
        n = P.shape[1]
        fixed = np.zeros((dead.shape[0], n), dtype=bool)
        fixed[:, :G] = dead
        value = np.zeros((dead.shape[0], n))
        value[:, :G] = scale[r]
        theta = solve_rows(P, y, fixed, value)
        new_s[r] = theta[:, :G]
        new_z[r] = -theta[:, :G] * (1 << (bits - 1)) if symmetric else theta[:, G:]
    return new_s, new_z
