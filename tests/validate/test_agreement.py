"""The one definition of "agrees with the reference" (validate.compare.agreement / assert_agree)
and the one backend registry (decoupleq_ref.backends) it resolves names in."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import decoupleq_ref as dq
from decoupleq_ref.backends import backend_status, canonical_backend, get_solver
from validate.adapters import load_impl
from validate.compare import agreement, assert_agree
from validate.policy import CUDA, NUMBA, Agreement

W, H = dq.synthetic_layer(24, 64, n_tokens=256, seed=3)
CFG = dq.QuantConfig(group_size=16, lower_bound=True)
REF = dq.quantize_layer(W, H, CFG)


@pytest.mark.parametrize("tol", [Agreement(), NUMBA, CUDA], ids=["default", "numba", "cuda"])
def test_a_result_agrees_with_itself(tol):
    c = assert_agree(W, H, CFG, REF, dataclasses.replace(REF), tol)
    assert c.agreement == 1.0 and c.loss_ratio == 1.0 and c.problems == []


def test_changed_codes_in_one_row_break_the_code_and_loss_bounds():
    q = REF.q.copy()
    q[5] = (q[5] + 1) % 4
    with pytest.raises(AssertionError, match="codes agree .* < 0.999") as e:
        assert_agree(W, H, CFG, REF, dataclasses.replace(REF, q=q), CUDA)
    assert "objective ratio" in str(e.value)


def test_each_preset_holds_its_own_bounds():
    """A claimed loss 2e-6 off: beyond NUMBA's 1e-6, within CUDA's 1e-5; float32 scales: a dtype
    difference only the backend presets refuse; a changed history step and a missing bound."""
    off = dataclasses.replace(REF, loss=REF.loss * (1 + 2e-6))
    assert not agreement("x", W, H, CFG, REF, off, NUMBA).ok
    assert agreement("x", W, H, CFG, REF, off, CUDA).ok
    f32 = dataclasses.replace(REF, scale=REF.scale.astype(np.float32))
    assert any("dtype" in p for p in agreement("x", W, H, CFG, REF, f32, NUMBA).problems)
    hist = dataclasses.replace(REF, loss_history=[h * 1.01 for h in REF.loss_history])
    assert any("loss_history" in p for p in agreement("x", W, H, CFG, REF, hist, NUMBA).problems)
    assert agreement("x", W, H, CFG, REF, hist, Agreement()).ok  # the suite comparison ignores histories
    unbounded = dataclasses.replace(REF, lower_bound=None)
    assert any("lower_bound" in p for p in agreement("x", W, H, CFG, REF, unbounded, CUDA).problems)


def test_one_registry_with_the_reference_alias():
    assert canonical_backend("reference") == canonical_backend("numpy") == "numpy"
    assert get_solver("reference") is dq.quantize_layer
    assert backend_status("reference") == (True, "available")
    with pytest.raises(ValueError, match="unknown backend 'fast'; choose one of"):
        get_solver("fast")
    impl = load_impl("reference")
    res = impl(W, H, CFG.to_dict())
    assert np.array_equal(res.q, REF.q)
    with pytest.raises(ValueError, match="impl: 'fast' is not"):
        load_impl("fast")
