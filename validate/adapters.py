"""Conventions other decoupleQ / GPTQ implementations use, and how to load an implementation.

This project's (``native``) convention, docs/FORMAT.md::

    q      integer codes in [0, 2^b − 1], shape (out, in)
    scale  (out, G), zero (out, G), Ŵ[i, j] = scale[i, j // g] · q[i, j] + zero[i, j // g]

Other conventions are converted to it before any check runs (``to_native``); combine them with
commas, e.g. ``"zero_point,transposed"``:

``signed``      codes in [−2^(b−1), 2^(b−1) − 1] with Ŵ = s·q + z, as in the official decoupleQ
                code (its ``w_int`` is int8); symmetric results may omit ``zero`` (Ŵ = s·q).
                Native: q + 2^(b−1), zero = z − s·2^(b−1).
``transposed``  scale and zero stored (G, out) instead of (out, G) (GPTQ/AutoGPTQ ``scales``).
``zero_point``  Ŵ = s·(q − zp) with an integer (or float) zero-point zp (GPTQ style).
                Native: zero = −zp·s.

An adapter never repairs a malformed result: an array whose shape does not fit the convention
is passed on unchanged so that ``check_result`` reports it.

An external implementation is a callable ``fn(W, H, config: dict) -> mapping`` with keys
``q``, ``scale``, ``zero`` and optionally ``loss``, ``row_loss``, ``objective`` and the fp16
branch ``hp_index`` (k,), ``hp_weight`` (out, k) (docs/FORMAT.md; Ŵ[:, hp_index] += hp_weight,
in every convention). ``W`` and ``H``
are float64 NumPy arrays (fresh copies), ``config`` is ``QuantConfig.to_dict()``. Attributes
(a ``QuantResult``) work as well as keys; torch tensors are converted with ``.detach().cpu()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from decoupleq_ref.config import QuantConfig
from decoupleq_ref.format import dequantize_parts

CONVENTIONS: dict[str, str] = {
    "native": "q in [0, 2^b-1], scale/zero (out, G), W_hat = scale*q + zero (this project)",
    "signed": "q in [-2^(b-1), 2^(b-1)-1], W_hat = scale*q + zero (official decoupleQ code)",
    "transposed": "scale/zero stored (G, out) instead of (out, G)",
    "zero_point": "W_hat = scale*(q - zp), zp an integer zero-point in the 'zero' slot (GPTQ style)",
}

RESULT_KEYS = ("q", "scale", "zero", "hp_index", "hp_weight", "loss", "row_loss", "objective")

Impl = Callable[[np.ndarray, np.ndarray, dict], Any]


#: Names the CLI accepts (``--convention``) for combinations of the conventions above.
ALIASES: dict[str, str] = {"ours": "native", "official": "signed", "gptq": "zero_point"}


def parse_convention(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"signed,transposed"`` -> ("signed", "transposed"); "native"/"ours"/None/"" -> ().
    The ALIASES are accepted: ``official`` (signed codes, the official decoupleQ code), ``gptq``
    (integer zero-point; add ``,transposed`` for (G, out) tensors as AutoGPTQ stores them)."""
    if spec is None:
        return ()
    parts = [ALIASES.get(p.strip(), p.strip()) for p in (spec.split(",") if isinstance(spec, str) else spec)]
    parts = [p for p in parts if p and p != "native"]
    bad = [p for p in parts if p not in CONVENTIONS]
    if bad:
        raise ValueError(f"convention: unknown {bad}; choose from {sorted(CONVENTIONS)} or {sorted(ALIASES)} "
                         "(comma-separated)")
    return tuple(dict.fromkeys(parts))


def as_array(x: Any) -> Any:
    """NumPy view of x (torch/cupy tensors included); None and scalars pass through."""
    if x is None or isinstance(x, (int, float, np.floating, np.integer)):
        return x
    if hasattr(x, "detach"):  # torch; numpy has no bfloat16, so those become float32 (exact)
        x = x.detach().cpu()
        x = (x.float() if str(x.dtype) == "torch.bfloat16" else x).numpy()
    elif hasattr(x, "get") and not isinstance(x, Mapping):  # cupy
        x = x.get()
    return np.asarray(x)


def result_mapping(obj: Any) -> dict[str, Any]:
    """{q, scale, zero[, loss, row_loss, objective]} from a mapping or an object with attributes.

    Missing keys are left out (so the checks can say which one is missing)."""
    out: dict[str, Any] = {}
    for k in RESULT_KEYS:
        if isinstance(obj, Mapping):
            v = obj.get(k)
        else:
            v = getattr(obj, k, None)
        if v is not None:
            out[k] = as_array(v)
    return out


def branch_of(r: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray] | None:
    """(hp_index as int64, hp_weight as float64) of a result mapping, or None without a branch."""
    if r.get("hp_index") is None or r.get("hp_weight") is None:
        return None
    return np.asarray(r["hp_index"]).astype(np.int64), np.asarray(r["hp_weight"], dtype=np.float64)


def w_hat(r: Mapping[str, Any], branch: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Ŵ = s·q + z (float64), plus the fp16 branch B on its columns: of a native result mapping,
    or of explicit (q, scale, zero) with ``branch`` given separately."""
    W_hat = dequantize_parts(*(np.asarray(r[k], dtype=np.float64) for k in ("q", "scale", "zero")))
    br = branch if branch is not None else branch_of(r)
    if br is not None:
        W_hat[:, br[0]] += br[1]
    return W_hat


def _bits(config: QuantConfig | Mapping[str, Any]) -> tuple[int, bool]:
    if isinstance(config, QuantConfig):
        return config.bits, config.symmetric
    return int(config.get("bits", 2)), bool(config.get("symmetric", False))


def to_native(result: Any, config: QuantConfig | Mapping[str, Any],
              convention: str | Iterable[str] | None = None) -> dict[str, Any]:
    """Convert an implementation's result to this project's convention (see module doc)."""
    conv = parse_convention(convention)
    bits, symmetric = _bits(config)
    r = result_mapping(result)
    if "transposed" in conv:
        for k in ("scale", "zero"):
            v = r.get(k)
            if isinstance(v, np.ndarray) and v.ndim == 2:
                r[k] = np.ascontiguousarray(v.T)
    if "zero_point" in conv:
        s, zp = r.get("scale"), r.get("zero")
        if isinstance(s, np.ndarray) and isinstance(zp, np.ndarray) and s.shape == zp.shape:
            r["zero"] = -zp.astype(np.float64) * s.astype(np.float64)
    if "signed" in conv:
        half = 1 << (bits - 1)
        q, s = r.get("q"), r.get("scale")
        if isinstance(q, np.ndarray) and q.dtype.kind in "iu":
            r["q"] = q.astype(np.int64) + half
        if isinstance(s, np.ndarray):
            z = r.get("zero")
            if z is None and symmetric:
                z = np.zeros_like(s, dtype=np.float64)
            if isinstance(z, np.ndarray) and z.shape == s.shape:
                r["zero"] = z.astype(np.float64) - s.astype(np.float64) * half
    if "zero" not in r and symmetric and isinstance(r.get("scale"), np.ndarray):
        r["zero"] = -r["scale"].astype(np.float64) * (1 << (bits - 1))
    return r


def from_native(result: Any, config: QuantConfig | Mapping[str, Any],
                convention: str | Iterable[str] | None = None) -> dict[str, Any]:
    """The inverse of ``to_native``: express a native result in another convention.

    Used to build test implementations and to show what each convention looks like."""
    conv = parse_convention(convention)
    bits, _ = _bits(config)
    r = result_mapping(result)
    q, s, z = r["q"], r["scale"].astype(np.float64), r["zero"].astype(np.float64)
    if "signed" in conv:
        half = 1 << (bits - 1)
        q = (q.astype(np.int16) - half).astype(np.int8)
        z = z + s * half
    if "zero_point" in conv:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(s != 0, -z / np.where(s != 0, s, 1.0), 0.0)
    if "transposed" in conv:
        s, z = s.T.copy(), z.T.copy()
    r.update(q=q, scale=s, zero=z)
    return r


# ----------------------------------------------------------------------------- implementations


def reference_impl(W: np.ndarray, H: np.ndarray, config: Mapping[str, Any]) -> dict[str, Any]:
    """The reference solver behind the external-implementation protocol: a correct wrapper.

    ``decoupleq validate --impl validate.adapters:reference_impl`` passes the whole suite."""
    from decoupleq_ref import quantize_layer

    res = quantize_layer(W, H, QuantConfig.from_dict(dict(config)))
    return {"q": res.q, "scale": res.scale, "zero": res.zero, "loss": res.loss,
            "row_loss": res.row_loss, "objective": res.objective,
            "hp_index": res.hp_index, "hp_weight": res.hp_weight}


def solver_impl(solve: Callable[[np.ndarray, np.ndarray, QuantConfig], Any]) -> Impl:
    """Wrap a backend's ``quantize_layer(W, H, QuantConfig)`` in the external protocol."""
    def impl(W: np.ndarray, H: np.ndarray, config: Mapping[str, Any]) -> Any:
        return solve(W, H, QuantConfig.from_dict(dict(config)))
    impl.__name__ = getattr(solve, "__module__", "solver") + ".quantize_layer"
    return impl


def load_impl(spec: str) -> Impl:
    """Resolve ``package.module:function``, ``path/to/file.py:function`` or a backend name
    (``reference``, ``numba``, ``cuda``: see validate.compare.BACKENDS) to a callable
    ``fn(W, H, config: dict)``. Raises ValueError with a fix on failure."""
    from .compare import BACKENDS, backend_status, get_backend

    if ":" not in spec:
        if spec in BACKENDS or spec == "numpy":
            ok, why = backend_status(spec)
            if not ok:
                raise ValueError(f"impl: backend {spec!r} is not available here: {why}")
            return solver_impl(get_backend(spec))
        raise ValueError(f"impl: {spec!r} is not 'package.module:function', 'file.py:function' "
                         f"or a backend name {sorted(BACKENDS)}")
    mod_name, _, fn_name = spec.rpartition(":")
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.exists():
                raise ValueError(f"impl: file {path} does not exist")
            mspec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules.setdefault(path.stem, module)
            mspec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"impl: cannot import {mod_name!r}: {e}; is it installed or on PYTHONPATH?") from None
    fn = module
    for part in fn_name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"impl: {mod_name!r} has no attribute {fn_name!r}")
    if not callable(fn):
        raise ValueError(f"impl: {spec!r} is not callable")
    return fn
