"""GPU benchmarks of issue 4 (needs a CUDA GPU; exits with a message otherwise).

1. packed_matmul (W2, g64 and per-channel) vs torch fp16 ``x @ W.T`` (cuBLAS) on 8192² and
   16384², batch 1, 4, 16, 64, timed with CUDA events in the same process; prints the ratio.
2. The solver on a Llama-7B-shaped layer set (4096×4096 ×4, 11008×4096 ×2, 4096×11008; synthetic
   weights, random PSD H) at W2 per-channel and g64: seconds per layer, the extrapolated time for
   32 blocks, and the speed-up over the numba CPU backend on the first layer where available.

    .venv/bin/python bench/bench_gpu.py [--matmul-only | --solver-only] [--reps 50]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

import decoupleq_ref as dq
import gpu

LLAMA7B_BLOCK = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                 ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]


def need_gpu():
    if not gpu.available():
        sys.exit("bench_gpu: no CUDA GPU usable through numba-cuda here (the simulator does not count); "
                 "run it on a GPU machine with pip install -e \".[cuda,torch]\"")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu: torch has no CUDA here; install a CUDA build of torch==2.13.0 for the cuBLAS baseline")
    return torch


def time_events(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps, CUDA events around each call (after 3 warm-ups)."""
    from numba import cuda

    for _ in range(3):
        fn()
    cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = cuda.event(), cuda.event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(cuda.event_elapsed_time(start, end))
    return float(np.median(times))


def bench_matmul(torch, reps: int) -> None:
    from numba import cuda

    print(f"device: {torch.cuda.get_device_name()}")
    print(f"{'shape':>12} {'group':>6} {'batch':>5} {'packed ms':>10} {'torch fp16 ms':>14} {'speed-up':>9}")
    rng = np.random.default_rng(0)
    for n in (8192, 16384):
        q = rng.integers(0, 4, (n, n), dtype=np.uint8)
        for gs in (64, -1):
            G = 1 if gs == -1 else n // gs
            layer = dq.PackedLayer(dq.pack(q, 2), rng.random((n, G), dtype=np.float32) * 0.01,
                                   -rng.random((n, G), dtype=np.float32) * 0.01, 2, gs, (n, n))
            dev = gpu.DevicePackedLayer(layer)
            W16 = torch.from_numpy(layer.dequantize().astype(np.float16)).cuda()
            for batch in (1, 4, 16, 64):
                x16 = torch.randn(batch, n, device="cuda", dtype=torch.float16)
                dx = cuda.as_cuda_array(x16)
                t_packed = time_events(lambda: gpu.packed_matmul(dx, dev), reps)
                t_torch = time_events(lambda: x16 @ W16.T, reps)
                print(f"{n:>5}×{n:<6} {gs:>6} {batch:>5} {t_packed:>10.4f} {t_torch:>14.4f} {t_torch / t_packed:>8.2f}×")
            del W16


def bench_solver(torch) -> None:
    rng = np.random.default_rng(0)
    for gs in (-1, 64):
        cfg = dq.QuantConfig(bits=2, group_size=gs)
        total = 0.0
        for name, out, n in LLAMA7B_BLOCK:
            W = rng.standard_t(5, (out, n)) * 0.02
            X = rng.standard_normal((2 * n, n)).astype(np.float64)
            H = X.T @ X / X.shape[0]
            t = time.perf_counter()
            res = gpu.quantize_layer(W, H, cfg)
            dt = time.perf_counter() - t
            total += dt
            print(f"g={gs:>3} {name:>9} {out}×{n}: {dt:8.2f} s  objective {res.objective:.4g}")
            if name == "q_proj":
                cpu_speedup(W, H, cfg, dt)
        print(f"g={gs:>3} one block {total:.1f} s → 32 blocks ≈ {32 * total / 60:.1f} min (goal ≤ 15 min)")


def cpu_speedup(W, H, cfg, t_gpu: float) -> None:
    from decoupleq_ref.backends import backend_available, get_solver

    if not backend_available("numba"):
        print("  (numba CPU backend not available: no speed-up figure)")
        return
    t = time.perf_counter()
    get_solver("numba")(W, H, cfg)
    t_cpu = time.perf_counter() - t
    print(f"  numba CPU on the same layer: {t_cpu:.1f} s → GPU speed-up {t_cpu / t_gpu:.1f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matmul-only", action="store_true")
    ap.add_argument("--solver-only", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    torch = need_gpu()
    if not args.solver_only:
        bench_matmul(torch, args.reps)
    if not args.matmul_only:
        bench_solver(torch)


if __name__ == "__main__":
    main()
