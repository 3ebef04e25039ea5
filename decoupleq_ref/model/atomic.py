"""Atomic file writes: write a temporary file beside the target, then os.replace it.

A reader never sees a half-written file: either the old content (or nothing) or the new one. A
process killed mid-write leaves its temporary file (``.NAME.tmp-PID``, or the safetensors
library's own ``.tmpXXXXXX``); remove_stale_temps clears them when a run resumes.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

#: Temporary files of atomic_write (``.NAME.tmp-PID``) and of safetensors' save_file (``.tmpXXXXXX``).
TEMP_NAME = re.compile(r"\..+\.tmp-\d+|\.tmp[A-Za-z0-9]{6}")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path in the same folder, then rename it onto ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write with sorted keys (byte-identical for equal content)."""
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Atomic safetensors write (safetensors.numpy: no torch, no pickle). The library reports I/O
    failures (disk full, file too large) as SafetensorError, not OSError: they are turned back into
    the OSError they are, with the errno, so callers handle every disk error in one place."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}

    def save(tmp: Path) -> None:
        try:
            save_file(arrays, str(tmp), metadata=metadata)
        except SafetensorError as e:
            raise safetensors_os_error(e, path) from None

    atomic_write(path, save)


def safetensors_os_error(e: Exception, path: Path) -> OSError:
    """The OSError behind a SafetensorError ("... (os error 28) ..."); EIO when it names none."""
    found = re.search(r"os error (\d+)", str(e))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code) if found else f"writing failed: {' '.join(str(e).split())}", str(path))


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` (TEMP_NAME); call only while
    holding the folder's lock (lock.py), when no other writer can be using them."""
    removed = []
    if Path(folder).is_dir():
        for p in Path(folder).iterdir():
            if p.is_file() and TEMP_NAME.fullmatch(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
