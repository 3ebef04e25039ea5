"""The ``decoupleq`` command line (typer). No command here imports torch."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from .config import METHODS, QuantConfig
from .backends import BACKENDS, get_solver
from .synthetic import synthetic_layer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="decoupleQ reference: quantize layers and models, check other implementations.")


@app.callback()
def main() -> None:
    """decoupleQ reference implementation (arXiv 2404.12759)."""


def load_layer_file(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read W and H from an .npz (keys W, H) or .safetensors file (tensors W, H); a missing,
    damaged or incomplete file is a usage error naming --layer and the fix."""
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist", param_hint="--layer")
    if path.suffix == ".npz":
        fix = "re-save it with numpy.savez(path, W=W, H=H)"
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = {"W", "H"} - set(f.files)
                if missing:
                    raise typer.BadParameter(f"{path} lacks arrays {sorted(missing)}; it needs W and H",
                                             param_hint="--layer")
                return f["W"], f["H"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise typer.BadParameter(f"{path} is not a readable .npz file ({' '.join(str(e).split())[:160]}); "
                                     f"{fix}", param_hint="--layer") from None
    if path.suffix == ".safetensors":
        from .model.safefiles import read_safetensors

        try:
            t, _ = read_safetensors(path, "--layer", "re-save it with safetensors.numpy.save_file({'W': W, 'H': H}, path)",
                                    names=["W", "H"])
        except ValueError as e:
            raise typer.BadParameter(str(e).removeprefix("--layer: "), param_hint="--layer") from None
        return t["W"], t["H"]
    raise typer.BadParameter(f"{path}: expected a .npz or .safetensors file", param_hint="--layer")


@app.command("quantize-layer")
def quantize_layer_cmd(
    layer: Optional[Path] = typer.Option(None, help="W and H in an .npz/.safetensors file; default: a bundled synthetic layer"),
    bits: int = typer.Option(2, min=1, max=8, help="integer bits"),
    group_size: int = typer.Option(64, help="columns per (scale, zero) group; -1 = per-channel"),
    iters: int = typer.Option(4, min=0, help="decoupleq alternations"),
    methods: str = typer.Option(",".join(METHODS), help="comma-separated methods to compare; "
                                "'improved' = decoupleq with QuantConfig.improved() (refinement + 8 starts)"),
    out: int = typer.Option(256, min=1, help="synthetic layer: output channels"),
    n_in: int = typer.Option(512, "--in", min=1, help="synthetic layer: input channels"),
    seed: int = typer.Option(0, help="synthetic layer seed"),
    backend: Optional[str] = typer.Option(None, help=f"one of {', '.join(BACKENDS)}; default: fastest available"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
) -> None:
    """Quantize one layer with rtn, gptq and decoupleq and print their losses side by side."""
    if layer is None:
        W, H = synthetic_layer(out, n_in, seed=seed)
        source = f"synthetic {out}x{n_in} (seed {seed})"
    else:
        W, H = load_layer_file(layer)
        source = str(layer)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS + ("improved",)]
    if bad:
        raise typer.BadParameter(f"unknown method(s) {bad}; choose from {METHODS + ('improved',)}",
                                 param_hint="--methods")
    try:
        solve = get_solver(backend)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--backend") from None
    rows = []
    for m in chosen:
        try:
            cfg = (QuantConfig.improved(bits=bits, group_size=group_size, iters=iters) if m == "improved"
                   else QuantConfig(bits=bits, group_size=group_size, method=m, iters=iters))
            t0 = time.perf_counter()
            res = solve(W, H, cfg)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
        rows.append({"method": m, "loss": res.loss, "objective": res.objective,
                     "seconds": time.perf_counter() - t0})
    base = rows[0]["loss"]
    if json_out:
        typer.echo(json.dumps({"layer": source, "bits": bits, "group_size": group_size, "results": rows}))
        return
    typer.echo(f"layer: {source}   W{bits} group_size={group_size}")
    typer.echo(f"{'method':<10} {'loss (on H)':>14} {'vs ' + chosen[0]:>10} {'seconds':>9}")
    for r in rows:
        typer.echo(f"{r['method']:<10} {r['loss']:>14.6g} {r['loss'] / base:>10.3f} {r['seconds']:>9.2f}")


# Commands defined in other modules register themselves on ``app`` when imported.
from . import cli_model, cli_validate  # noqa: E402,F401
from . import cli_export  # noqa: E402,F401
