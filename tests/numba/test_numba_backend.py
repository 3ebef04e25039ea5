"""kernels_numba against the reference: the same decisions, codes, losses and matmul.

Every test compiles what it calls on first use (numba cache=True: later runs load from disk);
layers are small so the file stays within its CI budget (≤ 4 min on 2 idle cores, cold cache).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupleq_ref as dq
import kernels_numba as kn
from kernels_numba import float_step as kn_float, init as kn_init, integer_step as kn_int, refine as kn_refine
from kernels_numba.objective import exact_losses
from kernels_numba.solver import RELIABLE
from decoupleq_ref.integer_step import gptq_factor
from decoupleq_ref.objective import damp_hessian
from validate.compare import assert_agree
from validate.policy import NUMBA
from validate.strategies import configs, layers, make_hessian

pytestmark = pytest.mark.skipif(not kn.available(), reason="numba is not installed")

from support import REPO  # noqa: E402


def structured_layer(kind: str, out: int = 40, n_in: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A small layer with one kind of structure that stresses ties and degenerate cases."""
    W, H = dq.synthetic_layer(out=out, n_in=n_in, n_tokens=512, seed=seed)
    rng = np.random.default_rng(seed)
    if kind == "outlier_cols":
        W[:, [3, 50]] *= 20.0
    elif kind == "rank_deficient":
        H = make_hessian(rng, n_in, rank=12)
    elif kind == "const_rows":
        W[5], W[6] = 0.3, -0.01
    elif kind == "zero_rows":
        W[[0, 7, 8]] = 0.0
    return W, H


KINDS = ["random", "outlier_cols", "rank_deficient", "const_rows", "zero_rows"]

CONFIGS = {
    "rtn": dq.QuantConfig(method="rtn"),
    "gptq": dq.QuantConfig(method="gptq"),
    "dq_pc": dq.QuantConfig(),
    "dq_g32": dq.QuantConfig(group_size=32),
    "dq_sym_g16_w3": dq.QuantConfig(bits=3, group_size=16, symmetric=True),
    "dq_w4_noact": dq.QuantConfig(bits=4, act_order=False, iters=2),
    "dq_w1_g32": dq.QuantConfig(bits=1, group_size=32),
    "relax": dq.QuantConfig(relax_iters=4, group_size=32),
    "improved_pc": dq.QuantConfig.improved(n_starts=3),
    "improved_g32_sym": dq.QuantConfig.improved(n_starts=2, group_size=32, symmetric=True),
    "hp_branch": dq.QuantConfig(hp_channels=5, refine_sweeps=2),
    "lower_bound": dq.QuantConfig(lower_bound=True, grid=0),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_quantize_layer_agrees_on_every_config(name):
    W, H = structured_layer("outlier_cols", seed=1)
    cfg = CONFIGS[name]
    assert_agree(W, H, cfg, dq.quantize_layer(W, H, cfg), kn.quantize_layer(W, H, cfg), NUMBA)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group_size", [-1, 32])
def test_quantize_layer_agrees_on_structured_layers(kind, group_size):
    W, H = structured_layer(kind, seed=2)
    cfg = dq.QuantConfig(group_size=group_size, refine_sweeps=2)
    assert_agree(W, H, cfg, dq.quantize_layer(W, H, cfg), kn.quantize_layer(W, H, cfg), NUMBA)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers(), configs())
def test_quantize_layer_agrees_on_random_tiny_layers(layer, cfg):
    """Tiny hypothesis layers: the objective agrees to 1e-6 always; where codes differ it is a
    float tie, so the objectives must then agree to 1e-9."""
    W, H, gs = layer
    cfg = dataclasses.replace(cfg, group_size=gs)
    a, b = dq.quantize_layer(W, H, cfg), kn.quantize_layer(W, H, cfg)
    assert abs(a.objective - b.objective) <= 1e-6 * abs(a.objective) + 1e-15
    if not np.array_equal(a.q, b.q):
        assert abs(a.objective - b.objective) <= 1e-9 * abs(a.objective) + 1e-15


# --- the kernels one by one ------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gs,symmetric,bits", [(-1, False, 2), (32, False, 2), (16, True, 3), (32, False, 1)])
def test_init_picks_the_reference_grid(kind, gs, symmetric, bits):
    """The incremental grid search (init.py) chooses the reference's shrink factor per row, so
    (s, z) are bitwise equal; its losses agree to rounding."""
    W, H = structured_layer(kind, seed=3)
    Hd = damp_hessian(H, 0.01)
    s0, z0, l0 = dq.init_scale_zero(W, Hd, bits, gs, symmetric, 200, 0.8)
    s1, z1, l1 = kn_init.init_scale_zero(W, Hd, bits, gs, symmetric, 200, 0.8)
    assert np.mean(np.all(s0 == s1, axis=1)) >= 0.97  # a row may differ only on a float tie
    np.testing.assert_allclose(l1, l0, rtol=1e-9, atol=1e-14 * l0.max())


def test_init_incremental_loss_matches_direct_on_large_values():
    """Weights of size 300 (FP cancellation in the expansion): still the reference's choice."""
    W, H = structured_layer("random", seed=4)
    W *= 15000.0
    s0, _, l0 = dq.init_scale_zero(W, H, 2, -1, False, 200, 0.8)
    s1, _, l1 = kn_init.init_scale_zero(W, H, 2, -1, False, 200, 0.8)
    np.testing.assert_array_equal(s0, s1)
    np.testing.assert_allclose(l1, l0, rtol=1e-9)


@pytest.mark.parametrize("gs,act_order,block", [(-1, True, 128), (32, False, 16), (16, True, 7)])
def test_gptq_round_is_bitwise_the_reference(gs, act_order, block):
    W, H = structured_layer("outlier_cols", seed=5)
    s, z, _ = dq.init_scale_zero(W, H, 2, gs, False, 50, 0.8)
    n = W.shape[1]
    factor = gptq_factor(H, act_order, 0.01)
    ref = dq.gptq_round(W, np.repeat(s, n // s.shape[1], 1), np.repeat(z, n // z.shape[1], 1), H, 2,
                        act_order, block, 0.01, factor)
    got = kn_int.integer_step(W, s, z, H, 2, act_order, block, 0.01, 0, 1e-3, factor)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, ref)
    own = kn_int.integer_step(W, s, z, H, 2, act_order, block, 0.01, 0, 1e-3)  # its own factor
    assert np.mean(own == ref) >= 0.999


@pytest.mark.parametrize("damp", [0.01, 0.0])
def test_lean_gptq_factor_matches_the_reference(damp):
    """potrf → potri → potrf in one buffer gives the reference's (perm, U) to rounding, including
    the damping ladder on a singular H."""
    for H in (structured_layer("rank_deficient", seed=9)[1], np.zeros((16, 16))):
        p0, U0 = gptq_factor(H, True, damp)
        p1, U1 = kn_int.gptq_factor(H, True, damp)
        np.testing.assert_array_equal(p1, p0)
        np.testing.assert_allclose(U1, U0, rtol=0, atol=1e-12 * np.abs(U0).max())


@pytest.mark.parametrize("gs,symmetric", [(-1, False), (-1, True), (32, False), (16, True)])
def test_float_step_matches_the_reference(gs, symmetric):
    W, H = structured_layer("const_rows", seed=6)
    s, z, _ = dq.init_scale_zero(W, H, 2, gs, symmetric, 50, 0.8)
    q = dq.quantize_rtn(W, s, z, 2)
    q[3, :] = 1.0  # a constant row: degenerate groups keep their scale
    s0, z0 = dq.closed_form_scale_zero(q, W, H, 2, gs, symmetric, s)
    s1, z1 = kn_float.closed_form_scale_zero(q.astype(np.uint8), W, H, 2, gs, symmetric, s)
    np.testing.assert_allclose(s1, s0, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(z1, z0, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("symmetric", [False, True])
def test_refinements_make_the_reference_moves(symmetric):
    from decoupleq_ref.refine import refine_integers, refine_profiled

    W, H = structured_layer("random", seed=7)
    res = dq.quantize_layer(W, H, dq.QuantConfig(group_size=32, symmetric=symmetric, iters=1))
    q0, m0 = refine_integers(res.q, W, res.scale, res.zero, H, 2, 3)
    q1, m1 = kn_refine.refine_integers(res.q, W, res.scale, res.zero, H, 2, 3)
    assert m0 == m1 > 0
    np.testing.assert_array_equal(q1, q0)
    res = dq.quantize_layer(W, H, dq.QuantConfig(symmetric=symmetric, iters=1))
    q0, m0 = refine_profiled(res.q, W, H, 2, symmetric, 3)
    q1, m1 = kn_refine.refine_profiled(res.q, W, H, 2, symmetric, 3)
    assert m0 == m1 > 0
    np.testing.assert_array_equal(q1, q0)


# --- packing and the packed matmul -----------------------------------------------------------

def random_layer(rng, out, n_in, bits, gs, k=0) -> dq.PackedLayer:
    G = 1 if gs == -1 else n_in // gs
    q = rng.integers(0, 1 << bits, (out, n_in)).astype(np.uint8)
    branch = ((np.sort(rng.choice(n_in, k, replace=False)).astype(np.int32),
               rng.standard_normal((out, k)).astype(np.float16)) if k else (None, None))
    return dq.PackedLayer(dq.pack(q, bits), rng.standard_normal((out, G)).astype(np.float32),
                          rng.standard_normal((out, G)).astype(np.float32), bits, gs, (out, n_in), *branch)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("out,n_in", [(1, 8), (37, 100), (5, 1000)])
def test_pack_unpack_are_the_reference(bits, out, n_in):
    rng = np.random.default_rng(bits * 1000 + n_in)
    q = rng.integers(0, 1 << bits, (out, n_in)).astype(np.uint8)
    packed = kn.pack(q, bits)
    np.testing.assert_array_equal(packed, dq.pack(q, bits))
    np.testing.assert_array_equal(kn.unpack(packed, bits, (out, n_in)), q)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("out,n_in,gs,k", [(37, 96, -1, 0), (33, 96, 32, 3), (19, 120, 8, 0), (65, 256, 64, 5),
                                            (7, 40, 20, 0), (9, 96, 48, 0)])  # 48: 3 or 6 words per group
@pytest.mark.parametrize("batch", [1, 3, 17, kn.matmul.GEMV_MAX_BATCH + 1])  # the last: tiles for BLAS
def test_packed_matmul_matches_the_reference(bits, out, n_in, gs, k, batch):
    rng = np.random.default_rng(bits + out + batch)
    layer = random_layer(rng, out, n_in, bits, gs, k)
    x = rng.standard_normal((batch, n_in)).astype(np.float32)
    y = kn.packed_matmul(x, layer)
    ref = dq.matmul(x.astype(np.float64), layer)
    assert y.dtype == np.float32 and y.shape == (batch, out)
    assert np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(kn.dequantize(layer), layer.dequantize(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("magnitude", [1e-36, 1e-20, 1e30])
def test_packed_matmul_keeps_precision_for_tiny_and_huge_activations(bits, magnitude):
    """The word GEMV prescales x by 2^(−b·r); activations that would turn subnormal there must take
    the unscaled path instead of losing their low bits."""
    rng = np.random.default_rng(bits)
    layer = random_layer(rng, 24, 256, bits, 64)
    x = (rng.standard_normal((2, 256)) * magnitude).astype(np.float32)
    ref = dq.matmul(x.astype(np.float64), layer)
    assert np.abs(kn.packed_matmul(x, layer) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_packed_matmul_on_a_solved_layer_with_branch():
    W, H = structured_layer("outlier_cols", seed=8)
    res = kn.quantize_layer(W, H, dq.QuantConfig(group_size=32, hp_channels=4))
    layer = dq.PackedLayer.from_result(res)
    x = np.random.default_rng(0).standard_normal((2, W.shape[1])).astype(np.float32)
    ref = dq.matmul(x.astype(np.float64), layer)
    assert np.abs(kn.packed_matmul(x, layer) - ref).max() <= 1e-5 * np.abs(ref).max()


def test_bad_input_is_a_clear_error():
    layer = random_layer(np.random.default_rng(0), 4, 16, 2, -1)
    with pytest.raises(ValueError, match="^x: has 15 columns"):
        kn.packed_matmul(np.ones((1, 15), np.float32), layer)
    with pytest.raises(ValueError, match="^x: expected a 2-D float"):
        kn.packed_matmul(np.ones(16, np.float32), layer)
    with pytest.raises(ValueError, match=r"^q: codes must be in \[0, 3\]"):
        kn.pack(np.full((2, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="^packed: expected uint8"):
        kn.unpack(np.zeros((2, 3), np.uint8), 2, (2, 16))
    with pytest.raises(ValueError, match="^H: must be square"):
        kn.quantize_layer(np.ones((2, 4)), np.ones((4, 3)))


def test_imports_without_numba_and_says_unavailable():
    """With numba hidden the package still imports, available() is False, the backend switch
    skips it and a call explains how to install numba."""
    code = textwrap.dedent("""
        import sys
        class Hide:
            def find_spec(self, name, path=None, target=None):
                if name == "numba" or name.startswith("numba."):
                    raise ImportError("numba hidden for this test")
        sys.meta_path.insert(0, Hide())
        import numpy as np, kernels_numba as kn
        from decoupleq_ref.backends import backend_available
        assert kn.available() is False and backend_available("numba") is False
        try:
            kn.quantize_layer(np.ones((2, 4)), np.eye(4))
        except ImportError as e:
            assert "pip install" in str(e), e
        else:
            raise SystemExit("no ImportError")
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.parametrize("group_size,symmetric", [(-1, False), (32, False), (16, True)])
def test_step_loss_formulas_equal_the_residual_product(group_size, symmetric):
    """The losses the init, float step and GPTQ hand to the loop with their proposals (the grid
    score; the normal equations; ‖e‖² − λ'‖r‖²) equal r H rᵀ by the product, on a layer with
    outlier columns, every row from its formula (none below the RELIABLE threshold)."""
    W, H = structured_layer("outlier_cols", out=48, n_in=96, seed=3)
    Hd = damp_hessian(H, 0.01)
    ops = kn.NumbaOps(W, Hd, dq.QuantConfig(group_size=group_size, symmetric=symmetric, block_size=32))
    s, z, init_losses = ops.init()
    assert (init_losses > RELIABLE * np.abs(ops.c)).all()
    run = ops.start(s, z, init_losses)
    assert run.q.dtype == np.uint8  # the compiled backend keeps codes as uint8 (8× less memory than float64)
    np.testing.assert_allclose(run.obj, exact_losses(W, run.q, s, z, Hd), rtol=1e-10)
    for p in (ops.float_step(run), ops.integer_step(run)):
        assert p.moved is not None and p.losses is not None
        np.testing.assert_allclose(p.losses, exact_losses(W, p.q, p.scale, p.zero, Hd), rtol=1e-10)


def test_float_step_solves_only_the_stale_rows_and_each_row_alone():
    """The float step solves the rows the incumbent's stale mask names (to rounding as among all
    rows: BLAS may round a product differently for fewer rows) and proposes the incumbent's own
    (s, z, ℓ) elsewhere."""
    W, H = structured_layer("outlier_cols", out=48, n_in=96, seed=3)
    Hd = damp_hessian(H, 0.01)
    ops = kn.NumbaOps(W, Hd, dq.QuantConfig(group_size=32))
    run = ops.start(*ops.init())
    every = ops.float_step(run)
    for rows in ([5], [1, 5, 40]):
        run.stale[:] = False
        run.stale[rows] = True
        some = ops.float_step(run)
        others = np.setdiff1d(np.arange(48), rows)
        np.testing.assert_allclose(some.scale[rows], every.scale[rows], rtol=1e-12)
        np.testing.assert_allclose(some.losses[rows], every.losses[rows], rtol=1e-12)
        np.testing.assert_array_equal(some.scale[others], run.scale[others])
        np.testing.assert_array_equal(some.losses[others], run.obj[others])


def test_result_says_why_the_solve_stopped():
    W, H = structured_layer("random", seed=8)
    res = kn.quantize_layer(W, H, dq.QuantConfig(group_size=32, iters=2, min_improvement=0.0))
    assert res.status == 0 and "used all 2 rounds" in res.message
    res = kn.quantize_layer(W, H, dq.QuantConfig(group_size=32, iters=50))
    assert res.status == 1 and "fewer than min_improvement" in res.message
    res = kn.quantize_layer(W, H, dq.QuantConfig.improved(group_size=32, n_starts=1))
    assert res.status == 2 and "polish converged" in res.message
    ref = dq.quantize_layer(W, H, dq.QuantConfig.improved(group_size=32, n_starts=1))
    assert (ref.status, ref.message) == (res.status, res.message)
