"""K-quant grids: the constrained decoupleQ solve against llama.cpp's own algorithm.

For every layer and every type in --types (Q2_K, Q4_K, Q5_K) measures the loss Σ_i (Ŵ_i − W_i)
H (Ŵ_i − W_i)ᵀ on the undamped H of

    llama.cpp   decoupleq_ref.kquant_start.llamacpp_kquant: its weighted min-max search per
                sub-block, importance diag(H) as --imatrix feeds it (written from its description)
    projected   decoupleQ's free solve (bits, group = the type's sub-block) rounded onto the grid
    decoupleQ-K decoupleq_ref.kquant.solve_kquant from kquant_start (per row the better of the
                projection and llama.cpp's result): the constrained alternation

and reports decoupleQ-K / llama.cpp (below 1: decoupleQ is better) and the seconds each took.

Layers: ``blkNN_<name>.npz`` files (W, H) from bench/capture_smollm2_layers.py in --layers-dir
(SmolLM2's down_proj is its only linear with 256-multiple rows), and/or synthetic layers
(decoupleq_ref.synthetic_layer: Student-t weights, correlated activations with outlier channels)
of the shapes in --shapes, e.g. Llama-7B's 4096x4096, 11008x4096, 4096x11008; --rows keeps the
first R output rows of each (rows are solved independently on the same H, so the per-row loss
ratio is unchanged and the run is shorter).

``--diagonal-h`` replaces each H by its diagonal (uncorrelated inputs): the setting llama.cpp's
importance-weighted search is built for, so the comparison isolates the algorithm from the use of
H's off-diagonal part.

    python bench/kquant_vs_llamacpp.py --shapes 576x1536,256x4096 --rows 128 --out-json /tmp/kq.json
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
from decoupleq_ref.kquant import KSPECS, project_to_kgrid, solve_kquant  # noqa: E402
from decoupleq_ref.objective import layer_loss  # noqa: E402
from decoupleq_ref.kquant_start import kquant_start, llamacpp_kquant  # noqa: E402


def layers(args: argparse.Namespace):
    """(name, W, H) for every requested layer."""
    if args.layers_dir:
        for path in sorted(Path(args.layers_dir).glob("blk*_*.npz")):
            data = np.load(path)
            if data["W"].shape[1] % 256 == 0:
                yield path.stem, data["W"][: args.rows].astype(np.float64), data["H"].astype(np.float64)
    for shape in filter(None, args.shapes.split(",")):
        out, n_in = (int(v) for v in shape.split("x"))
        W, H = dq.synthetic_layer(out=min(out, args.rows), n_in=n_in, seed=args.seed)
        yield f"synthetic {out}x{n_in}", W, H


def compare(W: np.ndarray, H: np.ndarray, name: str, iters: int) -> dict:
    spec = KSPECS[name]
    t0 = time.perf_counter()
    base = llamacpp_kquant(W, np.diag(H), spec)
    t1 = time.perf_counter()
    free = dq.quantize_layer(W, H, dq.QuantConfig(bits=spec.bits, group_size=spec.sub, iters=iters))
    start = project_to_kgrid(free.q, free.scale, free.zero, spec)
    solved = solve_kquant(W, H, kquant_start(W, H, start))
    t2 = time.perf_counter()
    losses = {"llama.cpp": layer_loss(W, base.dequantize(), H), "free": free.loss,
              "projected": layer_loss(W, start.dequantize(), H), "decoupleQ-K": layer_loss(W, solved.dequantize(), H)}
    return {**losses, "ratio": losses["decoupleQ-K"] / losses["llama.cpp"],
            "seconds_llama.cpp": t1 - t0, "seconds_decoupleQ": t2 - t1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q2_K,Q4_K,Q5_K")
    ap.add_argument("--shapes", default="576x1536,4096x4096,11008x4096,4096x11008")
    ap.add_argument("--layers-dir", default=None)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--iters", type=int, default=4, help="decoupleQ iterations of the free solve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--diagonal-h", action="store_true", help="use diag(H) as H (uncorrelated inputs)")
    ap.add_argument("--out-json", default=None)
    args = ap.parse_args()
    rows, ratios = [], {t: [] for t in args.types.split(",")}
    print(f"{'layer':<28} {'type':<5} {'llama.cpp':>11} {'projected':>11} {'decoupleQ-K':>11} {'ratio':>6} {'s llama':>8} {'s dq':>8}")
    for layer_name, W, H in layers(args):
        if args.diagonal_h:
            H = np.diag(np.diag(H))
        for t in ratios:
            r = {"layer": layer_name, "type": t, "shape": list(W.shape), **compare(W, H, t, args.iters)}
            rows.append(r)
            ratios[t].append(r["ratio"])
            print(f"{layer_name:<28} {t:<5} {r['llama.cpp']:>11.4g} {r['projected']:>11.4g} {r['decoupleQ-K']:>11.4g} "
                  f"{r['ratio']:>6.3f} {r['seconds_llama.cpp']:>8.2f} {r['seconds_decoupleQ']:>8.2f}", flush=True)
    summary = {t: {"geomean_ratio": math.exp(np.mean(np.log(v))), "worst_ratio": max(v), "layers": len(v)}
               for t, v in ratios.items() if v}
    for t, s in summary.items():
        print(f"{t}: decoupleQ-K / llama.cpp geometric mean {s['geomean_ratio']:.3f}, worst {s['worst_ratio']:.3f} "
              f"over {s['layers']} layers")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"rows": rows, "summary": summary, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
