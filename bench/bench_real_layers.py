"""Compare rtn / gptq / decoupleq (this reference) with the official-style solver on real layers.

For every ``blkNN_<name>.npz`` in --layers-dir (made by bench/capture_smollm2_layers.py) and every
bits:group_size in --configs, runs

    rtn, gptq, decoupleq    decoupleq_ref.quantize_layer, QuantConfig(bits, group_size, method,
                            iters=--iters), defaults otherwise
    official f32 / f64      validate.official_style.official_quantize (the official decoupleQ
                            solver's behaviour, published settings, float32 and float64)

and reports each one's objective — the loss on the damped H, H + 0.01·mean(diag H)·I, computed in
float64 from the returned (q, scale, zero) so that all methods are measured alike — the ratios
decoupleq / official and decoupleq / gptq, and the seconds each took. Ends with a summary:
geometric-mean and worst ratios, and on how many layers decoupleq beats gptq.

    python bench/bench_real_layers.py --configs 2:-1,2:64 --out-json /tmp/real.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import decoupleq_ref as dq  # noqa: E402
from decoupleq_ref.objective import damp_hessian  # noqa: E402

try:
    import torch

    from validate.official_style import official_quantize
except ImportError:  # torch missing: the official columns are skipped
    torch = None
    official_quantize = None

OURS = ("rtn", "gptq", "decoupleq")


def parse_configs(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        bits, gs = item.strip().split(":")
        out.append((int(bits), int(gs)))
    return out


def objective(W: np.ndarray, Hd: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> float:
    return float(dq.row_losses(W, dq.dequantize_parts(q, scale, zero), Hd).sum())


def run_layer(path: Path, bits: int, gs: int, iters: int, with_f64: bool) -> dict:
    d = np.load(path)
    W, H = np.asarray(d["W"], np.float64), np.asarray(d["H"], np.float64)
    Hd = damp_hessian(H, 0.01)
    row: dict = {"layer": path.stem, "bits": bits, "group_size": gs, "shape": list(W.shape)}
    for m in OURS:
        t = time.perf_counter()
        res = dq.quantize_layer(W, H, dq.QuantConfig(bits=bits, group_size=gs, method=m, iters=iters))
        row[f"{m}_s"] = time.perf_counter() - t
        row[m] = float(res.objective)
        row[f"{m}_recomputed"] = objective(W, Hd, res.q, res.scale, res.zero)
    if official_quantize is not None:
        kinds = [("official", torch.float32)] + ([("official64", torch.float64)] if with_f64 else [])
        for name, dt in kinds:
            t = time.perf_counter()
            r = official_quantize(W, H, bits=bits, group_size=gs, max_iter_num=iters, dtype=dt)
            row[f"{name}_s"] = time.perf_counter() - t
            row[name] = objective(W, Hd, r["q"], r["scale"], r["zero"])
            row[f"{name}_own"] = r["loss_damped"]
            row[f"{name}_history"] = [(n, l, rate) for n, l, rate in r["history"]]
        row["ours/official"] = row["decoupleq"] / row["official"]
        if with_f64:
            row["ours/official64"] = row["decoupleq"] / row["official64"]
    row["ours/gptq"] = row["decoupleq"] / row["gptq"]
    return row


def gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def print_row(r: dict) -> None:
    cols = [f"{r['layer']:<16}", f"{r['bits']}:{r['group_size']:<3}"]
    for k in ("rtn", "gptq", "decoupleq", "official", "official64"):
        cols.append(f"{r[k]:>11.5g}" if k in r else f"{'-':>11}")
    for k in ("ours/official", "ours/official64", "ours/gptq"):
        cols.append(f"{r[k]:>8.4f}" if k in r else f"{'-':>8}")
    secs = "/".join(f"{r[k + '_s']:.0f}" for k in ("rtn", "gptq", "decoupleq", "official", "official64")
                    if k + "_s" in r)
    cols.append(f"  {secs}")
    print(" ".join(cols), flush=True)


HEADER = (f"{'layer':<16} {'cfg':<5} {'rtn':>11} {'gptq':>11} {'decoupleq':>11} {'official':>11} "
          f"{'off.f64':>11} {'dq/off':>8} {'dq/o64':>8} {'dq/gptq':>8}  seconds rtn/gptq/dq/off/off64")


def summarize(rows: list[dict]) -> dict:
    summary = {}
    for bits, gs in sorted({(r["bits"], r["group_size"]) for r in rows}):
        sel = [r for r in rows if (r["bits"], r["group_size"]) == (bits, gs)]
        s = {"layers": len(sel),
             "decoupleq_below_gptq": sum(r["decoupleq"] < r["gptq"] for r in sel),
             "gmean ours/gptq": gmean([r["ours/gptq"] for r in sel]),
             "worst ours/gptq": max(r["ours/gptq"] for r in sel)}
        for key in ("ours/official", "ours/official64"):
            vals = [r[key] for r in sel if key in r]
            if vals:
                worst = max(sel, key=lambda r: r.get(key, -1))
                s[f"gmean {key}"] = gmean(vals)
                s[f"worst {key}"] = worst[key]
                s[f"worst {key} layer"] = worst["layer"]
                s[f"layers {key} > 1.02"] = [r["layer"] for r in sel if r.get(key, 0) > 1.02]
        summary[f"{bits}:{gs}"] = s
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers-dir", default=str(REPO / ".cache" / "smollm2_layers"))
    ap.add_argument("--configs", default="2:-1,2:64", help="comma-separated bits:group_size")
    ap.add_argument("--iters", type=int, default=4, help="decoupleq iters = official max_iter_num")
    ap.add_argument("--only", default="", help="substring filter on layer file names")
    ap.add_argument("--no-f64", action="store_true", help="skip the float64 official-style run")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args(argv)

    if torch is not None:
        torch.set_num_threads(max(1, torch.get_num_threads()))
    paths = sorted(p for p in Path(args.layers_dir).glob("blk*.npz") if args.only in p.name)
    if not paths:
        print(f"no blk*.npz in {args.layers_dir}; run bench/capture_smollm2_layers.py first", file=sys.stderr)
        return 2
    if official_quantize is None:
        print("torch not importable: official-style columns skipped", file=sys.stderr)
    rows = []
    print(HEADER, flush=True)
    for bits, gs in parse_configs(args.configs):
        for p in paths:
            r = run_layer(p, bits, gs, args.iters, with_f64=not args.no_f64)
            rows.append(r)
            print_row(r)
            if args.out_json:  # written after every layer so a long run can be inspected
                Path(args.out_json).write_text(json.dumps({"rows": rows, "summary": summarize(rows)}, indent=1))
    summary = summarize(rows)
    print()
    for cfg, s in summary.items():
        print(f"[{cfg}] " + "; ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                      for k, v in s.items()))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
