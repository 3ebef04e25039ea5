"""python -m validate.ggml_check CHECKPOINT [GGUF]: every layer of a W4 g32 checkpoint of a
Q4_1 GGUF model against llama.cpp's integers in the file (validate.ggml_q4_1); needs gguf.

A script module of its own, so that running it does not import itself through the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from decoupleq_ref.model.source import default_model_path

from .ggml_q4_1 import check_checkpoint_q4_1, gguf_q4_1_layers


def main(argv: list[str] | None = None) -> int:
    """python -m validate.ggml_check CHECKPOINT [GGUF]: a W4 g32 checkpoint of a Q4_1 GGUF model
    (default: the bundled SmolLM2-135M-Instruct) against the file's integers; exit 1 on a
    difference."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("checkpoint")
    ap.add_argument("gguf", nargs="?", help="the GGUF the checkpoint was made from (default: the bundled model)")
    args = ap.parse_args(argv)
    if args.gguf is None:
        args.gguf = default_model_path(fetch=False)
    rep = check_checkpoint_q4_1(args.checkpoint, gguf_q4_1_layers(args.gguf))
    n, bad = int(rep.numbers.get("layers", 0)), int(rep.numbers.get("layers_differing", 0))
    print(f"{args.checkpoint}: {n} Q4_1 layers compared, {bad} differ from {Path(args.gguf).name}")
    print(rep)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
