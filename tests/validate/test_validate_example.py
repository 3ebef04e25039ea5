"""Example: property-testing a quantizer with validate.strategies + validate.check_result.

Copy this file into another project and replace ``my_quantizer`` by your implementation
(``fn(W, H, config: dict) -> {"q", "scale", "zero", ...}``; pass ``convention="signed"`` etc. to
check_result if your codes are not this project's). Hypothesis draws small layers (outlier
columns, zero/constant rows, rank-deficient and ill-conditioned H) and configs; every result must
pass check_result at the "quality" level: valid structure, the claimed loss true, and an
objective within 1.5x of the reference solver's (never below the global optimum on tiny
layers); use level="reference" for a port of this solver (1e-6).
Here the implementation under test is the reference itself behind the external protocol, so the
file also checks that the oracle accepts a correct implementation on random inputs.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from validate import check_result
from validate.adapters import reference_impl
from validate.strategies import configs, layers

my_quantizer = reference_impl  # <- your implementation here


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layers(max_out=6, in_choices=(8, 16), group_choices=(-1, 8)), configs(bits=(1, 2, 3)))
def test_my_quantizer_passes_the_oracle(layer, cfg):
    W, H, group_size = layer
    cfg = cfg.__class__(**{**cfg.to_dict(), "group_size": group_size})
    result = my_quantizer(W, H, cfg.to_dict())
    check_result(W, H, result, cfg).raise_if_failed()
