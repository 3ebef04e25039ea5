"""The quantized checkpoint (docs/FORMAT.md, "Checkpoint"): write resumably, read, dequantize.

A checkpoint is a directory:

* ``model.safetensors``: per quantized linear ``NAME.qweight`` (packed uint8 codes),
  ``NAME.scales`` and ``NAME.zeros`` (float32, (out, n_groups)), with the fp16 branch also
  ``NAME.hp_index`` (int32 (k,)) and ``NAME.hp_weight`` (float16 (out, k)); every other tensor as is.
* ``quantization_config.json``: format version, bits, group size, method, backend, solver
  config, calibration info, tool version and per layer {shape, transposed, loss, ...}.
  Written last: a directory without it is not a checkpoint.

While a run is in progress, finished units (a layer, or a block for ``run``) are committed
one file each to ``.partial/`` by atomic rename; a restarted run with the same header skips them,
so the final files are byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ..format import QuantResult
from ..matmul import PackedLayer
from ..objective import layer_loss
from .atomic import read_safetensors, write_json, write_safetensors

CHECKPOINT_FORMAT = "decoupleq-checkpoint"
CHECKPOINT_VERSION = 1
CONFIG_NAME = "quantization_config.json"
WEIGHTS_NAME = "model.safetensors"
PARTIAL = ".partial"


#: Tensor suffixes of one quantized linear; the last two only with the fp16 branch.
QUANT_SUFFIXES = ("qweight", "scales", "zeros", "hp_index", "hp_weight")
#: Stored dtypes (docs/FORMAT.md); the loss in the config is measured after this cast.
STORED_DTYPES = {"qweight": "uint8", "scales": "float32", "zeros": "float32", "hp_index": "int32",
                 "hp_weight": "float16"}


def quantized_tensors(name: str, packed: PackedLayer) -> dict[str, np.ndarray]:
    """``NAME.qweight`` / ``.scales`` / ``.zeros`` (+ ``.hp_index`` / ``.hp_weight``) of one layer."""
    out = {f"{name}.qweight": packed.packed, f"{name}.scales": packed.scale, f"{name}.zeros": packed.zero}
    if packed.hp_channels:
        out[f"{name}.hp_index"], out[f"{name}.hp_weight"] = packed.hp_index, packed.hp_weight
    return out


def stored_layer(name: str, res: QuantResult, W: np.ndarray, H: np.ndarray, transposed: bool
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and JSON info of one solved linear, its loss re-measured after the float32 cast:
    loss = Σ_i (Ŵ_i − W_i) H (Ŵ_i − W_i)ᵀ with Ŵ from the stored (float32) scale and zero."""
    packed = PackedLayer.from_result(res, np.float32)
    info = {"shape": list(W.shape), "transposed": transposed, "loss": layer_loss(W, packed.dequantize(), H),
            "loss_float64": res.loss, "objective": res.objective, "hp_channels": packed.hp_channels}
    return quantized_tensors(name, packed), info


def packed_layer(tensors: dict[str, np.ndarray], name: str, layer: dict, bits: int, group_size: int) -> PackedLayer:
    """The PackedLayer of linear ``name`` from a checkpoint's tensors (fp16 branch when stored)."""
    branch = (tensors.get(f"{name}.hp_index"), tensors.get(f"{name}.hp_weight"))
    return PackedLayer(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors[f"{name}.zeros"],
                       bits, group_size, tuple(layer["shape"]), *branch)


def dequantized_weight(tensors: dict[str, np.ndarray], name: str, layer: dict, bits: int, group_size: int) -> np.ndarray:
    """Ŵ = s·q + z (+ B on the branch columns), (out, in) float32: computed in float64 from the
    stored tensors, cast once."""
    return packed_layer(tensors, name, layer, bits, group_size).dequantize().astype(np.float32)


class CheckpointWriter:
    """Resumable writer: ``commit`` units as they finish, ``finalize`` once all are done."""

    def __init__(self, out: Path, header: dict, overwrite: bool = False) -> None:
        self.out, self.header = Path(out), header
        self.partial = self.out / PARTIAL
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out: {self.out} is a file; pass a folder for the checkpoint")
        if overwrite and self.out.exists():
            shutil.rmtree(self.out)
        if self.out.exists() and any(self.out.iterdir()):
            head_path = self.partial / "header.json"
            if not head_path.exists():
                raise ValueError(f"--out: {self.out} exists and is not an unfinished run of this command; "
                                 "choose another --out or pass --overwrite")
            if json.loads(head_path.read_text()) != json.loads(json.dumps(header)):
                raise ValueError(f"--out: {self.out} holds an unfinished run with other settings; "
                                 "re-run with the same options to resume it, or pass --overwrite")
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json(self.partial / "header.json", header)

    def _unit_path(self, unit: str) -> Path:
        return self.partial / f"{unit}.safetensors"

    def done(self, unit: str) -> bool:
        return self._unit_path(unit).exists()

    def load(self, unit: str) -> tuple[dict[str, np.ndarray], dict]:
        tensors, meta = read_safetensors(self._unit_path(unit))
        return tensors, json.loads(meta["info"])

    def commit(self, unit: str, tensors: dict[str, np.ndarray], info: dict) -> None:
        """One atomic file per unit: tensors plus its JSON info in the safetensors metadata."""
        write_safetensors(self._unit_path(unit), tensors, {"info": json.dumps(info, sort_keys=True)})

    def finalize(self, units: list[str], other: dict[str, np.ndarray], layers: dict[str, dict],
                 extra: dict | None = None) -> dict:
        """Merge every unit with the unquantized tensors into the final files; remove .partial."""
        tensors = dict(other)
        for unit in units:
            t, _ = self.load(unit)
            tensors.update(t)
        config = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **self.header,
                  "dtypes": STORED_DTYPES, **(extra or {}), "layers": layers}
        write_safetensors(self.out / WEIGHTS_NAME, tensors, {"format": CHECKPOINT_FORMAT})
        write_json(self.out / CONFIG_NAME, config)
        shutil.rmtree(self.partial)
        return config


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).exists() and not (Path(folder) / PARTIAL).exists()


def checkpoint_config(folder: Path, arg: str = "--quantized") -> dict:
    """quantization_config.json of a finished checkpoint; ValueError naming ``arg`` (the argument
    that passed the folder) for a missing, unfinished or foreign one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{arg}: {folder} is not a directory; pass the --out folder of quantize/run")
    if not is_complete(folder):
        raise ValueError(f"{arg}: {folder} is not a finished checkpoint (no {CONFIG_NAME}, or an "
                         "interrupted run); re-run the command that writes it to finish it")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{arg}: {folder / CONFIG_NAME} is not valid JSON ({e})") from None
    if config.get("format") != CHECKPOINT_FORMAT or config.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{arg}: {folder / CONFIG_NAME} is not a version-{CHECKPOINT_VERSION} checkpoint")
    return config


def finished_with(folder: Path, header: dict) -> dict | None:
    """The config of ``folder`` if it is a finished checkpoint written with ``header``'s settings
    (a repeated command then has nothing to do), else None."""
    if not is_complete(folder):
        return None
    config = checkpoint_config(folder)
    return config if {k: config.get(k) for k in header} == json.loads(json.dumps(header)) else None


def read_checkpoint_tensors(folder: Path, arg: str = "--quantized") -> tuple[dict, dict[str, np.ndarray]]:
    """(config, every tensor of model.safetensors) of a finished checkpoint; errors name ``arg``."""
    config = checkpoint_config(folder, arg)
    tensors, _ = read_safetensors(Path(folder) / WEIGHTS_NAME)
    return config, tensors


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, PackedLayer]]:
    """Public reader: (config, {linear name: PackedLayer}) of a finished checkpoint.

    config is quantization_config.json (bits, group_size, method, per-layer loss, ...); each
    PackedLayer holds the stored packed codes, float32 scales/zeros and the fp16 branch if any,
    so ``PackedLayer.dequantize()`` / ``decoupleq_ref.matmul`` give the layer's Ŵ / x @ Ŵᵀ."""
    config, tensors = read_checkpoint_tensors(folder, "folder")
    return config, {name: packed_layer(tensors, name, layer, config["bits"], config["group_size"])
                    for name, layer in config["layers"].items()}


def model_state(config: dict, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float state_dict the checkpoint stands for: dequantized weights + every other tensor."""
    bits, group_size = config["bits"], config["group_size"]
    quant_keys = {f"{n}.{s}" for n in config["layers"] for s in QUANT_SUFFIXES}
    state = {k: v for k, v in tensors.items() if k not in quant_keys}
    for name, layer in config["layers"].items():
        W_hat = dequantized_weight(tensors, name, layer, bits, group_size)
        # back to the module's storage orientation: GPT-2 Conv1D keeps (in, out)
        state[f"{name}.weight"] = np.ascontiguousarray(W_hat.T) if layer["transposed"] else W_hat
    return state
