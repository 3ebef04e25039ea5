"""The fp16 high-precision branch and the 1-bit main branch through the whole stack."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupleq_ref as dq
from decoupleq_ref.format import bits_per_weight
from decoupleq_ref.hp_branch import TIE_BREAK, branch_hessian, branch_weight, channel_scores, select_channels
from decoupleq_ref.objective import damp_hessian
from validate.strategies import configs, layers

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def branch_case(layer, cfg, k):
    W, H, gs = layer
    k = min(k, W.shape[1] - 1)
    return W, H, dq.quantize_layer(W, H, dataclasses.replace(cfg, group_size=gs, hp_channels=k))


# --- the joint solve ----------------------------------------------------------------------------

@FAST
@given(layers(), configs(), st.integers(1, 6))
def test_branch_is_stationary_and_objective_is_joint(layer, cfg, k):
    """B minimises the damped loss over its columns: ((Ŵ − W) Hd)[:, S] = 0; and the reported
    objective is the solver's history minus the λ‖Q_S − W_S‖² tie-break term (hp_branch.py)."""
    W, H, res = branch_case(layer, cfg, k)
    Hd = damp_hessian(H, cfg.damp)
    W_hat = res.dequantize()
    grad = ((W_hat - W) @ Hd)[:, res.hp_index]
    scale = np.sqrt(np.einsum("ij,ij->", W @ Hd, W)) + 1e-300
    assert np.abs(grad).max() <= 1e-7 * max(scale, 1.0)
    assert np.isclose(res.objective, dq.layer_loss(W, W_hat, Hd), rtol=1e-9, atol=1e-12)
    assert np.isclose(res.loss, dq.layer_loss(W, W_hat, H), rtol=1e-9, atol=1e-12)
    lam = TIE_BREAK * (np.mean(np.diag(Hd)) or 1.0)
    Q_S = dq.dequantize_parts(res.q, res.scale, res.zero)[:, res.hp_index]
    tie_break = lam * np.sum((Q_S - W[:, res.hp_index]) ** 2)
    assert np.isclose(res.loss_history[-1] - tie_break, res.objective,
                      rtol=1e-7, atol=1e-9 * max(1.0, res.loss_history[0]))


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_schur_complement_is_the_loss_after_the_optimal_branch(seed, k):
    """For any fixed quantized part Q: min_B ℓ(Q + B) = r_R (H_RR − H_RS H_SS⁻¹ H_SR) r_Rᵀ, and
    branch_weight's B beats random perturbations of it."""
    rng = np.random.default_rng(seed)
    out, n = 5, 12
    X = rng.standard_normal((40, n))
    Hd = X.T @ X / 40 + 0.01 * np.eye(n)
    W, Q = rng.standard_normal((out, n)), rng.standard_normal((out, n))
    idx = np.sort(rng.choice(n, size=k, replace=False))
    B = branch_weight(W, Q, Hd, idx)
    W_hat = Q.copy()
    W_hat[:, idx] += B
    H_eff = branch_hessian(Hd, idx, lam=0.0)
    joint = dq.row_losses(W, W_hat, Hd)
    np.testing.assert_allclose(joint, dq.row_losses(W, Q, H_eff), rtol=1e-9, atol=1e-12)
    for _ in range(3):
        W_bad = W_hat.copy()
        W_bad[:, idx] += 1e-3 * rng.standard_normal((out, k))
        assert np.all(dq.row_losses(W, W_bad, Hd) >= joint - 1e-12)


def test_branch_lowers_the_loss_on_a_layer_with_outlier_channels():
    W, H = dq.synthetic_layer(out=48, n_in=128, outlier_channels=4)
    cfg = dq.QuantConfig(bits=2, grid=50, iters=2)
    base = dq.quantize_layer(W, H, cfg).objective
    objs = [dq.quantize_layer(W, H, dataclasses.replace(cfg, hp_channels=k)).objective for k in (4, 16)]
    assert objs[0] < 0.9 * base and objs[1] < objs[0]


def test_same_input_same_output():
    W, H = dq.synthetic_layer(out=16, n_in=64)
    cfg = dq.QuantConfig(bits=2, group_size=16, hp_channels=6, grid=20, iters=2)
    a, b = dq.quantize_layer(W, H, cfg), dq.quantize_layer(W, H, cfg)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.hp_index, b.hp_index)
    assert np.array_equal(a.hp_weight, b.hp_weight)


def test_rank_deficient_h_without_damping_stays_finite():
    rng = np.random.default_rng(3)
    W = rng.standard_normal((8, 16))
    X = rng.standard_normal((5, 16))
    H = X.T @ X / 5
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, damp=0.0, hp_channels=4, grid=10, iters=2))
    assert np.isfinite(res.hp_weight).all() and np.isfinite(res.loss)


# --- selection ----------------------------------------------------------------------------------

def test_selectors_follow_their_definition():
    rng = np.random.default_rng(0)
    n = 10
    W = rng.standard_normal((6, n))
    W[:, 2] *= 30.0                                        # largest weights
    X = rng.standard_normal((200, n))
    X[:, 7] *= 30.0                                        # largest activations
    Hd = X.T @ X / 200
    energy = (W ** 2).sum(axis=0)
    assert select_channels(W, Hd, 1, "magnitude")[0] == 2
    np.testing.assert_allclose(channel_scores(W, Hd, "hessian"), np.diag(Hd) * energy)
    np.testing.assert_allclose(channel_scores(W, Hd, "obs"), energy / np.diag(np.linalg.inv(Hd)), rtol=1e-9)
    assert set(select_channels(W, Hd, 2, "hessian")) == {2, 7}
    err = channel_scores(W, Hd, "error", bits=2)
    assert err.shape == (n,) and np.all(err >= 0)


def test_selection_is_sorted_distinct_and_ties_take_the_lower_index():
    W = np.ones((3, 8))
    idx = select_channels(W, np.eye(8), 3, "hessian")
    assert idx.tolist() == [0, 1, 2]


# --- configuration and bad input ----------------------------------------------------------------

@pytest.mark.parametrize("field, value, needle", [
    ("hp_channels", -1, "hp_channels"), ("hp_channels", 2.5, "hp_channels"), ("hp_channels", True, "hp_channels"),
    ("hp_select", "random", "hp_select"),
])
def test_config_rejects_bad_branch_fields(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        dq.QuantConfig(**{field: value})


def test_config_rejects_bound_with_branch():
    with pytest.raises(ValueError, match="lower_bound"):
        dq.QuantConfig(hp_channels=4, lower_bound=True)


def test_too_many_channels_names_the_argument():
    W, H = dq.synthetic_layer(out=4, n_in=16)
    with pytest.raises(ValueError, match="hp_channels"):
        dq.quantize_layer(W, H, dq.QuantConfig(hp_channels=16))


# --- storage, bits per weight, packed layer and matmul ------------------------------------------

def test_bits_per_weight_counts_scales_zeros_and_branch():
    assert bits_per_weight(10, 128, 2, 64) == 2.5
    assert bits_per_weight(10, 128, 2, 64, symmetric=True) == 2.25
    assert bits_per_weight(10, 576, 2, -1) == 2 + 32 / 576
    assert np.isclose(bits_per_weight(10, 576, 1, -1, hp_channels=8), 1 + (32 + 8 * 16 + 8 * 32 / 10) / 576)
    W, H = dq.synthetic_layer(out=10, n_in=64)
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=32, hp_channels=4, grid=10, iters=1))
    assert res.bits_per_weight == bits_per_weight(10, 64, 2, 32, False, 4)


def test_packed_layer_stores_the_branch_in_fp16_and_matmul_adds_it():
    W, H = dq.synthetic_layer(out=24, n_in=64)
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=16, hp_channels=5, grid=20, iters=2))
    layer = dq.PackedLayer.from_result(res)
    assert layer.hp_index.dtype == np.int32 and layer.hp_weight.dtype == np.float16
    assert layer.hp_weight.shape == (24, 5) and layer.hp_index.tolist() == res.hp_index.tolist()
    x = np.random.default_rng(1).standard_normal((3, 64))
    y = dq.matmul(x, layer)
    np.testing.assert_allclose(y, x @ layer.dequantize().T, rtol=1e-12, atol=1e-12)
    ref = x @ res.dequantize().T
    assert np.abs(y - ref).max() <= 2e-3 * np.abs(ref).max()          # fp16 B, fp32 (s, z)
    # without the branch the output differs: the branch really is applied
    plain = dataclasses.replace(layer, hp_index=None, hp_weight=None)
    assert not np.allclose(dq.matmul(x, plain), y)


@pytest.mark.parametrize("change, needle", [
    (dict(hp_weight=None), "both"),
    (dict(hp_index=np.array([3, 1], dtype=np.int32)), "increasing"),
    (dict(hp_index=np.array([1, 99], dtype=np.int32)), "increasing"),
    (dict(hp_weight=np.zeros((4, 3), dtype=np.float16)), "hp_weight"),
])
def test_packed_layer_rejects_a_malformed_branch(change, needle):
    W, H = dq.synthetic_layer(out=4, n_in=16)
    res = dq.quantize_layer(W, H, dq.QuantConfig(hp_channels=2, grid=10, iters=1))
    fields = {**dataclasses.asdict(dq.PackedLayer.from_result(res)), **change}
    with pytest.raises(ValueError, match=needle):
        dq.PackedLayer(**fields)


# --- 1-bit main branch --------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_one_bit_pack_round_trip_and_layout(out, n_in, seed):
    q = np.random.default_rng(seed).integers(0, 2, size=(out, n_in)).astype(np.uint8)
    packed = dq.pack(q, 1)
    assert packed.shape == (out, dq.packed_row_bytes(n_in, 1)) and packed.shape[1] % 4 == 0
    assert np.array_equal(dq.unpack(packed, 1, q.shape), q)
    j = n_in - 1                                               # column j is bit j % 8 of byte j // 8
    assert np.array_equal((packed[:, j // 8] >> (j % 8)) & 1, q[:, j])


@pytest.mark.parametrize("group_size, k", [(-1, 0), (16, 0), (-1, 4), (16, 4)])
def test_one_bit_through_solver_packing_and_matmul(group_size, k):
    W, H = dq.synthetic_layer(out=16, n_in=64)
    objs = {}
    for method in dq.METHODS:
        cfg = dq.QuantConfig(bits=1, group_size=group_size, method=method, hp_channels=k, grid=20, iters=2)
        res = dq.quantize_layer(W, H, cfg)
        assert set(np.unique(res.q)) <= {0, 1}
        objs[method] = res.objective
    assert objs["decoupleq"] <= objs["gptq"] * (1 + 1e-12) <= objs["rtn"] * (1 + 1e-12)
    layer = dq.PackedLayer.from_result(res)
    assert np.array_equal(layer.codes(), res.q)
    x = np.random.default_rng(2).standard_normal((2, 64))
    ref = x @ res.dequantize().T
    assert np.abs(dq.matmul(x, layer) - ref).max() <= 2e-3 * np.abs(ref).max()
