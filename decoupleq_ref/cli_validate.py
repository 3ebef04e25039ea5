"""Oracle commands: ``decoupleq validate`` and ``decoupleq validate-checkpoint``.

Both register on ``cli.app``; the validate package is imported inside the commands, so the
rest of the CLI starts without it. Exit status: 0 when everything passed, 1 when a check
failed, 2 for bad arguments (typer's usage error, naming the option).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import typer

from .cli import app


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON through a temporary file in the same directory and rename it into place, so a
    crash never leaves a half-written report."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise typer.BadParameter(f"directory {path.parent} does not exist", param_hint="--json")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(x: Any) -> Any:
    """numpy scalars and arrays in reports."""
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


@app.command("validate")
def validate_cmd(
    impl: str = typer.Option(..., help="the implementation: 'package.module:function', 'file.py:function' "
                             "or a backend name (reference, numba, cuda); fn(W, H, config: dict) -> mapping "
                             "with q, scale, zero"),
    suite: str = typer.Option("default", help="suite name under validate/suites, or a suite directory"),
    convention: str = typer.Option("ours", help="how the result is expressed: ours | official | gptq | "
                                   "transposed, or a comma list of signed,transposed,zero_point"),
    level: str = typer.Option("quality", help="'quality': objective <= 1.5x the reference's per case and "
                              "<= 1.05x in geometric mean over the suite; 'reference': within 1e-6 (a port of "
                              "this solver)"),
    cases: Optional[str] = typer.Option(None, help="only cases whose name contains one of these (comma list)"),
    tags: Optional[str] = typer.Option(None, help="only cases with one of these tags (tiny, medium, combo, "
                                       "adversarial, ragged, hp, config, method)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the full report (every finding) here"),
    details: int = typer.Option(5, min=0, help="print the findings of this many failing cases"),
) -> None:
    """Run an external decoupleQ implementation on the conformance suite; non-zero exit on failure."""
    from validate.adapters import load_impl, parse_convention
    from validate.policy import LEVELS
    from validate.conformance import load_suite, run_suite

    if level not in LEVELS:
        raise typer.BadParameter(f"{level!r} is not one of {sorted(LEVELS)}", param_hint="--level")
    try:
        conv = parse_convention(convention)
        fn = load_impl(impl)
        s = load_suite(suite)
    except ValueError as e:
        hint = str(e).split(":", 1)[0]
        raise typer.BadParameter(str(e), param_hint=f"--{hint}" if hint in ("impl", "suite", "convention") else None) from None
    names = [c.strip() for c in cases.split(",")] if cases else None
    tag_list = [t.strip() for t in tags.split(",")] if tags else None
    if names or tag_list:
        s = s.select(names=names, tags=tag_list)
        if not len(s):
            raise typer.BadParameter("no case of the suite matches", param_hint="--cases/--tags")
    rep = run_suite(fn, s, level=level, convention=conv)
    rep.impl = impl
    typer.echo(rep.table(details=details))
    if json_out is not None:
        write_json_atomic(json_out, rep.to_dict())
        typer.echo(f"report written to {json_out}")
    raise typer.Exit(0 if rep.ok else 1)


@app.command("validate-checkpoint")
def validate_checkpoint_cmd(
    path: Path = typer.Argument(..., help="this project's checkpoint directory, an official output directory "
                                "(fake_quant.pth + true_quant.pth), or an official true_quant.pth"),
    fake: Optional[Path] = typer.Option(None, help="fake-quant state dict to compare with (.pth/.pt/.bin via "
                                        "torch.load(weights_only=True), or .safetensors); required for a true_quant file"),
    bits: Optional[int] = typer.Option(None, min=1, max=8, help="official format: also check codes lie in the "
                                       "signed b-bit range"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report here"),
) -> None:
    """Dequantize every packed layer and compare it with the fake-quant weights; lists the layers
    that differ and by how much. Non-zero exit if any layer differs or is malformed."""
    from validate.checkpoint import validate_checkpoint

    if fake is not None and not fake.is_file():
        raise typer.BadParameter(f"{fake} is not a file", param_hint="--fake")
    try:
        rep = validate_checkpoint(path, fake, bits)
    except ValueError as e:
        hint = str(e).split(":", 1)[0]
        raise typer.BadParameter(str(e), param_hint="--fake" if hint == "fake" else "PATH") from None
    typer.echo(rep.table())
    if json_out is not None:
        write_json_atomic(json_out, rep.to_dict())
    raise typer.Exit(0 if rep.ok else 1)


@app.command("check-kernel")
def check_kernel_cmd(
    matmul: str = typer.Option(..., help="the kernel: 'package.module:function' or 'file.py:function'"),
    signature: str = typer.Option("parts", help="'parts': fn(x, packed, scale, zero, group_size) -> y; "
                                  "'layer': fn(x, PackedLayer) -> y"),
    inputs: str = typer.Option("numpy", help="activations as 'numpy' arrays or 'torch' tensors"),
    dtypes: str = typer.Option("float32,float16,bfloat16", help="activation dtypes (comma list)"),
    bits: int = typer.Option(2, min=1, max=8, help="code width of the built-in test layers"),
    shape: Optional[list[str]] = typer.Option(None, help="test random layers of this shape OUTxIN instead of the "
                                              "built-in battery (repeatable), e.g. --shape 4096x11008"),
    group_size: Optional[str] = typer.Option(None, "--group-size", help="group sizes of the built-in or --shape "
                                             "layers (comma list, -1 = per-channel); default 32,64,128,-1"),
    layer: Optional[list[str]] = typer.Option(None, help="test a layer of your own checkpoint, CKPT_DIR:LAYER_NAME "
                                              "(repeatable), e.g. qmodel/:model.layers.0.mlp.down_proj"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the report here"),
) -> None:
    """Run a packed matmul on the input battery and name the layout mistake behind wrong outputs."""
    from validate.adapters import load_impl
    from validate.kernel import check_kernel
    from validate.kernel_layers import DEPLOY_GROUPS, checkpoint_layer, default_layers, parse_shape, shape_layers

    try:
        fn = load_impl(matmul)
    except ValueError as e:
        raise typer.BadParameter(str(e).replace("impl: ", ""), param_hint="--matmul") from None
    try:
        groups = tuple(int(g) for g in group_size.split(",")) if group_size else DEPLOY_GROUPS
    except ValueError:
        raise typer.BadParameter(f"{group_size!r} is not a comma list of integers", param_hint="--group-size") from None
    layers = []
    try:
        for spec in layer or []:
            layers.append(checkpoint_layer(spec))
        for spec in shape or []:
            layers.extend(shape_layers(*parse_shape(spec), bits, groups))
        if not layers:
            layers = default_layers(bits, hp=signature == "layer", group_sizes=groups)
    except ValueError as e:
        which = str(e).split(":", 1)[0]
        hint = {"shape": "--shape", "layer": "--layer"}.get(which, "--group-size")
        raise typer.BadParameter(str(e), param_hint=hint) from None
    try:
        rep = check_kernel(fn, layers, signature=signature, inputs=inputs,
                           dtypes=tuple(d.strip() for d in dtypes.split(",")), name=matmul)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo(str(rep))
    typer.echo(f"layers: {'; '.join(rep.meta['layers'])}")
    if json_out is not None:
        write_json_atomic(json_out, rep.to_dict())
    raise typer.Exit(0 if rep.ok else 1)
