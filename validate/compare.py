"""Cross-backend agreement: does backend B give what backend A gives on the same inputs?

    from validate.compare import assert_agree, compare
    cmp = compare("reference", "numba", "default")     # suite name, Suite, cases or (W, H, cfg) tuples
    print(cmp.table()); assert cmp.ok
    assert_agree(W, H, cfg, reference_result, numba_result, NUMBA)   # one layer, in a test

Per case: integer agreement (fraction of equal codes, and of rows with all codes equal), the
objective ratio B/A (loss on the damped H, recomputed from each side's q/scale/zero), and the
largest scale / zero difference on rows whose codes agree (relative to the case's largest
|scale| / |zero|; rows whose codes differ legitimately have different (s, z); groups whose
codes are all equal determine only s·q + z, which is compared there). ``agreement`` is the one
definition of "agrees": ``compare``, ``assert_agree`` and the bench scripts all use it, with
the bounds of a ``validate.policy.Agreement`` (``NUMBA``, ``CUDA`` for the compiled backends).

Backends are named as in decoupleq_ref.backends (``reference`` is an alias of ``numpy``), or
passed as a callable ``quantize_layer(W, H, QuantConfig)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from decoupleq_ref.backends import Solver, get_solver
from decoupleq_ref.config import QuantConfig
from decoupleq_ref.model.checkpoint import read_checkpoint
from decoupleq_ref.objective import damp_hessian, row_losses

from .adapters import result_mapping, w_hat
from .policy import CUDA, NUMBA, Agreement
from .suite import Case, Suite, load_suite

__all__ = ["CUDA", "NUMBA", "Agreement", "CaseComparison", "Comparison", "agreement", "assert_agree", "compare",
           "compare_checkpoints", "get_backend"]

def get_backend(backend: str | Solver) -> Solver:
    """The quantize_layer of a named backend (decoupleq_ref.backends.get_solver: ValueError with
    the reason if unusable), or ``backend`` itself if it is already a callable (W, H, QuantConfig)."""
    return backend if callable(backend) else get_solver(backend)


def _name(backend: str | Solver) -> str:
    if isinstance(backend, str):
        return backend
    return f"{getattr(backend, '__module__', '?')}.{getattr(backend, '__qualname__', 'solver')}"


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
    tie_rows: float = 0.0                  # fraction of rows whose codes differ at a float tie
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


def _extra(result: Any, key: str) -> Any:
    """A result field beyond the mapping's (loss_history, history_steps, lower_bound)."""
    return result.get(key) if isinstance(result, dict) else getattr(result, key, None)


def _shape_problems(ra: dict[str, Any], rb: dict[str, Any], dtypes: bool) -> tuple[list[str], list[str]]:
    """(why the arrays cannot be compared, dtype differences): q, scale, zero missing or of other
    shapes; row_loss of another shape; with ``dtypes`` any of them of another dtype."""
    errors, problems = [], []
    for k in ("q", "scale", "zero", "row_loss"):
        if k not in ra or k not in rb:
            if k != "row_loss":
                errors.append(f"{k} missing from {'A' if k not in ra else 'B'}")
            continue
        x, y = np.asarray(ra[k]), np.asarray(rb[k])
        if x.shape != y.shape:
            (errors if k != "row_loss" else problems).append(f"{k} shape {y.shape} vs {x.shape}")
        elif dtypes and x.dtype != y.dtype:
            problems.append(f"{k} dtype {y.dtype} vs {x.dtype}")
    return errors, problems


def _extras_problems(a: Any, b: Any, ra: dict[str, Any], rb: dict[str, Any], tol: Agreement) -> list[str]:
    """The claimed loss/objective, the loss history, the fp16 branch and the lower bound."""
    out = []
    for k in ("loss", "objective"):
        if k in ra and k in rb:
            x, y = float(ra[k]), float(rb[k])
            if not abs(x - y) <= tol.loss_rtol * abs(x) + tol.loss_atol:
                out.append(f"claimed {k} {y!r} vs {x!r}: off by more than {tol.loss_rtol:g}")
    if tol.history_rtol is not None:
        if _extra(a, "history_steps") != _extra(b, "history_steps"):
            out.append(f"history_steps {_extra(b, 'history_steps')} vs {_extra(a, 'history_steps')}")
        ha, hb = (np.asarray(_extra(r, "loss_history"), dtype=np.float64) for r in (a, b))
        if ha.shape != hb.shape or not np.all(np.abs(hb - ha) <= tol.history_rtol * np.abs(ha) + tol.loss_atol):
            out.append(f"loss_history differs beyond {tol.history_rtol:g}: {hb.tolist()} vs {ha.tolist()}")
    if math.isfinite(tol.branch_rtol):
        ia, ib = ra.get("hp_index"), rb.get("hp_index")
        if (ia is None) != (ib is None) or (ia is not None and not np.array_equal(ia, ib)):
            out.append(f"fp16 branch columns differ: {ib} vs {ia}")
        elif ia is not None:
            wa, wb = np.asarray(ra["hp_weight"], np.float64), np.asarray(rb["hp_weight"], np.float64)
            lim = tol.branch_rtol * np.abs(wa) + tol.branch_atol * (float(np.abs(wa).max()) if wa.size else 0.0)
            if wa.shape != wb.shape or not np.all(np.abs(wb - wa) <= lim):
                out.append(f"fp16 branch weights differ beyond {tol.branch_rtol:g} + {tol.branch_atol:g}·max")
    if tol.bound_rtol is not None:
        la, lb = _extra(a, "lower_bound"), _extra(b, "lower_bound")
        if (la is None) != (lb is None) or (la is not None and not abs(lb - la) <= tol.bound_rtol * abs(la)):
            out.append(f"lower_bound {lb!r} vs {la!r} (rtol {tol.bound_rtol:g})")
    return out


def agreement(name: str, W: np.ndarray, H: np.ndarray, cfg: QuantConfig, a: Any, b: Any,
              tol: Agreement = Agreement()) -> CaseComparison:
    """How far result ``b`` is from result ``a`` (A the reference) on layer (W, H) under cfg,
    and which bounds of ``tol`` it breaks (``.problems``; empty = they agree)."""
    out = CaseComparison(name, W.shape, cfg)
    ra, rb = result_mapping(a), result_mapping(b)
    errors, out.problems = _shape_problems(ra, rb, tol.same_dtypes)
    if errors:
        out.error = "; ".join(errors)
        return out
    qa, qb = np.asarray(ra["q"]).astype(np.int64), np.asarray(rb["q"]).astype(np.int64)
    eq = qa == qb
    same_rows = eq.all(axis=1)
    out.agreement, out.rows_identical = float(eq.mean()), float(same_rows.mean())
    tie = np.zeros(len(same_rows), dtype=bool)
    if tol.tie_rtol is not None and "row_loss" in ra and "row_loss" in rb:
        tie = ~same_rows & np.isclose(np.asarray(ra["row_loss"], np.float64), np.asarray(rb["row_loss"], np.float64),
                                      rtol=tol.tie_rtol, atol=tol.tie_atol)
    out.tie_rows = float(tie.mean()) if tie.size else 0.0
    codes_equal = float(eq[~tie].mean()) if (~tie).any() else float("nan")
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
    s_ref = max(float(np.abs(sa).max()), 1e-300) if sa.size else 1.0
    z_ref = max(float(np.abs(za).max()), s_ref) if za.size else 1.0
    ds, dz = identifiable_diffs(qa, sa, za, sb, zb)
    out.max_scale_diff = _rel_max(ds[same_rows], s_ref)
    out.max_zero_diff = _rel_max(dz[same_rows], z_ref)
    if out.tie_rows > tol.max_tie_rows:
        out.problems.append(f"{int(tie.sum())} of {len(tie)} rows are float ties (> {tol.max_tie_rows:g})")
    if not codes_equal >= tol.min_agreement:
        ties = " outside float ties" if tie.any() else ""
        out.problems.append(f"codes agree {codes_equal:.4f}{ties} < {tol.min_agreement:g}")
    if abs(out.objective_b - out.objective_a) > tol.loss_rtol * max(out.objective_a, out.objective_b) + slack:
        out.problems.append(f"objective ratio {out.loss_ratio:.9g} off by more than {tol.loss_rtol:g}")
    if max(out.max_scale_diff, out.max_zero_diff) > tol.max_param_diff:
        out.problems.append(f"scale/zero differ by {max(out.max_scale_diff, out.max_zero_diff):.3g} on rows "
                            f"with equal codes (> {tol.max_param_diff:g})")
    out.problems += _extras_problems(a, b, ra, rb, tol)
    return out


def assert_agree(W: np.ndarray, H: np.ndarray, cfg: QuantConfig, a: Any, b: Any,
                 tol: Agreement = Agreement()) -> CaseComparison:
    """AssertionError naming every broken bound unless result ``b`` agrees with the reference
    result ``a`` on layer (W, H) under cfg (``agreement``); returns the measurements."""
    c = agreement("layer", np.asarray(W, dtype=np.float64), np.asarray(H, dtype=np.float64), cfg, a, b, tol)
    assert c.ok, f"{W.shape[0]}x{W.shape[1]} {cfg}: " + (c.error or "; ".join(c.problems))
    return c


def compare_one(name: str, W: np.ndarray, H: np.ndarray, cfg: QuantConfig, solve_a: Solver, solve_b: Solver,
                tol: Agreement = Agreement()) -> CaseComparison:
    """Run both solvers on copies of (W, H) and measure their ``agreement``."""
    try:
        t0 = time.perf_counter()
        a = solve_a(W.copy(), H.copy(), cfg)
        t1 = time.perf_counter()
        b = solve_b(W.copy(), H.copy(), cfg)
        seconds = (t1 - t0, time.perf_counter() - t1)
    except Exception as e:  # noqa: BLE001
        out = CaseComparison(name, W.shape, cfg)
        out.error = f"{type(e).__name__}: {e}"
        return out
    out = agreement(name, W, H, cfg, a, b, tol)
    out.seconds_a, out.seconds_b = seconds
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
