"""Block-wise training step in float32 vs bfloat16 autocast, side by side (BENCHMARKS.md §5).

One SmolLM2-135M decoder block, quantized layer-wise with the RTN init (the stage's speed does
not depend on how q was found), its (s, z) and norm weights trained towards the float block's
output by ``train_block`` for one epoch over the calibration windows — exactly the step
`decoupleq run` takes — once per precision, alternating, ``--repeats`` times. Prints the time
per Adam step (forward + backward + optimizer, from the stage timer), the bf16/fp32 ratio of
the medians, and each precision's output MSE after the epoch measured in float32 (so a faster
step that learns less shows up).

    .venv/bin/python bench/bench_train_precision.py                   # 32 windows x 512, block 0
    .venv/bin/python bench/bench_train_precision.py --block 15 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from decoupleq_ref.cli_model import DEFAULT_CALIB_TEXT, quant_config, solver_for, text_windows
from decoupleq_ref.format import dequantize_parts
from decoupleq_ref.model.blockwise import output_mse, train_block
from decoupleq_ref.model.checkpoint import packed_layer
from decoupleq_ref.model.sequential import block_inputs, decoder_blocks, forward_block, quantize_block
from decoupleq_ref.model.source import resolve_model
from decoupleq_ref.model.stage_times import StageTimes
from decoupleq_ref.model.torch_model import find_linears, load_model, native_bf16, set_layer_matrix
from decoupleq_ref.model.train_config import BlockwiseConfig
from decoupleq_ref.packing import unpack

STEP_STAGES = ("blockwise forward", "blockwise backward", "blockwise optimizer")


def quantized_block(block: torch.nn.Module, prefix: str, X: torch.Tensor, kwargs: dict, bits: int,
                    group_size: int) -> dict[str, tuple]:
    """RTN-quantize the block in place (layer-wise, no stage) and return train_block's ``quant``."""
    cfg = quant_config(bits, group_size, "rtn")
    solve, _ = solver_for(None)
    tensors, info, _ = quantize_block(block, prefix, X, kwargs, cfg, solve, BlockwiseConfig(epochs=0), seed=0)
    quant = {}
    for full, layer in info["layers"].items():
        p = packed_layer(tensors, full, layer, bits, group_size)
        quant[full.removeprefix(prefix)] = (unpack(p.packed, bits, p.shape), p.scale, p.zero, None)
    return quant


def one_epoch(block: torch.nn.Module, quant: dict[str, tuple], X: torch.Tensor, Y: torch.Tensor, kwargs: dict,
              precision: str, lr: float) -> tuple[float, float]:
    """(seconds per Adam step, output MSE after the epoch in float32) on a copy of ``block``."""
    work = copy.deepcopy(block)
    times = StageTimes()
    config = BlockwiseConfig(epochs=1, lr=lr, targets="quantized", precision=precision)
    r = train_block(work, quant, X, Y, kwargs, config, seed=0, times=times)
    step = sum(times.seconds[s] for s in STEP_STAGES) / r.steps
    linears = find_linears(work)
    for name, (q, _, _, _) in quant.items():  # Ŵ from the trained (s, z), as the pipeline commits it
        set_layer_matrix(linears[name], dequantize_parts(q, r.scales[name], r.zeros[name]).astype(np.float32))
    return step, output_mse(forward_block(work, X, kwargs), Y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    p.add_argument("--calib-text", type=Path, default=DEFAULT_CALIB_TEXT)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--block", type=int, default=0, help="which decoder block")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=BlockwiseConfig.lr)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    device = torch.device("cpu")
    if not native_bf16(device):
        print("note: this CPU has no native bf16 (AVX-512-BF16 / AMX); autocast emulates it")
    model, tokenizer = load_model(resolve_model(args.model), causal=True)
    windows = text_windows(tokenizer, args.calib_text, args.nsamples, args.seqlen, seed=0, option="--calib-text")
    X, kwargs = block_inputs(model, windows)
    blocks = decoder_blocks(model)
    if not 0 <= args.block < len(blocks):
        raise SystemExit(f"--block: expected 0..{len(blocks) - 1}, got {args.block}")
    with torch.no_grad():
        for block in list(blocks)[:args.block]:  # the float prefix's output is this block's input
            X = forward_block(block, X, kwargs)
    block = blocks[args.block]
    Y = forward_block(block, X, kwargs)
    t0 = time.perf_counter()
    quant = quantized_block(block, f"model.layers.{args.block}.", X, kwargs, args.bits, args.group_size)
    print(f"block {args.block}: {len(quant)} linears RTN W{args.bits} g{args.group_size} in "
          f"{time.perf_counter() - t0:.1f} s; MSE before training {output_mse(forward_block(block, X, kwargs), Y):.6g}")
    print(f"{args.nsamples} windows x {args.seqlen} tokens, one epoch at lr {args.lr:g}, torch threads "
          f"{torch.get_num_threads()}")

    steps: dict[str, list[float]] = {"fp32": [], "bf16": []}
    mse: dict[str, float] = {}
    for r in range(args.repeats):
        for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            s, mse[precision] = one_epoch(block, quant, X, Y, kwargs, precision, args.lr)
            steps[precision].append(s)
            print(f"  repeat {r}: {precision} {1000 * s:7.1f} ms/step, MSE after {mse[precision]:.6g}", flush=True)
    fp32, bf16 = statistics.median(steps["fp32"]), statistics.median(steps["bf16"])
    print(f"median ms/step: fp32 {1000 * fp32:.1f}, bf16 {1000 * bf16:.1f}; bf16 / fp32 = {bf16 / fp32:.2f} "
          f"(speed-up {fp32 / bf16:.2f}x); MSE after one epoch: fp32 {mse['fp32']:.6g}, bf16 {mse['bf16']:.6g}")


if __name__ == "__main__":
    main()
