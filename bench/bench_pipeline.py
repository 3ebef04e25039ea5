"""SmolLM2-135M perplexity after quantization, per method and setting (BENCHMARKS.md §5).

Every quantized model comes from `decoupleq run` (true-sequential: each block's H is captured on
the outputs of the already-quantized prefix), so the methods differ only in the layer solver:

    rtn            init only (H-scored min-max grid)        --method rtn       --block-epochs 0 --model-epochs 0
    gptq           init + GPTQ rounding                     --method gptq      --block-epochs 0 --model-epochs 0
    decoupleq      the alternation, layer-wise only         --method decoupleq --block-epochs 0 --model-epochs 0
    decoupleq+bw   the same + `run`'s trained stages        --method decoupleq (block-wise and model-level stages
                   at the --block-* / --model-* settings, default `run`'s)

Calibration: --nsamples random windows of --seqlen tokens of wikitext-2 valid (default 32 x 512);
evaluation: the first --eval-tokens (16384) tokens of wikitext-2-raw test in non-overlapping windows
of --eval-seqlen (default --seqlen). Each run's time per stage goes to the JSON. Results go to --out-json after every
run (a re-run skips what is there, and resumes an interrupted checkpoint), then a table and a PNG
of perplexity vs bits per method.

    .venv/bin/python bench/bench_pipeline.py --settings 2:64,4:-1 --png docs/pipeline_ppl.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path

from decoupleq_ref.cli_model import (DEFAULT_CALIB_TEXT, DEFAULT_EVAL_TEXT, SOLVERS, eval_pipeline, quant_config,
                                    run_pipeline, stage_settings)
from decoupleq_ref.model.atomic import write_json
from decoupleq_ref.model.train_config import PRECISION_CHOICES, SCHEDULES, TARGETS, BlockwiseConfig, ModelStageConfig
from decoupleq_ref.model.source import resolve_model

METHODS = ("rtn", "gptq", "decoupleq", "decoupleq+bw")


def setting_name(bits: int, group_size: int) -> str:
    return f"W{bits} " + ("pc" if group_size == -1 else f"g{group_size}")


def parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        bits, _, gs = item.partition(":")
        out.append((int(bits), int(gs or -1)))
    return out


def one_run(source, args, bits: int, group_size: int, method: str) -> dict:
    """run → eval of one (setting, method); checkpoint under args.workdir (resumable)."""
    solver_method = "decoupleq" if method == "decoupleq+bw" else method
    epochs = args.block_epochs if method == "decoupleq+bw" else 0
    suffix = "" if args.solver == "official" else f"_{args.solver}"
    out = args.workdir / f"w{bits}_g{group_size}_{method.replace('+', '_')}{suffix}"
    cfg = quant_config(bits, group_size, solver_method, solver=args.solver)
    t0 = time.perf_counter()
    model_epochs = args.model_epochs if method == "decoupleq+bw" else 0
    blockwise, model_stage, times = stage_settings(args.device, epochs, args.block_lr, args.block_targets,
                                                   args.block_schedule, args.block_retries, model_epochs, args.model_lr,
                                                   args.model_retries, args.train_precision)
    config = run_pipeline(source, args.calib_text, args.nsamples, args.seqlen, 0, cfg, args.backend, blockwise,
                          out, overwrite=False, device=args.device, times=times, model_stage=model_stage)
    t_run = time.perf_counter() - t0
    print(f"{setting_name(bits, group_size)} {method}: run {t_run:.0f}s, time per stage:\n{times.table(t_run)}", flush=True)
    r = eval_pipeline(source, out, args.eval_text, args.eval_seqlen, args.eval_tokens, device=args.device)
    stages = config.get("blockwise", [])
    improved = sum(1 for s in stages if s.get("kept") == "trained")
    return {"setting": setting_name(bits, group_size), "bits": bits, "group_size": group_size, "method": method,
            "solver": args.solver, "perplexity": r["perplexity"], "kl": r["kl"], "tokens": r["tokens"],
            "seqlen": r["seqlen"],
            "run_seconds": t_run, "eval_seconds": time.perf_counter() - t0 - t_run, "backend": config["backend"],
            "blocks_improved_by_bw": improved if epochs else None, "stage_seconds": times.as_dict(),
            "blockwise": blockwise.settings() if epochs else None, "model_stage": config.get("model_stage"),
            "layer_loss_total": sum(v["loss"] for v in config["layers"].values())}


def table(results: dict) -> str:
    fp = results.get("fp")
    lines = [f"fp32 perplexity {fp['perplexity']:.3f} ({fp['tokens']} tokens, seqlen {fp['seqlen']})" if fp else "",
             f"{'setting':<8} {'method':<13} {'ppl':>9} {'ppl/fp':>7} {'KL':>7} {'run s':>7}"]
    for key, r in results.items():
        if key == "fp":
            continue
        ratio = r["perplexity"] / fp["perplexity"] if fp else math.nan
        lines.append(f"{r['setting']:<8} {r['method']:<13} {r['perplexity']:>9.3f} {ratio:>7.3f} {r['kl']:>7.4f} "
                     f"{r['run_seconds']:>7.0f}")
    return "\n".join(lines)


def plot(results: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, grouped in zip(axes, (False, True)):
        for method in METHODS:
            pts = sorted((r["bits"], r["perplexity"]) for k, r in results.items()
                         if k != "fp" and r["method"] == method and (r["group_size"] != -1) == grouped)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        if "fp" in results:
            ax.axhline(results["fp"]["perplexity"], color="k", ls="--", label="fp32")
        ax.set_yscale("log")
        ax.set_xticks([2, 3, 4])
        ax.set_xlim(1.7, 4.3)
        ax.set_xlabel("bits")
        ax.set_title("group size 64" if grouped else "per-channel")
        ax.set_ylabel("wikitext-2 test perplexity")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct (" + (f"{results['fp']['tokens']} tokens, seqlen {results['fp']['seqlen']})"
                                              if "fp" in results else ")"))
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="2:64,4:-1,2:-1,3:-1", help="bits:group_size list, in order")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--calib-text", type=Path, default=DEFAULT_CALIB_TEXT)
    p.add_argument("--eval-text", type=Path, default=DEFAULT_EVAL_TEXT)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512, help="calibration window (and evaluation window unless "
                   "--eval-seqlen)")
    p.add_argument("--eval-seqlen", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--block-epochs", type=int, default=BlockwiseConfig.epochs)
    p.add_argument("--block-lr", type=float, default=BlockwiseConfig.lr)
    p.add_argument("--block-targets", default=BlockwiseConfig.targets, choices=TARGETS)
    p.add_argument("--train-precision", default="auto", choices=PRECISION_CHOICES)
    p.add_argument("--model-epochs", type=int, default=ModelStageConfig.epochs)
    p.add_argument("--model-lr", type=float, default=ModelStageConfig.lr)
    p.add_argument("--model-retries", type=int, default=ModelStageConfig.retries)
    p.add_argument("--block-schedule", default=BlockwiseConfig.schedule, choices=SCHEDULES)
    p.add_argument("--block-retries", type=int, default=BlockwiseConfig.retries)
    p.add_argument("--solver", default="official", choices=SOLVERS,
                   help="layer solver settings (decoupleq run --solver)")
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="auto", help="torch device of the forward passes (decoupleq run --device)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_pipeline"))
    p.add_argument("--out-json", type=Path, default=Path("/tmp/bench_pipeline/results.json"))
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="other --out-json files (e.g. a second process's) to include in the table and plot")
    args = p.parse_args()
    if args.png and importlib.util.find_spec("matplotlib") is None:  # before the runs, not after them
        p.error("--png: needs matplotlib; install it with pip install -e '.[bench]', or leave out --png")
    args.eval_seqlen = args.eval_seqlen or args.seqlen
    args.workdir.mkdir(parents=True, exist_ok=True)
    source = resolve_model(args.model)
    results = json.loads(args.out_json.read_text()) if args.out_json.exists() else {}
    if "fp" not in results:
        t0 = time.perf_counter()
        r = eval_pipeline(source, None, args.eval_text, args.eval_seqlen, args.eval_tokens, device=args.device)
        results["fp"] = {**r, "eval_seconds": time.perf_counter() - t0}
        write_json(args.out_json, results)
    print(table(results), flush=True)
    for bits, gs in parse_settings(args.settings):
        for method in args.methods.split(","):
            key = f"{setting_name(bits, gs)} {method}" + ("" if args.solver == "official" else f" {args.solver}")
            if key in results:
                continue
            results[key] = one_run(source, args, bits, gs, method)
            write_json(args.out_json, results)
            print(table(results).splitlines()[-1], flush=True)
    for extra in args.merge:
        results = {**json.loads(extra.read_text()), **results}
    print(table(results))
    if args.png:
        plot(results, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
