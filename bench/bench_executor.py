"""Per-task overhead of the quantize executors (docs/SCALING.md).

Quantizes every linear of a small random Llama (random full-rank H, no forward pass) with the
same config four ways in one run — in-process, a 2-process local pool, Ray with one task in
flight, Ray with two — and prints wall times, the per-task overhead of each executor over the
in-process solve, and whether every checkpoint is byte-identical to the in-process one.

    .venv/bin/python bench/bench_executor.py [--hidden 256] [--layers 2]

The overhead per task = (wall − in-process wall / parallelism) / tasks: dispatch, the worker
reading its own W and H from the model and stats files, and shipping the packed result back.
Ray's start-up (ray.init) is timed separately: it is paid once per driver, not per task.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from decoupleq_ref import QuantConfig
from decoupleq_ref.backends import get_solver
from decoupleq_ref.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME
from decoupleq_ref.model.quantize import quantize_model
from decoupleq_ref.model.source import resolve_model
from decoupleq_ref.model.stats import CalibrationStats
from decoupleq_ref.model.tiny import save_random_stats, save_tiny


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size of the random Llama (intermediate = 2x)")
    ap.add_argument("--layers", type=int, default=2, help="decoder blocks (7 linears each)")
    ap.add_argument("--backend", default="numpy", choices=["numpy", "numba"])
    a = ap.parse_args()

    import ray

    root = Path(tempfile.mkdtemp(prefix="bench_executor_"))
    model = save_tiny(root / "model", "llama", hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_hidden_layers=a.layers, num_attention_heads=4, num_key_value_heads=2)
    stats_dir = save_random_stats(model, root / "stats")
    stats = CalibrationStats.load(stats_dir)
    cfg, n = QuantConfig(bits=2, group_size=64), len(stats.layers)

    def run(tag: str, **kw) -> tuple[float, bytes]:
        out = root / tag
        t0 = time.perf_counter()
        quantize_model(resolve_model(model), stats, cfg, get_solver(a.backend), a.backend, out, stats_dir=stats_dir, **kw)
        wall = time.perf_counter() - t0
        return wall, (out / WEIGHTS_NAME).read_bytes() + (out / CONFIG_NAME).read_bytes()

    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    run("warm-ray", executor="ray", workers=2)  # workers started and modules imported once
    base, ref = run("inproc")
    rows = [("in-process", 1, base, ref)]
    for tag, par, kw in [("local pool, 2 workers", 2, dict(workers=2)),
                         ("ray, 1 in flight", 1, dict(executor="ray", workers=1)),
                         ("ray, 2 in flight", 2, dict(executor="ray", workers=2))]:
        wall, data = run(tag.replace(" ", "_").replace(",", ""), **kw)
        rows.append((tag, par, wall, data))
    ray.shutdown()

    print(f"{n} layers ({a.layers} blocks, hidden {a.hidden}), W2 g64 decoupleq, backend {a.backend}; "
          f"ray.init: {ray_start:.1f}s (once per driver)")
    print(f"{'executor':<24} {'wall s':>8} {'vs in-process':>14} {'overhead/task ms':>17} {'identical':>10}")
    for tag, par, wall, data in rows:
        overhead = (wall - base / par) / n * 1e3
        print(f"{tag:<24} {wall:8.2f} {base / wall:13.2f}x {overhead:17.0f} {str(data == ref):>10}")


if __name__ == "__main__":
    main()
