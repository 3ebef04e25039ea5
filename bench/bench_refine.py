"""Optimality-gap benchmark: how far from optimal are gptq, official-settings decoupleq and this
project's improved decoupleq (refinement + extra starts)?

  tiny: seeded layers small enough to enumerate the global optimum (validate.exact), W2
        per-channel, H from few samples (rank < in) or many (full rank); ratio loss / optimum.
  real: SmolLM2 layers captured by bench/capture_smollm2_layers.py; ratio loss / official.

Every ratio compares objectives on the same damped H, measured in this one run.

    python bench/bench_refine.py tiny --cases 200
    python bench/bench_refine.py real --layers-dir .cache/smollm2_layers
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import numpy as np

import decoupleq_ref as dq
from decoupleq_ref.backends import get_solver
from decoupleq_ref.objective import damp_hessian

VARIANTS = {
    "gptq": dict(method="gptq"),
    "decoupleq (official settings)": {},
    "decoupleq + refine": dict(refine_sweeps=3),
    "decoupleq + refine + 4 starts": dict(refine_sweeps=3, n_starts=4),
    "decoupleq + refine + 8 starts": dict(refine_sweeps=3, n_starts=8),
}
OFFICIAL_PORT = "official-style port (float64)"


def tiny_case(seed: int, n_in: int) -> tuple[np.ndarray, np.ndarray, str]:
    """One row of Gaussian weights; H from 12 samples (full rank) or n_in − 3 (rank-deficient)."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((1, n_in))
    n_samples = 12 if seed % 2 == 0 else n_in - 3
    X = rng.standard_normal((n_samples, n_in)) * rng.uniform(0.3, 3.0, n_in)
    H = X.T @ X / n_samples
    return W, (H + H.T) / 2, "full rank" if n_samples >= n_in else f"rank {n_samples}"


def run_tiny(cases: int, n_in: int, first_seed: int = 0) -> None:
    from validate.exact import global_optimum

    try:
        import torch

        from validate.official_style import official_quantize
    except ImportError:
        official_quantize = None
    names = list(VARIANTS) + ([OFFICIAL_PORT] if official_quantize else [])
    ratios = {k: [] for k in names}
    seconds = {k: 0.0 for k in names}
    kinds = []
    for seed in range(first_seed, first_seed + cases):
        W, H, kind = tiny_case(seed, n_in)
        kinds.append(kind)
        optimum = global_optimum(W, damp_hessian(H, 0.01), bits=2).loss
        for name, over in VARIANTS.items():
            t0 = time.perf_counter()
            res = dq.quantize_layer(W, H, dq.QuantConfig(bits=2, group_size=-1, **over))
            seconds[name] += time.perf_counter() - t0
            ratios[name].append(res.objective / optimum)
        if official_quantize:
            t0 = time.perf_counter()
            r = official_quantize(W, H, bits=2, group_size=-1, dtype=torch.float64)
            seconds[OFFICIAL_PORT] += time.perf_counter() - t0
            ratios[OFFICIAL_PORT].append(r["loss_damped"] / optimum)
    kinds = np.array(kinds)
    print(f"tiny exact instances: {cases} seeded rows, in = {n_in}, W2 per-channel, "
          f"{np.sum(kinds == 'full rank')} full-rank H, {np.sum(kinds != 'full rank')} rank-deficient H")
    print(f"{'variant':<32} {'median':>8} {'p90':>8} {'max':>8} {'min':>10} {'at opt.':>8} {'ms/case':>8}")
    for name, r in ratios.items():
        r = np.array(r)
        print(f"{name[:32]:<32} {np.median(r):8.3f} {np.percentile(r, 90):8.3f} {r.max():8.3f} {r.min():10.6f} "
              f"{np.mean(r < 1 + 1e-9):8.0%} {1e3 * seconds[name] / cases:8.1f}")
        for kind in ("full rank", "rank-deficient"):
            sel = r[kinds == "full rank"] if kind == "full rank" else r[kinds != "full rank"]
            print(f"    {kind:<28} {np.median(sel):8.3f} {np.percentile(sel, 90):8.3f} {sel.max():8.3f}")


def run_real(layers_dir: str, configs: list[tuple[int, int]], variants: list[str] | None = None,
             backend: str = "numpy") -> None:
    files = sorted(glob.glob(os.path.join(layers_dir, "*.npz")))
    if not files:
        raise SystemExit(f"--layers-dir: no .npz layers in {layers_dir}; run bench/capture_smollm2_layers.py")
    base_name = "decoupleq (official settings)"
    solve = get_solver(backend)  # numba gives the reference's codes (tests/numba/test_numba_backend.py), faster
    for bits, gs in configs:
        print(f"\nW{bits} group_size={gs}: objective ratio to {base_name} (same damped H), seconds per layer")
        names = [n for n in VARIANTS if n != base_name and (not variants or n in variants)]
        print(f"{'layer':<20} {'official obj':>13} " + " ".join(f"{n[:24]:>26}" for n in names))
        ratios = {n: [] for n in names}
        secs = {n: 0.0 for n in [base_name] + names}
        for f in files:
            with np.load(f) as d:
                W, H = d["W"], d["H"]
            objs = {}
            for name in [base_name] + names:
                t0 = time.perf_counter()
                objs[name] = solve(W, H, dq.QuantConfig(bits=bits, group_size=gs, **VARIANTS[name])).objective
                secs[name] += time.perf_counter() - t0
            cells = []
            for n in names:
                ratios[n].append(objs[n] / objs[base_name])
                cells.append(f"{ratios[n][-1]:26.4f}")
            print(f"{os.path.basename(f)[:-4]:<20} {objs[base_name]:13.5g} " + " ".join(cells), flush=True)
        print(f"{'mean ratio':<34} " + " ".join(f"{np.mean(ratios[n]):26.4f}" for n in names))
        print(f"{'worst ratio':<34} " + " ".join(f"{np.max(ratios[n]):26.4f}" for n in names))
        print("seconds per layer: " + ", ".join(f"{n}: {secs[n] / len(files):.1f}" for n in secs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="which", required=True)
    t = sub.add_parser("tiny")
    t.add_argument("--cases", type=int, default=200)
    t.add_argument("--in", dest="n_in", type=int, default=8)
    t.add_argument("--first-seed", type=int, default=0, help="seeds first_seed .. first_seed + cases − 1")
    r = sub.add_parser("real")
    r.add_argument("--layers-dir", default=os.path.join(os.path.dirname(__file__), "..", ".cache", "smollm2_layers"))
    r.add_argument("--configs", default="2:-1,2:64", help="bits:group_size pairs")
    r.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    r.add_argument("--backend", default="numpy", choices=["numpy", "numba"], help="solver backend (same codes)")
    a = ap.parse_args()
    if a.which == "tiny":
        run_tiny(a.cases, a.n_in, a.first_seed)
    else:
        chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
        unknown = [v for v in chosen if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        run_real(a.layers_dir, [tuple(map(int, c.split(":"))) for c in a.configs.split(",")], chosen, a.backend)


if __name__ == "__main__":
    main()
