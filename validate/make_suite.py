"""Generate the conformance suite (validate/suites/<name>/): deterministic, no hand-written numbers.

    python -m validate.make_suite                      # (re)write validate/suites/default
    python -m validate.make_suite --check              # regenerate in memory, compare with the files

Inputs are built so that they are bit-identical on every machine: W is rounded to float32
values (from seeded normals, with IEEE-exact transforms only), and H = XᵀX/N is computed from a
dyadic X (multiples of 2^-k, N a power of two), so every entry of H is exact whatever the BLAS
or summation order. Reference results (the float64 solver at the case's config) and, for tiny
per-channel layers, the exact global optimum (validate.exact.global_optimum on the damped H)
are stored next to them, with SHA-256 hashes of every tensor in the JSON manifest.

Bump SUITE_VERSION whenever a case is added, removed or changed, or the reference's results
change; the manifest's policy section is the tolerance contract of each check.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

import decoupleq_ref as dq
from decoupleq_ref.config import QuantConfig
from decoupleq_ref.objective import damp_hessian

from .exact import global_optimum
from .policy import policy_section
from .suite import FORMAT_VERSION, MANIFEST_FILE, SUITES_DIR, TENSORS_FILE, tensor_hash, write

SUITE_VERSION = 3  # 2: fp16-branch cases (hp_channels), configs with the hp_* fields; 3: the branch's
#   tie-break λ = 1e-8·mean diag (its reference results changed)


# ----------------------------------------------------------------------------- exact inputs

def f32(x: np.ndarray) -> np.ndarray:
    """Round to float32 values, stored as float64 (cross-platform stable inputs)."""
    return np.asarray(x, dtype=np.float64).astype(np.float32).astype(np.float64)


def dyadic(x: np.ndarray, frac_bits: int = 3) -> np.ndarray:
    """Round to multiples of 2^-frac_bits: products and sums of these are exact in float64."""
    return np.round(np.asarray(x) * (1 << frac_bits)) / (1 << frac_bits)


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, ...], df: int = 5) -> np.ndarray:
    """Student-t-like weights z / sqrt(χ²_df / df) from normals only (no libm-dependent draws)."""
    z = rng.standard_normal(shape)
    chi = (rng.standard_normal((df,) + tuple(shape)) ** 2).mean(axis=0)
    return z / np.sqrt(chi)


def gram(X: np.ndarray) -> np.ndarray:
    """H = XᵀX / N for dyadic X and N a power of two: exact, hence exactly symmetric."""
    n = X.shape[0]
    assert n & (n - 1) == 0, "N must be a power of two for an exact H"
    return (X.T @ X) / n


def activations(rng: np.random.Generator, n_in: int, n: int, *, rank: int = 0, outliers: int = 0,
                col_exp: tuple[int, int] | None = None) -> np.ndarray:
    """Dyadic activations X (n, in): shared low-rank part (rank > 0) + noise, ``outliers``
    channels ×8, and column scales 2^k with k uniform in col_exp (ill-conditioning)."""
    X = 0.5 * rng.standard_normal((n, n_in))
    if rank:
        X += rng.standard_normal((n, rank)) @ rng.standard_normal((rank, n_in)) / np.sqrt(rank)
    X = dyadic(X, 3)
    if outliers:
        X[:, rng.choice(n_in, size=outliers, replace=False)] *= 8.0
    if col_exp is not None:
        X *= 2.0 ** rng.integers(col_exp[0], col_exp[1] + 1, size=n_in)
    return X


# ----------------------------------------------------------------------------- layers

@dataclass
class Layer:
    name: str
    W: np.ndarray
    H: np.ndarray
    description: str


def build_layers() -> dict[str, Layer]:
    """Every input layer of the suite, each from its own seed."""
    L: dict[str, Layer] = {}

    def add(name: str, seed: int, make: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], desc: str) -> None:
        W, H = make(np.random.default_rng(seed))
        W = f32(W)
        assert np.array_equal(H, H.T) and np.all(np.isfinite(H)) and np.all(np.isfinite(W))
        L[name] = Layer(name, np.ascontiguousarray(W), np.ascontiguousarray(H), desc)

    # tiny (global optimum enumerable)
    add("tiny_a", 101, lambda r: (heavy_tailed(r, (6, 8)) * 0.02, gram(activations(r, 8, 32, rank=2))),
        "6x8 heavy-tailed weights, correlated full-rank H")
    def tiny_outlier(r):
        W = heavy_tailed(r, (4, 8)) * 0.02
        W[:, 3] *= 16.0
        return W, gram(activations(r, 8, 32, outliers=1))
    add("tiny_outlier", 102, tiny_outlier, "4x8, one outlier weight column and one outlier input channel")
    add("tiny_lowrank", 103, lambda r: (heavy_tailed(r, (4, 8)) * 0.02, gram(activations(r, 8, 4))),
        "4x8, H of rank 4 (N = 4 samples)")
    def tiny_rows(r):
        W = heavy_tailed(r, (5, 8)) * 0.02
        W[1] = 0.0
        W[2] = 0.0125
        W[3] = np.where(np.arange(8) % 2 == 0, -0.03, 0.02)
        return W, gram(activations(r, 8, 32))
    add("tiny_rows", 104, tiny_rows, "5x8 with a zero row, a constant row and a two-valued row")
    add("tiny_b3", 105, lambda r: (heavy_tailed(r, (4, 5)), gram(activations(r, 5, 16, rank=1))),
        "4x5 (3-bit enumerable), odd width")
    add("tiny_b1", 106, lambda r: (heavy_tailed(r, (4, 16)) * 0.1, gram(activations(r, 16, 64, rank=3))),
        "4x16 (1-bit enumerable)")
    add("tiny_b4", 107, lambda r: (heavy_tailed(r, (3, 4)) * 3.0, gram(activations(r, 4, 16))),
        "3x4 (4-bit enumerable)")

    # medium (reference results only)
    add("medium", 201, lambda r: (heavy_tailed(r, (64, 256)) * 0.02,
                                  gram(activations(r, 256, 1024, rank=16, outliers=4))),
        "64x256 LLM-like: heavy-tailed W, low-rank + noise activations, 4 outlier channels")
    add("combo", 202, lambda r: (heavy_tailed(r, (16, 64)) * 0.02, gram(activations(r, 64, 256, rank=4, outliers=1))),
        "16x64 layer used for every bits x group_size x symmetric combination")

    # adversarial
    def outlier_columns(r):
        W = heavy_tailed(r, (32, 64)) * 0.02
        W[:, r.choice(64, 2, replace=False)] *= 32.0
        return W, gram(activations(r, 64, 256, rank=4, outliers=2))
    add("outlier_columns", 301, outlier_columns, "32x64, two weight columns x32 and two input channels x8")
    add("rank_deficient_h", 302, lambda r: (heavy_tailed(r, (24, 64)) * 0.02, gram(activations(r, 64, 16))),
        "24x64, H from 16 samples (rank 16 of 64)")
    def near_singular(r):
        X = activations(r, 64, 256, col_exp=(-6, 6))
        for j, k in ((1, 0), (5, 4), (9, 8)):  # near-duplicate channels
            X[:, j] = X[:, k] + dyadic(r.standard_normal(256), 3) * 2.0 ** -12
        return heavy_tailed(r, (24, 64)) * 0.02, gram(X)
    add("near_singular_h", 303, near_singular,
        "24x64, three near-duplicate input channels (difference 2^-12) and channel scales 2^-6..2^6")
    def dead_inputs(r):
        X = activations(r, 32, 128, rank=2)
        X[:, r.choice(32, 8, replace=False)] = 0.0
        return heavy_tailed(r, (16, 32)) * 0.02, gram(X)
    add("dead_inputs", 304, dead_inputs, "16x32, 8 dead input channels (zero rows/columns of H)")
    add("zero_h", 305, lambda r: (heavy_tailed(r, (8, 16)) * 0.02, np.zeros((16, 16))),
        "8x16 with H = 0 (no calibration signal: the damped objective is plain MSE)")
    def zero_rows(r):
        W = heavy_tailed(r, (12, 32)) * 0.02
        W[[0, 5, 11]] = 0.0
        return W, gram(activations(r, 32, 128, rank=2))
    add("zero_rows", 306, zero_rows, "12x32, rows 0, 5, 11 all zero")
    def constant_rows(r):
        W = heavy_tailed(r, (12, 32)) * 0.02
        W[2] = 0.015
        W[7] = -0.04
        W[9, 8:16] = 0.01   # one constant group
        W[10, :8] = 0.0     # one zero group
        return W, gram(activations(r, 32, 128, rank=2))
    add("constant_rows", 307, constant_rows, "12x32, constant rows 2 and 7, a constant group and a zero group")
    def dynamic_range(r):
        W = heavy_tailed(r, (16, 64)) * 2.0 ** np.arange(-30, 31, 4)[:, None]
        return W, gram(activations(r, 64, 256, col_exp=(-10, 10)))
    add("dynamic_range", 308, dynamic_range, "16x64, row magnitudes 2^-30..2^30, input channel scales 2^-10..2^10")
    def exact_grid(r):
        q = r.integers(0, 4, size=(8, 32)).astype(np.float64)
        q[:, 0], q[:, 1] = 0, 3
        s = 2.0 ** r.integers(-8, -4, size=(8, 1))
        z = -s * r.integers(0, 4, size=(8, 1))
        return s * q + z, gram(activations(r, 32, 128, rank=2))
    add("exact_grid", 309, exact_grid, "8x32, every row exactly on a 2-bit grid (optimal loss 0)")
    def ties(r):
        k = r.integers(0, 7, size=(8, 16)).astype(np.float64) / 2  # multiples of 0.5 in [0, 3]
        k[:, 0], k[:, 1] = 0.0, 3.0  # min-max grid: s = 1, z = 0 exactly, so x.5 are exact ties
        W = k * 2.0 ** r.integers(-6, -2, size=(8, 1))
        return W, np.diag(2.0 ** r.integers(-2, 3, size=16).astype(np.float64))
    add("rounding_ties", 310, ties, "8x16, weights at exact midpoints of the min-max grid, diagonal H")
    for (o, i), seed in zip(((7, 24), (1, 8), (13, 40), (5, 3), (1, 1), (3, 7)), range(401, 407)):
        add(f"ragged_{o}x{i}", seed, lambda r, o=o, i=i: (heavy_tailed(r, (o, i)) * 0.02,
                                                           gram(activations(r, i, 64))),
            f"{o}x{i}: odd shape")
    add("full_rank", 501, lambda r: (heavy_tailed(r, (16, 32)) * 0.02, gram(activations(r, 32, 256, rank=2))),
        "16x32, well-conditioned full-rank H (for damp = 0)")
    return L


# ----------------------------------------------------------------------------- cases

@dataclass
class CaseSpec:
    name: str
    layer: str
    config: dict[str, Any]
    tags: list[str]
    description: str
    checks: list[str] = field(default_factory=lambda: ["structure", "loss.claimed", "loss.reference"])


def build_cases(layers: dict[str, Layer]) -> list[CaseSpec]:
    cases: list[CaseSpec] = []

    def add(name: str, layer: str, tags: list[str], desc: str = "", **cfg: Any) -> None:
        full = QuantConfig(**cfg).to_dict()  # validates, and records every field
        checks = ["structure", "loss.claimed", "loss.reference"]
        n_in = layers[layer].W.shape[1]
        if "tiny" in tags:
            assert full["group_size"] in (-1, n_in) and (1 << full["bits"]) ** n_in <= 1 << 16, name
            checks.append("loss.optimum")
        cases.append(CaseSpec(name, layer, full, tags, desc or layers[layer].description, checks))

    # tiny: exact optima
    add("tiny_a_b2", "tiny_a", ["tiny"], bits=2)
    add("tiny_a_b2_sym", "tiny_a", ["tiny"], bits=2, symmetric=True)
    add("tiny_a_b2_g8", "tiny_a", ["tiny"], "6x8 with group_size = in (one explicit group)", bits=2, group_size=8)
    add("tiny_outlier_b2", "tiny_outlier", ["tiny", "adversarial"], bits=2)
    add("tiny_lowrank_b2", "tiny_lowrank", ["tiny", "adversarial"], bits=2)
    add("tiny_lowrank_b2_sym", "tiny_lowrank", ["tiny", "adversarial"], bits=2, symmetric=True)
    add("tiny_rows_b2", "tiny_rows", ["tiny", "adversarial"], bits=2)
    add("tiny_rows_b2_sym", "tiny_rows", ["tiny", "adversarial"], bits=2, symmetric=True)
    add("tiny_b3", "tiny_b3", ["tiny"], bits=3)
    add("tiny_b3_sym", "tiny_b3", ["tiny"], bits=3, symmetric=True)
    add("tiny_b1", "tiny_b1", ["tiny"], bits=1)
    add("tiny_b1_sym", "tiny_b1", ["tiny"], bits=1, symmetric=True)
    add("tiny_b4", "tiny_b4", ["tiny"], bits=4)

    # medium: reference results
    add("medium_b2_g64", "medium", ["medium"], bits=2, group_size=64)
    add("medium_b2_pc", "medium", ["medium"], bits=2, group_size=-1)
    add("medium_b3_g32_sym", "medium", ["medium"], bits=3, group_size=32, symmetric=True)
    add("medium_b4_g128", "medium", ["medium"], bits=4, group_size=128)
    add("medium_b2_g64_gptq", "medium", ["medium", "method"], bits=2, group_size=64, method="gptq")
    add("medium_b2_g64_rtn", "medium", ["medium", "method"], bits=2, group_size=64, method="rtn")

    # every bits x group x symmetric combination
    for b in range(1, 9):
        for gs in (-1, 16, 32):
            for sym in (False, True):
                add(f"combo_b{b}_{'pc' if gs == -1 else f'g{gs}'}{'_sym' if sym else ''}", "combo", ["combo"],
                    bits=b, group_size=gs, symmetric=sym)

    # config variants
    add("combo_b2_g16_no_act_order", "combo", ["config"], bits=2, group_size=16, act_order=False)
    add("combo_b2_g16_iters1", "combo", ["config"], bits=2, group_size=16, iters=1)
    add("combo_b2_g16_grid0", "combo", ["config"], bits=2, group_size=16, grid=0)
    add("full_rank_b2_g8_damp0", "full_rank", ["config"], "16x32, damp = 0 (objective = loss)",
        bits=2, group_size=8, damp=0.0)

    # fp16 branch (Ŵ = s·q + z + B on hp_channels columns): the reference stores hp_index/hp_weight
    add("combo_b2_g16_hp4", "combo", ["hp"], bits=2, group_size=16, hp_channels=4)
    add("combo_b1_g16_hp4", "combo", ["hp"], "16x64, 1-bit main branch + 4 fp16 channels",
        bits=1, group_size=16, hp_channels=4)
    add("outlier_columns_b2_pc_hp2_obs", "outlier_columns", ["hp", "adversarial"], bits=2, hp_channels=2,
        hp_select="obs")
    add("rank_deficient_b2_g16_hp8", "rank_deficient_h", ["hp", "adversarial"], bits=2, group_size=16,
        hp_channels=8)

    # adversarial
    add("outlier_columns_b2_pc", "outlier_columns", ["adversarial"], bits=2)
    add("outlier_columns_b2_g16", "outlier_columns", ["adversarial"], bits=2, group_size=16)
    add("rank_deficient_b2_g16", "rank_deficient_h", ["adversarial"], bits=2, group_size=16)
    add("rank_deficient_b3_pc_sym", "rank_deficient_h", ["adversarial"], bits=3, symmetric=True)
    add("near_singular_b2_pc", "near_singular_h", ["adversarial"], bits=2)
    add("near_singular_b2_g32", "near_singular_h", ["adversarial"], bits=2, group_size=32)
    add("dead_inputs_b2_g8", "dead_inputs", ["adversarial"], bits=2, group_size=8)
    add("zero_h_b2_pc", "zero_h", ["adversarial"], bits=2)
    add("zero_rows_b2_g8", "zero_rows", ["adversarial"], bits=2, group_size=8)
    add("zero_rows_b2_g8_sym", "zero_rows", ["adversarial"], bits=2, group_size=8, symmetric=True)
    add("constant_rows_b2_g8", "constant_rows", ["adversarial"], bits=2, group_size=8)
    add("constant_rows_b2_g8_sym", "constant_rows", ["adversarial"], bits=2, group_size=8, symmetric=True)
    add("dynamic_range_b2_g16", "dynamic_range", ["adversarial"], bits=2, group_size=16)
    add("dynamic_range_b4_pc", "dynamic_range", ["adversarial"], bits=4)
    add("exact_grid_b2_pc", "exact_grid", ["adversarial"], bits=2)
    add("exact_grid_b2_g8", "exact_grid", ["adversarial"], bits=2, group_size=8)
    add("rounding_ties_rtn", "rounding_ties", ["adversarial", "ties", "method"], bits=2, method="rtn", grid=0)
    add("rounding_ties_b2", "rounding_ties", ["adversarial", "ties"], bits=2)
    add("ragged_7x24_g8", "ragged_7x24", ["ragged"], bits=2, group_size=8)
    add("ragged_1x8_pc", "ragged_1x8", ["ragged"], bits=2)
    add("ragged_13x40_g8", "ragged_13x40", ["ragged"], bits=2, group_size=8)
    add("ragged_13x40_g20_sym", "ragged_13x40", ["ragged"], bits=3, group_size=20, symmetric=True)
    add("ragged_5x3_pc", "ragged_5x3", ["ragged"], bits=2)
    add("ragged_1x1_pc", "ragged_1x1", ["ragged"], bits=2)
    add("ragged_3x7_pc_b3", "ragged_3x7", ["ragged"], bits=3)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases


# ----------------------------------------------------------------------------- build / write

def build(name: str = "default") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors and the manifest of the suite, computed from scratch."""
    layers = build_layers()
    specs = build_cases(layers)
    tensors: dict[str, np.ndarray] = {}
    man_layers: dict[str, Any] = {}
    used = {c.layer for c in specs}
    for lname, layer in layers.items():
        if lname not in used:
            continue
        tensors[f"layer.{lname}.W"] = layer.W
        tensors[f"layer.{lname}.H"] = layer.H
        man_layers[lname] = {"shape": list(layer.W.shape), "description": layer.description,
                             "sha256": {"W": tensor_hash(layer.W), "H": tensor_hash(layer.H)}}
    man_cases = []
    for c in specs:
        layer = layers[c.layer]
        cfg = QuantConfig.from_dict(c.config)
        res = dq.quantize_layer(layer.W, layer.H, cfg)
        ref = {"q": res.q.astype(np.uint8), "scale": res.scale, "zero": res.zero}
        if res.hp_index is not None:
            ref.update(hp_index=res.hp_index.astype(np.int64), hp_weight=res.hp_weight)
        entry: dict[str, Any] = {
            "name": c.name, "layer": c.layer, "shape": list(layer.W.shape), "tags": c.tags,
            "description": c.description, "config": c.config, "checks": c.checks,
            "reference": {"loss": res.loss, "objective": res.objective,
                          "sha256": {k: tensor_hash(v) for k, v in ref.items()}},
        }
        for k, v in ref.items():
            tensors[f"case.{c.name}.ref.{k}"] = np.ascontiguousarray(v)
        if "loss.optimum" in c.checks:
            Hd = damp_hessian(layer.H, cfg.damp)
            opt = global_optimum(layer.W, Hd, cfg.bits, symmetric=cfg.symmetric)
            o = {"q": opt.q.astype(np.uint8), "scale": np.asarray(opt.scale, dtype=np.float64),
                 "zero": np.asarray(opt.zero, dtype=np.float64)}
            W_hat = dq.dequantize_parts(o["q"], o["scale"], o["zero"])
            entry["optimum"] = {"objective": float(dq.row_losses(layer.W, W_hat, Hd).sum()),
                                "sha256": {k: tensor_hash(v) for k, v in o.items()}}
            for k, v in o.items():
                tensors[f"case.{c.name}.opt.{k}"] = np.ascontiguousarray(v)
        man_cases.append(entry)
    manifest = {
        "suite": name,
        "suite_version": SUITE_VERSION,
        "format_version": FORMAT_VERSION,
        "generator": "python -m validate.make_suite",
        "reference": {"package": "decoupleq_ref", "version": dq.__version__},
        "tensors_file": TENSORS_FILE,
        "policy": policy_section(),
        "layers": man_layers,
        "cases": man_cases,
    }
    return tensors, manifest


def compare_with_files(out_dir: Path, tensors: dict[str, np.ndarray], manifest: dict[str, Any],
                       rtol: float = 1e-6) -> list[str]:
    """Differences between a fresh build and the files on disk ([] = consistent).

    Inputs (layers, configs, case list) must be bit-identical. Reference and optimum results
    must have identical hashes or, where a platform's float rounding decided a tie differently,
    objectives within ``rtol`` (the reference-level tolerance)."""
    problems: list[str] = []
    path = out_dir / MANIFEST_FILE
    if not path.exists():
        return [f"{path} does not exist: run python -m validate.make_suite"]
    old = json.loads(path.read_text())
    for key in ("suite", "suite_version", "format_version", "policy"):
        if old.get(key) != manifest.get(key):
            problems.append(f"manifest field {key!r} differs: {old.get(key)!r} != {manifest.get(key)!r}")
    if old.get("layers") != manifest["layers"]:
        diff = sorted(k for k in set(old.get("layers", {})) | set(manifest["layers"])
                      if old.get("layers", {}).get(k) != manifest["layers"].get(k))
        problems.append(f"input layers differ (not bit-identical): {diff}")
    old_cases = {c["name"]: c for c in old.get("cases", [])}
    new_cases = {c["name"]: c for c in manifest["cases"]}
    if list(old_cases) != list(new_cases):
        problems.append(f"case list differs: only in files {sorted(set(old_cases) - set(new_cases))}, "
                        f"only in build {sorted(set(new_cases) - set(old_cases))}")
    for name in new_cases.keys() & old_cases.keys():
        a, b = old_cases[name], new_cases[name]
        for key in ("layer", "shape", "tags", "config", "checks"):
            if a.get(key) != b.get(key):
                problems.append(f"{name}: {key} differs")
        for part in ("reference", "optimum"):
            if (part in a) != (part in b):
                problems.append(f"{name}: {part} present in only one of files/build")
                continue
            if part not in a or a[part]["sha256"] == b[part]["sha256"]:
                continue
            x, y = a[part]["objective"], b[part]["objective"]
            if abs(x - y) > rtol * max(abs(x), abs(y)) + 1e-300:
                problems.append(f"{name}: {part} objective {y!r} (build) != {x!r} (files) beyond rtol {rtol}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validate.make_suite", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="default", help="suite name (directory under validate/suites)")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default validate/suites/<name>)")
    ap.add_argument("--check", action="store_true", help="regenerate in memory and compare with the files")
    args = ap.parse_args(argv)
    out_dir = args.out or SUITES_DIR / args.name
    tensors, manifest = build(args.name)
    if args.check:
        problems = compare_with_files(out_dir, tensors, manifest)
        for p in problems:
            print("DIFF", p)
        print(f"{out_dir}: {'consistent with a fresh build' if not problems else f'{len(problems)} differences'}")
        return 1 if problems else 0
    write(out_dir, tensors, manifest)
    size = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"wrote {out_dir} ({len(manifest['cases'])} cases, {size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
