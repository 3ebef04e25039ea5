"""Calibration statistics on disk: H = XᵀX/N per linear, float64, no torch needed to read them.

``stats/hessians.safetensors``  one float64 (in, in) tensor per linear, named like the module
``stats/stats.json``           model, text hash, windows, token count N and per layer
                                {out, in, transposed} (transposed: GPT-2 Conv1D stores W as (in, out))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import read_safetensors, write_json, write_safetensors

STATS_FORMAT = "decoupleq-stats"
STATS_VERSION = 1


@dataclass
class CalibrationStats:
    """H per linear (module name → (in, in) float64) and what produced it."""

    hessians: dict[str, np.ndarray]
    layers: dict[str, dict]  # name → {"out", "in", "transposed"}
    info: dict  # model, text_sha256, nsamples, seqlen, seed, tokens

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / "hessians.safetensors", self.hessians)
        # stats.json last: its presence marks a complete stats folder
        write_json(folder / "stats.json", {"format": STATS_FORMAT, "version": STATS_VERSION,
                                           **self.info, "layers": self.layers})

    def subset(self, names: list[str]) -> "CalibrationStats":
        """The same statistics for the named linears only (e.g. to solve a few layers)."""
        return CalibrationStats({n: self.hessians[n] for n in names}, {n: self.layers[n] for n in names}, self.info)

    @classmethod
    def load(cls, folder: Path) -> "CalibrationStats":
        meta_path = folder / "stats.json"
        if not meta_path.exists():
            raise ValueError(f"--stats: {folder} has no stats.json; run `decoupleq calibrate ... --out {folder}` first")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
            raise ValueError(f"--stats: {meta_path} is not a version-{STATS_VERSION} {STATS_FORMAT} file")
        hessians, _ = read_safetensors(folder / "hessians.safetensors")
        layers = meta.pop("layers")
        missing = sorted(set(layers) - set(hessians))
        if missing:
            raise ValueError(f"--stats: hessians.safetensors lacks {missing[:3]}...; re-run calibrate")
        return cls(hessians, layers, {k: v for k, v in meta.items() if k not in ("format", "version")})


def layer_weight(weights: dict[str, np.ndarray], name: str, layer: dict) -> np.ndarray:
    """W (out, in) of linear ``name`` from a name → array dict; ValueError when the stats and the
    model disagree (missing layer or other shape)."""
    key = f"{name}.weight"
    if key not in weights:
        raise ValueError(f"--stats: layer {name} is not in the model ({key} missing); "
                         "the stats were made for another model: re-run calibrate on this MODEL")
    W = weights[key].T if layer.get("transposed") else weights[key]
    if W.shape != (layer["out"], layer["in"]):
        raise ValueError(f"--stats: layer {name} is {layer['out']}x{layer['in']} in the stats but "
                         f"{W.shape[0]}x{W.shape[1]} in the model; re-run calibrate on this MODEL")
    return W
