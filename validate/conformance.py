"""The conformance suite run: an implementation through every stored case, each result checked.

    from validate.conformance import load_suite, run_suite
    rep = run_suite("validate.adapters:reference_impl")      # or any fn(W, H, config) -> mapping
    print(rep.table()); assert rep.ok

The suite itself (cases, manifest, hashes) is validate.suite; the tolerances validate.policy.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from .adapters import Impl, load_impl, parse_convention, result_mapping
from .check import check_result
from .policy import Policy
from .report import FAIL, SKIP, Report, with_status
from .suite import Case, Suite, load_suite

__all__ = ["Case", "CaseOutcome", "Suite", "SuiteReport", "check_case", "load_suite", "run_suite"]


# ----------------------------------------------------------------------------- running

@dataclass
class CaseOutcome:
    case: Case
    report: Report
    seconds: float

    @property
    def status(self) -> str:
        return self.report.status


@dataclass
class SuiteReport:
    """Outcome of one implementation on one suite."""

    suite: str
    version: int
    impl: str
    level: str
    convention: tuple[str, ...]
    outcomes: list[CaseOutcome]
    policy: Policy = field(default_factory=Policy)

    @property
    def failed(self) -> list[CaseOutcome]:
        return with_status(self.outcomes, FAIL)

    @property
    def ok(self) -> bool:
        return not self.failed and self.aggregate_ok

    @property
    def aggregate(self) -> tuple[float | None, int]:
        """(geometric mean of objective / reference objective, number of cases in it) over the
        cases that have the ratio; ratios are floored at 1e-6 (an objective of 0 where the
        reference's is not)."""
        ratios = [o.report.numbers.get("ratio_to_reference") for o in self.outcomes]
        ratios = [max(float(r), 1e-6) for r in ratios if r is not None and np.isfinite(r)]
        return (float(np.exp(np.mean(np.log(ratios)))) if ratios else None), len(ratios)

    @property
    def aggregate_ok(self) -> bool:
        g, _ = self.aggregate
        return g is None or g <= 1 + self.policy.suite_rtol

    @property
    def defects(self) -> dict[str, int]:
        """Named likely defects and how many cases show them."""
        out: dict[str, int] = {}
        for o in self.outcomes:
            for d in dict.fromkeys(o.report.defects):
                out[d] = out.get(d, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def counts(self) -> dict[str, int]:
        n_fail, n_skip = len(self.failed), len(with_status(self.outcomes, SKIP))
        return {"cases": len(self.outcomes), "pass": len(self.outcomes) - n_fail - n_skip,
                "fail": n_fail, "skip": n_skip}

    def header(self) -> str:
        conv = ",".join(self.convention) or "native"
        return (f"decoupleq validate: {self.impl} on suite {self.suite!r} v{self.version} "
                f"({len(self.outcomes)} cases; level {self.level}: objective <= (1 + {self.policy.rtol:g}) x the "
                f"reference per case, geometric mean <= 1 + {self.policy.suite_rtol:g}; convention {conv})")

    def aggregate_line(self) -> str:
        g, n = self.aggregate
        if g is None:
            return "suite: no case compared with the reference"
        verdict = "ok" if self.aggregate_ok else "FAIL (systematically worse than the reference)"
        return (f"suite: geometric mean of objective / reference over {n} cases = {g:.6f} "
                f"(limit {1 + self.policy.suite_rtol:g}): {verdict}")

    def table(self, details: int = 5) -> str:
        """Per-case pass/fail table, then the failure details of the first ``details`` failing cases."""
        lines = [self.header(),
                 f"{'case':<28} {'shape':>7} {'b':>2} {'group':>5} {'sym':>3} {'status':>6} "
                 f"{'vs ref':>10} {'vs opt':>8} {'sec':>6}  detail"]
        for o in self.outcomes:
            c, r = o.case, o.report
            ref = r.numbers.get("ratio_to_reference")
            opt = r.numbers.get("ratio_to_optimum")
            detail = "" if r.ok else r.summary()[5:]
            if r.status == SKIP:
                detail = r.findings[-1].message if r.findings else ""
            lines.append(
                f"{c.name:<28} {f'{c.shape[0]}x{c.shape[1]}':>7} {c.config.bits:>2} {c.config.group_size:>5} "
                f"{'yes' if c.config.symmetric else 'no':>3} {r.status:>6} "
                f"{_fmt(ref, 10)} {_fmt(opt, 8)} {o.seconds:>6.2f}  {detail}")
        n = self.counts()
        lines.append(f"{n['cases']} cases: {n['pass']} pass, {n['fail']} fail, {n['skip']} skip"
                     + (f"; likely defects: " + ", ".join(f"{k} ({v} cases)" for k, v in self.defects.items())
                        if self.defects else ""))
        lines.append(self.aggregate_line())
        for o in self.failed[:details]:
            lines.append("")
            lines.append(str(o.report))
        if len(self.failed) > details:
            lines.append(f"... {len(self.failed) - details} more failing cases (use --json for all)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "suite_version": self.version, "impl": self.impl, "level": self.level,
                "convention": list(self.convention), "ok": self.ok, "counts": self.counts(),
                "aggregate": {"geomean_ratio_to_reference": self.aggregate[0], "cases": self.aggregate[1],
                              "limit": 1 + self.policy.suite_rtol, "ok": self.aggregate_ok},
                "defects": self.defects,
                "cases": [{"name": o.case.name, "tags": o.case.tags, "shape": list(o.case.shape),
                           "config": o.case.config.to_dict(), "seconds": o.seconds, **o.report.to_dict()}
                          for o in self.outcomes]}


def _fmt(x: float | None, width: int) -> str:
    if x is None:
        return f"{'-':>{width}}"
    return f"{x:>{width}.6f}" if abs(x) < 1e4 else f"{x:>{width}.3g}"


def check_case(case: Case, result: Any, policy: Policy | None = None, convention: Any = None) -> Report:
    """check_result for one suite case, against its stored reference and optimum."""
    opt = case.optimum if ("loss.optimum" in case.checks and case.optimum is not None) else False
    ref = case.reference if ("loss.reference" in case.checks and case.reference is not None) else False
    rep = check_result(case.W, case.H, result, case.config, reference=ref, optimum=opt, policy=policy,
                       convention=convention, case=case.name)
    if "loss.claimed" not in case.checks:
        rep.findings = [f for f in rep.findings if not f.check.startswith("loss.claimed")]
    return rep


def run_suite(impl: Impl | str, suite: Suite | str | Path = "default", *, level: str = "quality",
              convention: str | Iterable[str] | None = None, policy: Policy | None = None,
              progress: Callable[[CaseOutcome], None] | None = None) -> SuiteReport:
    """Run ``impl`` (a callable fn(W, H, config: dict), 'module:function', or a backend name)
    on every case of ``suite`` and check each result. Exceptions from the implementation fail
    the case (``impl.error``), except NotImplementedError, which skips it (``impl.unsupported``)."""
    name = impl if isinstance(impl, str) else f"{getattr(impl, '__module__', '?')}:{getattr(impl, '__qualname__', impl)}"
    fn = load_impl(impl) if isinstance(impl, str) else impl
    s = suite if isinstance(suite, Suite) else load_suite(suite)
    conv = parse_convention(convention)
    pol = policy or Policy(level=level)
    outcomes = []
    for case in s:
        t0 = time.perf_counter()
        try:
            out = result_mapping(fn(case.W.copy(), case.H.copy(), case.config.to_dict()))
        except NotImplementedError as e:
            rep = Report(case=case.name)
            rep.add("impl.unsupported", SKIP, f"implementation raised NotImplementedError: {e}")
        except Exception as e:  # noqa: BLE001 - any crash of the implementation is a finding
            rep = Report(case=case.name)
            tb = traceback.extract_tb(e.__traceback__)[-1]
            rep.add("impl.error", FAIL, f"implementation raised {type(e).__name__}: {e} "
                    f"(at {Path(tb.filename).name}:{tb.lineno})")
        else:
            rep = check_case(case, out, pol, conv)
        outcome = CaseOutcome(case, rep, time.perf_counter() - t0)
        outcomes.append(outcome)
        if progress:
            progress(outcome)
    return SuiteReport(s.name, s.version, name, pol.level, conv, outcomes, pol)
