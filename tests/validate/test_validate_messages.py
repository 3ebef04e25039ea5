"""check_result's failure messages say what the numbers say, and a convention mistake on top of
a weaker solver is still named (the repair closes most of the gap to the reference)."""

from __future__ import annotations

import pytest

import decoupleq_ref as dq
from validate.check import check_result


def _row_scaled_layer(factor: float, row: int = 0):
    W, H = dq.synthetic_layer(12, 64, seed=3)
    W = W.copy()
    W[row] *= factor
    cfg = dq.QuantConfig(bits=2, group_size=16)
    return W, H, cfg, dq.quantize_layer(W, H, cfg)


def _zero_row(res, row: int = 0) -> dict:
    """The result with one row's Ŵ set to 0 (scale = zero = 0): that row's loss is its energy."""
    s, z = res.scale.copy(), res.zero.copy()
    s[row], z[row] = 0.0, 0.0
    return {"q": res.q, "scale": s, "zero": z}


def test_large_rows_worse_is_not_blamed_on_small_rows():
    W, H, cfg, res = _row_scaled_layer(100.0)
    rep = check_result(W, H, _zero_row(res), cfg, reference=res)
    msg = rep.finding("loss.reference_rows").message
    assert rep.numbers["row_ratio_to_reference"] < rep.numbers["ratio_to_reference"]
    assert "rows of small magnitude" not in msg and "below the total's" in msg and "large magnitude" in msg, msg


def test_small_rows_worse_is_named():
    W, H, cfg, res = _row_scaled_layer(0.01)
    rep = check_result(W, H, _zero_row(res), cfg, reference=res)
    msg = rep.finding("loss.reference_rows").message
    assert rep.finding("loss.reference").status == "pass"  # the small row hides in the total
    assert rep.finding("loss.reference_rows").status == "fail"
    assert "rows of small magnitude are quantized worse" in msg and "above the total's" in msg, msg


@pytest.mark.parametrize("mistake", ["swapped_scale_zero", "negated_zero"])
def test_convention_mistake_on_a_weaker_solver_is_named(mistake):
    """RTN is a valid but weaker result (well above the reference here); with a convention
    mistake on top the repaired objective is not within 5 % of the reference, but the repair
    removes nearly all of the excess, so the mistake is named."""
    W, H = dq.synthetic_layer(12, 64, seed=3)
    cfg = dq.QuantConfig(bits=2, group_size=16)
    rtn = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=16, method="rtn"))
    s, z = rtn.scale, rtn.zero
    if mistake == "swapped_scale_zero":
        wrong = {"q": rtn.q, "scale": z, "zero": s}
    else:
        wrong = {"q": rtn.q, "scale": s, "zero": -z}
    rtn_ratio = check_result(W, H, rtn, cfg).numbers["ratio_to_reference"]
    assert rtn_ratio > 1.05  # the 5 % rule alone would not name it
    rep = check_result(W, H, wrong, cfg)
    assert not rep.ok and mistake in rep.defects, str(rep)
    assert "the rest is the solver's" in rep.finding(f"defect.{mistake}").message
