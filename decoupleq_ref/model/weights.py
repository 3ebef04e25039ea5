"""Read a model's weights as float32 NumPy arrays under transformers' state_dict names — no torch.

* HF directory: every ``*.safetensors`` file (sharded or not) through safetensors' numpy API;
  bf16 tensors are widened to float32.
* GGUF (Llama family): tensors dequantized with the ``gguf`` package and renamed to HF names.
  llama.cpp's converter permutes the rows of attn_q / attn_k so that rotary pairs are
  interleaved; transformers undoes that when it loads a GGUF, and so do we
  (``unpermute_rotary``), so the arrays equal what transformers' model holds.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from .safefiles import one_line, read_safetensors, safetensors_header
from .source import ModelSource

#: GGUF tensor name (within ``blk.N.``) → HF module path within ``model.layers.N.``
LLAMA_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
LLAMA_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_ARCHS = ("llama",)


def gguf_to_hf_name(name: str) -> str | None:
    """'blk.3.attn_q.weight' → 'model.layers.3.self_attn.q_proj.weight'; None for tensors HF has no
    parameter for (e.g. rope_freqs)."""
    stem, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m.group(2) in LLAMA_BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{LLAMA_BLOCK_NAMES[m.group(2)]}.{leaf}"
    if stem in LLAMA_GLOBAL_NAMES:
        return f"{LLAMA_GLOBAL_NAMES[stem]}.{leaf}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    """The inverse of gguf_to_hf_name: 'model.layers.3.self_attn.q_proj.weight' →
    'blk.3.attn_q.weight'; None for a tensor llama.cpp's Llama layout has no name for."""
    stem, _, leaf = name.rpartition(".")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m:
        block = {hf: gg for gg, hf in LLAMA_BLOCK_NAMES.items()}.get(m.group(2))
        return f"blk.{m.group(1)}.{block}.{leaf}" if block else None
    glob = {hf: gg for gg, hf in LLAMA_GLOBAL_NAMES.items()}.get(stem)
    return f"{glob}.{leaf}" if glob else None


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (the inverse of unpermute_rotary): rows ordered
    (head, half, pair) → (head, pair, half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: rows ordered (head, pair, half) → (head, half, pair)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_field(reader: object, key: str) -> object:
    """Scalar or string value of a GGUF metadata field, or None."""
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value.item()


def read_gguf_weights(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a Llama-family GGUF as float32 arrays with HF names and HF orientation."""
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in LLAMA_ARCHS:
        raise ValueError(f"MODEL: GGUF architecture {arch!r} is not supported by the torch-free reader "
                         f"(supported: {LLAMA_ARCHS}); save the model as a HF safetensors directory instead")
    n_head, n_kv = gguf_heads(reader)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        name = gguf_to_hf_name(t.name)
        if name is not None:
            out[name] = gguf_tensor_array(t, n_head, n_kv)
    return out


def gguf_heads(reader: object) -> tuple[int, int]:
    """(attention heads, key/value heads) from a GGUF's metadata: what hf_row_order needs."""
    arch = gguf_field(reader, "general.architecture")
    n_head = int(gguf_field(reader, f"{arch}.attention.head_count"))
    return n_head, int(gguf_field(reader, f"{arch}.attention.head_count_kv") or n_head)


def hf_row_order(gguf_name: str, a: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """``a`` (one entry per weight row first: the weight, or its codes or block scales) of GGUF
    tensor ``gguf_name`` with its rows in HF order: attn_q / attn_k un-permuted, others as they are."""
    if ".attn_q." in gguf_name:
        return unpermute_rotary(a, n_head)
    if ".attn_k." in gguf_name:
        return unpermute_rotary(a, n_kv)
    return a


def gguf_row_order(gguf_name: str, a: np.ndarray, n_head: int, n_kv: int) -> np.ndarray:
    """The inverse of hf_row_order: ``a`` (rows first) of HF tensor order in the row order GGUF
    tensor ``gguf_name`` stores, attn_q / attn_k permuted for llama.cpp's rope layout."""
    if ".attn_q." in gguf_name:
        return permute_rotary(a, n_head)
    if ".attn_k." in gguf_name:
        return permute_rotary(a, n_kv)
    return a


def gguf_tensor_array(t: object, n_head: int, n_kv: int) -> np.ndarray:
    """One GGUF tensor as float32 in HF orientation: dequantized, reshaped, Q/K rows un-permuted."""
    from gguf.quants import dequantize

    # gguf lists dims fastest-first; dequantize returns the C-order (out, in) array
    w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(tuple(reversed(t.shape.tolist())))
    return hf_row_order(t.name, w, n_head, n_kv)


#: What a user does about a damaged model file.
RESAVE = "re-download the model, or re-save it with save_pretrained(..., safe_serialization=True)"


def model_files(folder: Path) -> list[Path]:
    """The *.safetensors files of a HF directory; ValueError with the fix when there are none."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"MODEL: {folder} has no *.safetensors file (pickled .bin weights are not read); "
                         "re-save the model with save_pretrained(..., safe_serialization=True)")
    return files


def open_gguf(path: Path) -> object:
    """GGUFReader of ``path``; ValueError naming MODEL for a file the gguf package cannot parse."""
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, TypeError, struct.error) as e:
        raise ValueError(f"MODEL: {path} is not a readable GGUF file ({one_line(e)}); re-download it") from None


def weight_shapes(source: ModelSource) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape under its HF name, from file headers only (no tensor data is read)."""
    if source.is_gguf:
        reader = open_gguf(source.path)
        return {name: tuple(reversed(t.shape.tolist())) for t in reader.tensors
                if (name := gguf_to_hf_name(t.name)) is not None}
    shapes: dict[str, tuple[int, ...]] = {}
    for f in model_files(source.folder):
        shapes.update({k: tuple(v["shape"]) for k, v in safetensors_header(f, "MODEL", RESAVE)[0].items()})
    return shapes


def read_safetensors_weights(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a HF directory's *.safetensors files (float tensors as float32)."""
    out: dict[str, np.ndarray] = {}
    for f in model_files(folder):
        tensors, _ = read_safetensors(f, "MODEL", RESAVE)
        out.update({k: arr.astype(np.float32) if arr.dtype.kind == "f" else arr for k, arr in tensors.items()})
    return out


def read_weights(source: ModelSource) -> dict[str, np.ndarray]:
    """The model's tensors by HF state_dict name, as NumPy arrays (no torch import)."""
    return read_gguf_weights(source.path) if source.is_gguf else read_safetensors_weights(source.folder)
