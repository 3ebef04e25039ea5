"""check_kernel: does a deployed packed matmul compute x @ Ŵᵀ for this project's format? If not, why?

    from validate import kernel
    rep = kernel.check_kernel(my_matmul)                 # fn(x, packed, scale, zero, group_size) -> y
    rep = kernel.check_kernel(dq.matmul, signature="layer")   # fn(x, PackedLayer) -> y
    print(rep); rep.raise_if_failed()

The battery (per layer and activation dtype): random inputs at every batch size in ``batches``
(1 … 256), all-zero inputs (output must be exactly 0), one-hot rows (row j isolates input
column j, so the outputs are the kernel's effective weight Ŵ'[:, j]), large magnitudes, and
NaN/Inf in single entries (the non-finite pattern must match IEEE propagation through Ŵ).
Without a ``layer`` it runs on built-in layers: an aligned one, an odd-shaped one (rows padded
to 32-bit words) and a per-channel one, with random codes covering every value.

Tolerance (docs/VALIDATION.md): the reference is float64 on the very values the kernel received
(x after the cast to its dtype, scale and zero as stored), and an output passes when

    |y − y_ref| ≤ rtol(dtype) · (|x| @ Mᵀ) + tiny,   M = |s|·q + |z| (+ |B|),
    rtol(dtype) = 8·u(dtype) + 2·in·u(float32)

u = unit roundoff (fp32 2⁻²⁴, fp16 2⁻¹¹, bf16 2⁻⁸): the kernel may round x, Ŵ and y to its
dtype and accumulate ``in`` products in fp32; M makes cancellation in s·q + z harmless. Any
layout mistake moves outputs by O(|y|), orders of magnitude above this bound.

When a probe fails, the one-hot probe (at the failing dtype and batch size) gives the kernel's
effective weight; the mismatching entries are located (output channels, (row, group) pairs)
and every mistake of validate.layout is tried: the one whose Ŵ' matches all entries is named
(``defect.<name>`` hint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from decoupleq_ref.format import effective_group_size
from decoupleq_ref.matmul import PackedLayer
from decoupleq_ref.packing import pack

from .adapters import as_array
from .layout import layout_mistakes
from .report import FAIL, HINT, INFO, PASS, SKIP, Report, list_groups, list_rows, nonzero_rows

UNIT_ROUNDOFF = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}
DTYPES = ("float32", "float16", "bfloat16")
BATCHES = (1, 2, 7, 16, 64, 256)
LARGE = {"float32": 2.0 ** 40, "float16": 2.0 ** 6, "bfloat16": 2.0 ** 40}
SIGNATURES = ("parts", "layer")

Matmul = Callable[..., Any]


def rtol_for(dtype: str, n_in: int) -> float:
    """8·u(dtype) + 2·in·u(fp32): rounding of x, Ŵ, y to dtype and an fp32 accumulation."""
    return 8 * UNIT_ROUNDOFF[dtype] + 2 * n_in * UNIT_ROUNDOFF["float32"]


# ----------------------------------------------------------------------------- layers


def random_layer(out: int, n_in: int, bits: int = 2, group_size: int = 64, seed: int = 0,
                 hp_channels: int = 0) -> PackedLayer:
    """A PackedLayer with uniform random codes (every value used), distinct positive scales and
    signed zeros per group (so a mis-assigned group is visible), optional fp16 branch."""
    rng = np.random.default_rng(seed)
    g = effective_group_size(n_in, group_size)
    G = n_in // g
    q = rng.integers(0, 1 << bits, size=(out, n_in), dtype=np.uint8)
    q[:, 0], q[:, -1] = 0, (1 << bits) - 1
    scale = (0.01 * rng.uniform(0.5, 1.5, size=(out, G))).astype(np.float32)
    zero = (-scale * ((1 << bits) - 1) / 2 + 0.005 * rng.standard_normal((out, G))).astype(np.float32)
    branch: tuple[Any, Any] = (None, None)
    if hp_channels:
        idx = np.sort(rng.choice(n_in, size=hp_channels, replace=False)).astype(np.int32)
        branch = (idx, (0.05 * rng.standard_normal((out, hp_channels))).astype(np.float16))
    return PackedLayer(pack(q, bits), scale, zero, bits, group_size, (out, n_in), *branch)


def default_layers(bits: int = 2, hp: bool = False) -> list[tuple[str, PackedLayer]]:
    """Aligned (64x256, g64), odd (7x40, g8: rows padded to a 32-bit word) and per-channel
    (5x48) layers; with ``hp`` also one with a 3-column fp16 branch."""
    layers = [("aligned_64x256_g64", random_layer(64, 256, bits, 64, seed=1)),
              ("odd_7x40_g8", random_layer(7, 40, bits, 8, seed=2)),
              ("per_channel_5x48", random_layer(5, 48, bits, -1, seed=3))]
    if hp:
        layers.append(("hp3_12x64_g32", random_layer(12, 64, bits, 32, seed=4, hp_channels=3)))
    return layers


# ----------------------------------------------------------------------------- inputs


def _cast(x: np.ndarray, dtype: str, inputs: str) -> tuple[Any, np.ndarray] | str:
    """(what the kernel receives, the same values in float64) or the reason it cannot be built."""
    if inputs == "torch" or dtype == "bfloat16":
        try:
            import torch
        except ImportError:
            if dtype != "bfloat16":
                return "inputs='torch' needs torch installed"
            torch = None
        if torch is not None:
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(getattr(torch, dtype))
            vals = t.to(torch.float64).numpy()
            if inputs == "torch":
                return t, vals
            if dtype == "bfloat16":
                try:
                    import ml_dtypes  # noqa: F401  (numpy bfloat16)
                except ImportError:
                    return ("numpy has no bfloat16: install ml_dtypes, or pass inputs='torch' if the kernel "
                            "takes torch tensors")
                return vals.astype(ml_dtypes.bfloat16), vals
        elif dtype == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                return "bfloat16 needs torch or ml_dtypes installed"
            xb = x.astype(ml_dtypes.bfloat16)
            return xb, xb.astype(np.float64)
    xd = np.ascontiguousarray(x, dtype=dtype)
    return xd, xd.astype(np.float64)


def _battery(rng: np.random.Generator, n_in: int, dtype: str, batches: Sequence[int]) -> list[tuple[str, int, np.ndarray]]:
    """(probe, batch, x) for the random, zeros, large and non-finite probes."""
    probes = [("random", bsz, rng.standard_normal((bsz, n_in))) for bsz in batches]
    probes.append(("zeros", 3, np.zeros((3, n_in))))
    probes.append(("large", 4, rng.standard_normal((4, n_in)) * LARGE[dtype]))
    x = rng.standard_normal((4, n_in))
    x[0, 0], x[1, min(1, n_in - 1)], x[2, n_in - 1] = np.nan, np.inf, -np.inf
    probes.append(("nonfinite", 4, x))
    return probes


# ----------------------------------------------------------------------------- reference


@dataclass
class _Expected:
    W: np.ndarray   # the weight a correct kernel applies (out, in), float64
    M: np.ndarray   # magnitude for the error bound: |s|·q + |z| (+ |B|)


def _expected(layer: PackedLayer, signature: str) -> _Expected:
    out, n_in = layer.shape
    g = effective_group_size(n_in, layer.group_size)
    q = layer.codes().astype(np.float64)
    S = np.repeat(layer.scale.astype(np.float64), g, axis=1)
    Z = np.repeat(layer.zero.astype(np.float64), g, axis=1)
    W, M = S * q + Z, np.abs(S) * q + np.abs(Z)
    if layer.hp_channels and signature != "parts":
        B = layer.hp_weight.astype(np.float64)
        W[:, layer.hp_index] += B
        M[:, layer.hp_index] += np.abs(B)
    return _Expected(W, M)


def _call(fn: Matmul, x: Any, layer: PackedLayer, signature: str | Callable) -> np.ndarray:
    if callable(signature):
        y = signature(fn, x, layer)
    elif signature == "layer":
        y = fn(x, layer)
    else:
        y = fn(x, layer.packed, layer.scale, layer.zero, layer.group_size)
    return np.asarray(as_array(y), dtype=np.float64)


def _compare(y: np.ndarray, xv: np.ndarray, exp: _Expected, rtol: float) -> tuple[np.ndarray, float]:
    """(bad mask (batch, out), worst error / bound) of one kernel output."""
    with np.errstate(invalid="ignore", over="ignore"):
        ref = xv @ exp.W.T
        bound = rtol * (np.abs(xv) @ exp.M.T) + 1e-300
        finite = np.isfinite(ref)
        bad = np.isfinite(y) != finite
        bad |= finite & ~(np.abs(y - ref) <= bound)
        bad |= np.isnan(ref) & ~np.isnan(y)  # NaN in x must stay NaN
        err = np.where(finite & np.isfinite(y), np.abs(y - ref) / bound, 0.0)
    worst = float(err.max()) if err.size else 0.0
    return bad, worst


# ----------------------------------------------------------------------------- diagnosis


def effective_weight(fn: Matmul, layer: PackedLayer, signature: str | Callable = "parts", dtype: str = "float32",
                     chunk: int = 256, inputs: str = "numpy") -> np.ndarray:
    """The weight (out, in) the kernel applies, measured with one-hot rows: y(e_j) = Ŵ'[:, j]."""
    out, n_in = layer.shape
    cols = []
    for j0 in range(0, n_in, max(1, chunk)):
        eye = np.eye(n_in)[j0:j0 + max(1, chunk)]
        cast = _cast(eye, dtype, inputs)
        if isinstance(cast, str):
            raise ValueError(f"dtype: {cast}")
        cols.append(_call(fn, cast[0], layer, signature))
    return np.concatenate(cols, axis=0).T


def diagnose(rep: Report, W_eff: np.ndarray, layer: PackedLayer, exp: _Expected, rtol: float) -> list[str]:
    """Locate the mismatching entries of W_eff and name the layout mistake that explains them."""
    out, n_in = layer.shape
    g = effective_group_size(n_in, layer.group_size)
    tol = rtol * exp.M + 1e-300
    with np.errstate(invalid="ignore"):
        wrong = ~(np.abs(W_eff - exp.W) <= tol)
    if not wrong.any():
        rep.add("kernel.locate", INFO, "the one-hot probe matches Ŵ: the failure depends on the input "
                "(batch size, magnitude or non-finite handling), not on the weight layout")
        return []
    rows = nonzero_rows(wrong)
    pairs = sorted({(int(r), int(c) // g) for r, c in zip(*np.nonzero(wrong))})
    cols = np.nonzero(wrong.any(axis=0))[0].tolist()
    rep.add("kernel.locate", INFO, f"effective weight differs from Ŵ at {int(wrong.sum())} of {wrong.size} entries: "
            f"output channels {list_rows(rows)[5:]}, input groups {list_groups(pairs)[13:]} "
            f"({len(cols)} of {n_in} input columns: {list_rows(cols)[5:]})", rows=rows, groups=pairs)
    named: list[str] = []
    best: tuple[float, str] = (0.0, "")
    for m in layout_mistakes(layer):
        with np.errstate(invalid="ignore"):
            ok = np.abs(W_eff - m.W) <= rtol * (exp.M + np.abs(m.W)) + 1e-300
        if ok.all():
            if m.name not in named:
                named.append(m.name)
                rep.add(f"defect.{m.name}", HINT, m.description, rows=rows, groups=pairs)
        else:
            frac = float(ok[wrong].mean())
            best = max(best, (frac, m.name))
    if not named:
        extra = f"; closest: {best[1]} explains {best[0]:.0%} of the wrong entries" if best[1] else ""
        rep.add("kernel.diagnosis", INFO, f"no listed layout mistake explains the output{extra}")
    elif len(named) > 1:
        rep.add("kernel.diagnosis", INFO, f"{len(named)} mistakes give identical weights on this layer "
                f"({', '.join(named)}): a layer with more groups or columns separates them")
    return named


# ----------------------------------------------------------------------------- entry point


def check_kernel(
    matmul_fn: Matmul,
    layer: PackedLayer | None = None,
    *,
    signature: str | Callable = "parts",
    dtypes: Sequence[str] = DTYPES,
    batches: Sequence[int] = BATCHES,
    inputs: str = "numpy",
    seed: int = 0,
    diagnose_failures: bool = True,
    name: str = "",
) -> Report:
    """Run ``matmul_fn`` on the input battery for ``layer`` (default: ``default_layers()``) and
    compare with the float64 reference; returns a Report (see the module doc).

    signature  "parts": fn(x, packed, scale, zero, group_size) -> y (the packed part only, the
               fp16 branch is not expected); "layer": fn(x, PackedLayer) -> y (branch included);
               or a callable adapter(fn, x, layer) -> y for any other signature
    dtypes     activation dtypes to try; a dtype the kernel rejects (raises) is skipped with the
               reason, except float32, whose rejection fails
    inputs     "numpy" arrays or "torch" tensors (bfloat16 always goes through torch, or
               ml_dtypes for numpy kernels; skipped with the reason when neither is installed)
    """
    if not callable(signature) and signature not in SIGNATURES:
        raise ValueError(f"signature: {signature!r} is not one of {SIGNATURES} or a callable adapter(fn, x, layer)")
    if inputs not in ("numpy", "torch"):
        raise ValueError(f"inputs: {inputs!r} must be 'numpy' or 'torch'")
    bad_dt = [d for d in dtypes if d not in DTYPES]
    if bad_dt:
        raise ValueError(f"dtypes: unknown {bad_dt}; choose from {DTYPES}")
    if any(int(b) < 1 for b in batches):
        raise ValueError(f"batches: batch sizes must be >= 1, got {list(batches)}")
    layers = [("layer", layer)] if layer is not None else default_layers(hp=signature == "layer")
    rep = Report(case=name or getattr(matmul_fn, "__qualname__", "kernel"),
                 meta={"signature": signature if isinstance(signature, str) else "adapter",
                       "layers": [f"{n}: {lay.shape} b{lay.bits} g{lay.group_size}" for n, lay in layers]})
    for lname, lay in layers:
        _check_layer(rep, matmul_fn, lname, lay, signature, dtypes, batches, inputs, seed, diagnose_failures)
    return rep


def _check_layer(rep: Report, fn: Matmul, lname: str, layer: PackedLayer, signature: Any, dtypes: Sequence[str],
                 batches: Sequence[int], inputs: str, seed: int, diagnose_failures: bool) -> None:
    out, n_in = layer.shape
    exp = _expected(layer, signature)
    first_fail: tuple[str, int] | None = None
    for dtype in dtypes:
        rtol = rtol_for(dtype, n_in)
        rng = np.random.default_rng(seed)
        probes = _battery(rng, n_in, dtype, batches)
        probes.insert(len(batches), ("one_hot", min(n_in, 256), np.eye(n_in)[:256]))
        for probe, bsz, x in probes:
            check = f"kernel.{lname}.{dtype}.{probe}" + (f".b{bsz}" if probe == "random" else "")
            cast = _cast(x, dtype, inputs)
            if isinstance(cast, str):
                rep.add(f"kernel.{lname}.{dtype}", SKIP, cast)
                break
            xk, xv = cast
            try:
                y = _call(fn, xk, layer, signature)
            except Exception as e:  # noqa: BLE001 - a kernel's exception is a finding
                why = f"{type(e).__name__}: {e}"
                if dtype != "float32" and probe == "random":
                    rep.add(f"kernel.{lname}.{dtype}", SKIP, f"kernel rejects {dtype} activations ({why})")
                    break
                rep.add(check, FAIL, f"kernel raised {why} on {probe} input, batch {bsz}, {dtype}")
                continue
            if y.shape != (bsz, out):
                hint = " (transposed: return (batch, out))" if y.shape == (out, bsz) else ""
                rep.add(check, FAIL, f"output shape {y.shape}, expected {(bsz, out)} = (batch, out){hint}")
                first_fail = first_fail or (dtype, bsz)
                continue
            bad, worst = _compare(y, xv, exp, rtol)
            if bad.any():
                chans = nonzero_rows(bad.T)
                with np.errstate(invalid="ignore", over="ignore"):
                    pattern = bool((np.isfinite(y) != np.isfinite(xv @ exp.W.T)).any())
                rep.add(check, FAIL, f"{int(bad.sum())} of {bad.size} outputs outside the tolerance "
                        f"(rtol {rtol:.2g}; worst {worst:.3g}x the bound) in output channels {list_rows(chans)[5:]}"
                        + ("; the NaN/Inf pattern differs from IEEE propagation through Ŵ" if pattern else ""),
                        rows=chans, value=worst, limit=1.0)
                first_fail = first_fail or (dtype, bsz)
            else:
                rep.add(check, PASS, f"{bsz}x{n_in} {probe} within rtol {rtol:.2g} (worst {worst:.2g}x the bound)",
                        value=worst, limit=1.0)
    if first_fail and diagnose_failures:
        dtype, bsz = first_fail
        try:
            W_eff = effective_weight(fn, layer, signature, dtype, chunk=bsz, inputs=inputs)
        except Exception as e:  # noqa: BLE001
            rep.add(f"kernel.{lname}.diagnosis", INFO, f"one-hot probe failed ({type(e).__name__}: {e})")
            return
        diagnose(rep, W_eff, layer, exp, rtol_for(dtype, n_in))
