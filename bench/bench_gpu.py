"""GPU benchmarks of the gpu backend (needs a CUDA GPU and a CUDA build of torch; exits with a
message otherwise). Every ratio is measured side by side in one process.

1. Card: name, SMs, and a device-to-device copy's GB/s (read + write), the practical peak the
   packed GEMV's bandwidth is compared with.
2. packed_matmul W2 (g64 and per-channel) vs torch fp16 ``x @ W.T`` (cuBLAS) on n×n for n in
   4096, 8192, 16384 at batch 1, 4, 16, 64. Two timings each:
   * kernel: device time per call. A ``torch.cuda._sleep`` holds the GPU while the host queues
     a burst of calls between two CUDA events, so Python's launch cost (numba's is tens of µs,
     more than a 2-bit GEMV takes) does not count; this is what a CUDA graph or a C++ caller sees.
   * call: CUDA events around single calls, host launch cost included.
   Plus the error of each result against torch fp32 ``x @ Ŵᵀ`` on the same dequantized weights.
   A kernel time marked ``!`` was launch-bound: the host queued the burst more slowly than the
   GPU ran it, so the figure is an upper bound.
3. GEMV block shapes (warps per block × rows per warp) at batch 1 and 4, to choose the default,
   and the W2 quad GEMV with its inner step in linked CUDA C and in Python side by side.
4. The solver on the Llama-7B-shaped layers (synthetic weights and H, ``synthetic_layer``) at W2
   per-channel and g64: seconds per layer (kernel compilation excluded: a tiny warm-up solve
   first), the one-block and 32-block extrapolation, and with ``--profile`` where the first
   layer's time goes (a synchronize after every kernel launch, summed per kernel; the rest is
   host work and launch overhead).

    python bench/bench_gpu.py [--only matmul gemv solver] [--sizes 4096 8192 16384]
                              [--solver-layers q_proj gate_proj down_proj] [--solver-groups -1 64]
                              [--solver-budget 300] [--profile] [--reps 200]
    python bench/bench_gpu.py --only solver --solver-backend numba     # the same layers on the CPU
"""

from __future__ import annotations

import argparse
import cProfile
import collections
import functools
import pstats
import sys
import time

import numpy as np

import decoupleq_ref as dq
import gpu

LLAMA7B_LAYERS = {"q_proj": (4096, 4096), "gate_proj": (11008, 4096), "down_proj": (4096, 11008)}
LLAMA7B_BLOCK = {"q_proj": 4, "gate_proj": 2, "down_proj": 1}  # q,k,v,o | gate,up | down
# (warps per block, rows per warp): 4×1 is the first kernel measured on hardware (one row per
# warp); the defaults are 8×4 at batch 1 and 8×8 at batch 2..4 (gpu.matmul.gemv_rows_per_warp)
GEMV_SHAPES = [(4, 1), (8, 4), (8, 8), (4, 8)]


def need_gpu():
    if not gpu.available():
        sys.exit("bench_gpu: no CUDA GPU usable through numba-cuda here (the simulator does not count); "
                 "run it on a GPU machine with pip install -e \".[cuda,torch]\"")
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_gpu: torch has no CUDA here; install a CUDA build of torch for the cuBLAS baseline")
    return torch


def call_ms(torch, fn, reps: int) -> float:
    """Median ms of single calls between CUDA events (after 3 warm-ups): host launch cost included."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def kernel_ms(torch, fn, burst: int, rounds: int = 3) -> float:
    """Device ms per call: the GPU sleeps while the host queues a burst of calls between two
    events, then runs them back to back; best of `rounds`. The burst is `burst` calls (20..400),
    fewer for slow calls (about 30 ms of GPU work). Marked launch-bound (returned negative) when
    the host took longer to queue them than the GPU slept, i.e. the GPU may have idled."""
    burst = max(20, min(burst, 400))
    burst = max(5, min(burst, int(30.0 / max(call_ms(torch, fn, 3), 1e-3))))
    best, launch_bound = float("inf"), False
    for _ in range(rounds):
        e0, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        e0.record()
        torch.cuda._sleep(int(2e6 * (10 + burst * 0.1)))  # ≈ (10 + burst/10) ms at ~2 GHz
        start.record()
        t = time.perf_counter()
        for _ in range(burst):
            fn()
        host_ms = (time.perf_counter() - t) * 1e3
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end) / burst
        if ms < best:
            best, launch_bound = ms, host_ms > e0.elapsed_time(start)
    return -best if launch_bound else best


def fmt_ms(ms: float, width: int) -> str:
    return f"{abs(ms):>{width - 1}.4f}" + ("!" if ms < 0 else " ")


def card(torch) -> float:
    """Print the card and return a device-to-device copy's GB/s (bytes read + written)."""
    p = torch.cuda.get_device_properties(0)
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = abs(kernel_ms(torch, lambda: b.copy_(a), burst=20))
    gbps = 2 * a.numel() / ms / 1e6
    print(f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
          f"torch {torch.__version__}; copy 1 GiB: {gbps:.0f} GB/s (read + write)")
    del a, b
    return gbps


@functools.lru_cache(maxsize=1)
def random_codes(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(q, packed q): random W2 codes for an n×n layer, packed once per size (pack is host work)."""
    q = np.random.default_rng(n).integers(0, 4, (n, n), dtype=np.uint8)
    return q, dq.pack(q, 2)


def packed_case(n: int, gs: int, rng) -> dq.PackedLayer:
    """A random W2 n×n PackedLayer (codes from random_codes, random scales and zeros)."""
    _, packed = random_codes(n)
    G = 1 if gs == -1 else n // gs
    scale = (rng.random((n, G), dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
    zero = (-rng.random((n, G), dtype=np.float32) * 0.01).astype(np.float32)
    return dq.PackedLayer(packed, scale, zero, 2, gs, (n, n))


def dense_weight(torch, layer: dq.PackedLayer):
    """Ŵ of `layer` as fp32 on the device (dequantized there: the host would take seconds at 16384²)."""
    q, _ = random_codes(layer.shape[0])
    width = layer.shape[1] if layer.group_size == -1 else layer.group_size
    return torch.from_numpy(q).cuda().float() * torch.from_numpy(layer.scale).cuda().repeat_interleave(width, 1) \
        + torch.from_numpy(layer.zero).cuda().repeat_interleave(width, 1)


def bench_matmul(torch, sizes, reps: int, peak: float) -> None:
    from numba import cuda

    from gpu.matmul import quad_linked

    print("\n## packed_matmul W2 vs torch fp16 x @ W.T (kernel = device time per call; call = with host launch)")
    print(f"batch ≤ 4: the quad GEMV, inner step {'linked CUDA C' if quad_linked() else 'Python (no cffi?)'}; "
          "batch 16: the word GEMV; batch 64: the fp32 tile GEMM")
    print(f"{'shape':>12} {'group':>6} {'batch':>5} {'packed ms':>10} {'fp16 ms':>9} {'speed-up':>9} "
          f"{'packed GB/s':>11} {'of copy':>8} {'call packed':>11} {'call fp16':>10} {'rel err':>8}")
    rng = np.random.default_rng(0)
    for n in sizes:
        for gs in (64, -1):
            layer = packed_case(n, gs, rng)
            dev, W32 = gpu.DevicePackedLayer(layer), dense_weight(torch, layer)
            W16 = W32.half()
            nbytes = layer.packed.nbytes + layer.scale.nbytes + layer.zero.nbytes
            for batch in (1, 4, 16, 64):
                x16 = torch.randn(batch, n, device="cuda", dtype=torch.float16)
                dx = cuda.as_cuda_array(x16)
                y = cuda.device_array((batch, n), np.float32)
                y16 = torch.empty(batch, n, device="cuda", dtype=torch.float16)
                W16T = W16.T

                def packed():
                    gpu.packed_matmul(dx, dev, out=y)

                def fp16():
                    torch.matmul(x16, W16T, out=y16)

                packed()
                ref = x16.float() @ W32.T
                err = float((torch.as_tensor(y, device="cuda") - ref).abs().max() / ref.abs().max())
                k_p, k_t = kernel_ms(torch, packed, reps), kernel_ms(torch, fp16, reps)
                t_p, t_t = abs(k_p), abs(k_t)
                c_p, c_t = call_ms(torch, packed, 20), call_ms(torch, fp16, 20)
                gbps = (nbytes + x16.numel() * 2 + batch * n * 4) / t_p / 1e6
                print(f"{n:>5}×{n:<6} {gs:>6} {batch:>5} {fmt_ms(k_p, 11)}{fmt_ms(k_t, 10)}{t_t / t_p:>8.2f}× "
                      f"{gbps:>11.0f} {gbps / peak:>7.0%} {c_p:>11.4f} {c_t:>10.4f} {err:>8.1e}", flush=True)
            del W16, W32, dev
            torch.cuda.empty_cache()


def bench_gemv_shapes(torch, sizes, reps: int) -> None:
    from numba import cuda

    from gpu.matmul import GEMV_WARPS, gemv_rows_per_warp, launch_gemv, launch_gemv_quad, quad_linked

    print("\n## GEMV block shapes (kernel ms per call, g64): warps per block × rows per warp; quad = the W2 "
          "quad GEMV (16-byte loads, no barrier in the loop) at 8 warps and the default rows, inner step in "
          f"linked CUDA C (quad-C{'' if quad_linked() else ': unavailable here'}) or Python (quad-py)")
    print(f"{'shape':>12} {'batch':>5} " + "".join(f"{f'{w}w×{r}r':>10}" for w, r in GEMV_SHAPES)
          + f"{'quad-C':>10}{'quad-py':>10}")
    rng = np.random.default_rng(1)
    for n in sizes:
        dev = gpu.DevicePackedLayer(packed_case(n, 64, rng))
        for batch in (1, 4):
            x16 = torch.randn(batch, n, device="cuda", dtype=torch.float16)
            dx = cuda.as_cuda_array(x16)
            y = cuda.device_array((batch, n), np.float32)
            row = []
            for w, r in GEMV_SHAPES:
                try:
                    row.append(fmt_ms(kernel_ms(torch, lambda: launch_gemv(dx, dev, y, warps=w, rows=min(r, 32 // batch)),
                                                reps), 10))
                except ValueError:  # too much shared memory for this batch
                    row.append(f"{'-':>10}")
                except Exception as exc:  # e.g. a launch out of registers: report it, go on
                    row.append(f"{type(exc).__name__[:9]:>10}")
            for linked in (True, False):
                try:
                    row.append(fmt_ms(kernel_ms(torch, lambda: launch_gemv_quad(
                        dx, dev, y, warps=GEMV_WARPS, rows=gemv_rows_per_warp(batch), linked=linked), reps), 10))
                except Exception as exc:  # no cffi, a link or launch failure: report it, go on
                    row.append(f"{type(exc).__name__[:9]:>10}")
            print(f"{n:>5}×{n:<6} {batch:>5} " + "".join(row), flush=True)
        del dev
        torch.cuda.empty_cache()


class LaunchTimer:
    """Synchronize after every numba kernel launch and sum the seconds per kernel."""

    def __init__(self):
        from numba import cuda
        from numba.cuda import dispatcher

        self.cuda, self.cls = cuda, dispatcher._LaunchConfiguration
        self.orig = self.cls.__call__
        self.seconds = collections.Counter()
        self.calls = collections.Counter()

    def __enter__(self):
        timer = self

        def timed_call(cfg, *args):
            t = time.perf_counter()
            res = timer.orig(cfg, *args)
            timer.cuda.synchronize()
            name = cfg.dispatcher.py_func.__qualname__.replace(".<locals>.kernel", "")
            timer.seconds[name] += time.perf_counter() - t
            timer.calls[name] += 1
            return res

        self.cls.__call__ = timed_call
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.orig


def profile_solve(W, H, cfg) -> None:
    prof = cProfile.Profile()
    with LaunchTimer() as lt:
        t = time.perf_counter()
        prof.enable()
        gpu.quantize_layer(W, H, cfg)
        prof.disable()
        total = time.perf_counter() - t
    in_kernels = sum(lt.seconds.values())
    print(f"  profile (sync after each launch): {total:.2f} s, kernels {in_kernels:.2f} s "
          f"({in_kernels / total:.0%}), host and launches {total - in_kernels:.2f} s")
    for name, sec in lt.seconds.most_common(8):
        print(f"    kernel {name:<32} {sec:7.3f} s  {lt.calls[name]:>6} launches")
    st = pstats.Stats(prof)
    rows = sorted(((v[2], k) for k, v in st.stats.items()), reverse=True)[:12]  # own time
    for own, (file, line, fn) in rows:
        if own > 0.02 * total:
            print(f"    host   {fn:<32} {own:7.3f} s  ({file.split('/')[-1]}:{line})")


def bench_solver(layers, groups, budget: float, profile: bool, backend: str = "cuda") -> None:
    if backend == "cuda":
        solve = gpu.quantize_layer
    else:
        import kernels_numba

        solve, profile = kernels_numba.quantize_layer, False
    print(f"\n## solver ({backend}), Llama-7B-shaped layers (synthetic_layer; W2)")
    W, H = dq.synthetic_layer(64, 128, seed=1)
    t = time.perf_counter()
    for gs in groups:
        solve(W, H, dq.QuantConfig(bits=2, group_size=gs))
    print(f"warm-up (kernel compilation, tiny layer, both configs): {time.perf_counter() - t:.1f} s")
    t_start = time.perf_counter()
    done: dict[int, dict[str, float]] = {gs: {} for gs in groups}
    for name in layers:  # each shape at every config before the next shape: the budget may end it
        out, n = LLAMA7B_LAYERS[name]
        W, H = dq.synthetic_layer(out, n, seed=0)
        for gs in groups:
            if time.perf_counter() - t_start > budget:
                print(f"g={gs:>3} {name}: skipped (solver budget {budget:.0f} s spent)")
                continue
            cfg = dq.QuantConfig(bits=2, group_size=gs)
            t = time.perf_counter()
            res = solve(W, H, cfg)
            done[gs][name] = dt = time.perf_counter() - t
            print(f"g={gs:>3} {name:>9} {out}×{n}: {dt:8.2f} s  loss {res.loss:.6g}  steps {len(res.loss_history)}",
                  flush=True)
            if profile and name == layers[0] and gs == groups[0]:
                profile_solve(W, H, cfg)
    for gs in groups:
        if set(done[gs]) == set(LLAMA7B_BLOCK):
            block = sum(LLAMA7B_BLOCK[k] * t for k, t in done[gs].items())
            print(f"g={gs:>3} one block (4 q-shaped + 2 gate-shaped + 1 down-shaped) {block:.1f} s → "
                  f"32 blocks ≈ {32 * block / 60:.1f} min (goal ≤ 15 min)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=["matmul", "gemv", "solver"], default=["matmul", "gemv", "solver"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--reps", type=int, default=200, help="calls per timed burst (20..400)")
    ap.add_argument("--solver-layers", nargs="+", choices=list(LLAMA7B_LAYERS), default=list(LLAMA7B_LAYERS))
    ap.add_argument("--solver-groups", nargs="+", type=int, default=[64, -1])
    ap.add_argument("--solver-budget", type=float, default=float("inf"),
                    help="seconds after which no further solver layer is started")
    ap.add_argument("--profile", action="store_true", help="profile the first solver layer at the first config")
    ap.add_argument("--solver-backend", choices=["cuda", "numba"], default="cuda",
                    help="numba: the same solver layers on the numba CPU backend (no GPU needed; with --only solver)")
    args = ap.parse_args()
    if args.solver_backend == "numba":
        if args.only != ["solver"]:
            ap.error("--solver-backend numba runs the solver section only: add --only solver")
        bench_solver(args.solver_layers, args.solver_groups, args.solver_budget, False, "numba")
        return
    torch = need_gpu()
    peak = card(torch)
    if "matmul" in args.only:
        bench_matmul(torch, args.sizes, args.reps, peak)
    if "gemv" in args.only:
        bench_gemv_shapes(torch, args.sizes, args.reps)
    if "solver" in args.only:
        bench_solver(args.solver_layers, args.solver_groups, args.solver_budget, args.profile)


if __name__ == "__main__":
    main()
