"""Hypothesis properties of the reference solver (decoupleq_ref)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupleq_ref as dq
from decoupleq_ref.objective import damp_hessian
from validate.strategies import configs, layers, make_hessian

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def solve(W, H, gs, cfg):
    return dq.quantize_layer(W, H, dataclasses.replace(cfg, group_size=gs))


@FAST
@given(layers(), configs())
def test_result_structure_and_range(layer, cfg):
    W, H, gs = layer
    res = solve(W, H, gs, cfg)
    G = dq.n_groups(W.shape[1], gs)
    assert res.q.dtype == np.uint8 and res.q.shape == W.shape
    assert res.q.max() <= cfg.maxq
    assert res.scale.shape == res.zero.shape == (W.shape[0], G)
    assert np.isfinite(res.scale).all() and np.isfinite(res.zero).all()
    assert np.isclose(res.loss, dq.layer_loss(W, dq.dequantize(res), H), rtol=1e-9, atol=1e-12)
    if cfg.symmetric:
        np.testing.assert_allclose(res.zero, -res.scale * 2 ** (cfg.bits - 1), rtol=1e-12, atol=0)


@FAST
@given(layers(), configs(methods=("decoupleq",)))
def test_history_never_increases_and_ends_at_objective(layer, cfg):
    W, H, gs = layer
    res = solve(W, H, gs, cfg)
    hist = np.array(res.loss_history)
    assert np.all(np.diff(hist) <= 1e-12 * max(1.0, hist[0]))
    assert len(res.history_steps) == len(hist) == len(res.improved_rows)
    assert np.isclose(hist[-1], res.objective, rtol=1e-9, atol=1e-12)
    Hd = damp_hessian(H, cfg.damp)
    assert np.isclose(res.objective, dq.layer_loss(W, dq.dequantize(res), Hd), rtol=1e-9, atol=1e-12)
    # status says why the alternation stopped, and the history shows it
    assert res.message.startswith("decoupleq: ")
    if cfg.refine_sweeps == 0 and cfg.n_starts == 1:
        steps = [s for s in res.history_steps if s != "gptq[init]"]
        assert res.status in (0, 1)
        if res.status == 0:
            assert cfg.iters == 0 or steps[-1] == f"float[{cfg.iters - 1}]"
        else:  # the last half-step improved too few rows
            assert res.improved_rows[len(steps) - 1] < cfg.min_improvement * W.shape[0]


def test_config_from_a_checkpoint_that_records_retired_fields():
    """Older checkpoints recorded QuantConfig.seed (never used); they still load."""
    cfg = dq.QuantConfig(bits=3, group_size=16)
    assert dq.QuantConfig.from_dict({**cfg.to_dict(), "seed": 0}) == cfg
    with pytest.raises(ValueError, match="unknown field"):
        dq.QuantConfig.from_dict({**cfg.to_dict(), "sed": 0})


@FAST
@given(layers(), st.sampled_from([1, 2, 3, 4]), st.booleans())
def test_methods_are_ordered_on_the_same_init(layer, bits, symmetric):
    """decoupleq ≤ gptq ≤ rtn in the objective, row by row: gptq extends rtn's path, and decoupleq
    is offered the gptq result on the same init after its alternation."""
    W, H, gs = layer
    base = dq.QuantConfig(bits=bits, group_size=gs, symmetric=symmetric, grid=20, iters=2)
    obj = {m: dq.quantize_layer(W, H, dataclasses.replace(base, method=m)).objective for m in dq.METHODS}
    tol = 1e-12 * max(1.0, obj["rtn"])
    assert obj["decoupleq"] <= obj["gptq"] + tol
    assert obj["gptq"] <= obj["rtn"] + tol


@FAST
@given(layers(), st.sampled_from([2, 3, 4]), st.booleans(), st.integers(0, 2**32 - 1))
def test_closed_form_beats_random_perturbations(layer, bits, symmetric, seed):
    W, H, gs = layer
    rng = np.random.default_rng(seed)
    Hd = damp_hessian(H, 0.01)
    q = rng.integers(0, 2**bits, size=W.shape).astype(np.uint8)
    G = dq.n_groups(W.shape[1], gs)
    s, z = dq.closed_form_scale_zero(q, W, Hd, bits, gs, symmetric, np.ones((W.shape[0], G)))
    best = dq.row_losses(W, dq.dequantize_parts(q, s, z), Hd)
    for _ in range(10):
        ds = rng.standard_normal(s.shape) * 1e-3 * (np.abs(s) + 1e-6)
        dz = -ds * 2 ** (bits - 1) if symmetric else rng.standard_normal(z.shape) * 1e-3 * (np.abs(z) + 1e-6)
        pert = dq.row_losses(W, dq.dequantize_parts(q, s + ds, z + dz), Hd)
        assert np.all(pert >= best - 1e-9 * np.maximum(best, 1e-12))


@FAST
@given(layers(structured=False), configs(), st.integers(-3, 3))
def test_scaling_w_by_power_of_two_scales_s_z_and_keeps_q(layer, cfg, k):
    """A power of two scales every float operation exactly, so the integers must not move.
    (Not with the Adam relaxation: its lr and eps are absolute, in weight units.)"""
    W, H, gs = layer
    cfg = dataclasses.replace(cfg, relax_iters=0)
    c = 2.0**k
    a, b = solve(W, H, gs, cfg), solve(c * W, H, gs, cfg)
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_allclose(b.scale, c * a.scale, rtol=1e-12, atol=0)
    np.testing.assert_allclose(b.zero, c * a.zero, rtol=1e-12, atol=0)


@FAST
@given(layers(), configs(), st.integers(0, 2**32 - 1))
def test_row_permutation_equivariance(layer, cfg, seed):
    W, H, gs = layer
    perm = np.random.default_rng(seed).permutation(W.shape[0])
    a, b = solve(W, H, gs, cfg), solve(W[perm], H, gs, cfg)
    assert np.mean(a.q[perm] == b.q) >= 0.999
    np.testing.assert_allclose(b.row_loss, a.row_loss[perm], rtol=1e-7, atol=1e-12)


@FAST
@given(layers(structured=False), st.sampled_from([2, 3, 4]))
def test_identity_hessian_is_plain_mse_and_gptq_is_rtn(layer, bits):
    W, _, gs = layer
    H = np.eye(W.shape[1])
    cfg = dq.QuantConfig(bits=bits, group_size=gs, damp=0.0, grid=20)
    rtn = dq.quantize_layer(W, H, dataclasses.replace(cfg, method="rtn"))
    gptq = dq.quantize_layer(W, H, dataclasses.replace(cfg, method="gptq"))
    assert np.isclose(rtn.loss, np.sum((dq.dequantize(rtn) - W) ** 2), rtol=1e-12)
    # with diagonal H the GPTQ error feedback is zero, so it rounds to nearest
    np.testing.assert_array_equal(rtn.q, gptq.q)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 70), st.integers(0, 2**32 - 1))
def test_pack_unpack_roundtrip(bits, out, n_in, seed):
    q = np.random.default_rng(seed).integers(0, 2**bits, size=(out, n_in)).astype(np.uint8)
    packed = dq.pack(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (out, dq.packed_row_bytes(n_in, bits))
    assert packed.shape[1] % 4 == 0
    np.testing.assert_array_equal(dq.unpack(packed, bits, q.shape), q)


def test_pack_bit_order_is_documented_lsb_first():
    q = np.array([[1, 2, 3, 0, 3]], dtype=np.uint8)
    packed = dq.pack(q, 2)
    # value k at bits 2k..2k+1 of the row stream: byte 0 = 0b00_11_10_01, byte 1 = 0b11
    assert packed[0, 0] == 0b00111001 and packed[0, 1] == 0b11 and packed.shape == (1, 4)
    q3 = np.array([[5, 3, 7]], dtype=np.uint8)  # stream 101 110 111 -> bits LSB first
    assert int.from_bytes(dq.pack(q3, 3)[0, :2].tobytes(), "little") == 5 | (3 << 3) | (7 << 6)


@FAST
@given(layers(), st.sampled_from([2, 3, 4]), st.integers(1, 9))
def test_reference_matmul_matches_dequantized_product(layer, bits, batch):
    W, H, gs = layer
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=bits, group_size=gs, method="rtn", grid=0))
    layer_p = dq.PackedLayer.from_result(res)
    x = np.random.default_rng(batch).standard_normal((batch, W.shape[1]))
    Wq = dq.dequantize_parts(res.q, res.scale.astype(np.float32).astype(np.float64),
                             res.zero.astype(np.float32).astype(np.float64))
    np.testing.assert_allclose(dq.matmul(x, layer_p), x @ Wq.T, rtol=1e-12, atol=1e-12)


def test_matmul_propagates_nan():
    W, H = dq.synthetic_layer(4, 16, 64)
    layer_p = dq.PackedLayer.from_result(dq.quantize_layer(W, H, dq.QuantConfig(method="rtn")))
    x = np.ones((2, 16))
    x[1, 3] = np.nan
    y = dq.matmul(x, layer_p)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()


def test_constant_and_zero_rows_never_nan():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((4, 16))
    W[1] = 0.7
    W[2] = 0.0
    W[3, :8] = -1.0  # one constant group
    H = make_hessian(rng, 16, rank=5)
    for gs in (-1, 8):
        for sym in (False, True):
            res = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, symmetric=sym))
            assert np.isfinite(res.scale).all() and np.isfinite(res.zero).all() and np.isfinite(res.loss)
            if not sym:  # constant rows are represented exactly by z alone
                assert res.row_loss[1] < 1e-20 and res.row_loss[2] < 1e-20


def test_singular_h_without_damping_is_finite():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((6, 12))
    H = make_hessian(rng, 12, rank=3)
    res = dq.quantize_layer(W, H, dq.QuantConfig(damp=0.0, group_size=4))
    assert np.isfinite(res.scale).all() and np.isfinite(res.loss)
    assert np.all(np.diff(res.loss_history) <= 1e-12)


def test_determinism_identical_integers():
    W, H = dq.synthetic_layer(64, 128, 512, seed=3)
    cfg = dq.QuantConfig(group_size=32, relax_iters=10)
    a, b = dq.quantize_layer(W, H, cfg), dq.quantize_layer(W, H, cfg)
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    assert a.loss_history == b.loss_history


def test_decoupleq_beats_gptq_clearly_on_a_structured_layer():
    W, H = dq.synthetic_layer(96, 192, 768, seed=5)
    for gs in (-1, 64):
        g = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, method="gptq"))
        d = dq.quantize_layer(W, H, dq.QuantConfig(group_size=gs, method="decoupleq"))
        assert d.loss < 0.97 * g.loss, (gs, d.loss, g.loss)


BAD_INPUTS = [
    ("W", lambda W, H: (np.where(np.eye(*W.shape) > 0, np.nan, W), H), "NaN"),
    ("H", lambda W, H: (W, np.where(np.eye(*H.shape) > 0, np.inf, H)), "NaN or Inf"),
    ("H", lambda W, H: (W, H[:-1]), "square"),
    ("H", lambda W, H: (W, H[:-1, :-1]), "does not match"),
    ("H", lambda W, H: (W, H + np.triu(np.ones_like(H), 1)), "not symmetric"),
    ("W", lambda W, H: (W.astype(np.int32), H), "floating-point"),
    ("W", lambda W, H: (W[:0], H), "empty"),
    ("W", lambda W, H: (W[0], H), "2-D"),
    ("H", lambda W, H: (W, -H), "negative diagonal"),
]


@pytest.mark.parametrize("arg,mutate,phrase", BAD_INPUTS)
def test_bad_input_names_the_argument(arg, mutate, phrase):
    W, H = dq.synthetic_layer(4, 16, 64)
    with pytest.raises(ValueError) as e:
        dq.quantize_layer(*mutate(W, H), dq.QuantConfig())
    assert str(e.value).startswith(arg + ":") and phrase in str(e.value)


@pytest.mark.parametrize("field,value", [("bits", 0), ("bits", 9), ("bits", 2.5), ("group_size", 0),
                                         ("method", "awq"), ("iters", -1), ("damp", -0.1),
                                         ("max_shrink", 1.0), ("relax_lr", 0.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"QuantConfig.{field}"):
        dq.QuantConfig(**{field: value})


def test_ragged_group_is_a_clear_error():
    W, H = dq.synthetic_layer(4, 48, 64)
    with pytest.raises(ValueError, match="group_size: 32 does not divide"):
        dq.quantize_layer(W, H, dq.QuantConfig(group_size=32))


def test_pack_rejects_out_of_range_and_wrong_bits():
    with pytest.raises(ValueError, match="q: values must lie in"):
        dq.pack(np.array([[4]], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="bits"):
        dq.pack(np.array([[1]], dtype=np.uint8), 9)
    with pytest.raises(ValueError, match="packed"):
        dq.unpack(np.zeros((1, 3), dtype=np.uint8), 2, (1, 8))
