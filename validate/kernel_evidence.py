"""The measured margins of check_kernel's precision model (docs/VALIDATION.md, check_kernel).

    python -m validate.kernel_evidence

For each battery layer and activation dtype: the worst error / bound over the random probes of
(a) a correct kernel that forms Ŵ in fp32, rounds it to the activation dtype, accumulates in
fp32 and rounds the output once; (b) a kernel that forms Ŵ in the dtype's own arithmetic (scale
and zero rounded to it first); (c) the correct kernel accumulating in the dtype itself,
sequentially, on layers of 256, 1024 and 4096 columns. A pass needs < 1.
"""

from __future__ import annotations

import numpy as np

from decoupleq_ref.matmul import PackedLayer

from .kernel import check_kernel
from .kernel_layers import default_layers, random_layer
from .kernel_precision import round_to


def _dtype_of(x) -> str:
    return np.asarray(x).dtype.name


def _weight(layer: PackedLayer, dtype: str, in_dtype_arithmetic: bool) -> np.ndarray:
    """The weight the kernel multiplies by, in float64: Ŵ rounded to dtype (+ the branch B
    rounded to dtype on its columns)."""
    g = layer.shape[1] // layer.scale.shape[1]
    q = layer.codes().astype(np.float64)
    if in_dtype_arithmetic:
        s = round_to(np.repeat(layer.scale.astype(np.float64), g, axis=1), dtype)
        z = round_to(np.repeat(layer.zero.astype(np.float64), g, axis=1), dtype)
        W = round_to(round_to(s * q, dtype) + z, dtype)
    else:
        W32 = np.repeat(layer.scale, g, axis=1) * q.astype(np.float32) + np.repeat(layer.zero, g, axis=1)
        W = round_to(W32.astype(np.float64), dtype)
    if layer.hp_channels:
        W[:, layer.hp_index] += round_to(layer.hp_weight.astype(np.float64), dtype)
    return W


def correct_kernel(in_dtype_arithmetic: bool = False):
    """fn(x, layer): Ŵ rounded to the activation dtype (or formed in its arithmetic), fp32
    accumulation, the output rounded once to the dtype."""

    def fn(x, layer):
        dtype = _dtype_of(x)
        xv = np.asarray(x, dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):  # the NaN/Inf probe
            y = xv.astype(np.float32) @ _weight(layer, dtype, in_dtype_arithmetic).T.astype(np.float32)
        return round_to(y.astype(np.float64), dtype)

    return fn


def accumulating_in_dtype(x, layer):
    """Sequential accumulation in the activation dtype: every partial sum rounded to it."""
    dtype = _dtype_of(x)
    xv, Wd = np.asarray(x, dtype=np.float64), _weight(layer, dtype, False)
    acc = np.zeros((xv.shape[0], layer.shape[0]))
    for j in range(layer.shape[1]):
        acc = round_to(acc + round_to(np.outer(xv[:, j], Wd[:, j]), dtype), dtype)
    return acc


def _worst(rep) -> float:
    return max((f.value for f in rep.findings if f.value is not None and ".random." in f.check), default=float("nan"))


def main() -> None:
    dtypes = ("float16", "bfloat16")
    print("| layer | " + " | ".join(f"{d} (a) | {d} (b)" for d in dtypes) + " |")
    print("|---|" + "---|" * (2 * len(dtypes)))
    for name, lay in default_layers(2):
        cells = []
        for d in dtypes:
            for arith in (False, True):
                rep = check_kernel(correct_kernel(arith), lay, signature="layer", dtypes=(d,), diagnose_failures=False)
                cells.append(f"{_worst(rep):.3g}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n(c) accumulating in float16, random probes at batch 16:")
    for n in (256, 1024, 4096):
        rep = check_kernel(accumulating_in_dtype, random_layer(64, n, 2, 128, seed=5), signature="layer",
                           dtypes=("float16",), batches=(16,), diagnose_failures=False)
        print(f"  {n} columns: worst {_worst(rep):.3g}x the bound")


if __name__ == "__main__":
    main()
