"""Hypothesis strategies for quantizer property tests: layers, PSD Hessians of chosen rank and
conditioning, and quantization configs. Everything is drawn from seeds, so a failing example
is reproducible from hypothesis' printed seed alone."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from decoupleq_ref.config import QuantConfig


def make_hessian(rng: np.random.Generator, n_in: int, rank: int | None = None,
                 outlier_channels: int = 0, cond_boost: float = 1.0) -> np.ndarray:
    """H = XᵀX/N from N = rank samples (rank-deficient when rank < n_in).

    ``outlier_channels`` columns of X are scaled by 10 and ``cond_boost`` stretches the
    spectrum (X's columns get scales spread over [1, cond_boost]) to make H ill-conditioned.
    """
    n = rank if rank is not None else 4 * n_in
    X = rng.standard_normal((n, n_in))
    X *= np.geomspace(1.0, cond_boost, n_in)[rng.permutation(n_in)]
    if outlier_channels:
        X[:, rng.choice(n_in, size=min(outlier_channels, n_in), replace=False)] *= 10.0
    H = X.T @ X / n
    return (H + H.T) / 2


@st.composite
def layers(draw, max_out: int = 12, in_choices: tuple[int, ...] = (8, 16, 24, 32),
           group_choices: tuple[int, ...] = (-1, 8), structured: bool = True):
    """(W, H, group_size): a small random layer with a compatible group size.

    With ``structured`` the draw may add outlier columns, constant rows, zero rows,
    rank-deficient or ill-conditioned H.
    """
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    out = draw(st.integers(1, max_out))
    n_in = draw(st.sampled_from(in_choices))
    gs = draw(st.sampled_from([g for g in group_choices if g == -1 or n_in % g == 0]))
    W = rng.standard_normal((out, n_in)) * draw(st.sampled_from([0.02, 1.0, 300.0]))
    rank = None
    if structured:
        kind = draw(st.sampled_from(["plain", "outlier_cols", "const_row", "zero_row", "low_rank", "ill"]))
        if kind == "outlier_cols":
            W[:, rng.integers(n_in)] *= 20.0
        elif kind == "const_row":
            W[rng.integers(out)] = W[0, 0]
        elif kind == "zero_row":
            W[rng.integers(out)] = 0.0
        elif kind == "low_rank":
            rank = draw(st.integers(1, n_in - 1))
        H = make_hessian(rng, n_in, rank=rank, cond_boost=1e3 if kind == "ill" else 1.0)
    else:
        H = make_hessian(rng, n_in)
    return W, H, gs


@st.composite
def configs(draw, methods: tuple[str, ...] = ("rtn", "gptq", "decoupleq"), bits: tuple[int, ...] = (1, 2, 3, 4),
            group_size: int = -1, fast: bool = True):
    """A QuantConfig with small iteration counts (fast=True keeps property tests quick)."""
    return QuantConfig(
        bits=draw(st.sampled_from(bits)),
        group_size=group_size,
        method=draw(st.sampled_from(methods)),
        iters=draw(st.integers(1, 3)),
        symmetric=draw(st.booleans()),
        grid=draw(st.sampled_from([0, 20] if fast else [0, 200])),
        act_order=draw(st.booleans()),
        relax_iters=draw(st.sampled_from([0, 0, 5])),
        refine_sweeps=draw(st.sampled_from([0, 0, 2])),
        n_starts=draw(st.sampled_from([1, 1, 2])),
    )
