"""Reading files a user hands us (models, stats, checkpoints) as untrusted input.

Every problem becomes a ValueError of one line that names the option, the file and the fix
(the CLI shows it as a usage error, exit 2): never a SafetensorError / JSONDecodeError /
KeyError traceback. A safetensors file's header is parsed and checked here before any tensor
data is read, so a file that claims a huge tensor is refused (or sized) for the cost of its
header, and names that come from files are checked before they are used.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np

#: The safetensors library's own header limit.
MAX_HEADER_BYTES = 100_000_000
#: Bytes per element of each safetensors dtype.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
#: A module path as transformers names modules: identifiers (or block indices) joined by dots.
MODULE_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")


def check_module_name(name: object, option: str, file: Path, fix: str) -> str:
    """``name`` if it is a module path (``model.layers.3.mlp.down_proj``); ValueError otherwise.
    Names from files are never used as paths, but one that is not a module path marks a damaged
    or hand-made file, and is refused before anything is solved."""
    if not isinstance(name, str) or len(name) > 1000 or not MODULE_PATH.fullmatch(name):
        raise ValueError(f"{option}: {file} names a layer {str(name)[:80]!r}, which is not a module path "
                         f"(letters, digits and _ joined by dots); {fix}")
    return name


def read_json(path: Path, option: str, fix: str) -> dict:
    """A JSON object from ``path``; ValueError naming the file for a missing, unreadable or
    non-object file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{option}: {path} is missing; {fix}") from None
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{option}: {path} is not valid JSON ({one_line(e)}); {fix}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{option}: {path} holds a JSON {type(obj).__name__}, not an object; {fix}")
    return obj


def one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def safetensors_header(path: Path, option: str, fix: str) -> tuple[dict[str, dict], dict[str, str]]:
    """({tensor name: {"dtype", "shape"}}, metadata) of a safetensors file, from its header only.

    Checked here, before any data is read: the header fits the file and the library's limit, every
    dtype is known, every shape is a list of non-negative integers and every tensor's byte range
    lies inside the file and has exactly the size its dtype and shape need."""
    path = Path(path)

    def bad(why: str) -> ValueError:
        return ValueError(f"{option}: {path} is not a valid safetensors file ({why}); {fix}")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise bad(f"the header claims {n} bytes, the file has {size}")
            raw = f.read(n)
    except FileNotFoundError:
        raise ValueError(f"{option}: {path} is missing; {fix}") from None
    except IsADirectoryError:
        raise ValueError(f"{option}: {path} is a directory, not a safetensors file; {fix}") from None
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise bad(f"its header is not JSON: {one_line(e, 80)}") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its __metadata__ is not a map of strings")
    data_bytes = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            raise bad(f"tensor {name[:80]!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name[:80]!r} has shape {str(shape)[:80]}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name[:80]!r} has data offsets {str(offsets)[:80]} outside the file's "
                      f"{data_bytes} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
            raise bad(f"tensor {name[:80]!r} of shape {shape} has {offsets[1] - offsets[0]} bytes")
        tensors[name] = {"dtype": entry["dtype"], "shape": shape}
    return tensors, metadata


def read_safetensors(path: Path, option: str, fix: str, names: Iterable[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors of a safetensors file (all, or ``names``) as numpy arrays, plus its string metadata;
    the header is checked first (safetensors_header), every failure is a ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    header, metadata = safetensors_header(path, option, fix)
    wanted = list(header) if names is None else list(names)
    missing = [k for k in wanted if k not in header]
    if missing:
        raise ValueError(f"{option}: {path} has no tensor {missing[0][:80]!r}; {fix}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: f.get_tensor(k) for k in wanted}, metadata
    except TypeError as e:  # bf16 has no numpy dtype
        raise ValueError(f"{option}: {path} holds a dtype numpy cannot read ({one_line(e, 80)}); re-save it in "
                         "float32 or float16") from None
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{option}: {path} cannot be read ({one_line(e)}); {fix}") from None


def file_fingerprint(paths: Iterable[Path], samples: int = 64, chunk: int = 4096) -> str:
    """sha256 over each file's name, size, first MiB and ``samples`` evenly spaced chunks: tells
    two models with equal shapes but different weights apart without reading gigabytes."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            h.update(f.read(1 << 20))
            for i in range(samples):
                f.seek(size * i // samples)
                h.update(f.read(chunk))
    return h.hexdigest()


def expect(cond: Any, option: str, path: Path, what: str, fix: str) -> None:
    """ValueError ``OPTION: PATH WHAT; FIX`` unless ``cond``: the shape of every file check."""
    if not cond:
        raise ValueError(f"{option}: {path} {what}; {fix}")
