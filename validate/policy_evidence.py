"""The measurements behind the "quality" level (docs/VALIDATION.md, "Tolerance policy").

    python -m validate.policy_evidence          # ~2-4 min on 2 cores; needs torch

Runs three valid-but-different implementations through the default suite and prints, per
implementation, the per-case ratios to the reference that matter for the policy: the official
solver's port (validate.official_style, float32: a legitimate variant that must pass), GPTQ
without the alternation and plain RTN (weaker results the suite must reject).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import decoupleq_ref as dq

from .conformance import SuiteReport, load_suite, run_suite
from .official_style import official_quantize


def official_impl(W: Any, H: Any, config: dict) -> dict:
    """The official solver's decisions (asymmetric decoupleq only; other cases are skipped)."""
    if config["symmetric"] or config["method"] != "decoupleq" or config["hp_channels"]:
        raise NotImplementedError("the official-style port covers asymmetric decoupleq without the fp16 branch")
    r = official_quantize(W, H, bits=config["bits"], group_size=config["group_size"], max_iter_num=config["iters"] + 1,
                          perdamp=config["damp"], act_order=config["act_order"], grid=config["grid"],
                          max_shrink=config["max_shrink"])
    return {"q": r["q_signed"], "scale": r["scale"], "zero": r["zero_signed"], "objective": r["loss_damped"]}


def method_impl(method: str) -> Callable[[Any, Any, dict], Any]:
    def impl(W: Any, H: Any, config: dict) -> Any:
        return dq.quantize_layer(W, H, dq.QuantConfig(**{**config, "method": method}))
    impl.__name__ = impl.__qualname__ = f"{method}_only"
    return impl


def summary(rep: SuiteReport) -> str:
    ratios = sorted(((o.report.numbers.get("ratio_to_reference"), o.case.name) for o in rep.outcomes
                     if o.report.numbers.get("ratio_to_reference") is not None), reverse=True)
    g, n = rep.aggregate
    worst = ", ".join(f"{name} {r:.3f}" for r, name in ratios[:4])
    failed = [o.case.name for o in rep.failed]
    fails = (", ".join(failed[:5]) + (f", ... ({len(failed)} in all)" if len(failed) > 5 else "")) or "none"
    return (f"{rep.impl}: {n} cases with a ratio, geometric mean {g:.4f}, above 1.05: "
            f"{sum(r > 1.05 for r, _ in ratios)}, above 1.5: {sum(r > 1.5 for r, _ in ratios)}; worst: {worst}; "
            f"failing cases at level quality: {fails}")


def main() -> int:
    suite = load_suite("default")
    dq_cases = suite.select(where=lambda c: c.config.method == "decoupleq" and not c.config.hp_channels)
    official_impl.__qualname__ = "official_style port"
    print(summary(run_suite(official_impl, suite, convention="official")))
    for method in ("gptq", "rtn"):
        print(summary(run_suite(method_impl(method), dq_cases)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
