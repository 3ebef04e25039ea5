"""``decoupleq export``: a finished checkpoint as a file other runtimes load (GGUF for
llama.cpp and transformers' ``gguf_file=``). Registers on ``cli.app``; no torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .cli import app
from .cli_errors import friendly_errors
from .model.progress import log


@app.command("export")
@friendly_errors
def export_cmd(
    quantized: Path = typer.Argument(..., metavar="QMODEL", help="checkpoint folder written by quantize/run (--out)"),
    gguf: Path = typer.Option(..., "--gguf", help="GGUF file to write (written whole, then renamed into place)"),
    model: Optional[str] = typer.Option(None, "--model", help="the model the checkpoint was quantized from (its "
                                        "hyperparameters and tokenizer); default: the one the checkpoint records"),
    ggml_type: Optional[str] = typer.Option(None, "--type", help="ggml type of the quantized linears: Q4_1, Q5_1 "
                                            "(exact; default: the checkpoint's), or Q2_K (from W2 g16), Q4_K, Q5_K "
                                            "(from W4 / W5 g32; re-solved on the K-quant grid, needs --stats)"),
    stats: Optional[Path] = typer.Option(None, "--stats", help="calibrate's folder (H per linear), for K-quants"),
    json_out: bool = typer.Option(False, "--json", help="print the summary as one JSON line on stdout"),
) -> None:
    """Write QMODEL as a GGUF file: W1–W4 as ggml Q4_1, W5 as Q5_1, exactly (the scales and zeros
    rounded to fp16; group size 32, a multiple of it, or -1); or on a K-quant grid (--type)."""
    from .model.gguf_export import default_source, export_gguf
    from .model.source import resolve_model

    recorded = default_source(quantized)
    if model is None and recorded is None and (quantized / "quantization_config.json").exists():
        raise ValueError("--model: the model this checkpoint records is not there any more; pass it with --model")
    summary = export_gguf(quantized, resolve_model(model if model is not None else recorded), gguf,
                          ggml_type=ggml_type, stats=stats)
    result = {"gguf": str(summary.path), "tensors": summary.counts(), "fallback": summary.fallback,
              "notes": summary.notes, "kquant": summary.kquant}
    if summary.kquant:
        total = {k: sum(v[k] for v in summary.kquant.values()) for k in ("checkpoint", "projected", "solved")}
        log(f"{ggml_type} layers' H-loss: checkpoint {total['checkpoint']:.6g}, projected onto the grid "
            f"{total['projected']:.6g}, constrained solve {total['solved']:.6g}")
    for name, why in summary.fallback.items():
        log(f"{name}: F32 (fallback: {why})")
    for note in summary.notes:
        log(note)
    if json_out:
        typer.echo(json.dumps(result))
    else:
        counts = ", ".join(f"{n} {t}" for t, n in summary.counts().items())
        log(f"wrote {summary.path}: {counts}" + (f"; {len(summary.fallback)} fell back to F32" if summary.fallback else ""))
