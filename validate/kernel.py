"""check_kernel: does a deployed packed matmul compute x @ Ŵᵀ for this project's format? If not, why?

    from validate import kernel
    rep = kernel.check_kernel(my_matmul)                 # fn(x, packed, scale, zero, group_size) -> y
    rep = kernel.check_kernel(dq.matmul, signature="layer")   # fn(x, PackedLayer) -> y
    print(rep); rep.raise_if_failed()

The battery (per layer and activation dtype): random inputs at every batch size in ``batches``
(1 … 256), all-zero inputs (output must be exactly 0), one-hot rows (row j isolates input
column j, so the outputs are the kernel's effective weight Ŵ'[:, j]), large magnitudes, and
NaN/Inf in single entries (the non-finite pattern must match IEEE propagation through Ŵ).
Without a ``layer`` it runs on validate.kernel_layers' deployment battery (263x4096 at groups
32, 64, 128 and per-channel, plus a small odd-shaped layer).

Tolerance: validate.kernel_precision's model of a correct kernel (fp32-or-wider accumulation of
inputs rounded to the activation dtype, the output rounded once); docs/VALIDATION.md has the
derivation and the measured margins.

A kernel's exception fails its check, with the traceback's last line. Only an explicit refusal
skips: ``NotImplementedError``, or a dtype left out of the kernel's declared
``supported_dtypes`` attribute; a run in which every check was skipped fails
(``kernel.coverage``).

When a probe fails, validate.kernel_diagnosis names the mistake of the catalogue that
reproduces every wrong entry, or says plainly that none does and where the output is wrong.
"""

from __future__ import annotations

import traceback
from typing import Any, Callable, Sequence

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer

from .adapters import as_array
from .kernel_diagnosis import diagnose_input, diagnose_weight, locate_batch_rows, ranges
from .kernel_layers import default_layers, random_layer  # noqa: F401  (public here since the first version)
from .kernel_precision import UNIT_ROUNDOFF, Expected, error_bound, output_error
from .report import FAIL, INFO, PASS, SKIP, Report

DTYPES = ("float32", "float16", "bfloat16")
BATCHES = (1, 2, 7, 16, 64, 256)
LARGE = {"float32": 2.0 ** 40, "float16": 2.0 ** 6, "bfloat16": 2.0 ** 40}
SIGNATURES = ("parts", "layer")
ONE_HOT_CALLS = 16  # the one-hot diagnosis uses batches of at least in / this many rows

Matmul = Callable[..., Any]


# ----------------------------------------------------------------------------- inputs


def _cast(x: np.ndarray, dtype: str, inputs: str) -> tuple[Any, np.ndarray] | str:
    """(what the kernel receives, the same values in float64) or why it cannot be built."""
    if inputs == "torch":
        try:
            import torch
        except ImportError:
            return "inputs='torch' needs torch installed (pip install torch)"
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(getattr(torch, dtype))
        return t, t.to(torch.float64).numpy()
    if dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            return ("numpy has no bfloat16: install ml_dtypes (pip install 'decoupleq-ref[validate]'), or leave "
                    "bfloat16 out of the dtypes")
        xb = np.ascontiguousarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16)
        return xb, xb.astype(np.float64)
    xd = np.ascontiguousarray(x, dtype=dtype)
    return xd, xd.astype(np.float64)


def one_hot(first: int, rows: int, n_in: int) -> np.ndarray:
    """Rows e_first … e_(first+rows-1) of the (n_in, n_in) identity."""
    x = np.zeros((rows, n_in))
    x[np.arange(rows), first + np.arange(rows)] = 1.0
    return x


def _battery(rng: np.random.Generator, n_in: int, dtype: str,
             batches: Sequence[int]) -> list[tuple[str, int, np.ndarray]]:
    """(probe, batch, x) for the random, one-hot, zeros, large and non-finite probes."""
    probes = [("random", bsz, rng.standard_normal((bsz, n_in))) for bsz in batches]
    probes.append(("one_hot", min(n_in, 256), one_hot(0, min(n_in, 256), n_in)))
    probes.append(("zeros", 3, np.zeros((3, n_in))))
    probes.append(("large", 4, rng.standard_normal((4, n_in)) * LARGE[dtype]))
    x = rng.standard_normal((4, n_in))
    x[0, 0], x[1, min(1, n_in - 1)], x[2, n_in - 1] = np.nan, np.inf, -np.inf
    probes.append(("nonfinite", 4, x))
    return probes


# ----------------------------------------------------------------------------- reference


def expected(layer: PackedLayer, signature: Any = "layer") -> Expected:
    """What a correct kernel applies (with signature "parts" the fp16 branch is not expected)."""
    out, n_in = layer.shape
    g = effective_group_size(n_in, layer.group_size)
    q = layer.codes()
    s32, z32 = np.repeat(layer.scale.astype(np.float32), g, axis=1), np.repeat(layer.zero.astype(np.float32), g, axis=1)
    S, Z = s32.astype(np.float64), z32.astype(np.float64)
    W, M = S * q + Z, np.abs(S) * q + np.abs(Z)
    W32 = (s32 * q.astype(np.float32) + z32).astype(np.float64)
    if layer.hp_channels and signature != "parts":
        B = layer.hp_weight.astype(np.float64)
        W[:, layer.hp_index] += B
        M[:, layer.hp_index] += np.abs(B)
        return Expected(W, M, W32, layer.hp_index, B)
    return Expected(W, M, W32)


def _call(fn: Matmul, x: Any, layer: PackedLayer, signature: str | Callable) -> np.ndarray:
    if callable(signature):
        y = signature(fn, x, layer)
    elif signature == "layer":
        y = fn(x, layer)
    else:
        y = fn(x, layer.packed, layer.scale, layer.zero, layer.group_size)
    return np.asarray(as_array(y), dtype=np.float64)


def _compare(y: np.ndarray, xv: np.ndarray, exp: Expected, dtype: str) -> tuple[np.ndarray, float]:
    """(bad mask (batch, out), worst error / bound) of one kernel output."""
    err, ref = output_error(y, xv, exp, dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        bound = error_bound(xv, exp, dtype, ref)
        finite = np.isfinite(ref)
        bad = np.isfinite(y) != finite
        bad |= finite & ~(err <= bound)
        bad |= np.isnan(ref) & ~np.isnan(y)  # NaN in x must stay NaN
        ratio = np.where(finite & np.isfinite(y), err / bound, 0.0)
    return bad, float(ratio.max()) if ratio.size else 0.0


def _where(e: BaseException) -> str:
    """'Type: message (file:line in function)' of the innermost frame: the traceback's last line."""
    tb = traceback.extract_tb(e.__traceback__)
    at = f" ({tb[-1].filename}:{tb[-1].lineno} in {tb[-1].name})" if tb else ""
    return f"{type(e).__name__}: {e}{at}"


# ----------------------------------------------------------------------------- diagnosis


def effective_weight(fn: Matmul, layer: PackedLayer, signature: str | Callable = "parts", dtype: str = "float32",
                     chunk: int = 256, inputs: str = "numpy") -> np.ndarray:
    """The weight (out, in) the kernel applies, measured with one-hot rows: y(e_j) = Ŵ'[:, j]."""
    out, n_in = layer.shape
    chunk = max(1, chunk)
    cols = []
    for j0 in range(0, n_in, chunk):
        cast = _cast(one_hot(j0, min(chunk, n_in - j0), n_in), dtype, inputs)
        if isinstance(cast, str):
            raise ValueError(f"dtype: {cast}")
        cols.append(_call(fn, cast[0], layer, signature))
    return np.concatenate(cols, axis=0).T


# ----------------------------------------------------------------------------- entry point


def check_kernel(
    matmul_fn: Matmul,
    layer: PackedLayer | Sequence[tuple[str, PackedLayer]] | None = None,
    *,
    signature: str | Callable = "parts",
    dtypes: Sequence[str] = DTYPES,
    batches: Sequence[int] = BATCHES,
    inputs: str = "numpy",
    seed: int = 0,
    diagnose_failures: bool = True,
    name: str = "",
    dense: np.ndarray | None = None,
) -> Report:
    """Run ``matmul_fn`` on the input battery for ``layer`` (default: ``default_layers()``) and
    compare with the float64 reference; returns a Report (see the module doc).

    layer      one PackedLayer, a list of (name, PackedLayer), or None for the deployment battery

    signature  "parts": fn(x, packed, scale, zero, group_size) -> y (the packed part only, the
               fp16 branch is not expected); "layer": fn(x, PackedLayer) -> y (branch included);
               or a callable adapter(fn, x, layer) -> y for any other signature
    dtypes     activation dtypes to try; the kernel may refuse one by raising NotImplementedError
               or by a ``supported_dtypes`` attribute (skipped); any other exception fails
    inputs     "numpy" arrays (bfloat16 through ml_dtypes) or "torch" tensors; a dtype that cannot
               be built fails with the fix
    dense      the layer's unquantized weights (out, in), when known: a kernel that multiplies by
               them instead of the packed ones is named (``defect.dense_weights``)
    """
    if not callable(signature) and signature not in SIGNATURES:
        raise ValueError(f"signature: {signature!r} is not one of {SIGNATURES} or a callable adapter(fn, x, layer)")
    if inputs not in ("numpy", "torch"):
        raise ValueError(f"inputs: {inputs!r} must be 'numpy' or 'torch'")
    bad_dt = [d for d in dtypes if d not in DTYPES]
    if bad_dt or not dtypes:
        raise ValueError(f"dtypes: unknown {bad_dt or 'empty list'}; choose from {DTYPES}")
    if not batches or any(int(b) < 1 for b in batches):
        raise ValueError(f"batches: batch sizes must be >= 1, got {list(batches)}")
    if layer is None:
        layers = default_layers(hp=signature == "layer")
    else:
        layers = [("layer", layer)] if isinstance(layer, PackedLayer) else list(layer)
    if dense is not None:
        dense = np.asarray(dense, dtype=np.float64)
        if len(layers) != 1 or dense.shape != layers[0][1].shape:
            raise ValueError(f"dense: the unquantized weights {dense.shape} must come with one layer of that shape "
                             f"(got {[lay.shape for _, lay in layers]})")
    rep = Report(case=name or getattr(matmul_fn, "__qualname__", "kernel"),
                 meta={"signature": signature if isinstance(signature, str) else "adapter",
                       "layers": [f"{n}: {lay.shape} b{lay.bits} g{lay.group_size}" for n, lay in layers]})
    declared = getattr(matmul_fn, "supported_dtypes", None)
    for lname, lay in layers:
        _check_layer(rep, matmul_fn, lname, lay, signature, dtypes, batches, inputs, seed, diagnose_failures,
                     declared, dense)
    ran = [f for f in rep.findings if f.status in (PASS, FAIL)]
    if not ran:
        why = sorted({f.message for f in rep.findings if f.status == SKIP})
        rep.add("kernel.coverage", FAIL, "every check was skipped, so nothing was verified: " + "; ".join(why))
    return rep


def _check_layer(rep: Report, fn: Matmul, lname: str, layer: PackedLayer, signature: Any, dtypes: Sequence[str],
                 batches: Sequence[int], inputs: str, seed: int, diagnose_failures: bool,
                 declared: Sequence[str] | None, dense: np.ndarray | None) -> None:
    out, n_in = layer.shape
    exp = expected(layer, signature)
    first_fail: tuple[str, int, np.ndarray, np.ndarray | None, np.ndarray | None] | None = None
    for dtype in dtypes:
        if declared is not None and dtype not in declared:
            rep.add(f"kernel.{lname}.{dtype}", SKIP, f"the kernel declares supported_dtypes = {tuple(declared)}")
            continue
        probes = _battery(np.random.default_rng(seed), n_in, dtype, batches)
        crashes: dict[str, list] = {}  # one finding per distinct error, counting the probes it hit
        for k, (probe, bsz, x) in enumerate(probes):
            check = f"kernel.{lname}.{dtype}.{probe}" + (f".b{bsz}" if probe == "random" else "")
            cast = _cast(x, dtype, inputs)
            if isinstance(cast, str):
                rep.add(f"kernel.{lname}.{dtype}", FAIL, f"cannot test {dtype} activations: {cast}")
                break
            xk, xv = cast
            try:
                y = _call(fn, xk, layer, signature)
            except NotImplementedError as e:
                if k == 0:
                    rep.add(f"kernel.{lname}.{dtype}", SKIP, f"the kernel refuses {dtype} activations ({_where(e)})")
                    break
                rep.add(check, SKIP, f"the kernel refuses {probe} input, batch {bsz} ({_where(e)})")
                continue
            except Exception as e:  # noqa: BLE001 - a kernel's crash is a failure of the kernel
                why = _where(e)
                if why in crashes:
                    crashes[why][1] += 1
                    f = crashes[why][0]
                    f.message = f.message.split(" [and ")[0] + f" [and {crashes[why][1]} more probes of {dtype}]"
                else:
                    crashes[why] = [rep.add(check, FAIL, f"kernel raised on {probe} input, batch {bsz}, {dtype}: "
                                            f"{why}"), 0]
                first_fail = first_fail or (dtype, bsz, xv, None, None)
                continue
            if y.shape != (bsz, out):
                hint = " (transposed: return (batch, out))" if y.shape == (out, bsz) else ""
                rep.add(check, FAIL, f"output shape {y.shape}, expected {(bsz, out)} = (batch, out){hint}")
                first_fail = first_fail or (dtype, bsz, xv, None, None)
                continue
            bad, worst = _compare(y, xv, exp, dtype)
            if bad.any():
                with np.errstate(invalid="ignore", over="ignore"):
                    pattern = bool((np.isfinite(y) != np.isfinite(xv @ exp.W.T)).any())
                rep.add(check, FAIL, f"{int(bad.sum())} of {bad.size} outputs outside the precision model "
                        f"(worst {worst:.3g}x the bound) in output channels {ranges(np.nonzero(bad.any(axis=0))[0])}, "
                        f"batch rows {ranges(np.nonzero(bad.any(axis=1))[0])}"
                        + ("; the NaN/Inf pattern differs from IEEE propagation through Ŵ" if pattern else ""),
                        rows=np.nonzero(bad.any(axis=0))[0].tolist(), value=worst, limit=1.0)
                if first_fail is None or (probe == "random" and first_fail[3] is None):
                    first_fail = (dtype, bsz, xv, y if probe == "random" else None, bad)
            else:
                rep.add(check, PASS, f"{bsz}x{n_in} {probe} within the precision model (worst {worst:.2g}x the bound)",
                        value=worst, limit=1.0)
    if first_fail and diagnose_failures:
        _diagnose(rep, fn, lname, layer, exp, signature, inputs, first_fail, dense)


def _diagnose(rep: Report, fn: Matmul, lname: str, layer: PackedLayer, exp: Expected, signature: Any, inputs: str,
              fail: tuple, dense: np.ndarray | None) -> None:
    """Activation-side mistakes on the failing probe first (a one-hot probe would misread them),
    then the effective weight against the catalogue."""
    dtype, bsz, xv, y, bad = fail
    if y is not None and diagnose_input(rep, xv, y, exp, dtype):
        return
    if y is not None and not bad.any(axis=1).all():
        locate_batch_rows(rep, bad)  # some batch rows are right, so the weights are read right
        return
    n_in = layer.shape[1]
    chunk = max(bsz, -(-n_in // ONE_HOT_CALLS))
    try:
        W_eff = effective_weight(fn, layer, signature, dtype, chunk=chunk, inputs=inputs)
    except Exception as e:  # noqa: BLE001
        rep.add(f"kernel.{lname}.diagnosis", INFO, f"one-hot probe failed ({_where(e)})")
        return
    if W_eff.shape != layer.shape:
        rep.add(f"kernel.{lname}.diagnosis", INFO, f"one-hot probe gave an effective weight of shape {W_eff.shape}, "
                f"not {layer.shape}")
        return
    if diagnose_weight(rep, W_eff, layer, exp, dtype, dense) is None:
        if bad is not None:
            locate_batch_rows(rep, bad)
        else:
            rep.add("kernel.diagnosis", INFO, "the one-hot probe matches Ŵ: the failure depends on the input "
                    "(batch size, magnitude or non-finite handling), not on the weight layout")


def unit_roundoff(dtype: str) -> float:
    """u of an activation dtype (fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸)."""
    return UNIT_ROUNDOFF[dtype]
