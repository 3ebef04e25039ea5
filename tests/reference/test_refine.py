"""The exact-descent refinement and the certified fixed-(s, z) lower bound."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings

import decoupleq_ref as dq
from decoupleq_ref.objective import damp_hessian
from decoupleq_ref.refine import box_lower_bound, refine_integers
from validate.strategies import layers, make_hessian


def loss_rows(q, W, s, z, H):
    return dq.row_losses(W, dq.dequantize_parts(q, s, z), H)


@settings(max_examples=30, deadline=None)
@given(layers(max_out=6))
def test_refinement_never_increases_and_ends_at_a_local_minimum(layer):
    W, H, gs = layer
    Hd = damp_hessian(H, 0.01)
    res = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, method="rtn", grid=10))
    q, moves = refine_integers(res.q, W, res.scale, res.zero, Hd, 2, sweeps=200)
    before = loss_rows(res.q, W, res.scale, res.zero, Hd)
    after = loss_rows(q, W, res.scale, res.zero, Hd)
    assert np.all(after <= before * (1 + 1e-12) + 1e-300)
    assert q.min() >= 0 and q.max() <= 3
    # 1-opt: no single ±1 move lowers any row by more than the tie tolerance
    for j in range(W.shape[1]):
        for step in (-1, 1):
            q2 = q.copy()
            q2[:, j] = np.clip(q2[:, j] + step, 0, 3)
            assert np.all(loss_rows(q2, W, res.scale, res.zero, Hd) >= after - 1e-10 * np.abs(after) - 1e-300)


def test_box_bound_is_below_every_integer_point():
    rng = np.random.default_rng(7)
    for trial in range(5):
        W = rng.standard_normal((3, 6))
        H = make_hessian(rng, 6, rank=4 + trial % 3)
        Hd = damp_hessian(H, 0.01)
        res = dq.quantize_layer(W, H, dq.QuantConfig(method="rtn"))
        bound = box_lower_bound(W, res.scale, res.zero, Hd, 2)
        best = np.full(3, np.inf)
        for qs in itertools.product(range(4), repeat=6):
            qq = np.tile(np.array(qs, dtype=float), (3, 1))
            best = np.minimum(best, loss_rows(qq, W, res.scale, res.zero, Hd))
        assert np.all(bound <= best * (1 + 1e-12))


def test_refinement_improves_decoupleq_on_a_structured_layer():
    W, H = dq.synthetic_layer(64, 128, 512, seed=11)
    for gs in (-1, 32):
        base = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs))
        ref = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, refine_sweeps=3))
        assert ref.objective < 0.99 * base.objective
        assert np.all(np.diff(ref.loss_history) <= 1e-12 * ref.loss_history[0])
        assert ref.history_steps[: len(base.history_steps)] == base.history_steps


def test_lower_bound_is_below_the_global_optimum_on_tiny_layers():
    """Brute force over every q row with the closed-form (s, z): the bound must stay below."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        W = rng.standard_normal((2, 5))
        H = make_hessian(rng, 5, rank=3)
        res = dq.quantize_layer(W, H, dq.QuantConfig(lower_bound=True))
        Hd = damp_hessian(H, 0.01)
        best = np.full(2, np.inf)
        for qs in itertools.product(range(4), repeat=5):
            qq = np.tile(np.array(qs, dtype=np.uint8), (2, 1))
            s, z = dq.closed_form_scale_zero(qq, W, Hd, 2, -1, False, np.ones((2, 1)))
            best = np.minimum(best, loss_rows(qq, W, s, z, Hd))
        assert 0 < res.lower_bound <= best.sum() * (1 + 1e-9)
        assert res.gap_bound >= res.objective / best.sum() * (1 - 1e-9)


def test_weighted_kmeans_matches_brute_force():
    from decoupleq_ref.bounds import weighted_kmeans_1d

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((3, 7)), rng.random((3, 7))
    got = weighted_kmeans_1d(x, w, 3)
    for r in range(3):
        best = np.inf
        for labels in itertools.product(range(3), repeat=7):
            lab = np.array(labels)
            cost = 0.0
            for k in range(3):
                m = lab == k
                if m.any():
                    mu = (w[r, m] * x[r, m]).sum() / w[r, m].sum()
                    cost += (w[r, m] * (x[r, m] - mu) ** 2).sum()
            best = min(best, cost)
        assert np.isclose(got[r], best, rtol=1e-10)


def test_extra_starts_never_hurt_and_keep_history_monotone():
    W, H = dq.synthetic_layer(48, 64, 256, seed=2)
    for gs, sym in ((-1, False), (16, False), (-1, True)):
        one = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, symmetric=sym))
        many = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, symmetric=sym, n_starts=3))
        assert many.objective <= one.objective
        assert many.history_steps[-2:] == ["start[1]", "start[2]"]
        assert np.all(np.diff(many.loss_history[len(one.loss_history) - 1:]) <= 0)
