"""Loss vs effective bits per weight of the fp16 high-precision branch on real layers.

For every ``blkNN_<name>.npz`` in --layers-dir (bench/capture_smollm2_layers.py) runs decoupleq
(QuantConfig defaults, hp_select=--select) for

    branch  bits ∈ --branch-bits × group_size ∈ --branch-groups × hp_channels ∈ --ks
    plain   the --plain bits:group_size settings (no branch), which draw the reference curve

and records each one's objective (loss on the damped H, the joint one with the branch) and its
bits_per_weight (scales, zeros and B included: format.bits_per_weight). A branch point is then
compared, layer by layer, with the plain curve at the *same* bits per weight: the plain points'
Pareto front, linearly interpolated in log-loss; "ratio" = branch loss / interpolated plain loss
(< 1: the branch wins), n/a where the branch's bits lie outside the plain curve. Also compared
with the nearest plain setting that has at least as many bits ("vs ≥bits").

The fp16 storage of B (and float32 s, z) is checked by recomputing the loss from the PackedLayer.

    python bench/bench_hp_branch.py --jobs 2 --out-json /tmp/hp.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per worker process
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import decoupleq_ref as dq  # noqa: E402
from decoupleq_ref.objective import damp_hessian  # noqa: E402

PLAIN_DEFAULT = "2:-1,2:192,2:64,2:32,3:-1,3:192,3:64,4:-1"


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.split(":")) for item in text.split(",") if item.strip()]


def label(bits: int, gs: int, k: int) -> str:
    return f"W{bits} {'pc' if gs == -1 else f'g{gs}'}" + (f" +{k}" if k else "")


def solve(task: tuple[str, int, int, int, str]) -> dict:
    path, bits, gs, k, select = task
    d = np.load(path)
    W, H = np.asarray(d["W"], np.float64), np.asarray(d["H"], np.float64)
    t = time.perf_counter()
    res = dq.quantize_layer(W, H, dq.QuantConfig(bits=bits, group_size=gs, hp_channels=k, hp_select=select))
    seconds = time.perf_counter() - t
    stored = dq.layer_loss(W, dq.PackedLayer.from_result(res).dequantize(), damp_hessian(H, 0.01))
    return {"layer": Path(path).stem, "bits": bits, "group_size": gs, "k": k, "select": select,
            "objective": res.objective, "stored_objective": stored, "bpw": res.bits_per_weight,
            "seconds": seconds}


def plain_curve(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pareto front of (bpw, loss): sorted by bits, keeping only points that lower the loss."""
    front: list[tuple[float, float]] = []
    for b, loss in sorted(points):
        if not front or loss < front[-1][1]:
            front.append((b, loss))
    return front


def interpolate(front: list[tuple[float, float]], b: float) -> float | None:
    """Plain loss at bits b, linear in log-loss between neighbouring front points."""
    if not front or b < front[0][0] or b > front[-1][0]:
        return None
    for (b0, l0), (b1, l1) in zip(front, front[1:]):
        if b0 <= b <= b1:
            t = (b - b0) / (b1 - b0)
            return math.exp((1 - t) * math.log(l0) + t * math.log(l1))
    return front[-1][1]


def gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def report(rows: list[dict], plain: list[tuple[int, int]]) -> None:
    by_layer: dict[str, list[dict]] = {}
    for r in rows:
        by_layer.setdefault(r["layer"], []).append(r)
    base = {name: next(r["objective"] for r in rs if (r["bits"], r["group_size"], r["k"]) == (2, -1, 0))
            for name, rs in by_layer.items()}
    fronts = {name: plain_curve([(r["bpw"], r["objective"]) for r in rs
                                 if r["k"] == 0 and (r["bits"], r["group_size"]) in plain])
              for name, rs in by_layer.items()}
    settings = sorted({(r["bits"], r["group_size"], r["k"]) for r in rows}, key=lambda s: (s[2] > 0, s))
    print(f"\n{'setting':<14} {'bpw 576':>8} {'bpw 1536':>8} {'loss/W2pc':>10} {'vs curve':>9} "
          f"{'wins':>6} {'vs ≥bits':>9} {'wins':>6}  {'stored/f64':>10}  s/layer")
    for s in settings:
        rs = [r for r in rows if (r["bits"], r["group_size"], r["k"]) == s]
        in576 = [r["bpw"] for r in rs if r["layer"].split("_", 1)[1] != "down_proj"]
        in1536 = [r["bpw"] for r in rs if r["layer"].split("_", 1)[1] == "down_proj"]
        rel = [r["objective"] / base[r["layer"]] for r in rs]
        curve, above = [], []
        for r in rs:
            ref = interpolate(fronts[r["layer"]], r["bpw"])
            if ref is not None:
                curve.append(r["objective"] / ref)
            richer = [loss for b, loss in fronts[r["layer"]] if b >= r["bpw"] - 1e-12]
            if richer and s[2] > 0:
                above.append(r["objective"] / richer[0])
        stored = max(abs(r["stored_objective"] / r["objective"] - 1) for r in rs)
        print(f"{label(*s):<14} {in576[0] if in576 else float('nan'):>8.3f} "
              f"{in1536[0] if in1536 else float('nan'):>8.3f} {gmean(rel):>10.4f} "
              f"{gmean(curve) if curve and s[2] else float('nan'):>9.4f} "
              f"{(f'{sum(c < 1 for c in curve)}/{len(curve)}' if s[2] else ''):>6} "
              f"{gmean(above):>9.4f} {(f'{sum(c < 1 for c in above)}/{len(above)}' if above else ''):>6}  "
              f"{stored:>10.2e}  {sum(r['seconds'] for r in rs) / len(rs):.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers-dir", default=str(REPO / ".cache" / "smollm2_layers"))
    ap.add_argument("--layers", default="*", help="glob on the layer names, e.g. 'blk14_*'")
    ap.add_argument("--branch-bits", default="1,2")
    ap.add_argument("--branch-groups", default="-1,64")
    ap.add_argument("--ks", default="0,8,32,64")
    ap.add_argument("--plain", default=PLAIN_DEFAULT, help="bits:group_size settings of the plain curve")
    ap.add_argument("--select", default="hessian", choices=dq.config.HP_SELECT)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()

    paths = sorted(Path(args.layers_dir).glob(f"{args.layers}.npz"))
    if not paths:
        sys.exit(f"no layers matching {args.layers!r} in {args.layers_dir}; "
                 f"run bench/capture_smollm2_layers.py first")
    plain = parse_pairs(args.plain)
    settings = {(b, g, k) for b in map(int, args.branch_bits.split(",")) for g in map(int, args.branch_groups.split(","))
                for k in map(int, args.ks.split(","))} | {(b, g, 0) for b, g in plain}
    tasks = [(str(p), b, g, k, args.select) for p in paths for b, g, k in sorted(settings)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(solve, tasks))
    for r in rows:
        print(f"{r['layer']:<16} {label(r['bits'], r['group_size'], r['k']):<14} bpw {r['bpw']:.3f} "
              f"objective {r['objective']:.6g}")
    print(f"select={args.select}; {len(tasks)} solves in {time.perf_counter() - t0:.0f} s; "
          f"loss = objective on H + 0.01·mean(diag H)·I; W2pc = plain W2 per-channel")
    report(rows, plain)
    if args.out_json:
        tmp = args.out_json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(tmp, args.out_json)


if __name__ == "__main__":
    main()
