"""Model-level commands: calibrate, quantize, run, eval, demo.

They register on ``cli.app``. torch and transformers are imported inside the commands that need
them, never at import time: ``decoupleq quantize`` runs without torch.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Optional

import typer

from .backends import ALIASES, BACKENDS, default_backend, get_solver
from .cli import app
from .cli_errors import friendly_errors
from .config import IMPROVED, METHODS, QuantConfig
from .model.progress import log
from .model.train_config import BlockwiseConfig, ModelStageConfig
from .model.source import ModelSource, resolve_model
from .model.stage_times import StageTimes

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB_TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_EVAL_TEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

MODEL_ARG = typer.Argument(None, help="HF model directory (safetensors) or .gguf file; default: the bundled SmolLM2-135M-Instruct")


def device_option() -> typer.Option:
    return typer.Option("auto", help="torch device for the model's forward passes: auto (a CUDA GPU when torch "
                        "sees one, else cpu), cpu, cuda or cuda:N; the layer solver's is --backend")


def model_source(model: Optional[str]) -> ModelSource:
    return resolve_model(model)


def solver_for(backend: Optional[str]):
    name = ALIASES.get(backend, backend) if backend else default_backend()  # "reference" -> "numpy"
    if name not in BACKENDS:
        raise ValueError(f"--backend: unknown backend {name!r}; choose one of {BACKENDS}")
    return get_solver(name), name


SOLVERS = ("official", "improved")


def solver_option() -> typer.Option:
    return typer.Option("official", help="layer solver settings: official (the published run's) or improved "
                        f"(adds {', '.join(f'{k}={v}' for k, v in IMPROVED.items())}: lower layer loss for several "
                        "times the solve time; BENCHMARKS.md §2)")


def quant_config(bits: int, group_size: int, method: str, iters: int = QuantConfig.iters, hp_channels: int = 0,
                 hp_select: str = "hessian", solver: str = "official") -> QuantConfig:
    if method not in METHODS:
        raise ValueError(f"--method: {method!r} is not one of {METHODS}")
    if solver not in SOLVERS:
        raise ValueError(f"--solver: {solver!r} is not one of {SOLVERS}")
    make = QuantConfig.improved if solver == "improved" else QuantConfig
    try:
        return make(bits=bits, group_size=group_size, method=method, iters=iters, hp_channels=hp_channels,
                    hp_select=hp_select)
    except ValueError as e:  # "QuantConfig.group_size: ..." → name the option
        field = str(e).split(":")[0].removeprefix("QuantConfig.").replace("_", "-")
        raise ValueError(f"--{field}: {str(e).split(':', 1)[1].strip()}") from None


def text_windows(tokenizer, text: Path, nsamples: int, seqlen: int, seed: int, option: str = "--text"):
    from .model.text import random_windows, token_ids

    return random_windows(token_ids(tokenizer, text, option), nsamples, seqlen, seed)


@app.command("calibrate")
@friendly_errors
def calibrate_cmd(
    model: Optional[str] = MODEL_ARG,
    text: Path = typer.Option(DEFAULT_CALIB_TEXT, help="calibration text file"),
    nsamples: int = typer.Option(128, min=1, help="random windows"),
    seqlen: int = typer.Option(2048, min=2, help="tokens per window"),
    seed: int = typer.Option(0, help="window sampling seed"),
    out: Path = typer.Option(Path("stats"), help="output folder (hessians.safetensors + stats.json)"),
    device: str = device_option(),
) -> None:
    """Run the float model on random text windows; store H = XᵀX/N (float64) for every linear."""
    from .model.atomic import remove_stale_temps
    from .model.calibrate import calibrate
    from .model.lock import FolderLock
    from .model.text import text_sha256
    from .model.torch_model import load_model, torch_device

    source = model_source(model)
    where = torch_device(device)
    net, tokenizer = load_model(source, device=where)
    windows = text_windows(tokenizer, text, nsamples, seqlen, seed)
    info = {"model": source.describe(), "model_fingerprint": source.fingerprint(), "text_sha256": text_sha256(text),
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "device": where.type}
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} is a file; pass a folder for the statistics")
    with FolderLock(out):
        stats = calibrate(net, windows, info)
        remove_stale_temps(out)  # a killed calibrate's half-written files
        stats.save(out)
    log(f"wrote H for {len(stats.layers)} linears ({stats.info['tokens']} tokens) to {out}")


@app.command("quantize")
@friendly_errors
def quantize_cmd(
    model: Optional[str] = MODEL_ARG,
    stats: Path = typer.Option(Path("stats"), help="folder written by `decoupleq calibrate`"),
    bits: int = typer.Option(2, min=1, max=8),
    group_size: int = typer.Option(64, help="columns per (scale, zero); -1 = per-channel"),
    method: str = typer.Option("decoupleq", help=f"one of {', '.join(METHODS)}"),
    iters: int = typer.Option(4, min=0, help="decoupleq alternations"),
    hp_channels: int = typer.Option(0, min=0, help="input channels per layer kept in an fp16 branch (0 = off)"),
    hp_select: str = typer.Option("hessian", help="how the fp16 branch picks its channels"),
    solver: str = solver_option(),
    backend: Optional[str] = typer.Option(None, help=f"one of {', '.join(BACKENDS)}; default: fastest available"),
    out: Path = typer.Option(Path("qmodel"), help="checkpoint folder"),
    overwrite: bool = typer.Option(False, help="replace an existing --out instead of resuming"),
    executor: str = typer.Option("local", help="where layers are solved: local (this machine; a process pool "
                                 "with --workers > 1) or ray (one task per layer; docs/SCALING.md)"),
    workers: Optional[int] = typer.Option(None, min=1, help="parallel layer solves (local default 1; ray "
                                          "default: all cluster CPUs)"),
    ray_address: Optional[str] = typer.Option(None, help="ray: 'auto' or ray://host:port of a running "
                                              "cluster; default: start a local one"),
    allow_other_stats: bool = typer.Option(False, help="use --stats recorded for another model (other weights, "
                                           "same shapes) with a warning instead of refusing them"),
    fmt: str = typer.Option("checkpoint", "--format", help="checkpoint (the --out folder), or gguf: also "
                            "OUT/model.gguf for llama.cpp in the exact type (W1-W4 Q4_1, W5 Q5_1; decoupleq export)"),
) -> None:
    """Solve every calibrated linear layer-wise and write the checkpoint. Never imports torch."""
    from .model.quantize import quantize_model
    from .model.stats import CalibrationStats

    from .model.gguf_export import check_output_format, write_output_format

    source = model_source(model)
    cfg = quant_config(bits, group_size, method, iters, hp_channels, hp_select, solver)
    check_output_format(fmt, bits, group_size)
    solve, backend_name = solver_for(backend)
    calib = CalibrationStats.load(stats)
    t0 = time.perf_counter()
    config = quantize_model(source, calib, cfg, solve, backend_name, out, overwrite, stats_dir=stats,
                            executor=executor, workers=workers, ray_address=ray_address,
                            allow_other_stats=allow_other_stats)
    total = sum(v["loss"] for v in config["layers"].values())
    log(f"wrote {out}: {len(config['layers'])} layers, total loss {total:.6g}, {time.perf_counter() - t0:.0f}s")
    if write_output_format(fmt, out, source):
        log(f"wrote {out / 'model.gguf'}")


#: Block-wise stage options of ``run``: defaults BlockwiseConfig's (why: BENCHMARKS.md §5);
#: the official code's stage is --block-lr 1e-5 --block-targets quantized --train-precision fp32
#: --block-schedule constant --block-retries 0 (4 epochs).
BLOCK_EPOCHS = typer.Option(BlockwiseConfig.epochs, min=0, help="block-wise stage epochs (0 = off)")
BLOCK_LR = typer.Option(BlockwiseConfig.lr, min=0.0, help="block-wise stage peak Adam learning rate (0 = off; "
                        "the official code's: 1e-5)")
BLOCK_TARGETS = typer.Option(BlockwiseConfig.targets, help="block-wise targets: quantized (the float block on the "
                             "quantized prefix's outputs, the official code's) or float (the float model's own "
                             "hidden states: the block also corrects the prefix's error)")
TRAIN_PRECISION = typer.Option("auto", help="forward/backward precision of the block-wise and model-level "
                               "stages: fp32 (the official code's), bf16 (autocast, fp32 master weights and "
                               "losses), or auto: bf16 where the device has it natively (CPUs with AMX or "
                               "AVX-512-BF16, GPUs), else fp32")
BLOCK_SCHEDULE = typer.Option(BlockwiseConfig.schedule, help="block-wise learning-rate schedule: constant (the "
                              "official code's) or cosine (decays to 0 over the steps)")
BLOCK_RETRIES = typer.Option(BlockwiseConfig.retries, min=0, help="block-wise stage: when a block's output loss "
                             "rose, start over from the layer-wise state at a tenth of the rate, up to this many "
                             "times (the official code: 0)")
MODEL_EPOCHS = typer.Option(ModelStageConfig.epochs, min=0, help="model-level stage epochs: every (s, z) and norm "
                            "trained towards the float model's next-token distribution (KL) after the blocks "
                            "(0 = off, as in the official procedure)")
MODEL_LR = typer.Option(ModelStageConfig.lr, min=0.0, help="model-level stage peak Adam learning rate (cosine decay; "
                        "0 = off)")
MODEL_RETRIES = typer.Option(ModelStageConfig.retries, min=0, help="model-level stage: when its KL rose, start over "
                             "at a tenth of the rate, up to this many times")


def stage_settings(device: str, block_epochs: int, block_lr: float, block_targets: str, block_schedule: str,
                   block_retries: int, model_epochs: int, model_lr: float, model_retries: int, train_precision: str
                   ) -> tuple[BlockwiseConfig, ModelStageConfig, StageTimes]:
    """The trained stages' settings from the options (--train-precision auto resolved for the
    device), and the stage clock for that device."""
    from .model.torch_model import torch_device, training_precision

    where = torch_device(device)
    precision = training_precision(train_precision, where)
    return (BlockwiseConfig(block_epochs, block_lr, block_targets, precision, block_schedule, block_retries),
            ModelStageConfig(model_epochs, model_lr, precision, model_retries), StageTimes(where))


def run_pipeline(source: ModelSource, text: Path, nsamples: int, seqlen: int, seed: int, cfg: QuantConfig,
                 backend: Optional[str], blockwise: BlockwiseConfig, out: Path, overwrite: bool,
                 text_option: str = "--text", device: str = "auto", times: StageTimes | None = None,
                 model_stage: ModelStageConfig | None = None) -> dict:
    """calibration windows → sequential quantization with the block-wise stage → checkpoint.
    ``times`` (optional) collects the wall time per stage (model/stage_times.py)."""
    from .model.checkpoint import CheckpointWriter, finished_with
    from .model.quantize import checkpoint_header
    from .model.sequential import run_model
    from .model.text import check_seqlen, text_sha256
    from .model.torch_model import load_model, torch_device

    solve, backend_name = solver_for(backend)
    where = torch_device(device)
    if not Path(text).is_file():
        raise ValueError(f"{text_option}: {text} is not a file; pass a plain-text file (e.g. wikitext-2 valid.txt)")
    calibration = {"text_sha256": text_sha256(text), "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    header = checkpoint_header("run", source, cfg, backend_name, calibration)
    header["blockwise_settings"] = blockwise.settings()
    if model_stage is not None and model_stage.on:
        header["model_stage_settings"] = model_stage.settings()
    header["torch_device"] = where.type  # forward passes and Adam differ in the last bits between devices
    done = None if overwrite else finished_with(out, header)
    if done is not None:
        log(f"{out} is already a finished checkpoint of this command; nothing to do")
        return done
    times = times if times is not None else StageTimes(where)
    with times("load"):
        net, tokenizer = load_model(source, causal=True, device=where)
        check_seqlen(net.config, seqlen)
        windows = text_windows(tokenizer, text, nsamples, seqlen, seed, text_option)
    with CheckpointWriter(out, header, overwrite) as writer:
        return run_model(net, windows, cfg, solve, writer, blockwise, seed, times, model_stage)


@app.command("run")
@friendly_errors
def run_cmd(
    model: Optional[str] = MODEL_ARG,
    text: Path = typer.Option(DEFAULT_CALIB_TEXT, help="calibration text file"),
    nsamples: int = typer.Option(32, min=1, help="calibration windows (the paper: 128)"),
    seqlen: int = typer.Option(512, min=2, help="tokens per calibration window (the paper: 2048)"),
    seed: int = typer.Option(0),
    bits: int = typer.Option(2, min=1, max=8),
    group_size: int = typer.Option(64, help="-1 = per-channel"),
    method: str = typer.Option("decoupleq", help=f"one of {', '.join(METHODS)}"),
    iters: int = typer.Option(4, min=0),
    hp_channels: int = typer.Option(0, min=0, help="input channels per layer kept in an fp16 branch (0 = off; "
                                    "the block-wise stage keeps the branch frozen)"),
    hp_select: str = typer.Option("hessian", help="how the fp16 branch picks its channels"),
    solver: str = solver_option(),
    backend: Optional[str] = typer.Option(None, help=f"one of {', '.join(BACKENDS)}"),
    block_epochs: int = BLOCK_EPOCHS,
    block_lr: float = BLOCK_LR,
    block_targets: str = BLOCK_TARGETS,
    block_schedule: str = BLOCK_SCHEDULE,
    block_retries: int = BLOCK_RETRIES,
    model_epochs: int = MODEL_EPOCHS,
    model_lr: float = MODEL_LR,
    model_retries: int = MODEL_RETRIES,
    train_precision: str = TRAIN_PRECISION,
    out: Path = typer.Option(Path("qmodel"), help="checkpoint folder"),
    overwrite: bool = typer.Option(False, help="replace an existing --out instead of resuming"),
    device: str = device_option(),
    fmt: str = typer.Option("checkpoint", "--format", help="checkpoint (the --out folder), or gguf: also "
                            "OUT/model.gguf for llama.cpp in the exact type (W1-W4 Q4_1, W5 Q5_1; decoupleq export)"),
) -> None:
    """The full procedure block by block: true-sequential layer-wise solves and the block-wise
    stage, then the model-level stage; prints the time per stage."""
    from .model.gguf_export import check_output_format, write_output_format

    cfg = quant_config(bits, group_size, method, iters, hp_channels, hp_select, solver)
    check_output_format(fmt, bits, group_size)
    t0 = time.perf_counter()
    source = model_source(model)
    blockwise, model_stage, times = stage_settings(device, block_epochs, block_lr, block_targets, block_schedule,
                                                   block_retries, model_epochs, model_lr, model_retries,
                                                   train_precision)
    config = run_pipeline(source, text, nsamples, seqlen, seed, cfg, backend, blockwise, out, overwrite,
                          device=device, times=times, model_stage=model_stage)
    wall = time.perf_counter() - t0
    log(f"wrote {out}: {len(config['layers'])} layers in {wall:.0f}s")
    if times.total:
        log("time per stage:\n" + times.table(wall))
    if write_output_format(fmt, out, source):
        log(f"wrote {out / 'model.gguf'}")


def eval_pipeline(source: ModelSource, quantized: Optional[Path], text: Path, seqlen: int,
                  max_tokens: Optional[int], text_option: str = "--text", packed: bool = False,
                  device: str = "auto") -> dict:
    """Perplexity of the float model, or of the checkpoint with its KL divergence to the float model."""
    from .model.checkpoint import checkpoint_config
    from .model.evaluate import evaluate
    from .model.text import check_seqlen, consecutive_windows, token_ids
    from .model.torch_model import load_model, load_quantized, torch_device

    where = torch_device(device)
    if quantized is not None:  # a wrong --quantized fails before the model is loaded
        checkpoint_config(quantized)
    fp, tokenizer = load_model(source, causal=True, device=where)
    check_seqlen(fp.config, seqlen)
    windows = consecutive_windows(token_ids(tokenizer, text, text_option), seqlen, max_tokens)
    result = {"model": source.describe(), "text": str(text), "device": where.type}
    if quantized is None:
        return {**result, **evaluate(fp, windows)}
    q = copy.deepcopy(fp)  # one load (slow for GGUF); every quantized tensor is then overwritten
    config = load_quantized(q, quantized, packed=packed, arg="--quantized")
    return {**result, "quantized": str(quantized), "bits": config["bits"], "group_size": config["group_size"],
            "method": config["method"], "packed": packed, **evaluate(q, windows, reference=fp)}


@app.command("eval")
@friendly_errors
def eval_cmd(
    model: Optional[str] = MODEL_ARG,
    quantized: Optional[Path] = typer.Option(None, help="checkpoint folder; default: evaluate the float model"),
    text: Path = typer.Option(DEFAULT_EVAL_TEXT, help="evaluation text file"),
    seqlen: int = typer.Option(2048, min=2),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="evaluate only the first N tokens"),
    packed: bool = typer.Option(False, help="run the quantized linears through the packed matmul kernel "
                                "(Numba when installed) instead of dequantized float weights"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
    device: str = device_option(),
) -> None:
    """Perplexity over non-overlapping windows (+ KL divergence to the float model with --quantized)."""
    t0 = time.perf_counter()
    if packed and quantized is None:
        raise ValueError("--packed: needs --quantized CHECKPOINT")
    r = eval_pipeline(model_source(model), quantized, text, seqlen, max_tokens, packed=packed, device=device)
    r["seconds"] = time.perf_counter() - t0
    if json_out:
        typer.echo(json.dumps(r))
        return
    kl = f"   KL to float {r['kl']:.4f} (float perplexity {r['reference_perplexity']:.3f})" if "kl" in r else ""
    typer.echo(f"perplexity {r['perplexity']:.3f}{kl}   ({r['tokens']} tokens, {r['windows']} x {r['seqlen']})")


@app.command("demo")
@friendly_errors
def demo_cmd(
    model: Optional[str] = MODEL_ARG,
    calib_text: Path = typer.Option(DEFAULT_CALIB_TEXT, help="calibration text"),
    eval_text: Path = typer.Option(DEFAULT_EVAL_TEXT, help="evaluation text"),
    nsamples: int = typer.Option(32, min=1, help="calibration windows"),
    seqlen: int = typer.Option(512, min=2, help="tokens per window (calibration and evaluation)"),
    eval_tokens: int = typer.Option(16384, min=1, help="evaluation tokens (from the start of the text)"),
    block_epochs: int = BLOCK_EPOCHS,
    block_lr: float = BLOCK_LR,
    block_targets: str = BLOCK_TARGETS,
    block_schedule: str = BLOCK_SCHEDULE,
    block_retries: int = BLOCK_RETRIES,
    model_epochs: int = MODEL_EPOCHS,
    model_lr: float = MODEL_LR,
    model_retries: int = MODEL_RETRIES,
    train_precision: str = TRAIN_PRECISION,
    backend: Optional[str] = typer.Option(None, help=f"one of {', '.join(BACKENDS)}; default: fastest available"),
    out: Path = typer.Option(Path("decoupleq-demo"), help="checkpoint folder"),
    overwrite: bool = typer.Option(False, help="start over instead of resuming"),
    device: str = device_option(),
) -> None:
    """The README's main job: `run` at W2 g64 with its default stages on 32 windows x 512 tokens,
    then eval of float vs quantized (BENCHMARKS.md §5's protocol)."""
    source = model_source(model)
    cfg = QuantConfig(bits=2, group_size=64)
    blockwise, model_stage, times = stage_settings(device, block_epochs, block_lr, block_targets, block_schedule,
                                                   block_retries, model_epochs, model_lr, model_retries,
                                                   train_precision)
    backend_name = solver_for(backend)[1]
    log(f"demo: {source.describe()}\n  run: W2 g64 decoupleq, {nsamples} calibration windows x {seqlen} tokens "
        f"of {calib_text.name}, backend {backend_name}; block-wise stage {blockwise.settings()}; model-level "
        f"stage {model_stage.settings() if model_stage.on else 'off'}\n"
        f"  eval: first {eval_tokens} tokens of {eval_text.name} in windows of {seqlen}; checkpoint {out}")
    t0 = time.perf_counter()
    if not eval_text.is_file():  # fail before the long run, not after it
        raise ValueError(f"--eval-text: {eval_text} is not a file; pass a plain-text file")
    config = run_pipeline(source, calib_text, nsamples, seqlen, 0, cfg, backend_name, blockwise, out, overwrite,
                          "--calib-text", device, times, model_stage)
    t_run = time.perf_counter() - t0
    r = eval_pipeline(source, out, eval_text, seqlen, eval_tokens, "--eval-text", device=device)
    stages = [s for s in config.get("blockwise", []) if "loss_before" in s]
    typer.echo(f"{source.path.name}: perplexity on {r['tokens']} tokens of {eval_text.name} "
               f"({r['windows']} windows x {seqlen})")
    typer.echo(f"  float32          {r['reference_perplexity']:10.3f}")
    typer.echo(f"  W2 g64 decoupleQ {r['perplexity']:10.3f}   KL to float {r['kl']:.4f}   (checkpoint {out})")
    if stages:
        before = sum(s["loss_before"] for s in stages)
        after = sum(min(s["loss_before"], s["loss_after"]) for s in stages)
        typer.echo(f"  block-wise stage: summed block output MSE {before:.4g} -> {after:.4g} "
                   f"({sum(s['kept'] == 'trained' for s in stages)}/{len(stages)} blocks improved)")
    if "model_stage" in config:
        m = config["model_stage"]
        typer.echo(f"  model-level stage: KL to float {m['kl_before']:.4g} -> {m['kl_after']:.4g} on "
                   f"{m['kl_windows']} calibration windows ({'kept' if m['kept'] == 'trained' else 'not kept'})")
    typer.echo(f"  time: run {t_run:.0f}s, total {time.perf_counter() - t0:.0f}s")
    if times.total:
        typer.echo("  time per stage of the run:\n" + times.table(t_run))
