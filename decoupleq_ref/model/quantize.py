"""``decoupleq quantize``: every calibrated linear solved layer-wise from stored H — no torch.

Weights come from weights.read_weights (safetensors numpy API or gguf), H from the stats
folder; each finished layer is committed to the checkpoint at once (resumable).
"""

from __future__ import annotations

import time
from pathlib import Path

from .. import __version__
from ..backends import Solver
from ..config import QuantConfig
from .checkpoint import CheckpointWriter, finished_with, stored_layer
from .executor import EXECUTORS, LayerOutcome, LayerTask, run_tasks
from .progress import log, progress_bar
from .source import ModelSource
from .stats import CalibrationStats, check_layer_shape, layer_weight
from .weights import read_weights, weight_shapes


def checkpoint_header(command: str, source: ModelSource, cfg: QuantConfig, backend: str, calibration: dict) -> dict:
    """What identifies a run: a restart resumes only when this is equal."""
    return {"command": command, "model": source.describe(), "bits": cfg.bits, "group_size": cfg.group_size,
            "method": cfg.method, "backend": backend, "solver": cfg.to_dict(), "calibration": calibration,
            "tool_version": __version__}


def quantize_model(source: ModelSource, stats: CalibrationStats, cfg: QuantConfig, solve: Solver, backend: str,
                   out: Path, overwrite: bool = False, *, stats_dir: Path | None = None, executor: str = "local",
                   workers: int | None = None, ray_address: str | None = None, allow_other_stats: bool = False
                   ) -> dict:
    """Solve every layer of ``stats`` on the model's weights; write the checkpoint to ``out``.
    Returns the checkpoint config (per-layer losses included).

    ``executor``/``workers``/``ray_address`` choose where the solves run (executor.py): with
    ``stats_dir`` given, ``local`` with workers > 1 and ``ray`` send one task per layer that reads
    its own W and H; otherwise layers are solved here with ``solve``. Either way each finished
    layer is committed at once, and the checkpoint does not depend on the executor.

    Before anything is written: the stats must be this model's (check_stats_model; ``allow_other_stats``
    turns the refusal into a warning) and every layer's shape in the model's file headers must be
    the stats' (no weight is read before that)."""
    header = checkpoint_header("quantize", source, cfg, backend, stats.info)
    done = None if overwrite else finished_with(out, header)
    if done is not None:
        log(f"{out} is already a finished checkpoint of this command; nothing to do")
        return done
    if executor not in EXECUTORS:
        raise ValueError(f"--executor: unknown executor {executor!r}; choose one of {EXECUTORS}")
    shapes = weight_shapes(source)  # from file headers: nothing is read before every layer fits
    check_stats_model(source, stats, stats_dir, allow_other_stats)
    for n, layer in stats.layers.items():
        check_layer_shape(shapes.get(f"{n}.weight"), n, layer, stats_json(stats_dir))
    with CheckpointWriter(out, header, overwrite) as writer:
        return solve_all(writer, source, stats, cfg, solve, backend, stats_dir, executor, workers, ray_address)


def check_stats_model(source: ModelSource, stats: CalibrationStats, stats_dir: Path | None, allow: bool) -> None:
    """The stats were recorded for this model (stats.json's model_fingerprint, source.fingerprint):
    ValueError naming --stats when not, unless ``allow`` (then a warning); a warning when the stats
    record no fingerprint (an older calibrate)."""
    where = stats_json(stats_dir)
    recorded = stats.info.get("model_fingerprint")
    if recorded is None:
        log(f"warning: {where} records no model fingerprint (an older calibrate); cannot check that it was "
            "recorded for this MODEL")
        return
    if recorded == source.fingerprint():
        return
    what = (f"--stats: {where} was recorded for another model ({stats.info.get('model', '?')}: other weights "
            f"than MODEL {source.describe()})")
    if not allow:
        raise ValueError(f"{what}; re-run calibrate on this MODEL, or pass --allow-other-stats to use them anyway")
    log(f"warning: {what}; used anyway (--allow-other-stats)")


def stats_json(stats_dir: Path | None) -> object:
    """How messages name the stats: their stats.json when the folder is known."""
    return Path(stats_dir) / "stats.json" if stats_dir is not None else "the stats"


def solve_all(writer: CheckpointWriter, source: ModelSource, stats: CalibrationStats, cfg: QuantConfig,
              solve: Solver, backend: str, stats_dir: Path | None, executor: str, workers: int | None,
              ray_address: str | None) -> dict:
    """Solve the layers ``writer`` does not hold yet, commit each, then finalize the checkpoint."""
    weights = read_weights(source)
    names = list(stats.layers)
    Ws = {n: layer_weight(weights, n, stats.layers[n]) for n in names}
    todo = [n for n in names if not writer.done(n)]
    if stats_dir is not None and (executor == "ray" or (workers or 1) > 1):
        tasks = [LayerTask(n, str(source.path), str(stats_dir), stats.layers[n], cfg.to_dict(), backend) for n in todo]
        outcomes = run_tasks(tasks, executor, workers, ray_address)
    else:
        outcomes = (solve_here(n, Ws[n], stats, cfg, solve) for n in todo)
    with progress_bar("quantize", len(names)) as advance:
        advance(len(names) - len(todo), note=f"{len(names) - len(todo)} layers resumed" if len(todo) < len(names) else "")
        for o in outcomes:
            writer.commit(o.name, o.tensors, o.info)
            advance(note=f"{o.name}: loss {o.info['loss']:.4g} in {o.seconds:.1f}s")
    layers = {n: writer.load(n)[1] for n in names}
    quantized = {f"{n}.weight" for n in names}
    other = {k: v for k, v in weights.items() if k not in quantized}
    return writer.finalize(names, other, layers)


def solve_here(name: str, W, stats: CalibrationStats, cfg: QuantConfig, solve: Solver) -> LayerOutcome:
    """One layer solved in this process from arrays already in memory."""
    t0 = time.perf_counter()
    W64, H = W.astype("float64"), stats.hessians[name]
    tensors, info = stored_layer(name, solve(W64, H, cfg), W64, H, bool(stats.layers[name].get("transposed")))
    return LayerOutcome(name, tensors, info, time.perf_counter() - t0, "driver")
