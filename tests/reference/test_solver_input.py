"""The layer solver never returns a silent wrong answer, on every backend: an H that is not
positive semi-definite, malformed arrays and mistyped configs are refused with a ValueError naming
the argument; layers at extreme magnitudes are solved by power-of-two rescaling (or refused where
float64 cannot hold the answer); the fp16 branch keeps the final objective at most RTN's.

The cuda backend runs where gpu.can_run(): on a GPU in-process, and in numba's CUDA simulator
through ``test_gpu_backend_cases_pass_in_the_simulator`` (a subprocess, as tests/gpu/test_gpu_sim.py does)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoupleq_ref as dq
from decoupleq_ref.backends import backend_runnable, get_solver
from decoupleq_ref.hp_branch import TIE_BREAK
from decoupleq_ref.layer_input import solve_layer
from validate.strategies import layers, make_hessian

from support import REPO as ROOT  # noqa: E402


def _backend_param(name: str):
    why = {"numba": 'numba is not installed: pip install -e ".[numba]"',
           "cuda": "no CUDA GPU here: test_gpu_backend_cases_pass_in_the_simulator runs these in the simulator"}
    return pytest.param(name, id=name, marks=pytest.mark.skipif(not backend_runnable(name), reason=why.get(name, "")))


BACKENDS = [_backend_param(b) for b in ("numpy", "numba", "cuda")]
#: tiny and quick on every backend, the CUDA simulator included
CFG = dq.QuantConfig(bits=2, group_size=8, iters=1, grid=8)


def tiny_layer(out: int = 4, n: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    W, H = dq.synthetic_layer(out, n, n_tokens=4 * n, seed=seed)
    return W, H


def indefinite(n: int = 16) -> np.ndarray:
    """Positive diagonal, eigenvalues 4 and −2: what a sloppy H can look like."""
    return np.kron(np.eye(n // 2), [[1.0, 3.0], [3.0, 1.0]])


# --- H that is not positive semi-definite ---------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,hp", [("rtn", 0), ("gptq", 0), ("decoupleq", 0), ("decoupleq", 2)])
def test_indefinite_h_is_refused(backend, method, hp):
    W, _ = tiny_layer()
    cfg = dataclasses.replace(CFG, method=method, hp_channels=hp)
    with pytest.raises(dq.HessianNotPSD, match=r"^H: not positive semi-definite .*X\.T @ X / N.*project_psd"):
        get_solver(backend)(W, indefinite(), cfg)


@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
def test_indefinite_h_is_refused_at_any_damping(damp):
    W, _ = tiny_layer()
    for method in ("rtn", "gptq"):
        with pytest.raises(ValueError, match="not positive semi-definite"):
            dq.quantize_layer(W, indefinite(), dataclasses.replace(CFG, method=method, damp=damp))


def test_singular_psd_h_without_damping_is_accepted():
    """A rank-deficient PSD H (fewer tokens than inputs) at damp = 0 is not an error."""
    W, _ = tiny_layer()
    H = make_hessian(np.random.default_rng(3), 16, rank=5)
    for method in ("rtn", "gptq", "decoupleq"):
        res = dq.quantize_layer(W, H, dataclasses.replace(CFG, method=method, damp=0.0))
        assert np.isfinite(res.objective) and res.loss >= 0


def test_a_negative_loss_from_any_solve_is_refused():
    """The result check: a negative Rayleigh quotient r·H·rᵀ certifies H is not PSD, whatever
    the solve did (here a stand-in solve that returns a negative loss)."""
    W, H = tiny_layer()
    good = dq.quantize_layer(W, H, CFG)

    def bad_solve(W_, H_, cfg_):
        return dataclasses.replace(good, loss=-1.0)

    with pytest.raises(dq.HessianNotPSD, match="-1 < 0"):
        solve_layer(bad_solve, W, H, CFG)


def test_project_psd_is_the_nearest_psd_matrix_and_the_solver_accepts_it():
    H = indefinite()
    P = dq.project_psd(H)
    # [[1, 3], [3, 1]] = 4·uuᵀ − 2·vvᵀ (u, v = (1, ±1)/√2): dropping −2 leaves 2·[[1, 1], [1, 1]]
    np.testing.assert_allclose(P, np.kron(np.eye(8), [[2.0, 2.0], [2.0, 2.0]]), atol=1e-12)
    _, H_ok = tiny_layer()
    np.testing.assert_allclose(dq.project_psd(H_ok), H_ok, rtol=0, atol=1e-12 * np.abs(H_ok).max())
    W, _ = tiny_layer()
    res = dq.quantize_layer(W, P, CFG)
    assert res.loss >= 0 and np.isclose(res.loss, dq.layer_loss(W, res.dequantize(), P))
    with pytest.raises(ValueError, match="^H: must be square"):
        dq.project_psd(np.ones((3, 4)))


# --- malformed arrays -------------------------------------------------------------------------------

def _bad_inputs():
    W, H = tiny_layer()
    asym = H.copy()
    asym[0, 1] += 0.5
    W_nan, H_inf = W.copy(), H.copy()
    W_nan[1, 2] = np.nan
    H_inf[3, 3] = np.inf
    return [
        ("asymmetric", W, asym, "^H: not symmetric"),
        ("nan_in_W", W_nan, H, "^W: contains NaN or Inf"),
        ("inf_in_H", W, H_inf, "^H: contains NaN or Inf"),
        ("H_for_other_W", W[:, :8], H, r"^H: shape \(16, 16\) does not match W's input dimension 8"),
        ("H_not_square", W, H[:, :8], "^H: must be square"),
        ("W_1d", W[0], H, "^W: expected a 2-D array"),
        ("W_int", W.astype(np.int64), H, "^W: expected a floating-point array"),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_malformed_arrays_name_the_argument(backend, case):
    _, W, H, needle = case
    with pytest.raises(ValueError, match=needle):
        get_solver(backend)(W, H, CFG)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_config_that_is_not_a_quantconfig_is_refused(backend):
    W, H = tiny_layer()
    with pytest.raises(ValueError, match="^cfg: expected a decoupleq_ref.QuantConfig"):
        get_solver(backend)(W, H, {"bits": 2})


# --- extreme magnitudes -----------------------------------------------------------------------------

def assert_scaled(res, base, w_exp: int, h_exp: int = 0):
    """res is base with W·2^w_exp, H·2^h_exp: the same codes, (s, z) and losses scaled."""
    np.testing.assert_array_equal(res.q, base.q)
    np.testing.assert_allclose(res.scale, np.ldexp(base.scale, w_exp), rtol=1e-12, atol=0)
    np.testing.assert_allclose(res.zero, np.ldexp(base.zero, w_exp), rtol=1e-12, atol=0)
    e = 2 * w_exp + h_exp
    for got, want in ((res.loss, base.loss), (res.objective, base.objective)):
        assert np.isfinite(got) and got > 0
        np.testing.assert_allclose(got, np.ldexp(want, e), rtol=1e-9)
    np.testing.assert_allclose(res.loss_history, np.ldexp(base.loss_history, e), rtol=1e-9)
    assert res.config == base.config


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_exp", [-56, 512, 0], ids=["W~1e-17", "W~1e154", "W~1"])
def test_extreme_w_is_solved_at_a_safe_scale(backend, w_exp):
    """W ≤ 1e-16 used to collapse every code to 0 (scale clamp) and W ≥ 1e154 to give loss 0 and
    a NaN objective; now both are the unit-scale solve scaled exactly."""
    W, H = tiny_layer()
    solve = get_solver(backend)
    base = solve(W, H, CFG)
    assert_scaled(solve(np.ldexp(W, w_exp), H, CFG), base, w_exp)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_h_and_fp16_branch_scale_back(backend):
    W, H = tiny_layer()
    cfg = dataclasses.replace(CFG, hp_channels=2)
    solve = get_solver(backend)
    base = solve(W, H, cfg)
    res = solve(np.ldexp(W, -70), np.ldexp(H, 900), cfg)
    assert_scaled(res, base, -70, 900)
    np.testing.assert_array_equal(res.hp_index, base.hp_index)
    np.testing.assert_allclose(res.hp_weight, np.ldexp(base.hp_weight, -70), rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("w_exp,needle", [(600, "overflows float64"), (-700, "underflows float64")])
def test_loss_beyond_float64_is_refused(backend, w_exp, needle):
    """W·2^600 has a loss near 2^1200: no float64 holds it, so the call says so and how to fix it."""
    W, H = tiny_layer()
    with pytest.raises(ValueError, match=f"^W, H: the .* {needle}. Quantization is scale-equivariant"):
        get_solver(backend)(np.ldexp(W, w_exp), H, CFG)


def test_huge_h_entries_do_not_overflow_the_symmetrisation():
    W, H = tiny_layer()
    base = dq.quantize_layer(W, H, CFG)
    h_exp = 1021 - int(np.frexp(np.abs(H).max())[1])  # max |H| just below float64's largest
    assert_scaled(dq.quantize_layer(np.ldexp(W, -600), np.ldexp(H, h_exp), CFG), base, -600, h_exp)


# --- config and PackedLayer types -------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("bits", True), ("bits", 2.0), ("bits", "2"), ("group_size", True), ("group_size", 64.0),
    ("symmetric", "no"), ("symmetric", 1), ("act_order", "False"), ("lower_bound", "yes"),
    ("iters", False), ("damp", "0.01"), ("damp", True), ("damp", float("nan")), ("relax_lr", float("inf")),
    ("n_starts", 1.5), ("hp_channels", np.float64(2)), ("method", 3), ("hp_select", None),
])
def test_config_types_are_checked(field, value):
    with pytest.raises(ValueError, match=rf"^QuantConfig\.{field}: must be"):
        dq.QuantConfig(**{field: value})


def test_config_takes_numpy_scalars_as_python_values():
    cfg = dq.QuantConfig(bits=np.int64(3), group_size=np.int32(8), symmetric=np.bool_(True),
                         damp=np.float32(0.5), iters=np.uint8(2))
    assert cfg == dq.QuantConfig(bits=3, group_size=8, symmetric=True, damp=0.5, iters=2)
    assert [type(getattr(cfg, f)) for f in ("bits", "group_size", "symmetric", "damp")] == [int, int, bool, float]


def _packed():
    W, H = tiny_layer()
    return dq.PackedLayer.from_result(dq.quantize_layer(W, H, CFG))


@pytest.mark.parametrize("change,needle", [
    (dict(group_size=0), "^group_size: must be -1 .* or a positive integer"),
    (dict(group_size=True), "^group_size: must be"),
    (dict(group_size=-2), "^group_size: must be"),
    (dict(bits=True), "^bits: must be an integer"),
    (dict(scale=[[1.0, 1.0]] * 4), "^scale: expected a numpy array, got list"),
    (dict(zero=None), "^zero: expected a numpy array, got NoneType"),
    (dict(scale=np.ones((4, 2), dtype=np.int32)), "^scale: expected a float array"),
    (dict(shape=(4,)), r"^shape: expected \(out, in\)"),
    (dict(shape=(4.0, 16)), r"^shape: expected \(out, in\)"),
    (dict(hp_index=[1, 2], hp_weight=np.zeros((4, 2), np.float16)), "^hp_index: expected a numpy array"),
])
def test_packed_layer_types_are_checked(change, needle):
    layer = _packed()
    with pytest.raises(ValueError, match=needle):
        dataclasses.replace(layer, **change)


# --- fp16 branch: keep-if-better holds for the joint objective --------------------------------------

def _rtn_bound(W, H, cfg):
    """RTN's joint objective and the tie-break slack λ‖Q_S − W_S‖² that the solver's objective
    adds to it: the final joint objective of gptq/decoupleq is at most their sum."""
    rtn = dq.quantize_layer(W, H, dataclasses.replace(cfg, method="rtn"))
    Q_S = dq.dequantize_parts(rtn.q, rtn.scale, rtn.zero)[:, rtn.hp_index]
    lam = TIE_BREAK * (np.mean(np.diag(dq.damp_hessian(H, cfg.damp))) or 1.0)
    return rtn.objective, lam * float(np.sum((Q_S - W[:, rtn.hp_index]) ** 2))


def assert_branch_not_worse_than_rtn(W, H, cfg):
    rtn, slack = _rtn_bound(W, H, cfg)
    res = dq.quantize_layer(W, H, cfg)
    rounding = 1e-9 * (res.loss_history[0] + abs(rtn))  # losses are sums of signed products
    assert res.objective <= rtn + slack + rounding, (res.objective, rtn, slack)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layers(), st.sampled_from(["gptq", "decoupleq"]), st.sampled_from([0.0, 1e-6, 1e-3, 0.01, 0.1, 1.0, 10.0]),
       st.integers(1, 5), st.sampled_from([1, 2, 3, 4]), st.booleans(), st.sampled_from([1, 2]))
def test_branch_final_objective_is_at_most_rtn(layer, method, damp, k, bits, symmetric, n_starts):
    W, H, gs = layer
    cfg = dq.QuantConfig(bits=bits, group_size=gs, method=method, damp=damp, iters=2, grid=20,
                         symmetric=symmetric, hp_channels=min(k, W.shape[1] - 1), n_starts=n_starts)
    assert_branch_not_worse_than_rtn(W, H, cfg)


@pytest.mark.parametrize("kind,damp,k,gs", [
    ("low_rank", 0.01, 4, -1),   # was 1399 vs RTN's 1190: the λ‖Q_S − W_S‖² term traded against the joint loss
    ("ill", 0.01, 4, 8),
    ("plain", 1.0, 4, 8),
    ("plain", 10.0, 4, -1),
])
def test_branch_regressions_at_non_default_damping(kind, damp, k, gs):
    rng = np.random.default_rng(1240)
    W = rng.standard_normal((9, 32))
    H = make_hessian(rng, 32, rank=12 if kind == "low_rank" else None, cond_boost=1e3 if kind == "ill" else 1.0)
    for method in ("gptq", "decoupleq"):
        cfg = dq.QuantConfig(bits=2, group_size=gs, method=method, damp=damp, iters=2, grid=20, hp_channels=k)
        assert_branch_not_worse_than_rtn(W, H, cfg)


# --- the cuda backend in the simulator --------------------------------------------------------------

CHILD = """
import sys
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", "-k", "cuda", sys.argv[1]]))
"""


@pytest.mark.slow  # ~1 min: every solve of the cuda cases runs as simulated Python threads
@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason='numba-cuda is not installed: pip install -e ".[cuda]"')
@pytest.mark.skipif(os.environ.get("NUMBA_ENABLE_CUDASIM") == "1", reason="already in the simulator")
def test_gpu_backend_cases_pass_in_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__))], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_every_config_field_has_a_checked_type():
    """_FIELD_KINDS names exactly QuantConfig's fields: a new field is type-checked, a removed one
    is not looked up (a stale entry made every QuantConfig() raise AttributeError)."""
    from decoupleq_ref.config import _FIELD_KINDS

    assert set(_FIELD_KINDS) == {f.name for f in dataclasses.fields(dq.QuantConfig)}
