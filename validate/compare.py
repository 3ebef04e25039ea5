"""Cross-backend agreement: does backend B give what backend A gives on the same inputs?

    from validate.compare import compare
    cmp = compare("reference", "numba", "default")     # suite name, Suite, cases or (W, H, cfg) tuples
    print(cmp.table()); assert cmp.ok

Per case: integer agreement (fraction of equal codes, and of rows with all codes equal), the
objective ratio B/A (loss on the damped H, recomputed from each side's q/scale/zero), and the
largest scale / zero difference on rows whose codes agree (relative to the case's largest
|scale| / |zero|; rows whose codes differ legitimately have different (s, z); groups whose
codes are all equal determine only s·q + z, which is compared there).

Backends are named in BACKENDS ("module:function" of a ``quantize_layer(W, H, QuantConfig)``);
adding one is one line. A backend whose module does not import, lacks the function, or whose
``available()`` is False is reported by ``backend_status`` with the reason, so tests can skip.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from decoupleq_ref.config import QuantConfig
from decoupleq_ref.objective import damp_hessian, row_losses

from .adapters import result_mapping, w_hat

#: name -> "module:function" of a quantize_layer(W, H, QuantConfig) -> QuantResult-like.
BACKENDS: dict[str, str] = {
    "reference": "decoupleq_ref:quantize_layer",
    "numba": "kernels_numba:quantize_layer",
    "cuda": "gpu:quantize_layer",  # numba-cuda; NUMBA_ENABLE_CUDASIM=1 runs it in the simulator
}
ALIASES = {"numpy": "reference"}

Solver = Callable[[np.ndarray, np.ndarray, QuantConfig], Any]


def backend_status(name: str) -> tuple[bool, str]:
    """(usable, reason): whether backend ``name`` can run here, and why not."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        return False, f"unknown backend {name!r}; known: {sorted(BACKENDS)}"
    mod_name, fn_name = BACKENDS[name].split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        return False, f"cannot import {mod_name}: {e}"
    if not callable(getattr(mod, fn_name, None)):
        return False, f"{mod_name} does not define {fn_name} (not implemented yet)"
    probe = getattr(mod, "available", None)
    if probe is not None:
        try:
            ok = bool(probe())
        except Exception as e:  # noqa: BLE001
            return False, f"{mod_name}.available() raised {type(e).__name__}: {e}"
        if not ok:
            why = getattr(mod, "unavailable_reason", None)
            why = why() if callable(why) else why
            return False, f"{mod_name}.available() is False" + (f": {why}" if why else "")
    return True, "available"


def get_backend(backend: str | Solver) -> Solver:
    """The quantize_layer of a named backend (ValueError with the reason if unusable), or
    ``backend`` itself if it is already a callable (W, H, QuantConfig) -> result."""
    if callable(backend):
        return backend
    ok, why = backend_status(backend)
    if not ok:
        raise ValueError(f"backend: {backend!r} is not usable here: {why}")
    mod_name, fn_name = BACKENDS[ALIASES.get(backend, backend)].split(":")
    return getattr(importlib.import_module(mod_name), fn_name)


def _name(backend: str | Solver) -> str:
    if isinstance(backend, str):
        return backend
    return f"{getattr(backend, '__module__', '?')}.{getattr(backend, '__qualname__', 'solver')}"


@dataclass(frozen=True)
class Agreement:
    """Thresholds for ``Comparison.ok``: what "the backends agree" means.

    min_agreement   fraction of equal integer codes per case
    loss_rtol       |objective_B / objective_A − 1| per case (plus energy_atol·energy)
    max_param_diff  scale/zero difference on rows with identical codes, relative to the case's
                    largest |scale| (|zero|)
    """

    min_agreement: float = 0.99
    loss_rtol: float = 1e-6
    max_param_diff: float = 1e-6
    energy_atol: float = 1e-12


@dataclass
class CaseComparison:
    name: str
    shape: tuple[int, int]
    config: QuantConfig
    agreement: float = float("nan")        # fraction of equal codes
    rows_identical: float = float("nan")   # fraction of rows with all codes equal
    objective_a: float = float("nan")
    objective_b: float = float("nan")
    loss_ratio: float = float("nan")       # objective_b / objective_a
    max_scale_diff: float = float("nan")   # on rows with identical codes, relative
    max_zero_diff: float = float("nan")
    seconds_a: float = 0.0
    seconds_b: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and not self.problems


@dataclass
class Comparison:
    a: str
    b: str
    tolerance: Agreement
    cases: list[CaseComparison]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    @property
    def failed(self) -> list[CaseComparison]:
        return [c for c in self.cases if not c.ok]

    def summary(self) -> dict[str, float]:
        ok = [c for c in self.cases if not c.error]
        if not ok:
            return {"cases": len(self.cases), "errors": len(self.cases)}
        return {"cases": len(self.cases), "errors": len(self.cases) - len(ok),
                "min_agreement": min(c.agreement for c in ok),
                "mean_agreement": float(np.mean([c.agreement for c in ok])),
                "max_abs_log_ratio": float(max(abs(np.log(c.loss_ratio)) if c.loss_ratio > 0 else 0.0 for c in ok)),
                "max_scale_diff": float(np.nanmax([c.max_scale_diff for c in ok] + [0.0])),
                "max_zero_diff": float(np.nanmax([c.max_zero_diff for c in ok] + [0.0])),
                "seconds_a": sum(c.seconds_a for c in ok), "seconds_b": sum(c.seconds_b for c in ok)}

    def table(self) -> str:
        t = self.tolerance
        lines = [f"compare {self.a} (A) vs {self.b} (B): {len(self.cases)} cases; agree = codes equal >= "
                 f"{t.min_agreement:g}, |objective ratio - 1| <= {t.loss_rtol:g}, (s, z) on equal rows <= "
                 f"{t.max_param_diff:g}",
                 f"{'case':<28} {'agree':>8} {'rows=':>6} {'B/A obj':>12} {'d scale':>9} {'d zero':>9} "
                 f"{'sec A':>6} {'sec B':>6}  status"]
        for c in self.cases:
            status = "ok" if c.ok else ("ERROR " + c.error if c.error else "; ".join(c.problems))
            lines.append(f"{c.name:<28} {c.agreement:>8.4f} {c.rows_identical:>6.2f} {c.loss_ratio:>12.9f} "
                         f"{c.max_scale_diff:>9.2e} {c.max_zero_diff:>9.2e} {c.seconds_a:>6.2f} {c.seconds_b:>6.2f}"
                         f"  {status}")
        lines.append(f"{len(self.cases) - len(self.failed)}/{len(self.cases)} cases agree")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "ok": self.ok, "tolerance": vars(self.tolerance),
                "summary": self.summary(),
                "cases": [{**{k: v for k, v in vars(c).items() if k != "config"},
                           "config": c.config.to_dict(), "ok": c.ok} for c in self.cases]}


def _iter_cases(cases: Any) -> Iterable[tuple[str, np.ndarray, np.ndarray, QuantConfig]]:
    from .conformance import Case, Suite, load_suite

    if isinstance(cases, str):
        cases = load_suite(cases)
    for k, c in enumerate(cases if isinstance(cases, (Suite, list, tuple)) else list(cases)):
        if isinstance(c, Case):
            yield c.name, c.W, c.H, c.config
        else:
            name, (W, H, cfg) = (c[0], c[1:]) if len(c) == 4 else (f"case{k}", c)
            cfg = cfg if isinstance(cfg, QuantConfig) else QuantConfig.from_dict(dict(cfg))
            yield name, np.asarray(W, dtype=np.float64), np.asarray(H, dtype=np.float64), cfg


def _rel_max(d: np.ndarray, ref: float) -> float:
    return float(d.max() / ref) if d.size else 0.0


def identifiable_diffs(q: np.ndarray, sa: np.ndarray, za: np.ndarray, sb: np.ndarray, zb: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """|Δscale|, |Δzero| per (row, group), for the same codes q on both sides. In a group whose
    codes are all equal only s·q + z is determined (any (s, z) on that line gives the same Ŵ,
    e.g. a symmetric 1-bit group of q = 1: Ŵ = s·(1 − 1) = 0 for every s): there the difference
    of s·q + z is reported in both slots instead."""
    G = sa.shape[1]
    qg = q.reshape(q.shape[0], G, -1).astype(np.float64)
    const = (qg == qg[..., :1]).all(axis=2)
    q0 = qg[..., 0]
    dw = np.abs((sa * q0 + za) - (sb * q0 + zb))
    return np.where(const, dw, np.abs(sa - sb)), np.where(const, dw, np.abs(za - zb))


def compare_one(name: str, W: np.ndarray, H: np.ndarray, cfg: QuantConfig, solve_a: Solver, solve_b: Solver,
                tol: Agreement = Agreement()) -> CaseComparison:
    out = CaseComparison(name, W.shape, cfg)
    try:
        t0 = time.perf_counter()
        ra = result_mapping(solve_a(W.copy(), H.copy(), cfg))
        t1 = time.perf_counter()
        rb = result_mapping(solve_b(W.copy(), H.copy(), cfg))
        out.seconds_a, out.seconds_b = t1 - t0, time.perf_counter() - t1
    except Exception as e:  # noqa: BLE001
        out.error = f"{type(e).__name__}: {e}"
        return out
    qa, qb = np.asarray(ra["q"]), np.asarray(rb["q"])
    if qa.shape != qb.shape or np.shape(ra["scale"]) != np.shape(rb["scale"]):
        out.error = f"shapes differ: q {qa.shape} vs {qb.shape}, scale {np.shape(ra['scale'])} vs {np.shape(rb['scale'])}"
        return out
    eq = qa.astype(np.int64) == qb.astype(np.int64)
    same_rows = eq.all(axis=1)
    out.agreement, out.rows_identical = float(eq.mean()), float(same_rows.mean())
    Hd = damp_hessian(H, cfg.damp)
    sa, za = np.asarray(ra["scale"], np.float64), np.asarray(ra["zero"], np.float64)
    sb, zb = np.asarray(rb["scale"], np.float64), np.asarray(rb["zero"], np.float64)
    oa, ob = row_losses(W, w_hat(ra), Hd), row_losses(W, w_hat(rb), Hd)
    out.objective_a, out.objective_b = float(oa.sum()), float(ob.sum())
    energy = float(np.einsum("ij,ij->i", W @ Hd, W).sum())
    slack = tol.energy_atol * energy
    if out.objective_a > slack:
        out.loss_ratio = out.objective_b / out.objective_a
    else:
        out.loss_ratio = 1.0 if out.objective_b <= 2 * slack + 1e-300 else float("inf")
    s_ref = max(float(np.abs(sa).max()), 1e-300)
    z_ref = max(float(np.abs(za).max()), s_ref)
    ds, dz = identifiable_diffs(qa, sa, za, sb, zb)
    out.max_scale_diff = _rel_max(ds[same_rows], s_ref)
    out.max_zero_diff = _rel_max(dz[same_rows], z_ref)
    if out.agreement < tol.min_agreement:
        out.problems.append(f"codes agree {out.agreement:.4f} < {tol.min_agreement:g}")
    if abs(out.objective_b - out.objective_a) > tol.loss_rtol * max(out.objective_a, out.objective_b) + slack:
        out.problems.append(f"objective ratio {out.loss_ratio:.9g} off by more than {tol.loss_rtol:g}")
    if max(out.max_scale_diff, out.max_zero_diff) > tol.max_param_diff:
        out.problems.append(f"scale/zero differ by {max(out.max_scale_diff, out.max_zero_diff):.3g} on rows "
                            f"with equal codes (> {tol.max_param_diff:g})")
    return out


def compare(backend_a: str | Solver, backend_b: str | Solver, cases: Any = "default",
            tolerance: Agreement | None = None, **kw: float) -> Comparison:
    """Run two backends on the same cases and measure their agreement (see module doc).

    cases: a suite name / Suite, a list of conformance Cases, or (W, H, config) or
    (name, W, H, config) tuples.
    Keyword arguments override fields of ``Agreement`` (min_agreement=..., loss_rtol=...)."""
    tol = tolerance or Agreement()
    if kw:
        tol = Agreement(**{**vars(tol), **kw})
    solve_a, solve_b = get_backend(backend_a), get_backend(backend_b)
    rows = [compare_one(n, W, H, cfg, solve_a, solve_b, tol) for n, W, H, cfg in _iter_cases(cases)]
    return Comparison(_name(backend_a), _name(backend_b), tol, rows)


@dataclass
class CheckpointAgreement:
    """Layer by layer agreement of two checkpoints of one model and setting, in ``compare``'s
    convention (A = the reference, B = the one under test): fraction of equal codes and loss
    ratio B/A, each layer's loss as stored in its checkpoint (re-measured on the layer's own H
    after the cast)."""

    backend_a: str
    backend_b: str
    codes_equal: dict[str, float]
    loss_ratio: dict[str, float]

    @property
    def codes_equal_min(self) -> float:
        return min(self.codes_equal.values())

    @property
    def loss_ratio_min(self) -> float:
        return min(self.loss_ratio.values())

    @property
    def loss_ratio_max(self) -> float:
        return max(self.loss_ratio.values())

    def to_dict(self) -> dict[str, Any]:
        return {"backend_a": self.backend_a, "backend_b": self.backend_b,
                "layers": {n: {"codes_equal": self.codes_equal[n], "loss_ratio": self.loss_ratio[n]}
                           for n in self.codes_equal},
                "codes_equal_min": self.codes_equal_min, "loss_ratio_min": self.loss_ratio_min,
                "loss_ratio_max": self.loss_ratio_max}


def compare_checkpoints(a: Any, b: Any) -> CheckpointAgreement:
    """Agreement of checkpoint folders ``a`` (reference) and ``b`` (under test), decoupleq
    quantize/run output. ValueError when they do not hold the same layers with the same shapes
    and setting: then nothing compares."""
    from decoupleq_ref.model.checkpoint import read_checkpoint

    (cfg_a, layers_a), (cfg_b, layers_b) = read_checkpoint(a), read_checkpoint(b)
    setting = ("bits", "group_size")
    if any(cfg_a[k] != cfg_b[k] for k in setting) or set(layers_a) != set(layers_b):
        raise ValueError(f"compare_checkpoints: {a} and {b} differ in setting or layers; compare checkpoints of "
                         "one model at one bits / group size")
    codes, ratio = {}, {}
    for name, la in layers_a.items():
        ca, cb = la.codes(), layers_b[name].codes()
        if ca.shape != cb.shape:
            raise ValueError(f"compare_checkpoints: layer {name} is {ca.shape} in {a} but {cb.shape} in {b}")
        codes[name] = float(np.mean(ca == cb))
        ratio[name] = cfg_b["layers"][name]["loss"] / max(cfg_a["layers"][name]["loss"], 1e-300)
    return CheckpointAgreement(cfg_a["backend"], cfg_b["backend"], codes, ratio)
