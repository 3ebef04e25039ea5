"""A cheap certified lower bound of the whole decoupleQ problem, per row.

For any diagonal D with H − D ⪰ 0,  ℓ_i = r H rᵀ ≥ r D rᵀ = Σ_j d_j r_j²  (r = Ŵ_i − W_i).
We take D = c·diag(H) with c = λ_min(diag(H)^−½ H diag(H)^−½) (the Jacobi-scaled smallest
eigenvalue, ≥ the plain λ_min(H)/max diag scaling and much larger when H's ill-conditioning comes
from channel scales). Whatever (s, z, q) are, a group's Ŵ takes at most 2^b distinct values, so
Σ_j d_j r_j² is at least the optimal weighted 1-D clustering of the group's weights into 2^b
levels with free positions (weighted k-means, solved exactly by dynamic programming over the
sorted values: optimal clusters are contiguous). Equal spacing, the integer structure and the
off-diagonal part of H are all relaxed, so the bound is loose where H is far from diagonal — but
it is certified, and cheap: O(2^b · g²) per group of g columns.
"""

from __future__ import annotations

import numpy as np


def jacobi_min_eig(H: np.ndarray) -> float:
    """c = λ_min(D^−½ H D^−½), D = diag(H); H − c·D ⪰ 0. Returns 0 if diag(H) has zeros."""
    d = np.diag(H)
    if np.any(d <= 0):
        return 0.0
    inv = 1.0 / np.sqrt(d)
    return max(float(np.linalg.eigvalsh(H * inv[:, None] * inv[None, :])[0]), 0.0)


def weighted_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int) -> np.ndarray:
    """Optimal Σ_j w_j (x_j − level(j))² with at most k free levels, for every row of x.

    x, w: (rows, n). Exact dynamic program over the sorted values (clusters are contiguous):
    F_m(e) = min_s F_{m−1}(s) + C(s, e), C the weighted within-cluster squared error of the
    sorted items s..e−1 from prefix sums. Vectorised over rows; O(k·n²) per row.
    """
    rows, n = x.shape
    order = np.argsort(x, axis=1, kind="stable")
    xs = np.take_along_axis(x, order, axis=1)
    ws = np.take_along_axis(w, order, axis=1)
    zero = np.zeros((rows, 1))
    S0 = np.concatenate([zero, np.cumsum(ws, axis=1)], axis=1)
    S1 = np.concatenate([zero, np.cumsum(ws * xs, axis=1)], axis=1)
    S2 = np.concatenate([zero, np.cumsum(ws * xs * xs, axis=1)], axis=1)

    def cost(s: np.ndarray, e: int) -> np.ndarray:  # (rows, len(s)): items s..e−1 as one cluster
        m0 = S0[:, [e]] - S0[:, s]
        m1 = S1[:, [e]] - S1[:, s]
        m2 = S2[:, [e]] - S2[:, s]
        with np.errstate(invalid="ignore", divide="ignore"):
            c = m2 - np.where(m0 > 0, m1 * m1 / m0, 0.0)
        return np.maximum(c, 0.0)

    F = np.stack([cost(np.array([0]), e)[:, 0] for e in range(n + 1)], axis=1)  # one cluster
    for _ in range(1, k):
        G = F.copy()
        for e in range(1, n + 1):
            s = np.arange(1, e)
            if s.size:
                G[:, e] = np.minimum(F[:, e], (F[:, s] + cost(s, e)).min(axis=1))
        F = G
    return F[:, n]


def row_lower_bound(W: np.ndarray, H: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Per-row certified lower bound of min_{q, s, z} ℓ_i on H (any H ⪰ 0; use the damped H to
    bound the solver's objective)."""
    out, n = W.shape
    gs = n if group_size == -1 else group_size
    c = jacobi_min_eig(H)
    if c == 0.0:
        return np.zeros(out)
    d = c * np.diag(H)
    total = np.zeros(out)
    for g0 in range(0, n, gs):
        cols = slice(g0, g0 + gs)
        total += weighted_kmeans_1d(W[:, cols], np.broadcast_to(d[cols], (out, gs)).copy(), 1 << bits)
    return total
