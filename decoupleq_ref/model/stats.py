"""Calibration statistics on disk: H = XᵀX/N per linear, float64, no torch needed to read them.

``stats/hessians.safetensors``  one float64 (in, in) tensor per linear, named like the module
``stats/stats.json``           model, model_fingerprint, text hash, windows, token count N and per
                                layer {out, in, transposed} (transposed: GPT-2 Conv1D stores W as (in, out))

Both files are checked when loaded (field types, layer names, every H's dtype and shape from the
header) and H is read lazily, one layer at a time, when a solve asks for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import write_json, write_safetensors
from .safefiles import check_module_name, expect, read_json, read_safetensors, safetensors_header

STATS_FORMAT = "decoupleq-stats"
STATS_VERSION = 1
HESSIANS_NAME = "hessians.safetensors"


def recalibrate(folder: Path) -> str:
    return f"re-run `decoupleq calibrate MODEL --out {folder}`"


class StoredHessians(Mapping):
    """name → H read from ``hessians.safetensors`` on access (memory-mapped: only that tensor),
    checked finite; shapes and dtypes were checked from the header when the stats were loaded."""

    def __init__(self, path: Path, names: list[str]) -> None:
        self.path, self.names = Path(path), list(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise KeyError(name)
        fix = recalibrate(self.path.parent)
        H = read_safetensors(self.path, "--stats", fix, names=[name])[0][name]
        expect(np.isfinite(H).all(), "--stats", self.path, f"holds NaN or Inf in H of {name}", fix)
        return H

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class CalibrationStats:
    """H per linear (module name → (in, in) float64) and what produced it."""

    hessians: Mapping[str, np.ndarray]
    layers: dict[str, dict]  # name → {"out", "in", "transposed"}
    info: dict  # model, model_fingerprint, text_sha256, nsamples, seqlen, seed, tokens

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        write_safetensors(folder / HESSIANS_NAME, dict(self.hessians))
        # stats.json last: its presence marks a complete stats folder
        write_json(folder / "stats.json", {"format": STATS_FORMAT, "version": STATS_VERSION,
                                           **self.info, "layers": self.layers})

    def subset(self, names: list[str]) -> "CalibrationStats":
        """The same statistics for the named linears only (e.g. to solve a few layers)."""
        return CalibrationStats({n: self.hessians[n] for n in names}, {n: self.layers[n] for n in names}, self.info)

    @classmethod
    def load(cls, folder: Path) -> "CalibrationStats":
        folder = Path(folder)
        meta_path = folder / "stats.json"
        fix = recalibrate(folder)
        if not meta_path.exists():
            raise ValueError(f"--stats: {folder} has no stats.json; run `decoupleq calibrate ... --out {folder}` first")
        meta = read_json(meta_path, "--stats", fix)
        if meta.get("format") != STATS_FORMAT or meta.get("version") != STATS_VERSION:
            raise ValueError(f"--stats: {meta_path} is not a version-{STATS_VERSION} {STATS_FORMAT} file; {fix}")
        layers = meta.pop("layers", None)
        expect(isinstance(layers, dict) and layers, "--stats", meta_path, "has no layers table", fix)
        for name, layer in layers.items():
            check_module_name(name, "--stats", meta_path, fix)
            expect(isinstance(layer, dict) and all(type(layer.get(k)) is int and layer[k] > 0 for k in ("out", "in"))
                   and isinstance(layer.get("transposed", False), bool), "--stats", meta_path,
                   f"gives layer {name} no positive integer out/in and boolean transposed ({str(layer)[:80]})", fix)
        h_path = folder / HESSIANS_NAME
        header, _ = safetensors_header(h_path, "--stats", fix)
        for name, layer in layers.items():
            got = header.get(name)
            expect(got is not None, "--stats", h_path, f"has no H for layer {name}", fix)
            expect(got["dtype"] == "F64" and got["shape"] == [layer["in"], layer["in"]], "--stats", h_path,
                   f"stores H of {name} as {got['dtype']} {got['shape']}, not F64 {[layer['in']] * 2} "
                   "(stats.json's in x in)", fix)
        return cls(StoredHessians(h_path, list(layers)), layers,
                   {k: v for k, v in meta.items() if k not in ("format", "version")})


def check_layer_shape(shape: tuple[int, ...] | None, name: str, layer: dict, where: object = "the stats") -> None:
    """The stored weight of linear ``name`` (``shape`` as the model stores it, None when absent)
    is what the stats (``where``: their stats.json) describe; ValueError naming --stats otherwise.
    Used on shapes from file headers, before any weight is read."""
    if shape is None:
        raise ValueError(f"--stats: layer {name} of {where} is not in the model ({name}.weight missing); "
                         "the stats were made for another model: re-run calibrate on this MODEL")
    shape = tuple(shape)
    out_in = shape[::-1] if layer.get("transposed") else shape
    if out_in != (layer["out"], layer["in"]):
        got = "x".join(map(str, out_in))
        raise ValueError(f"--stats: layer {name} is {layer['out']}x{layer['in']} in {where} but "
                         f"{got} in the model; re-run calibrate on this MODEL")


def layer_weight(weights: dict[str, np.ndarray], name: str, layer: dict) -> np.ndarray:
    """W (out, in) of linear ``name`` from a name → array dict; ValueError when the stats and the
    model disagree (missing layer or other shape)."""
    key = f"{name}.weight"
    check_layer_shape(weights[key].shape if key in weights else None, name, layer)
    return weights[key].T if layer.get("transposed") else weights[key]
