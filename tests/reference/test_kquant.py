"""decoupleQ on ggml's K-quant grids (decoupleq_ref.kquant): every kept step lowers the objective,
the constrained solve beats rounding the free solution onto the grid, each step is optimal where
it claims to be, and the bytes decode (by gguf-py's own dequantizer) to the solver's Ŵ."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import decoupleq_ref as dq
from decoupleq_ref.kquant import (KSPECS, KQuantLayer, kquant_float_step, kquant_subscale_step, project_to_kgrid,
                                  solve_kquant)
from decoupleq_ref.objective import damp_hessian, layer_loss


def free_and_start(name: str, seed: int = 0, out: int = 24, n_in: int = 512):
    W, H = dq.synthetic_layer(out=out, n_in=n_in, seed=seed)
    spec = KSPECS[name]
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=spec.bits, group_size=spec.sub, method="decoupleq", iters=2))
    return W, H, res, project_to_kgrid(res.q, res.scale, res.zero, spec)


@pytest.mark.parametrize("name", sorted(KSPECS))
def test_constrained_solve_beats_the_projection(name):
    """From the projected free solution the alternation only goes down, ends strictly below the
    projection, and within reach of the free (unconstrained (s, z)) decoupleQ solution."""
    W, H, free, start = free_and_start(name)
    solved = solve_kquant(W, H, start)
    assert all(b <= a for a, b in zip(solved.history, solved.history[1:]))
    projected, final = layer_loss(W, start.dequantize(), H), layer_loss(W, solved.dequantize(), H)
    assert final < 0.97 * projected
    assert final < 1.25 * free.loss
    assert solved.d.dtype == np.float16 and solved.sc.max() <= KSPECS[name].top and solved.m.max() <= KSPECS[name].top


def test_float_step_is_the_least_squares_optimum():
    """Before fp16 rounding no (d, dmin) does better: the closed form's loss is below every
    perturbation of one super-scale, on the damped H it is solved on."""
    W, H, _, start = free_and_start("Q4_K", seed=1, out=6)
    Hd = damp_hessian(H, 0.01)
    exact = kquant_float_step(W, Hd, start, fp16=False)
    base = layer_loss(W, exact.dequantize(), Hd)
    for field_name in ("d", "dmin"):
        for eps in (1e-3, -1e-3):
            moved = getattr(exact, field_name).astype(np.float64).copy()
            moved[:, 1] *= 1 + eps
            assert layer_loss(W, replace(exact, **{field_name: moved}).dequantize(), Hd) > base


def test_subscale_step_is_coordinatewise_optimal():
    """After the integer sub-scale step no single sub-scale or sub-min moved by ±1 lowers the loss."""
    W, H, _, start = free_and_start("Q2_K", seed=2, out=4)
    Hd = damp_hessian(H, 0.01)
    layer = kquant_subscale_step(W, Hd, kquant_float_step(W, Hd, start), sweeps=20)
    base = layer_loss(W, layer.dequantize(), Hd)
    top = layer.spec.top
    for which in ("sc", "m"):
        ints = getattr(layer, which)
        for j in range(0, ints.shape[1], 5):
            for step in (-1, 1):
                moved = ints.astype(np.int64).copy()
                moved[:, j] = np.clip(moved[:, j] + step, 0, top)
                trial = replace(layer, **{which: moved.astype(np.uint8)})
                assert layer_loss(W, trial.dequantize(), Hd) >= base - 1e-12 * abs(base)


@pytest.mark.parametrize("name", sorted(KSPECS))
def test_bytes_decode_to_the_solvers_w_hat(name):
    """gguf.quants.dequantize reads the encoded blocks as (d·sc)·q − dmin·m in float32, bit for bit,
    on random integers (every bit position used) and on a solved layer."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import dequantize

    from decoupleq_ref.model.ggml_blocks import encode_kquant

    spec, rng = KSPECS[name], np.random.default_rng(3)
    out, n_in = 5, 512
    layers = [KQuantLayer(spec, rng.integers(0, 1 << spec.bits, (out, n_in)).astype(np.uint8),
                          rng.integers(0, spec.top + 1, (out, n_in // spec.sub)).astype(np.uint8),
                          rng.integers(0, spec.top + 1, (out, n_in // spec.sub)).astype(np.uint8),
                          rng.normal(size=(out, 2)).astype(np.float16), rng.normal(size=(out, 2)).astype(np.float16))]
    W, H, _, start = free_and_start(name, out=4)
    layers.append(solve_kquant(W, H, start, iters=1))
    for layer in layers:
        got = dequantize(encode_kquant(layer), gguf.GGMLQuantizationType[name]).reshape(layer.q.shape)
        assert np.array_equal(got, layer.dequantize_ggml())
        assert np.allclose(got, layer.dequantize(), rtol=1e-6, atol=1e-6)


def test_rows_off_the_super_block_are_refused():
    W, H = dq.synthetic_layer(out=4, n_in=384, seed=0)
    spec = KSPECS["Q4_K"]
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=4, group_size=32, method="rtn"))
    with pytest.raises(ValueError, match="super-blocks of 256"):
        solve_kquant(W, H, project_to_kgrid(res.q, res.scale, res.zero, spec))


def test_llamacpp_baseline_is_a_sound_kquant():
    """The baseline (decoupleq_ref.kquant_start.llamacpp_kquant) gives a valid grid point whose weighted search beats
    its own first candidate (plain min-max) on the loss it weighs, and on a layer with correlated
    activations the constrained decoupleQ solve beats it on H."""
    from decoupleq_ref.kquant_start import llamacpp_kquant, weighted_minmax_search

    rng = np.random.default_rng(5)
    x, w = rng.standard_t(5, (200, 32)), rng.uniform(0.1, 2.0, (200, 32))
    scale, neg_min = weighted_minmax_search(x, w, 15, -0.9, 0.05, 36)
    plain_scale, plain_neg_min = weighted_minmax_search(x, w, 15, -0.9, 0.05, -1)  # no trial: min-max only

    def werr(s, nm):
        q = np.clip(np.floor((x + nm[:, None]) / s[:, None] + 0.5), 0, 15)
        return (w * (s[:, None] * q - nm[:, None] - x) ** 2).sum()

    assert werr(scale, neg_min) < 0.9 * werr(plain_scale, plain_neg_min)
    W, H, _, start = free_and_start("Q4_K", seed=4, out=16)
    base = llamacpp_kquant(W, np.diag(H), KSPECS["Q4_K"])
    assert base.sc.max() <= 63 and base.m.max() <= 63 and base.q.max() <= 15
    assert layer_loss(W, solve_kquant(W, H, start).dequantize(), H) < layer_loss(W, base.dequantize(), H)


@pytest.mark.parametrize("name", ["Q2_K", "Q5_K"])
def test_solve_from_kquant_start_is_never_worse_than_the_formats_quantizer(name):
    """kquant_start takes, per row, the better of the projection and llama.cpp's own result, so the
    constrained solve ends at or below llama.cpp's objective on every row set, even where the free
    solution's projection is far worse (weights already on a coarser grid)."""
    from decoupleq_ref.kquant_start import kquant_start, llamacpp_kquant
    from decoupleq_ref.objective import damp_hessian, row_losses

    spec = KSPECS[name]
    W, H = dq.synthetic_layer(out=12, n_in=256, n_tokens=1024, seed=5)
    # A projection made deliberately poor: the free solution's scales halved, so (b) must win rows.
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=spec.bits, group_size=spec.sub, iters=1))
    projected = project_to_kgrid(res.q, res.scale * 0.5, res.zero, spec)
    start = kquant_start(W, H, projected)
    Hd = damp_hessian(H, 0.01)
    own = row_losses(W, llamacpp_kquant(W, np.diag(H), spec).dequantize(), Hd)
    proj = row_losses(W, projected.dequantize(), Hd)
    assert np.allclose(row_losses(W, start.dequantize(), Hd), np.minimum(own, proj), rtol=1e-12, atol=0)
    assert (own < proj).any()
    solved = solve_kquant(W, H, start)
    assert layer_loss(W, solved.dequantize(), Hd) <= float(own.sum()) * (1 + 1e-12)
