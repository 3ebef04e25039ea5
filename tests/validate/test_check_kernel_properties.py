"""Property test of check_kernel itself: over random shapes, groups and bits, a correct kernel
passes, and the same kernel with one random corruption — one output row, one (row, group), one
16-row tile, one batch row — fails."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from validate.kernel import check_kernel, random_layer

CORRUPTIONS = ("row", "group", "tile", "batch_row")


@st.composite
def layers(draw):
    bits = draw(st.integers(1, 8))
    out = draw(st.integers(1, 40))
    g = draw(st.sampled_from([-1, 8, 16, 32]))
    n_in = draw(st.integers(1, 80)) if g == -1 else g * draw(st.integers(1, 6))
    return random_layer(out, n_in, bits, g, seed=draw(st.integers(0, 2 ** 16)))


def kernel(corruption: str | None = None, where: int = 0):
    """fn(x, layer): x @ Ŵᵀ in float32 from the layer's own dequantization, or with one corruption
    (a whole quantization step added to one row, one (row, group), one tile, or one batch row)."""

    def fn(x, layer):
        out, n_in = layer.shape
        g = n_in // layer.scale.shape[1]
        W = layer.dequantize_packed()
        step = np.repeat(layer.scale.astype(np.float64), g, axis=1)
        r = where % out
        if corruption == "row":
            W[r] += step[r]
        elif corruption == "group":
            c0 = (where // out % layer.scale.shape[1]) * g
            W[r, c0:c0 + g] += step[r, c0:c0 + g]
        elif corruption == "tile":
            t0 = r // 16 * 16
            W[t0:t0 + 16] += step[t0:t0 + 16]
        y = np.asarray(x, np.float32) @ W.T.astype(np.float32)
        if corruption == "batch_row" and len(y) > 1:
            y[where % (len(y) - 1) + 1] += 1.0
        return y

    return fn


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer=layers(), corruption=st.sampled_from(CORRUPTIONS), where=st.integers(0, 10 ** 6),
       dtype=st.sampled_from(["float32", "float16"]))
def test_correct_kernel_passes_and_one_corruption_fails(layer, corruption, where, dtype):
    kw = dict(signature="layer", dtypes=(dtype,), batches=(1, 3), diagnose_failures=False)
    good = check_kernel(kernel(), layer, **kw)
    assert good.ok, str(good)
    bad = check_kernel(kernel(corruption, where), layer, **kw)
    assert not bad.ok, f"{corruption} at {where} passed:\n{bad}"
