"""The model commands on a GPU machine: calibrate → quantize --backend cuda → eval, and run.

The model pipeline's GPU path (the cuda layer solver behind `decoupleq quantize` and `decoupleq
run`, and the default backend a GPU machine picks) as a user calls it, through the CLI, on a
random Llama saved as a HF directory (SmolLM2-135M's block shapes by default: hidden 576,
intermediate 1536, 9 heads / 3 KV heads) — the real model cannot travel to a lent GPU machine.
The same stats are quantized with the numba backend beside it, and the two checkpoints compared
layer by layer (codes equal, loss ratio); then perplexity of fp and both checkpoints, and one
`decoupleq run --backend cuda` (true-sequential + block-wise stage) with its eval.

    python bench/gpu_pipeline_check.py --out /tmp/gpc             # on the GPU machine
    python bench/gpu_pipeline_check.py --backends numpy,numba --hidden 64 --intermediate 128 \
        --heads 4 --kv-heads 2 --out /tmp/gpc_cpu                  # the script itself, on a CPU

(The simulator runs `--backend cuda` too, but takes over 20 minutes for the 14 layers of even a
32-wide 2-block model; tests/gpu/test_gpu_kernels.py runs the CLI path on one tiny layer set instead.)

Prints one line per step and writes summary.json under --out. Exit status 1 if a command fails
or a layer's loss in the tested backend's checkpoint is above 1.001× the other's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decoupleq_ref.backends import default_backend  # noqa: E402
from validate.compare import compare_checkpoints  # noqa: E402


def cli(*args, capture: bool = False) -> tuple[float, str]:
    """Run `decoupleq ARGS` in a child process; (seconds, stdout). Raises on a non-zero exit."""
    cmd = [sys.executable, "-c", "from decoupleq_ref.cli import app; app()", *map(str, args)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    seconds = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"FAILED ({res.returncode}): decoupleq {' '.join(map(str, args))}\n"
                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return seconds, res.stdout


def user_text(path: Path) -> Path:
    """Any text file will do: this repository's Markdown documents, concatenated."""
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
    path.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in docs if p.exists()), encoding="utf-8")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--backends", default="cuda,numba",
                   help="the backend under test, then the one it is compared with (`run` uses the first)")
    p.add_argument("--skip-run", action="store_true", help="leave out `decoupleq run`")
    args = p.parse_args()
    from decoupleq_ref.model.tiny import save_tiny

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"default_backend": default_backend(), "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"default backend here: {summary['default_backend']}", flush=True)
    model = save_tiny(out / "model", "llama", hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=max(256, args.seqlen))
    text = user_text(out / "text.txt")
    window = ["--nsamples", args.nsamples, "--seqlen", args.seqlen]
    setting = ["--bits", args.bits, "--group-size", args.group_size]
    summary["calibrate_s"], _ = cli("calibrate", model, "--text", text, *window, "--out", out / "stats")
    print(f"calibrate {summary['calibrate_s']:.1f} s", flush=True)
    test, base = args.backends.split(",")
    for backend in (test, base):
        seconds, _ = cli("quantize", model, "--stats", out / "stats", *setting, "--backend", backend,
                         "--out", out / f"q_{backend}", "--overwrite")
        summary[f"quantize_{backend}_s"] = seconds
        print(f"quantize --backend {backend}: {seconds:.1f} s (compilation included)", flush=True)
    cmp = compare_checkpoints(out / f"q_{base}", out / f"q_{test}")  # loss ratio test / base
    summary[f"{test}_vs_{base}"] = cmp.to_dict()
    print(f"{test} vs {base} checkpoint, {len(cmp.codes_equal)} layers: codes equal >= {cmp.codes_equal_min:.4f}, "
          f"loss ratio {cmp.loss_ratio_min:.6f}..{cmp.loss_ratio_max:.6f}", flush=True)
    evals = {"fp": []} | {f"q_{b}": ["--quantized", out / f"q_{b}"] for b in (test, base)}
    if not args.skip_run:
        seconds, _ = cli("run", model, "--text", text, *window, *setting, "--backend", test,
                         "--block-epochs", 1, "--out", out / f"run_{test}", "--overwrite")
        summary[f"run_{test}_s"] = seconds
        print(f"run --backend {test} (block-wise 1 epoch): {seconds:.1f} s", flush=True)
        evals[f"run_{test}"] = ["--quantized", out / f"run_{test}"]
    for name, extra in evals.items():
        _, stdout = cli("eval", model, *extra, "--text", text, "--seqlen", args.seqlen, "--max-tokens", 8192, "--json")
        summary[f"eval_{name}"] = r = json.loads(stdout.strip().splitlines()[-1])
        print(f"eval {name}: perplexity {r['perplexity']:.3f}" + (f", KL {r['kl']:.4f}" if r.get("kl") else ""),
              flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ok = cmp.loss_ratio_max <= 1.001
    print("PASS" if ok else f"FAIL: a {test} layer loss is above 1.001x the {base} one", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
