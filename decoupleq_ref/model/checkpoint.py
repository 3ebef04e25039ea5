"""The quantized checkpoint (docs/FORMAT.md, "Checkpoint"): write resumably, read, dequantize.

A checkpoint is a directory:

* ``model.safetensors``: per quantized linear ``NAME.qweight`` (packed uint8 codes),
  ``NAME.scales`` and ``NAME.zeros`` (float32, (out, n_groups)), with the fp16 branch also
  ``NAME.hp_index`` (int32 (k,)) and ``NAME.hp_weight`` (float16 (out, k)); every other tensor as is.
* ``quantization_config.json``: format version, bits, group size, method, backend, solver
  config, calibration info, tool version and per layer {shape, transposed, loss, ...}.
  Written last: a directory without it is not a checkpoint.

While a run is in progress, finished units (a layer, or a block for ``run``) are committed
one file each to ``.partial/`` by atomic rename, under a hash of the unit's name (names from files
never become paths); a restarted run with the same header skips them, so the final files are
byte-identical to an uninterrupted run's. ``OUT/.lock`` keeps a second run out (lock.py), and a
resumed run first removes what a killed one left (temporary files, a half-removed .partial/).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np

from ..format import QuantResult
from ..matmul import PackedLayer
from ..objective import layer_loss
from ..packing import packed_row_bytes
from .atomic import TEMP_NAME, remove_stale_temps, write_json, write_safetensors
from .lock import LOCK_NAME, FolderLock
from .progress import log
from .safefiles import check_module_name, expect, one_line, read_json, read_safetensors, safetensors_header

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


UNIT_FILE = re.compile(r"unit-[0-9a-f]{32}\.safetensors")
#: What a user does about a damaged or foreign checkpoint.
REWRITE = "re-run the quantize/run command that wrote it (add --overwrite to start over)"


def unit_file(unit: str) -> str:
    """File name of a unit in .partial/: a hash of its name, so no name (from stats.json or a model
    file) ever becomes a path; the name itself is in the file's metadata (``unit``)."""
    return f"unit-{hashlib.sha256(unit.encode()).hexdigest()[:32]}.safetensors"


def committed_units(partial: Path) -> list[Path]:
    return sorted(p for p in partial.glob("unit-*.safetensors") if UNIT_FILE.fullmatch(p.name)) \
        if partial.is_dir() else []


class CheckpointWriter:
    """Resumable writer: ``commit`` units as they finish, ``finalize`` once all are done.

    Use as a context manager: it holds ``OUT/.lock`` (lock.py) from construction until the block
    ends; leaving it by an error when no unit was committed removes what it wrote, so a run that
    solved nothing (e.g. a bad option) leaves no .partial/ to block its corrected re-run."""

    def __init__(self, out: Path, header: dict, overwrite: bool = False) -> None:
        self.out, self.header = Path(out), json.loads(json.dumps(header))
        self.partial = self.out / PARTIAL
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out: {self.out} is a file; pass a folder for the checkpoint")
        self.lock = FolderLock(self.out).acquire()
        try:
            self._prepare(overwrite)
        except BaseException:
            self._discard_if_empty()
            raise

    def _prepare(self, overwrite: bool) -> None:
        tidy_finished(self.out, locked=True)
        if overwrite:
            (self.out / CONFIG_NAME).unlink(missing_ok=True)  # first: the folder stops looking finished
            for p in self.out.iterdir():
                if p.name != LOCK_NAME:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        remove_stale_temps(self.out)
        remove_stale_temps(self.partial)
        head_path = self.partial / "header.json"
        units = committed_units(self.partial)
        # beside an unfinished run only finalize's first file may be (a run stopped between the two)
        others = {p.name for p in self.out.iterdir()} - {LOCK_NAME, PARTIAL}
        if (others - ({WEIGHTS_NAME} if head_path.exists() else set())) or (units and not head_path.exists()):
            raise ValueError(f"--out: {self.out} exists and is not an unfinished run of this command; "
                             "choose another --out or pass --overwrite")
        if units and read_json(head_path, "--out", "pass --overwrite to start over") != self.header:
            raise ValueError(f"--out: {self.out} holds an unfinished run with other settings; "
                             "re-run with the same options to resume it, or pass --overwrite")
        for path in units:  # damaged units are found now, not after the remaining solves
            meta = safetensors_header(path, "--out", f"delete {path} (that unit is solved again) or pass --overwrite")[1]
            expect(unit_file(meta.get("unit", "")) == path.name, "--out", path, "is not the unit its name says",
                   f"delete {path} (that unit is solved again) or pass --overwrite")
        self.partial.mkdir(parents=True, exist_ok=True)
        write_json(self.partial / "header.json", self.header)

    def __enter__(self) -> "CheckpointWriter":
        return self

    def __exit__(self, kind: type | None, *exc: object) -> None:
        if kind is not None:
            self._discard_if_empty()
        self.lock.release()

    def _discard_if_empty(self) -> None:
        """Remove .partial/ (and --out, when this run made it: FolderLock.release) if no unit was committed."""
        if self.partial.is_dir() and {p.name for p in self.partial.iterdir()} <= {"header.json"}:
            shutil.rmtree(self.partial)
        self.lock.release()

    def _unit_path(self, unit: str) -> Path:
        return self.partial / unit_file(unit)

    def done(self, unit: str) -> bool:
        return self._unit_path(unit).exists()

    def load(self, unit: str) -> tuple[dict[str, np.ndarray], dict]:
        path = self._unit_path(unit)
        fix = f"delete {path} (that unit is solved again) or pass --overwrite"
        tensors, meta = read_safetensors(path, "--out", fix)
        expect(meta.get("unit") == unit, "--out", path, f"holds unit {meta.get('unit', '?')[:80]!r}, not {unit!r}", fix)
        try:
            return tensors, json.loads(meta["info"])
        except (KeyError, ValueError):
            raise ValueError(f"--out: {path} has no readable info in its metadata; {fix}") from None

    def commit(self, unit: str, tensors: dict[str, np.ndarray], info: dict) -> None:
        """One atomic file per unit: tensors plus its name and JSON info in the safetensors metadata."""
        write_safetensors(self._unit_path(unit), tensors, {"unit": unit, "info": json.dumps(info, sort_keys=True)})

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


def tidy_finished(folder: Path, locked: bool = False) -> None:
    """A finished checkpoint (quantization_config.json present) whose run was killed while removing
    .partial/ (or left temporary files): remove the leftovers, under the folder's lock. The config
    is written after model.safetensors and before .partial/ goes, and a new run into a finished
    folder deletes the config first, so a .partial/ beside a config is always such a leftover."""
    folder = Path(folder)
    if not (folder / CONFIG_NAME).exists():
        return
    leftovers = [p for p in folder.iterdir() if p.name == PARTIAL or TEMP_NAME.fullmatch(p.name)]
    if not leftovers:
        return
    with contextlib.nullcontext() if locked else FolderLock(folder):
        if (folder / CONFIG_NAME).exists():
            if (folder / PARTIAL).is_dir():
                shutil.rmtree(folder / PARTIAL)
            remove_stale_temps(folder)
            log(f"{folder}: removed what an interrupted clean-up of a finished run left behind")


def is_complete(folder: Path) -> bool:
    return (Path(folder) / CONFIG_NAME).exists() and not (Path(folder) / PARTIAL).exists()


def checkpoint_config(folder: Path, option: str = "--quantized") -> dict:
    """quantization_config.json of a finished checkpoint, its fields checked; ValueError naming
    ``option`` (--quantized, or --out for a command about to write there) for a missing, unfinished,
    damaged or foreign one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{option}: {folder} is not a directory; pass the --out folder of quantize/run")
    if not is_complete(folder):
        raise ValueError(f"{option}: {folder} is not a finished checkpoint (no {CONFIG_NAME}, or an "
                         "interrupted run); re-run the command that writes it to finish it")
    path = folder / CONFIG_NAME
    config = read_json(path, option, REWRITE)
    if config.get("format") != CHECKPOINT_FORMAT or config.get("format_version") != CHECKPOINT_VERSION:
        raise ValueError(f"{option}: {path} is not a version-{CHECKPOINT_VERSION} checkpoint; {REWRITE}")
    bits, group_size, layers = config.get("bits"), config.get("group_size"), config.get("layers")
    expect(type(bits) is int and 1 <= bits <= 8, option, path, f"has bits {bits!r}, not 1..8", REWRITE)
    expect(type(group_size) is int and (group_size == -1 or group_size > 0), option, path,
           f"has group_size {group_size!r}, not -1 or a positive integer", REWRITE)
    expect(isinstance(layers, dict), option, path, "has no layers table", REWRITE)
    for name, layer in layers.items():
        check_module_name(name, option, path, REWRITE)
        shape = layer.get("shape") if isinstance(layer, dict) else None
        expect(isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape),
               option, path, f"gives layer {name} the shape {shape!r}", REWRITE)
        expect(isinstance(layer.get("transposed"), bool), option, path,
               f"gives layer {name} no boolean 'transposed'", REWRITE)
        k = layer.get("hp_channels", 0)
        expect(type(k) is int and 0 <= k <= shape[1], option, path, f"gives layer {name} hp_channels {k!r}", REWRITE)
        expect(group_size == -1 or shape[1] % group_size == 0, option, path,
               f"has group_size {group_size}, which does not divide layer {name}'s {shape[1]} inputs", REWRITE)
    return config


def expected_tensors(name: str, layer: dict, bits: int, group_size: int) -> dict[str, tuple[str, list[int]]]:
    """{tensor name: (safetensors dtype, shape)} a checkpoint holds for linear ``name`` (docs/FORMAT.md)."""
    out, n_in = layer["shape"]
    G = 1 if group_size == -1 else n_in // group_size
    want = {f"{name}.qweight": ("U8", [out, packed_row_bytes(n_in, bits)]), f"{name}.scales": ("F32", [out, G]),
            f"{name}.zeros": ("F32", [out, G])}
    k = layer.get("hp_channels") or 0
    if k:
        want.update({f"{name}.hp_index": ("I32", [k]), f"{name}.hp_weight": ("F16", [out, k])})
    return want


def check_checkpoint_tensors(path: Path, header: dict[str, dict], config: dict) -> None:
    """Every quantized linear's tensors are in ``header`` with the dtype and shape its config entry
    implies; checked before any tensor data is read."""
    for name, layer in config["layers"].items():
        for key, (dtype, shape) in expected_tensors(name, layer, config["bits"], config["group_size"]).items():
            got = header.get(key)
            expect(got is not None, "--quantized", path, f"has no tensor {key}", REWRITE)
            expect(got["dtype"] == dtype and got["shape"] == shape, "--quantized", path,
                   f"stores {key} as {got['dtype']} {got['shape']}, not {dtype} {shape}", REWRITE)


def finished_with(folder: Path, header: dict) -> dict | None:
    """The config of ``folder`` if it is a finished checkpoint written with ``header``'s settings
    (a repeated command then has nothing to do), else None. Leftovers of an interrupted clean-up
    are removed first (tidy_finished)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    tidy_finished(folder)
    if not is_complete(folder):
        return None
    config = checkpoint_config(folder, "--out")
    return config if {k: config.get(k) for k in header} == json.loads(json.dumps(header)) else None


def read_checkpoint_tensors(folder: Path, option: str = "--quantized") -> tuple[dict, dict[str, np.ndarray]]:
    """(config, every tensor of model.safetensors) of a finished checkpoint, checked: the config's
    fields, each quantized linear's tensors (dtype, shape from the header; then PackedLayer's checks).
    Errors name ``option``, the argument that passed the folder."""
    config, tensors, _ = read_checked_checkpoint(folder, option)
    return config, tensors


def read_checkpoint(folder: Path) -> tuple[dict, dict[str, PackedLayer]]:
    """Public reader: (config, {linear name: PackedLayer}) of a finished checkpoint.

    config is quantization_config.json (bits, group_size, method, per-layer loss, ...); each
    PackedLayer holds the stored packed codes, float32 scales/zeros and the fp16 branch if any,
    so ``PackedLayer.dequantize()`` / ``decoupleq_ref.matmul`` give the layer's Ŵ / x @ Ŵᵀ."""
    config, _, layers = read_checked_checkpoint(folder, "folder")
    return config, layers


def read_checked_checkpoint(folder: Path, option: str) -> tuple[dict, dict[str, np.ndarray], dict[str, PackedLayer]]:
    """(config, tensors, {linear name: PackedLayer}): both readers' checks, each layer built once."""
    config = checkpoint_config(folder, option)
    path = Path(folder) / WEIGHTS_NAME
    check_checkpoint_tensors(path, safetensors_header(path, option, REWRITE)[0], config)
    tensors, _ = read_safetensors(path, option, REWRITE)
    layers = {name: checked_packed_layer(folder, tensors, name, config, option) for name in config["layers"]}
    return config, tensors, layers


def checked_packed_layer(folder: Path, tensors: dict[str, np.ndarray], name: str, config: dict,
                         option: str = "--quantized") -> PackedLayer:
    """packed_layer of a checkpoint read from disk; a layout PackedLayer refuses (e.g. unsorted
    fp16-branch indices) is a ValueError naming the file."""
    try:
        return packed_layer(tensors, name, config["layers"][name], config["bits"], config["group_size"])
    except ValueError as e:
        raise ValueError(f"{option}: {Path(folder) / WEIGHTS_NAME} layer {name}: {one_line(e)}; {REWRITE}") from None


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
