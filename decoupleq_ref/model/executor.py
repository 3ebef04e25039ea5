"""Where ``decoupleq quantize`` solves its layers: in this process, a local process pool, or Ray.

With H captured once from the float model the layer-wise solves are independent, so they are
tasks. A task is small (names, paths, the config as a dict): each worker reads its own W and H
from the model and stats files — memory-mapped safetensors / GGUF on storage every worker sees —
and only the packed result (codes, scales, zeros, JSON info) travels back. The driver commits
each result to the resumable checkpoint as it arrives (quantize.py), so a dead driver is resumed
by re-running the command, and a dead worker's task is retried (Ray task retries; a broken local
pool fails the command, which then resumes).

Results do not depend on the executor: every task is the same deterministic solve of the same
float64 inputs (tests/model/test_executor.py checks the checkpoints byte for byte).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Iterator

import numpy as np

from ..backends import get_solver
from ..config import QuantConfig
from .checkpoint import stored_layer
from .safefiles import expect, read_json, read_safetensors, safetensors_header
from .stats import HESSIANS_NAME, StoredHessians, layer_weight
from .weights import RESAVE, model_files

EXECUTORS: tuple[str, ...] = ("local", "ray")
RAY_INSTALL = 'pip install "decoupleq-ref[ray]"'
#: Ray retries a task whose worker died this many times before the command fails.
RAY_TASK_RETRIES = 3


@dataclass(frozen=True)
class LayerTask:
    """One layer solve, described by what a worker needs to find its own inputs."""

    name: str  # module name, e.g. "model.layers.3.mlp.down_proj"
    model: str  # GGUF file or HF safetensors directory
    stats: str  # stats folder of `decoupleq calibrate` (hessians.safetensors)
    layer: dict  # {"out", "in", "transposed"} from stats.json
    config: dict  # QuantConfig.to_dict()
    backend: str


@dataclass
class LayerOutcome:
    """What comes back from a worker: the stored tensors of one layer and its JSON info."""

    name: str
    tensors: dict[str, np.ndarray]
    info: dict
    seconds: float
    worker: str


def read_hessian(stats_folder: str | Path, name: str) -> np.ndarray:
    """H of one layer from ``hessians.safetensors`` (memory-mapped: only this tensor is read)."""
    return StoredHessians(Path(stats_folder) / HESSIANS_NAME, [name])[name]


def read_weight(model: str | Path, key: str) -> np.ndarray:
    """One tensor of the model by HF state_dict name, float32, without reading the others."""
    path = Path(model)
    if path.suffix == ".gguf":
        return _read_gguf_tensor(path, key)
    shard = shard_file(path, key) if (path / INDEX_NAME).exists() else None
    for file in [shard] if shard is not None else model_files(path):
        if key in safetensors_header(file, "MODEL", RESAVE)[0]:
            arr = read_safetensors(file, "MODEL", RESAVE, names=[key])[0][key]
            return arr.astype(np.float32) if arr.dtype.kind == "f" else arr
    raise ValueError(f"MODEL: {path} has no tensor {key}")


INDEX_NAME = "model.safetensors.index.json"


def shard_file(folder: Path, key: str) -> Path | None:
    """The shard that model.safetensors.index.json names for ``key`` (None when it names none).
    The index is a file from outside: a shard name must be a plain *.safetensors file name in the
    model's folder, never a path."""
    index = folder / INDEX_NAME
    weight_map = read_json(index, "MODEL", RESAVE).get("weight_map", {})
    shard = weight_map.get(key) if isinstance(weight_map, dict) else None
    if shard is None:
        return None
    expect(isinstance(shard, str) and shard == Path(shard).name and shard.endswith(".safetensors")
           and not shard.startswith("."), "MODEL", index, f"names the shard {str(shard)[:80]!r} for {key}, "
           "not a *.safetensors file name in the model's folder", RESAVE)
    return folder / shard


def _read_gguf_tensor(path: Path, key: str) -> np.ndarray:
    """The GGUF tensor whose HF name is ``key``, converted as weights.read_gguf_weights does."""
    from .weights import gguf_heads, gguf_tensor_array, gguf_to_hf_name, open_gguf

    reader = open_gguf(path)
    n_head, n_kv = gguf_heads(reader)
    for t in reader.tensors:
        if gguf_to_hf_name(t.name) == key:
            return gguf_tensor_array(t, n_head, n_kv)
    raise ValueError(f"MODEL: {path} has no tensor for {key}")


def solve_layer_task(task: LayerTask) -> LayerOutcome:
    """The worker's whole job: read W and H, solve, return the stored (packed) form."""
    t0 = time.perf_counter()
    key = f"{task.name}.weight"
    W = layer_weight({key: read_weight(task.model, key)}, task.name, task.layer).astype(np.float64)
    H = read_hessian(task.stats, task.name)
    res = get_solver(task.backend)(W, H, QuantConfig.from_dict(task.config))
    tensors, info = stored_layer(task.name, res, W, H, bool(task.layer.get("transposed")))
    return LayerOutcome(task.name, tensors, info, time.perf_counter() - t0, f"{os.uname().nodename}:{os.getpid()}")


def run_local(tasks: list[LayerTask], workers: int = 1) -> Iterator[LayerOutcome]:
    """Solve in this process (workers = 1) or in a pool of ``workers`` processes, yielding each
    result as it finishes. Pool workers are spawned (no fork of a process holding BLAS threads)."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield solve_layer_task(task)
        return
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        pending = {pool.submit(solve_layer_task, t) for t in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()


def connect_ray(address: str | None, workers: int | None) -> None:
    """ray.init once per driver: an existing cluster (``auto`` or ``ray://host:port``) or, with no
    address, a local one of ``workers`` CPUs. ValueError with the fix when Ray is missing."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--executor: ray is not installed; {RAY_INSTALL}, or use --executor local") from None
    if ray.is_initialized():
        return
    kwargs = {"address": address} if address else {"num_cpus": workers or os.cpu_count()}
    ray.init(include_dashboard=False, log_to_driver=False, **kwargs)


def task_memory(task: LayerTask) -> int:
    """Bytes a solve may hold: W and H in float64 and up to three working copies of each (the
    Numba backend stays under 3x, BENCHMARKS.md §3). Given to Ray as the task's ``memory``
    request so a node is never handed more layers than it can hold."""
    out, n_in = task.layer["out"], task.layer["in"]
    return 4 * 8 * (out * n_in + n_in * n_in)


def run_ray(tasks: list[LayerTask], address: str | None = None, workers: int | None = None) -> Iterator[LayerOutcome]:
    """One Ray task per layer (``num_gpus=1`` for the cuda backend, else one CPU; ``memory`` from
    task_memory, capped at the cluster's so no task is unschedulable), at most ``workers`` in
    flight when given; results are yielded as they arrive. A task whose worker process dies is
    retried up to RAY_TASK_RETRIES times by Ray."""
    import ray

    connect_ray(address, workers)
    gpus = 1 if tasks and tasks[0].backend == "cuda" else 0
    remote = ray.remote(num_cpus=0 if gpus else 1, num_gpus=gpus, max_retries=RAY_TASK_RETRIES)(solve_layer_task)
    cluster_memory = int(ray.cluster_resources().get("memory", 0)) or None
    limit = workers or len(tasks)
    queue, in_flight = list(tasks), []
    while queue or in_flight:
        while queue and len(in_flight) < limit:
            task = queue.pop(0)
            in_flight.append(remote.options(memory=min(task_memory(task), cluster_memory or task_memory(task))).remote(task))
        done, in_flight = ray.wait(in_flight, num_returns=1)
        yield ray.get(done[0])


def run_tasks(tasks: list[LayerTask], executor: str = "local", workers: int | None = None,
              ray_address: str | None = None) -> Iterator[LayerOutcome]:
    """Dispatch to the chosen executor; ValueError naming --executor for an unknown one."""
    if executor == "local":
        return run_local(tasks, workers or 1)
    if executor == "ray":
        connect_ray(ray_address, workers)  # fail fast, before any work
        return run_ray(tasks, ray_address, workers)
    raise ValueError(f"--executor: unknown executor {executor!r}; choose one of {EXECUTORS}")
