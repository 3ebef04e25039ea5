"""decoupleQ on ggml's K-quant grids: a second level of integer/float decoupling.

A K-quant with a min (Q2_K, Q4_K, Q5_K) stores a row in super-blocks of 256 columns, each cut into
sub-blocks (groups) of ``sub`` columns, and decodes

    Ŵ[c] = d_k · sc_j · q[c] − dmin_k · m_j        c in sub-block j of super-block k

with integer codes q ∈ {0 … 2^b − 1}, integer sub-scales sc_j and sub-mins m_j ∈ {0 … 2^t − 1}
and two fp16 floats (d_k, dmin_k) per super-block. That is decoupleQ's Ŵ = s·q + z with the
group's (s_j, z_j) = (d_k·sc_j, −dmin_k·m_j) themselves decoupled into integers and floats. So
the solve alternates three steps on the layer objective Σ_i (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ, each kept
only if it lowers the objective:

* ``kquant_float_step``: (d, dmin) in closed form given every integer (a 2S-unknown least
  squares per row), rounded to fp16;
* ``kquant_subscale_step``: the integer sub-scales and sub-mins given (d, dmin) and q, by exact
  coordinate descent (each is a 1-D convex quadratic: the rounded, clipped minimiser is optimal);
* the integer step: GPTQ rounding of q given the group (s, z) (decoupleq_ref.integer_step).

It starts from a free decoupleQ solution (codes and per-group (s, z)) projected onto the grid
(``project_to_kgrid``), rather than rounding a free solution and stopping there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .format import expand_groups
from .init import round_half_up, safe_div
from .integer_step import gptq_factor, gptq_round
from .objective import damp_hessian, layer_loss

SUPER = 256  # columns per K-quant super-block


@dataclass(frozen=True)
class KSpec:
    """One K-quant type: code bits, sub-block size, sub-scale / sub-min bits."""

    name: str
    bits: int
    sub: int
    sub_bits: int

    @property
    def n_sub(self) -> int:
        return SUPER // self.sub

    @property
    def top(self) -> int:
        return (1 << self.sub_bits) - 1


KSPECS = {"Q2_K": KSpec("Q2_K", 2, 16, 4), "Q4_K": KSpec("Q4_K", 4, 32, 6), "Q5_K": KSpec("Q5_K", 5, 32, 6)}


@dataclass
class KQuantLayer:
    """A layer on a K-quant grid: q (out, in) uint8, sc / m (out, in/sub) uint8, d / dmin
    (out, in/256) float16; ``loss`` on the H it was solved on, ``history`` after every kept step."""

    spec: KSpec
    q: np.ndarray
    sc: np.ndarray
    m: np.ndarray
    d: np.ndarray
    dmin: np.ndarray
    loss: float = float("nan")
    history: list[float] = field(default_factory=list)

    @property
    def scale(self) -> np.ndarray:
        """Per-group s_j = d_k · sc_j (float64, (out, in/sub))."""
        return np.repeat(self.d.astype(np.float64), self.spec.n_sub, axis=1) * self.sc

    @property
    def zero(self) -> np.ndarray:
        """Per-group z_j = −dmin_k · m_j."""
        return -np.repeat(self.dmin.astype(np.float64), self.spec.n_sub, axis=1) * self.m

    def dequantize(self) -> np.ndarray:
        """Ŵ in float64."""
        n_in = self.q.shape[1]
        return expand_groups(self.scale, n_in) * self.q + expand_groups(self.zero, n_in)

    def dequantize_ggml(self) -> np.ndarray:
        """Ŵ as ggml computes it, in float32: (d·sc)·q − dmin·m."""
        n_in, k = self.q.shape[1], self.spec.n_sub
        dl = np.repeat(self.d.astype(np.float32), k, axis=1) * self.sc.astype(np.float32)
        ml = np.repeat(self.dmin.astype(np.float32), k, axis=1) * self.m.astype(np.float32)
        return expand_groups(dl, n_in) * self.q.astype(np.float32) - expand_groups(ml, n_in)


def check_kquant_shape(n_in: int, spec: KSpec) -> None:
    if n_in % SUPER:
        raise ValueError(f"W: {spec.name} rows hold whole super-blocks of {SUPER} columns, got {n_in}")


def _fp16(x: np.ndarray) -> np.ndarray:
    """Round to fp16, saturating at fp16's largest finite value instead of overflowing."""
    big = float(np.finfo(np.float16).max)
    return np.clip(x, -big, big).astype(np.float16)


def project_to_kgrid(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, spec: KSpec) -> KQuantLayer:
    """A free solution (codes, per-sub-block (s, z)) rounded onto the K grid: per super-block
    d = max_j s_j / (2^t − 1), sc_j = round(s_j / d); dmin = max_j (−z_j) / (2^t − 1),
    m_j = round(−z_j / dmin); clipped to [0, 2^t − 1] (a sign opposite to the block's max gets 0)."""
    check_kquant_shape(np.shape(q)[1], spec)
    out, G = scale.shape
    S = G // spec.n_sub

    def split(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks = v.reshape(out, S, spec.n_sub)
        hi, lo = blocks.max(axis=2), blocks.min(axis=2)
        peak = np.where(np.abs(hi) >= np.abs(lo), hi, lo)  # the block's dominant sign
        f = _fp16(peak / spec.top)
        ints = np.clip(round_half_up(safe_div(blocks, f.astype(np.float64)[..., None])), 0, spec.top)
        return f, ints.reshape(out, G).astype(np.uint8)

    d, sc = split(np.asarray(scale, np.float64))
    dmin, m = split(-np.asarray(zero, np.float64))
    return KQuantLayer(spec, np.asarray(q, np.uint8), sc, m, d, dmin)


def _superblock_basis(layer: KQuantLayer) -> tuple[np.ndarray, np.ndarray]:
    """(A, B), each (out, S, 256): per super-block the columns multiplying d (sc_j·q) and dmin (−m_j)."""
    out, n_in = layer.q.shape
    S = n_in // SUPER
    A = (layer.q.astype(np.float64) * expand_groups(layer.sc.astype(np.float64), n_in)).reshape(out, S, SUPER)
    B = -expand_groups(layer.m.astype(np.float64), n_in).reshape(out, S, SUPER)
    return A, B


def kquant_float_step(W: np.ndarray, H: np.ndarray, layer: KQuantLayer, fp16: bool = True) -> KQuantLayer:
    """Closed-form super-scales given every integer, then fp16 rounding (``fp16=False``: the
    float64 optimum itself, for checks).

    Per row, Ŵ = Σ_k d_k·a_k + dmin_k·b_k with a_k = sc ⊙ q and b_k = −m on super-block k's
    columns (zero elsewhere). With x = (d_1 … d_S, dmin_1 … dmin_S) and the (in, 2S) basis C = [a | b],

        min_x (C x − W_i) H (C x − W_i)ᵀ   ⇒   (Cᵀ H C) x = Cᵀ H W_iᵀ,

    a 2S × 2S system per row (pseudo-inverse where a super-block's integers are all zero)."""
    out, n_in = W.shape
    S = n_in // SUPER
    A, B = _superblock_basis(layer)
    basis = np.concatenate([A, B], axis=1)  # (out, 2S, 256), block k or S+k covers super-block k
    cols = [slice((k % S) * SUPER, (k % S + 1) * SUPER) for k in range(2 * S)]
    HC = np.stack([basis[:, k] @ H[cols[k], :] for k in range(2 * S)], axis=1)  # (out, 2S, in): (C_k H)
    gram = np.empty((out, 2 * S, 2 * S))
    for j in range(2 * S):
        gram[:, :, j] = np.einsum("ikc,ic->ik", HC[:, :, cols[j]], basis[:, j])
    rhs = np.einsum("ikc,ic->ik", HC, W)
    x = np.einsum("ikl,il->ik", np.linalg.pinv(gram, hermitian=True), rhs)
    cast = _fp16 if fp16 else (lambda v: v)
    return replace(layer, d=cast(x[:, :S]), dmin=cast(x[:, S:]))


def kquant_subscale_step(W: np.ndarray, H: np.ndarray, layer: KQuantLayer, sweeps: int = 2) -> KQuantLayer:
    """Integer sub-scales and sub-mins given (d, dmin) and q, by exact coordinate descent.

    Changing sc_j by δ moves row i's Ŵ by δ·u with u = d_k·q on sub-block j's columns (u = −dmin_k
    there for m_j); with R = Ŵ − W the objective changes by 2δ·u H Rᵀ + δ²·u H uᵀ, minimised over
    the integers in [0, 2^t − 1] by clip(round(sc_j − u H Rᵀ / u H uᵀ)): a 1-D convex quadratic,
    so every move is optimal given the others and the objective never rises."""
    spec, (out, n_in) = layer.spec, W.shape
    sc, m = layer.sc.astype(np.float64), layer.m.astype(np.float64)
    d = np.repeat(layer.d.astype(np.float64), spec.n_sub, axis=1)
    dmin = np.repeat(layer.dmin.astype(np.float64), spec.n_sub, axis=1)
    q = layer.q.astype(np.float64)
    HR = (expand_groups(d * sc, n_in) * q - expand_groups(dmin * m, n_in) - W) @ H
    for _ in range(sweeps):
        moved = False
        for j in range(n_in // spec.sub):
            c = slice(j * spec.sub, (j + 1) * spec.sub)
            Hc = H[c, :]
            for ints, u in ((sc, d[:, j, None] * q[:, c]), (m, -np.repeat(dmin[:, j, None], spec.sub, axis=1))):
                curv = np.einsum("ic,cd,id->i", u, H[c, c], u)
                grad = np.einsum("ic,ic->i", u, HR[:, c])
                new = np.clip(round_half_up(ints[:, j] - safe_div(grad, curv)), 0, spec.top)
                new = np.where(curv > 0, new, ints[:, j])
                delta = new - ints[:, j]
                if delta.any():
                    moved = True
                    HR += delta[:, None] * (u @ Hc)
                    ints[:, j] = new
        if not moved:
            break
    return replace(layer, sc=sc.astype(np.uint8), m=m.astype(np.uint8))


def kquant_integer_step(W: np.ndarray, H: np.ndarray, layer: KQuantLayer, factor, act_order: bool,
                        block_size: int, damp: float) -> KQuantLayer:
    """GPTQ rounding of the codes given the groups' (s, z) = (d·sc, −dmin·m)."""
    n_in = W.shape[1]
    q = gptq_round(W, expand_groups(layer.scale, n_in), expand_groups(layer.zero, n_in), H, layer.spec.bits,
                   act_order, block_size, damp, factor)
    return replace(layer, q=q.astype(np.uint8))


def solve_kquant(W: np.ndarray, H: np.ndarray, start: KQuantLayer, iters: int = 4, inner: int = 3,
                 damp: float = 0.01, act_order: bool = True, block_size: int = 128,
                 min_improvement: float = 1e-4) -> KQuantLayer:
    """Alternate the three steps (module docstring) from ``start``, each kept only if it lowers
    Σ_i (Ŵ_i − W_i) (H + λI) (Ŵ_i − W_i)ᵀ; ``loss`` and ``history`` are on H + λI (λ = damp·mean
    diag H, the objective decoupleQ's solver minimises). Stops when an outer round gains less
    than ``min_improvement`` (relative)."""
    W = np.asarray(W, np.float64)
    check_kquant_shape(W.shape[1], start.spec)
    Hd = damp_hessian(np.asarray(H, np.float64), damp)
    factor = gptq_factor(np.asarray(H, np.float64), act_order, damp)

    def scored(layer: KQuantLayer) -> KQuantLayer:
        return replace(layer, loss=layer_loss(W, layer.dequantize(), Hd))

    best = scored(start)
    best.history = [best.loss]

    def keep(candidate: KQuantLayer) -> None:
        nonlocal best
        candidate = scored(candidate)
        if candidate.loss < best.loss:
            candidate.history = best.history + [candidate.loss]
            best = candidate

    for _ in range(iters):
        before = best.loss
        for _ in range(inner):
            keep(kquant_float_step(W, Hd, best))
            keep(kquant_subscale_step(W, Hd, best))
        keep(kquant_integer_step(W, H, best, factor, act_order, block_size, damp))
        if before - best.loss <= min_improvement * before:
            break
    return best
