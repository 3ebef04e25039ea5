"""Where a checkpoint's perplexity loss comes from: the float model with only one group of its
linears replaced by the checkpoint's Ŵ (BENCHMARKS.md §5, "Where the W4 per-channel gap comes from").

Groups: each linear type (q_proj, …, down_proj: that linear in every block) and each run of
--block-span consecutive blocks (all seven linears of those blocks). Only the linears change; a
block-wise checkpoint's trained norm weights are not applied, so pass a layer-wise checkpoint
(`run --block-epochs 0`) for a clean attribution. "all" swaps every linear and must give the
checkpoint's own perplexity (for a layer-wise checkpoint): the script's check on itself.

    .venv/bin/python bench/layer_sensitivity.py /tmp/bench_pipeline/w4_g-1_decoupleq --out-json /tmp/sens_w4.json
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import time
from pathlib import Path

from decoupleq_ref.cli_model import DEFAULT_EVAL_TEXT
from decoupleq_ref.model.atomic import write_json
from decoupleq_ref.model.checkpoint import dequantized_weight, read_checkpoint_tensors
from decoupleq_ref.model.evaluate import evaluate
from decoupleq_ref.model.source import resolve_model
from decoupleq_ref.model.text import consecutive_windows, token_ids
from decoupleq_ref.model.torch_model import load_model, set_layer_matrix

BLOCK = re.compile(r"\.layers\.(\d+)\.")


def groups(names: list[str], span: int) -> dict[str, list[str]]:
    """{group label: linear names}: "all", one group per linear type, one per run of ``span`` blocks."""
    out: dict[str, list[str]] = {"all": list(names)}
    for kind in sorted({n.rpartition(".")[2] for n in names}):
        out[kind] = [n for n in names if n.endswith("." + kind)]
    blocks = sorted({int(m.group(1)) for n in names if (m := BLOCK.search(n))})
    for start in range(0, len(blocks), span):
        part = set(blocks[start:start + span])
        out[f"blocks {min(part)}-{max(part)}"] = [n for n in names
                                                  if (m := BLOCK.search(n)) and int(m.group(1)) in part]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--model", default=None, help="the checkpoint's MODEL (default: the embedded SmolLM2)")
    ap.add_argument("--eval-text", type=Path, default=DEFAULT_EVAL_TEXT)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--block-span", type=int, default=5)
    ap.add_argument("--only", default=None, help="comma-separated group labels to run (default: all groups)")
    ap.add_argument("--out-json", type=Path, default=None, help="results, rewritten after every group")
    args = ap.parse_args()

    config, tensors = read_checkpoint_tensors(args.checkpoint)
    fp, tokenizer = load_model(resolve_model(args.model), causal=True)
    windows = consecutive_windows(token_ids(tokenizer, args.eval_text, "--eval-text"), args.seqlen, args.eval_tokens)
    base = evaluate(fp, windows)
    print(f"fp: ppl {base['perplexity']:.3f} on {base['tokens']} tokens", flush=True)
    results = {"checkpoint": str(args.checkpoint), "bits": config["bits"], "group_size": config["group_size"],
               "method": config["method"], "fp": base, "groups": {}}
    todo = groups(list(config["layers"]), args.block_span)
    if args.only:
        todo = {k: todo[k] for k in args.only.split(",")}
    for label, names in todo.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(fp)
        for name in names:
            W_hat = dequantized_weight(tensors, name, config["layers"][name], config["bits"], config["group_size"])
            set_layer_matrix(model.get_submodule(name), W_hat)
        r = evaluate(model, windows, reference=fp)
        del model
        r["linears"], r["seconds"] = len(names), time.perf_counter() - t0
        r["ppl_over_fp"] = r["perplexity"] / base["perplexity"]
        results["groups"][label] = r
        print(f"{label:>14}: {len(names):3d} linears  ppl {r['perplexity']:.3f} ({r['ppl_over_fp']:.4f}x fp)  "
              f"KL {r['kl']:.4f}", flush=True)
        if args.out_json:
            write_json(args.out_json, results)


if __name__ == "__main__":
    main()
