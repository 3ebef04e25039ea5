"""``decoupleq export QMODEL --gguf out.gguf``: a checkpoint as a GGUF file llama.cpp (and
transformers' ``gguf_file=`` loader) runs (docs/FORMAT.md, "GGUF export"). No torch.

The exact types: ggml's Q4_1 / Q5_1 store each block of 32 weights as w = d·q + m with fp16 d and
m, which is decoupleQ's Ŵ = s·q + z with groups of 32 (any group size that is a multiple of 32:
its blocks repeat the group's (s, z)). A checkpoint of up to 4 bits exports as Q4_1, of 5 bits as
Q5_1; the only change is (s, z) rounded to fp16. A linear whose rows are not a multiple of 32
columns has no such blocks: it falls back to F32 (its Ŵ, exactly) and the summary names it.

The K-quants with a min (Q2_K, Q4_K, Q5_K: super-blocks of 256 with integer sub-scales and
sub-mins under fp16 super-scales) are decoupleQ with a second integer/float level: a W2 g16 (Q2_K)
or W4 / W5 g32 (Q4_K / Q5_K) checkpoint is projected onto the grid and re-solved on the layer's H
(``--stats``) by decoupleq_ref.kquant. Rows that are not whole super-blocks fall back, as in
llama.cpp, to a 32-block type: the checkpoint's exact one (Q4_1 / Q5_1), or F32 when its groups
are smaller than 32.

Everything else in the checkpoint (embeddings, norms, an untied output head) is written as F32,
as the checkpoint holds it. Metadata comes from the source model: a GGUF source's key/values
(tokenizer included) are copied; a HF Llama directory's config.json gives the hyperparameters and
its tokenizer.json the tokenizer when it is a byte-level BPE (gguf_tokenizer).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..kquant import KSPECS, SUPER, project_to_kgrid, solve_kquant
from ..kquant_start import kquant_start
from ..matmul import PackedLayer
from ..objective import layer_loss
from .atomic import atomic_write
from .checkpoint import CONFIG_NAME, QUANT_SUFFIXES, packed_layer, read_checkpoint_tensors
from .ggml_blocks import BLOCK, encode_blocks, encode_kquant
from .gguf_tokenizer import tokenizer_metadata
from .source import ModelSource
from .weights import gguf_field, gguf_heads, gguf_row_order, hf_to_gguf_name

#: exact type per bit width (codes 0 … 2^b − 1 fit the type's 0 … 15 / 0 … 31)
EXACT_TYPE = {1: "Q4_1", 2: "Q4_1", 3: "Q4_1", 4: "Q4_1", 5: "Q5_1"}
#: llama.cpp's general.file_type of a model whose linears are mostly this type
FILE_TYPE = {"Q4_1": 3, "Q5_1": 9, "Q2_K": 10, "Q4_K": 14, "Q5_K": 16}
#: every type ``--type`` takes
GGUF_TYPES = tuple(FILE_TYPE)
#: GGUF key/values that describe the tensors, not the model: rewritten, never copied
TENSOR_KEYS = ("general.file_type", "general.quantization_version", "general.architecture")


@dataclass
class ExportSummary:
    """What an export wrote: tensor name → ggml type, the linears that fell back (why, and to
    which type), notes, and for K-quants the per-layer H-losses."""

    path: Path
    types: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)  # GGUF name → why
    notes: list[str] = field(default_factory=list)
    #: K-quant linears: GGUF name → H-losses of the checkpoint's Ŵ, its projection onto the
    #: grid and the constrained solve
    kquant: dict[str, dict[str, float]] = field(default_factory=dict)
    #: with keep_solved: GGUF name → the K-quant Ŵ as ggml decodes it (float32, HF row order)
    solved: dict[str, np.ndarray] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.types.values():
            out[t] = out.get(t, 0) + 1
        return dict(sorted(out.items()))


def exact_type(bits: int, group_size: int) -> str:
    """The ggml type a checkpoint of ``bits`` / ``group_size`` exports to exactly, or ValueError."""
    if bits not in EXACT_TYPE:
        raise ValueError(f"QMODEL: a {bits}-bit checkpoint has no exact GGUF type (Q4_1 holds up to 4 bits, "
                         "Q5_1 5); quantize with --bits 1…5")
    if group_size != -1 and group_size % BLOCK:
        raise ValueError(f"QMODEL: group size {group_size} does not split into ggml's blocks of {BLOCK}; "
                         f"quantize with --group-size {BLOCK} (or a multiple, or -1)")
    return EXACT_TYPE[bits]


def fp16_exact(x: np.ndarray, what: str) -> np.ndarray:
    """x rounded to fp16 (what ggml stores), ValueError if a value overflows fp16."""
    h = np.asarray(x, dtype=np.float64).astype(np.float16)
    if not np.isfinite(h).all():
        raise ValueError(f"QMODEL: {what} holds values beyond fp16's range; GGUF stores block scales as fp16")
    return h


def block_params(layer: PackedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes (out, in) uint8, d, m (out, in/32) fp16) of a layer whose groups split into
    blocks of 32: each block carries its group's (s, z)."""
    q = layer.codes()
    per_block = q.shape[1] // BLOCK // layer.scale.shape[1]
    d = np.repeat(fp16_exact(layer.scale, "a scale"), per_block, axis=1)
    m = np.repeat(fp16_exact(layer.zero, "a zero"), per_block, axis=1)
    return q, d, m


def linear_tensor(layer: PackedLayer, ggml_type: str) -> tuple[np.ndarray, str, str | None]:
    """(array to write, its ggml type, why it fell back or None) of one quantized linear in an
    exact type, rows in HF order. Rows that are not whole blocks of 32 fall back to F32 Ŵ, as
    llama.cpp falls back for tensors its block type cannot hold."""
    n_in = layer.shape[1]
    if ggml_type == "F32" or n_in % BLOCK:
        return layer.dequantize().astype(np.float32), "F32", f"{n_in} columns are not a multiple of {BLOCK}"
    return encode_blocks(ggml_type, *block_params(layer)), ggml_type, None


def kquant_types(bits: int, group_size: int, ggml_type: str) -> str:
    """The fallback type of a K-quant export (the checkpoint's exact type, else F32); ValueError
    when the checkpoint's bits / group size are not the K-quant's codes / sub-blocks."""
    spec = KSPECS[ggml_type]
    if (bits, group_size) != (spec.bits, spec.sub):
        raise ValueError(f"--type: {ggml_type} holds {spec.bits}-bit codes in sub-blocks of {spec.sub}; quantize "
                         f"with --bits {spec.bits} --group-size {spec.sub} (this checkpoint: W{bits} g{group_size})")
    try:
        return exact_type(bits, group_size)
    except ValueError:
        return "F32"


def chosen_type(bits: int, group_size: int, ggml_type: str | None) -> tuple[str, str]:
    """(type of the quantized linears, their fallback type) for ``--type`` (None: the exact one)."""
    if ggml_type is None:
        exact = exact_type(bits, group_size)
        return exact, exact
    if ggml_type not in GGUF_TYPES:
        raise ValueError(f"--type: {ggml_type!r} is not one of {', '.join(GGUF_TYPES)}")
    if ggml_type in KSPECS:
        return ggml_type, kquant_types(bits, group_size, ggml_type)
    exact = exact_type(bits, group_size)
    if ggml_type == "Q4_1" and exact == "Q5_1":
        raise ValueError("--type: 5-bit codes do not fit Q4_1; pass --type Q5_1")
    return ggml_type, ggml_type


def kquant_tensor(layer: PackedLayer, ggml_type: str, W: np.ndarray, H: np.ndarray, solver: dict
                  ) -> tuple[np.ndarray, dict[str, float], np.ndarray]:
    """(bytes, H-losses, ggml's Ŵ) of one linear on the ``ggml_type`` grid: the checkpoint's codes and
    (s, z) projected onto it, per row the better of that and llama.cpp's own quantization
    (kquant_start), then the constrained solve (decoupleq_ref.kquant) on H."""
    projected = project_to_kgrid(layer.codes(), layer.scale, layer.zero, KSPECS[ggml_type])
    start = kquant_start(W, H, projected, damp=solver.get("damp", 0.01))
    solved = solve_kquant(W, H, start, damp=solver.get("damp", 0.01), act_order=solver.get("act_order", True),
                          block_size=solver.get("block_size", 128))
    losses = {"checkpoint": layer_loss(W, layer.dequantize(), H), "projected": layer_loss(W, projected.dequantize(), H),
              "solved": layer_loss(W, solved.dequantize(), H)}
    return encode_kquant(solved), losses, solved.dequantize_ggml()


def llama_config_metadata(folder: Path) -> tuple[list[tuple[str, object, str]], int, int]:
    """(key/values, n_head, n_kv) of a HF Llama directory's config.json, as llama.cpp's converter
    writes them; ValueError for other architectures or rope scalings GGUF's llama has no key for."""
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"MODEL: cannot read {path} ({e})") from None
    if cfg.get("model_type") != "llama":
        raise ValueError(f"MODEL: GGUF export supports Llama-family models, {path} is {cfg.get('model_type')!r}")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"MODEL: rope type {rope.get('rope_type', rope.get('type'))!r} is not exported; "
                         "only default rope is")
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kv = [("general.name", folder.name, "str"),
          ("llama.context_length", int(cfg["max_position_embeddings"]), "u32"),
          ("llama.embedding_length", hidden, "u32"),
          ("llama.block_count", int(cfg["num_hidden_layers"]), "u32"),
          ("llama.feed_forward_length", int(cfg["intermediate_size"]), "u32"),
          ("llama.rope.dimension_count", int(cfg.get("head_dim") or hidden // n_head), "u32"),
          ("llama.attention.head_count", n_head, "u32"),
          ("llama.attention.head_count_kv", n_kv, "u32"),
          ("llama.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)), "f32"),
          ("llama.rope.freq_base", float(theta), "f32"),
          ("llama.vocab_size", int(cfg["vocab_size"]), "u32")]
    return kv, n_head, n_kv


def copy_gguf_metadata(reader: object, writer: object) -> None:
    """Every key/value of the source GGUF (hyperparameters, tokenizer) except those that describe
    its tensors."""
    from gguf import GGUFValueType

    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in TENSOR_KEYS:
            continue
        main = f.types[0]
        sub = f.types[-1] if main == GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), main, sub_type=sub)


def add_metadata(writer: object, kv: list[tuple[str, object, str]]) -> None:
    """Key/values typed "str", "u32", "f32", "bool", or arrays "str[]", "i32[]", "f32[]"."""
    from gguf import GGUFValueType

    scalar = {"str": writer.add_string, "u32": writer.add_uint32, "f32": writer.add_float32, "bool": writer.add_bool}
    array = {"str[]": GGUFValueType.STRING, "i32[]": GGUFValueType.INT32, "f32[]": GGUFValueType.FLOAT32}
    for key, value, kind in kv:
        if kind in array:
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=array[kind])
        else:
            scalar[kind](key, value)


def export_gguf(folder: Path, source: ModelSource, out: Path, ggml_type: str | None = None,
                stats: Path | None = None, keep_solved: bool = False) -> ExportSummary:
    """Write checkpoint ``folder`` (quantized from ``source``) to ``out`` as a GGUF; atomic (a
    temporary file renamed at the end). ``ggml_type``: None for the exact type of the checkpoint,
    or one of GGUF_TYPES; the K-quants need ``stats`` (calibrate's folder: H per linear).
    Returns what was written."""
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    from .progress import progress_bar
    from .stats import CalibrationStats, layer_weight
    from .weights import read_weights

    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--gguf: {out} is a folder; pass a file name such as model.gguf")
    if not out.parent.is_dir():
        raise ValueError(f"--gguf: folder {out.parent} does not exist; create it or pass another path")
    config, tensors = read_checkpoint_tensors(folder, "QMODEL")
    ggml_type, fallback_type = chosen_type(config["bits"], config["group_size"], ggml_type)
    calib = weights = None
    if ggml_type in KSPECS:
        if stats is None:
            raise ValueError(f"--stats: {ggml_type} is re-solved on each layer's H; pass the folder written by "
                             "`decoupleq calibrate` for this model")
        calib = CalibrationStats.load(Path(stats))
        weights = read_weights(source)
    if source.is_gguf:
        reader = GGUFReader(str(source.path))
        if gguf_field(reader, "general.architecture") != "llama":
            raise ValueError(f"MODEL: GGUF export supports Llama-family models, {source.describe()} is not")
        n_head, n_kv = gguf_heads(reader)
    else:
        kv, n_head, n_kv = llama_config_metadata(source.folder)
        tokenizer_kv, no_tokenizer = tokenizer_metadata(source.folder)
        kv += tokenizer_kv
    quant_keys = {f"{n}.{s}" for n in config["layers"] for s in QUANT_SUFFIXES}
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    summary = ExportSummary(Path(out))
    if not source.is_gguf and no_tokenizer:
        summary.notes.append(f"no tokenizer in the file ({no_tokenizer}); load it from {source.describe()}")
    with progress_bar("export", len(config["layers"])) as advance:
        for hf_name, layer_info in config["layers"].items():
            gguf_name = _gguf_name(f"{hf_name}.weight")
            layer = packed_layer(tensors, hf_name, layer_info, config["bits"], config["group_size"])
            if layer.hp_channels:
                raise ValueError("QMODEL: layers with an fp16 branch (--hp-channels) have no GGUF type; "
                                 "quantize without --hp-channels to export")
            if ggml_type in KSPECS and layer.shape[1] % SUPER == 0:
                if hf_name not in calib.hessians:
                    raise ValueError(f"--stats: no H for {hf_name}; pass the stats folder of this model")
                W = layer_weight(weights, hf_name, calib.layers[hf_name]).astype(np.float64)
                arr, summary.kquant[gguf_name], W_hat = kquant_tensor(layer, ggml_type, W, calib.hessians[hf_name],
                                                                      config.get("solver", {}))
                kind, why = ggml_type, None
                if keep_solved:
                    summary.solved[gguf_name] = W_hat
            else:
                arr, kind, why = linear_tensor(layer, fallback_type)
                if ggml_type in KSPECS:
                    why = f"{layer.shape[1]} columns are not a multiple of {SUPER}; {kind} instead"
            arrays[gguf_name] = (gguf_row_order(gguf_name, arr, n_head, n_kv), kind)
            if why:
                summary.fallback[gguf_name] = why
            advance()
    for hf_name, arr in tensors.items():
        if hf_name not in quant_keys:
            gguf_name = _gguf_name(hf_name)
            if gguf_name is not None:
                arrays[gguf_name] = (gguf_row_order(gguf_name, np.asarray(arr, np.float32), n_head, n_kv), "F32")

    def write(tmp: Path) -> None:
        writer = GGUFWriter(str(tmp), "llama")  # writes general.architecture itself
        if source.is_gguf:
            copy_gguf_metadata(reader, writer)
        else:
            add_metadata(writer, kv)
        writer.add_file_type(FILE_TYPE[ggml_type])
        writer.add_quantization_version(2)
        for name in sorted(arrays, key=_tensor_order):
            arr, kind = arrays[name]
            raw = None if kind == "F32" else GGMLQuantizationType[kind]
            writer.add_tensor(name, np.ascontiguousarray(arr), raw_dtype=raw)
            summary.types[name] = kind
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(out, write)
    return summary


#: HF tensors a Llama checkpoint may hold that GGUF has no tensor for (computed by the runtime)
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def _gguf_name(hf_name: str) -> str | None:
    """GGUF name of a checkpoint tensor; None for buffers the runtime computes; ValueError for a
    tensor the Llama layout has no place for."""
    name = hf_to_gguf_name(hf_name)
    if name is None and not hf_name.endswith(SKIPPED_SUFFIXES):
        raise ValueError(f"QMODEL: tensor {hf_name} has no place in GGUF's Llama layout; "
                         "GGUF export supports Llama-family models without biases")
    return name


def _tensor_order(name: str) -> tuple[int, int, str]:
    """llama.cpp's order: token_embd, blocks in order, then output_norm and output."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def default_source(folder: Path) -> str | None:
    """The model a checkpoint records it was made from, if that path still exists."""
    try:
        recorded = json.loads((Path(folder) / CONFIG_NAME).read_text()).get("model")
    except (OSError, json.JSONDecodeError):
        return None
    return recorded if recorded and os.path.exists(recorded) else None


#: what ``--format`` on quantize / run writes: the checkpoint folder, or also OUT/GGUF_NAME
OUTPUT_FORMATS = ("checkpoint", "gguf")
GGUF_NAME = "model.gguf"


def check_output_format(fmt: str, bits: int, group_size: int) -> None:
    """ValueError naming --format before a long run whose GGUF could not be written."""
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"--format: {fmt!r} is not one of {', '.join(OUTPUT_FORMATS)}")
    if fmt == "gguf":
        try:
            exact_type(bits, group_size)
        except ValueError as e:
            raise ValueError(f"--format gguf: {str(e).split(': ', 1)[1]}") from None


def write_output_format(fmt: str, out: Path, source: ModelSource) -> ExportSummary | None:
    """With ``--format gguf``, checkpoint ``out`` also as ``out/model.gguf`` in its exact type."""
    if fmt != "gguf":
        return None
    return export_gguf(Path(out), source, Path(out) / GGUF_NAME)
