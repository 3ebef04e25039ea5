"""The conformance suite's data model: a case, a suite, the manifest and its tensor hashes.

A suite is a directory validate/suites/<name>/ with ``manifest.json`` (cases, configs, tags,
checks, SHA-256 hashes of every tensor, tolerance policy) and ``cases.safetensors`` (inputs W
and H per layer, the reference's q/scale/zero per case, the exact optimum's for tiny cases).
``python -m validate.make_suite`` generates it (never edit it by hand); ``load_suite`` reads
and verifies it; ``validate.conformance`` runs an implementation through it.

safetensors (the ``torch`` extra) is imported where the tensors are read or written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from decoupleq_ref.config import QuantConfig

FORMAT_VERSION = 1
SUITES_DIR = Path(__file__).resolve().parent / "suites"
TENSORS_FILE = "cases.safetensors"
MANIFEST_FILE = "manifest.json"


def tensor_hash(a: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes: what the manifest records per tensor."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(f"{a.dtype.str}{list(a.shape)}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Case:
    """One conformance case: an input layer, a config, what to check, and the stored answers."""

    name: str
    layer: str
    W: np.ndarray
    H: np.ndarray
    config: QuantConfig
    tags: list[str]
    description: str
    checks: list[str]
    reference: dict[str, np.ndarray] | None = None   # q, scale, zero (+ hp_index, hp_weight) of the reference
    optimum: dict[str, np.ndarray] | None = None     # q, scale, zero of the global optimum (on H_d)
    numbers: dict[str, Any] = field(default_factory=dict)  # stored loss/objective values

    @property
    def shape(self) -> tuple[int, int]:
        return self.W.shape  # type: ignore[return-value]

    def __repr__(self) -> str:
        c = self.config
        return (f"Case({self.name!r}, {self.shape[0]}x{self.shape[1]}, bits={c.bits}, "
                f"group_size={c.group_size}, symmetric={c.symmetric}, tags={self.tags})")


@dataclass
class Suite:
    name: str
    version: int
    path: Path
    manifest: dict[str, Any]
    cases: list[Case]

    def __iter__(self) -> Iterator[Case]:
        return iter(self.cases)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"case {name!r} not in suite {self.name!r}")

    def select(self, names: Iterable[str] | None = None, tags: Iterable[str] | None = None,
               max_elements: int | None = None, where: Callable[[Case], bool] | None = None) -> "Suite":
        """A sub-suite: cases whose name contains one of ``names``, carrying one of ``tags``,
        with at most ``max_elements`` weights, and/or satisfying ``where``."""
        names, tags = list(names or []), set(tags or [])
        keep = [c for c in self.cases
                if (not names or any(n in c.name for n in names))
                and (not tags or tags & set(c.tags))
                and (max_elements is None or c.W.size <= max_elements)
                and (where is None or where(c))]
        return Suite(self.name, self.version, self.path, self.manifest, keep)

    @property
    def policy(self) -> dict[str, Any]:
        return self.manifest["policy"]


def suite_dir(name: str | Path = "default") -> Path:
    """Directory of a suite: a name under validate/suites, a directory, or its manifest.json."""
    p = Path(name)
    if p.name == MANIFEST_FILE:
        return p.parent
    if p.is_dir():
        return p
    d = SUITES_DIR / str(name)
    if not d.is_dir():
        raise ValueError(f"suite: {name!r} is neither a suite directory nor one of {list_suites()}")
    return d


def list_suites() -> list[str]:
    return sorted(p.parent.name for p in SUITES_DIR.glob(f"*/{MANIFEST_FILE}"))


def load_suite(name: str | Path = "default", verify: bool = True) -> Suite:
    """Load a suite; with ``verify`` every tensor's SHA-256 is checked against the manifest."""
    from safetensors.numpy import load_file

    d = suite_dir(name)
    manifest = json.loads((d / MANIFEST_FILE).read_text())
    t = load_file(str(d / manifest["tensors_file"]))

    def get(key: str, want: str | None) -> np.ndarray:
        if key not in t:
            raise ValueError(f"suite {d}: tensor {key!r} missing from {manifest['tensors_file']}")
        a = t[key]
        if verify and want is not None and tensor_hash(a) != want:
            raise ValueError(f"suite {d}: tensor {key!r} does not match its SHA-256 in the manifest; "
                             "regenerate with python -m validate.make_suite")
        return a

    layers = {n: (get(f"layer.{n}.W", m["sha256"]["W"]), get(f"layer.{n}.H", m["sha256"]["H"]))
              for n, m in manifest["layers"].items()}
    cases = []
    for c in manifest["cases"]:
        W, H = layers[c["layer"]]
        parts: dict[str, dict[str, np.ndarray] | None] = {}
        for part, tag in (("reference", "ref"), ("optimum", "opt")):
            if part in c:
                parts[part] = {k: get(f"case.{c['name']}.{tag}.{k}", want)
                               for k, want in c[part]["sha256"].items()}
            else:
                parts[part] = None
        numbers = {f"{part}_{k}": v for part in ("reference", "optimum") if part in c
                   for k, v in c[part].items() if k != "sha256"}
        cases.append(Case(c["name"], c["layer"], W, H, QuantConfig.from_dict(c["config"]), list(c["tags"]),
                          c["description"], list(c["checks"]), parts["reference"], parts["optimum"], numbers))
    return Suite(manifest["suite"], int(manifest["suite_version"]), d, manifest, cases)


def manifest_text(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=1, sort_keys=False) + "\n"


def write(out_dir: Path, tensors: dict[str, np.ndarray], manifest: dict[str, Any]) -> None:
    """Write both files through temporary names, then rename: the tensors first, the manifest
    (which names and hashes them) last, so a crash never leaves a suite that loads but lies."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_t, tmp_m = out_dir / f".{TENSORS_FILE}.tmp", out_dir / f".{MANIFEST_FILE}.tmp"
    save_file(dict(sorted(tensors.items())), str(tmp_t),
              metadata={"suite": manifest["suite"], "suite_version": str(manifest["suite_version"])})
    tmp_m.write_text(manifest_text(manifest))
    os.replace(tmp_t, out_dir / TENSORS_FILE)
    os.replace(tmp_m, out_dir / MANIFEST_FILE)
