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
from .checkpoint import CheckpointWriter, is_complete, checkpoint_config, stored_layer
from .progress import log, progress_bar
from .source import ModelSource
from .stats import CalibrationStats, layer_weight
from .weights import read_weights


def checkpoint_header(command: str, source: ModelSource, cfg: QuantConfig, backend: str, calibration: dict) -> dict:
    """What identifies a run: a restart resumes only when this is equal."""
    return {"command": command, "model": source.describe(), "bits": cfg.bits, "group_size": cfg.group_size,
            "method": cfg.method, "backend": backend, "solver": cfg.to_dict(), "calibration": calibration,
            "tool_version": __version__}


def quantize_model(source: ModelSource, stats: CalibrationStats, cfg: QuantConfig, solve: Solver, backend: str,
                   out: Path, overwrite: bool = False) -> dict:
    """Solve every layer of ``stats`` on the model's weights; write the checkpoint to ``out``.
    Returns the checkpoint config (per-layer losses included)."""
    header = checkpoint_header("quantize", source, cfg, backend, stats.info)
    if is_complete(out) and not overwrite:
        config = checkpoint_config(out)
        if {k: config.get(k) for k in header} == header:
            log(f"{out} is already a finished checkpoint of this command; nothing to do")
            return config
    writer = CheckpointWriter(out, header, overwrite)
    weights = read_weights(source)
    names = list(stats.layers)
    Ws = {n: layer_weight(weights, n, stats.layers[n]) for n in names}  # check all before solving
    layers: dict[str, dict] = {}
    with progress_bar("quantize", len(names)) as advance:
        for name in names:
            if not writer.done(name):
                t0 = time.perf_counter()
                res = solve(Ws[name].astype("float64"), stats.hessians[name], cfg)
                tensors, info = stored_layer(name, res, Ws[name].astype("float64"), stats.hessians[name],
                                             bool(stats.layers[name].get("transposed")))
                writer.commit(name, tensors, info)
                note = f"{name}: loss {info['loss']:.4g} in {time.perf_counter() - t0:.1f}s"
            else:
                note = f"{name}: resumed"
            layers[name] = writer.load(name)[1]
            advance(note=note)
    quantized = {f"{n}.weight" for n in names}
    other = {k: v for k, v in weights.items() if k not in quantized}
    return writer.finalize(names, other, layers)
