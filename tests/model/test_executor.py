"""Executors of `decoupleq quantize`: the checkpoint does not depend on where the layers
are solved — in-process, a local process pool, a local Ray cluster, or a Ray cluster that loses a
worker mid-layer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from decoupleq_ref import QuantConfig  # noqa: E402
from decoupleq_ref.backends import get_solver  # noqa: E402
from decoupleq_ref.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME  # noqa: E402
from decoupleq_ref.model.executor import LayerTask, read_weight, run_tasks, solve_layer_task  # noqa: E402
from decoupleq_ref.model.quantize import quantize_model  # noqa: E402
from decoupleq_ref.model.source import resolve_model  # noqa: E402
from decoupleq_ref.model.stats import CalibrationStats  # noqa: E402
from decoupleq_ref.model.tiny import save_random_stats, save_tiny  # noqa: E402
from decoupleq_ref.model.weights import read_weights  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("exec")
    model = save_tiny(root / "llama", "llama", hidden_size=128, intermediate_size=256)
    return model, save_random_stats(model, root / "stats")


def quantize(setup, out: Path, cfg: QuantConfig = QuantConfig(bits=2, group_size=32), **kw) -> dict:
    model, stats_dir = setup
    return quantize_model(resolve_model(model), CalibrationStats.load(stats_dir), cfg, get_solver("numpy"), "numpy",
                          out, stats_dir=stats_dir, **kw)


def files(folder: Path) -> tuple[bytes, bytes]:
    return (folder / WEIGHTS_NAME).read_bytes(), (folder / CONFIG_NAME).read_bytes()


@pytest.fixture(scope="module")
def serial(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("serial") / "q"
    quantize(setup, out)
    return files(out)


def test_worker_reads_its_own_inputs(setup):
    """A task carries names and paths only; the worker's W and H are the model's and the stats'."""
    model, stats_dir = setup
    stats = CalibrationStats.load(stats_dir)
    name = next(iter(stats.layers))
    W = read_weights(resolve_model(model))[f"{name}.weight"]
    assert np.array_equal(read_weight(model, f"{name}.weight"), W)
    out = solve_layer_task(LayerTask(name, str(model), str(stats_dir), stats.layers[name],
                                     QuantConfig(bits=2, group_size=32).to_dict(), "numpy"))
    assert out.name == name and set(out.tensors) == {f"{name}.qweight", f"{name}.scales", f"{name}.zeros"}
    assert out.tensors[f"{name}.qweight"].dtype == np.uint8 and out.info["loss"] > 0


def test_process_pool_gives_the_same_checkpoint(setup, serial, tmp_path):
    quantize(setup, tmp_path / "q", workers=2)
    assert files(tmp_path / "q") == serial


def test_unknown_executor_is_refused(setup, tmp_path):
    with pytest.raises(ValueError, match="^--executor"):
        quantize(setup, tmp_path / "q", executor="slurm")
    assert not (tmp_path / "q" / CONFIG_NAME).exists()


def test_ray_missing_is_a_clear_error(monkeypatch, setup, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ValueError, match=r"^--executor: ray is not installed; pip install \"decoupleq-ref\[ray\]\""):
        list(run_tasks([], "ray"))


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster, started and stopped by the tests (skipped if Ray cannot start)."""
    ray = pytest.importorskip("ray", reason='ray is not installed: pip install -e ".[ray]"')
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"a local Ray cluster could not start here: {e}")
    yield ray
    ray.shutdown()


def test_ray_gives_the_same_checkpoint(ray_cluster, setup, serial, tmp_path):
    quantize(setup, tmp_path / "q", executor="ray", workers=2)
    assert files(tmp_path / "q") == serial


def test_ray_survives_a_killed_worker(ray_cluster, setup, tmp_path):
    """SIGKILL a worker process while it solves a layer: Ray retries the task and the checkpoint
    is complete and byte-identical to a local run's."""
    psutil = pytest.importorskip("psutil")
    cfg = QuantConfig.improved(bits=2, group_size=32)  # slow enough (~seconds per layer) to be caught mid-solve
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        deadline = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < deadline and not killed:
            for p in psutil.process_iter(["pid", "cmdline"]):
                if "ray::solve_layer_task" in " ".join(p.info["cmdline"] or []):
                    time.sleep(0.3)  # let it get into the solve
                    try:
                        p.kill()
                        killed.append(p.info["pid"])
                    except psutil.NoSuchProcess:
                        continue
                    break
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        quantize(setup, tmp_path / "ray", cfg, executor="ray", workers=2)
    finally:
        stop.set()
        thread.join()
    assert killed, "no running ray::solve_layer_task process was seen to kill"
    quantize(setup, tmp_path / "local", cfg)
    assert files(tmp_path / "ray") == files(tmp_path / "local")


def test_cli_passes_the_executor_through(setup, tmp_path):
    from typer.testing import CliRunner

    from decoupleq_ref.cli import app

    model, stats_dir = setup
    args = ["quantize", str(model), "--stats", str(stats_dir), "--backend", "numpy", "--bits", "2", "--group-size", "32"]
    bad = CliRunner().invoke(app, args + ["--out", str(tmp_path / "bad"), "--executor", "slurm"])
    assert bad.exit_code == 2 and "--executor" in bad.output and "local" in bad.output
    ok = CliRunner().invoke(app, args + ["--out", str(tmp_path / "q"), "--executor", "local", "--workers", "2"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "q" / CONFIG_NAME).exists()
