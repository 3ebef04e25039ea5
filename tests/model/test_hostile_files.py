"""Hostile and damaged files, faults and concurrent runs on the model commands, on a one-block tiny
Llama: names from files never become paths, sizes are checked from file headers before any data is
read, every failure ends in one line naming the file and the fix (exit 1 or 2, never a traceback),
a killed run's temporary files are cleaned on resume, and one run at a time writes an --out."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

import decoupleq_ref.cli_model as cm  # noqa: E402
from decoupleq_ref.cli import app  # noqa: E402
from decoupleq_ref.model.atomic import TEMP_NAME  # noqa: E402
from decoupleq_ref.model.checkpoint import (CONFIG_NAME, PARTIAL, WEIGHTS_NAME, CheckpointWriter,  # noqa: E402
                                            read_checkpoint, unit_file)
from decoupleq_ref.model.lock import LOCK_NAME, FolderLock  # noqa: E402
from decoupleq_ref.model.tiny import save_random_stats, save_tiny  # noqa: E402
from test_pipeline import Interrupt, flat, interrupting_solver, runner, tree_bytes  # noqa: E402

#: Every error message ends in what to do; one of these starts it.
FIXES = ("re-run", "pass ", "use ", "re-save", "re-download", "delete", "choose", "free space", "wait")
QUANT = ("--backend", "numpy", "--method", "rtn", "--group-size", "32")
N_LAYERS = 7  # one Llama block


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(root, model, stats, ref checkpoint, text, cut = an unfinished run with 3 of 7 layers)."""
    root = tmp_path_factory.mktemp("hostile")
    model = save_tiny(root / "llama", "llama", num_hidden_layers=1)
    stats = save_random_stats(model, root / "stats")
    res = quantize(model, stats, root / "ref")
    assert res.exit_code == 0, res.output
    text = root / "text.txt"
    words = ["the", "model", "weight", "of", "a", "layer", "is", "quantized", "to", "two", "bits", "."]
    text.write_text(" ".join(np.random.default_rng(0).choice(words, 600)))
    interrupted(model, stats, root / "cut", after=3)
    return {"root": root, "model": model, "stats": stats, "ref": root / "ref", "text": text, "cut": root / "cut"}


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def quantize(model: Path, stats: Path, out: Path, *extra: str):
    return cli("quantize", model, "--stats", stats, "--out", out, *QUANT, *extra)


def evaluate(model: Path, quantized: Path, text: Path, *extra: str):
    return cli("eval", model, "--quantized", quantized, "--text", text, "--seqlen", "32", "--max-tokens", "64", *extra)


def interrupted(model: Path, stats: Path, out: Path, after: int, error: type[BaseException] = Interrupt):
    """quantize into ``out``, stopped by ``error`` raised from the solver after ``after`` layers."""
    old = cm.get_solver
    cm.get_solver = lambda name=None: interrupting_solver(after, error)
    try:
        return runner.invoke(app, [str(a) for a in ("quantize", model, "--stats", stats, "--out", out, *QUANT)],
                             catch_exceptions=error is not Interrupt)
    except Interrupt:
        return None
    finally:
        cm.get_solver = old


def listing(folder: Path, skip: Path | None = None) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if skip is None or skip not in (p, *p.parents)}


def assert_clean_error(res, file: str, codes: tuple[int, ...] = (2,)) -> str:
    """Exit ``codes``, no traceback, one message naming ``file`` and a fix; returns the flat output."""
    out = flat(res.output)
    assert res.exit_code in codes, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output, res.output
    assert "".join(file.split()) in "".join(out.split()), (file, res.output)  # rich folds long paths
    assert any(f in out for f in FIXES), res.output
    return out


def assert_finished_like_ref(out: Path, ref: Path, model_path_differs: bool = False) -> None:
    """A complete checkpoint byte-identical to the uninterrupted one: no lock, no .partial, no temp
    file (``model_path_differs``: from a copy of the model, so the config's "model" path differs)."""
    got, want = tree_bytes(out), tree_bytes(ref)
    if model_path_differs:
        got[CONFIG_NAME], want[CONFIG_NAME] = ({k: v for k, v in json.loads(t[CONFIG_NAME]).items() if k != "model"}
                                               for t in (got, want))
    assert got == want
    assert not [p for p in out.rglob("*") if TEMP_NAME.fullmatch(p.name) or p.name in (LOCK_NAME, PARTIAL)]


def save_safetensors_header(path: Path, header: dict, data_bytes: int) -> None:
    """A safetensors file with ``header`` and ``data_bytes`` of (sparse) zeros: claims without data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + data_bytes)


def copy_model(base: dict, to: Path) -> Path:
    shutil.copytree(base["model"], to)
    return to


# --- 2. names from files never become paths ---------------------------------------------------

@pytest.mark.parametrize("hostile", ["../../../escaped", "/tmp/absolute-escape", "model.layers.0/../../x",
                                     "a\0b", ""])
def test_hostile_layer_names_are_refused_and_write_nothing(base, tmp_path, hostile):
    """A stats.json layer name that is not a module path is refused before anything is written:
    no X.safetensors outside --out, no --out at all."""
    from decoupleq_ref.model.atomic import write_safetensors
    from decoupleq_ref.model.safefiles import read_safetensors

    stats = tmp_path / "deep" / "er" / "stats"
    shutil.copytree(base["stats"], stats)
    meta = json.loads((stats / "stats.json").read_text())
    name = next(iter(meta["layers"]))
    meta["layers"][hostile] = meta["layers"].pop(name)
    (stats / "stats.json").write_text(json.dumps(meta))
    H, _ = read_safetensors(stats / "hessians.safetensors", "--stats", "")
    H[hostile] = H.pop(name)
    write_safetensors(stats / "hessians.safetensors", H)
    before = listing(tmp_path)
    res = quantize(base["model"], stats, tmp_path / "deep" / "out")
    assert_clean_error(res, "stats.json")
    assert "not a module path" in flat(res.output)
    assert listing(tmp_path) == before and not Path("/tmp/absolute-escape.safetensors").exists()


def test_unit_files_are_hashes_and_hold_their_name(base, tmp_path):
    """.partial/ file names are hashes of the unit name (never the name); a unit file copied onto
    another unit's name is refused on resume, not read back as that unit."""
    assert unit_file("../../../x") == unit_file("../../../x") != unit_file("../../../y")
    assert "/" not in unit_file("../../../x") and unit_file("a").startswith("unit-")
    cut = tmp_path / "cut"
    shutil.copytree(base["cut"], cut)
    units = sorted((cut / PARTIAL).glob("unit-*.safetensors"))
    assert len(units) == 3
    stats = json.loads((base["stats"] / "stats.json").read_text())
    other = next(n for n in stats["layers"] if not (cut / PARTIAL / unit_file(n)).exists())
    shutil.copy(units[0], cut / PARTIAL / unit_file(other))
    res = quantize(base["model"], base["stats"], cut)
    out = assert_clean_error(res, unit_file(other))
    assert "is not the unit its name says" in out and "delete" in out


def test_shard_index_names_are_file_names(base, tmp_path):
    """model.safetensors.index.json naming a shard outside the model folder is refused."""
    from decoupleq_ref.model.executor import read_weight

    model = copy_model(base, tmp_path / "m")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.layers.0.mlp.up_proj.weight": "../../elsewhere.safetensors"}}))
    with pytest.raises(ValueError, match="not a \\*.safetensors file name in the model's folder"):
        read_weight(model, "model.layers.0.mlp.up_proj.weight")


def test_sizes_are_checked_from_headers_before_reading(base, tmp_path, monkeypatch):
    """A sparse model file claiming a 16384² float32 layer (1 GiB, a few KB on disk) is refused
    from its header: no tensor data is read. Same for a hessians file claiming a huge H."""
    import decoupleq_ref.model.quantize as qm

    from decoupleq_ref.model.safefiles import safetensors_header

    model = copy_model(base, tmp_path / "m")
    header, _ = safetensors_header(model / WEIGHTS_NAME, "MODEL", "")
    big, offset, new = 16384, 0, {}
    for name, entry in header.items():
        shape = [big, big] if name == "model.layers.0.mlp.up_proj.weight" else entry["shape"]
        size = int(np.prod(shape)) * (4 if entry["dtype"] == "F32" else 2)
        new[name] = {**entry, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    save_safetensors_header(model / WEIGHTS_NAME, new, offset)
    assert os.stat(model / WEIGHTS_NAME).st_size > big * big * 4
    monkeypatch.setattr(qm, "read_weights", lambda *a: pytest.fail("tensor data read before the shape check"))
    res = quantize(model, base["stats"], tmp_path / "q", "--allow-other-stats")
    assert "16384x16384 in the model" in assert_clean_error(res, "stats.json")
    assert not (tmp_path / "q").exists()

    stats = tmp_path / "stats"
    shutil.copytree(base["stats"], stats)
    layers = json.loads((stats / "stats.json").read_text())["layers"]
    save_safetensors_header(stats / "hessians.safetensors",
                            {n: {"dtype": "F64", "shape": [big, big] if i == 0 else [v["in"]] * 2,
                                 "data_offsets": [0, 0]} for i, (n, v) in enumerate(layers.items())}, 0)
    res = quantize(base["model"], stats, tmp_path / "q")
    assert_clean_error(res, "hessians.safetensors")


# --- 3. faults and file errors ------------------------------------------------------------------

def test_stale_temp_files_are_removed_on_resume(base, tmp_path):
    """The temporary files a kill -9 leaves (ours: .NAME.tmp-PID, safetensors': .tmpXXXXXX) in --out
    and .partial/ are removed by the resumed run: the folder equals an uninterrupted run's."""
    cut = tmp_path / "cut"
    shutil.copytree(base["cut"], cut)
    for junk in (cut / ".model.safetensors.tmp-999999", cut / ".quantization_config.json.tmp-12",
                 cut / PARTIAL / f".{unit_file('x')}.tmp-999999", cut / ".tmpAb12Cd"):
        junk.write_bytes(b"\0" * 1000)
    assert quantize(base["model"], base["stats"], cut).exit_code == 0
    assert_finished_like_ref(cut, base["ref"])


def test_kill_9_while_writing_the_final_file(base, tmp_path):
    """A real SIGKILL halfway through model.safetensors' temporary file: the process leaves that
    file and its lock; the same command takes the lock over, removes the file and ends with the
    uninterrupted run's bytes."""
    code = ("import os, signal, sys\nimport safetensors.numpy as sn\nreal = sn.save_file\n"
            "def dying(arrays, path, metadata=None):\n"
            "    if '.model.safetensors.tmp-' in path:\n"
            "        real(arrays, path, metadata=metadata)\n"
            "        os.truncate(path, os.path.getsize(path) // 2)\n"
            "        os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(arrays, path, metadata=metadata)\n"
            "sn.save_file = dying\nfrom decoupleq_ref.cli import app\napp(sys.argv[1:])\n")
    out = tmp_path / "q"
    args = ["quantize", str(base["model"]), "--stats", str(base["stats"]), "--out", str(out), *QUANT]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == -9, done.stderr[-2000:]
    left = sorted(p.name for p in out.iterdir())
    assert left == [".lock", f".model.safetensors.tmp-{json.loads((out / LOCK_NAME).read_text())['pid']}", PARTIAL]
    assert quantize(base["model"], base["stats"], out).exit_code == 0
    assert_finished_like_ref(out, base["ref"])


def test_calibrate_removes_stale_temp_files(base, tmp_path):
    out = tmp_path / "stats"
    out.mkdir()
    (out / ".hessians.safetensors.tmp-999999").write_bytes(b"\0" * 100)
    res = cli("calibrate", base["model"], "--text", base["text"], "--nsamples", "2", "--seqlen", "16", "--out", out)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["hessians.safetensors", "stats.json"]


def test_one_writer_per_out(base, tmp_path):
    """A live holder of --out (pid and host in OUT/.lock) makes a second run refuse, saying who;
    a dead pid's lock is taken over; another host's lock is refused with how to remove it."""
    out = tmp_path / "q"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "since": "now"}))
        res = quantize(base["model"], base["stats"], out)
        msg = assert_clean_error(res, "another run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg
        assert not (out / PARTIAL).exists() and (out / LOCK_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    assert quantize(base["model"], base["stats"], out).exit_code == 0  # the dead pid's lock is taken over
    assert_finished_like_ref(out, base["ref"])
    other = tmp_path / "q2"
    other.mkdir()
    (other / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "then"}))
    msg = assert_clean_error(quantize(base["model"], base["stats"], other), "elsewhere.example")
    assert f"delete {other / LOCK_NAME}" in msg
    with FolderLock(tmp_path / "q3"):  # in this process: a writer into a held folder refuses
        with pytest.raises(ValueError, match="this process"):
            CheckpointWriter(tmp_path / "q3", {"command": "quantize"})
    assert not (tmp_path / "q3").exists()


@pytest.mark.parametrize("code, shown", [(errno.ENOSPC, "disk full"), (errno.EFBIG, "file too large")])
def test_safetensors_write_errors_are_disk_errors(base, tmp_path, monkeypatch, code, shown):
    """The library reports a full disk / a too-large file as SafetensorError (not an OSError): exit 1
    with the hint, finished layers kept, the same command resumes to the uninterrupted bytes."""
    import safetensors.numpy
    from safetensors import SafetensorError

    real, calls = safetensors.numpy.save_file, []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) > 2:
            raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
        return real(*a, **kw)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing)
    res = quantize(base["model"], base["stats"], tmp_path / "q")
    out = assert_clean_error(res, shown, codes=(1,))
    assert "resumes" in out and len(list((tmp_path / "q" / PARTIAL).glob("unit-*"))) == 2
    monkeypatch.setattr(safetensors.numpy, "save_file", real)
    assert quantize(base["model"], base["stats"], tmp_path / "q").exit_code == 0
    assert_finished_like_ref(tmp_path / "q", base["ref"])


def test_stopped_between_the_final_files(base, tmp_path, monkeypatch):
    """Disk full while writing quantization_config.json, after model.safetensors: exit 1, the folder
    is no checkpoint, and the same command finishes it."""
    import decoupleq_ref.model.checkpoint as ck

    real = ck.write_json

    def full(path, obj):
        if Path(path).name == CONFIG_NAME:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, obj)

    monkeypatch.setattr(ck, "write_json", full)
    assert_clean_error(quantize(base["model"], base["stats"], tmp_path / "q"), "disk full", codes=(1,))
    assert (tmp_path / "q" / WEIGHTS_NAME).exists() and not (tmp_path / "q" / CONFIG_NAME).exists()
    monkeypatch.setattr(ck, "write_json", real)
    assert quantize(base["model"], base["stats"], tmp_path / "q").exit_code == 0
    assert_finished_like_ref(tmp_path / "q", base["ref"])


def test_damaged_files_end_in_one_line(base, tmp_path):
    """Truncated model / hessians, a header claiming 2⁴⁰ bytes, malformed stats.json, a missing
    model.safetensors in a checkpoint, a bad quantization_config.json: exit 2 naming the file."""
    model = copy_model(base, tmp_path / "m")
    data = (model / WEIGHTS_NAME).read_bytes()
    (model / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    assert_clean_error(quantize(model, base["stats"], tmp_path / "q"), "model.safetensors")
    (model / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 1 << 40) + data[8:100])
    assert "header claims" in assert_clean_error(quantize(model, base["stats"], tmp_path / "q"), "model.safetensors")
    stats = tmp_path / "stats"
    for damage in ("{not json", json.dumps({"format": "decoupleq-stats", "version": 1, "layers": {"a.b": {"out": "64"}}}),
                   json.dumps([1, 2])):
        shutil.rmtree(stats, ignore_errors=True)
        shutil.copytree(base["stats"], stats)
        (stats / "stats.json").write_text(damage)
        assert_clean_error(quantize(base["model"], stats, tmp_path / "q"), "stats.json")
    assert not (tmp_path / "q").exists()
    from decoupleq_ref.model.atomic import write_safetensors
    from decoupleq_ref.model.safefiles import read_safetensors

    shutil.rmtree(stats)
    shutil.copytree(base["stats"], stats)
    H, _ = read_safetensors(stats / "hessians.safetensors", "--stats", "")
    H[next(iter(H))][0, 0] = np.nan
    write_safetensors(stats / "hessians.safetensors", H)
    assert "NaN or Inf" in assert_clean_error(quantize(base["model"], stats, tmp_path / "q"), "hessians.safetensors")

    ck = tmp_path / "ck"
    shutil.copytree(base["ref"], ck)
    (ck / WEIGHTS_NAME).unlink()
    assert "is missing" in assert_clean_error(evaluate(base["model"], ck, base["text"]), "model.safetensors")
    shutil.copy(base["ref"] / WEIGHTS_NAME, ck / WEIGHTS_NAME)
    config = json.loads((ck / CONFIG_NAME).read_text())
    for key, value in (("group_size", 0), ("bits", True), ("layers", {"../x": {"shape": [1, 1]}})):
        (ck / CONFIG_NAME).write_text(json.dumps({**config, key: value}))
        assert_clean_error(evaluate(base["model"], ck, base["text"]), "quantization_config.json")
        with pytest.raises(ValueError, match="quantization_config.json"):
            read_checkpoint(ck)


def test_truncated_gguf_is_a_clear_error(base, tmp_path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_uint32("llama.attention.head_count", 4)
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((128, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "m.gguf").write_bytes(data[:200])
    assert "not a readable GGUF" in assert_clean_error(quantize(tmp_path / "m.gguf", base["stats"], tmp_path / "q"),
                                                       "m.gguf")


def test_truncated_layer_file_for_quantize_layer(tmp_path):
    np.savez(tmp_path / "l.npz", W=np.ones((4, 64)), H=np.eye(64))
    data = (tmp_path / "l.npz").read_bytes()
    (tmp_path / "l.npz").write_bytes(data[: len(data) // 2])
    res = cli("quantize-layer", "--layer", tmp_path / "l.npz")
    assert "not a readable .npz" in assert_clean_error(res, "l.npz")
    from safetensors.numpy import save_file

    save_file({"W": np.ones((4, 64))}, str(tmp_path / "l.safetensors"))
    assert_clean_error(cli("quantize-layer", "--layer", tmp_path / "l.safetensors"), "l.safetensors")


def test_refused_pickle_weights_are_a_clear_error(base, tmp_path):
    """A model folder whose pytorch_model.bin torch's safe unpickler refuses: exit 2, no code run."""
    import pickle

    model = copy_model(base, tmp_path / "m")
    (model / WEIGHTS_NAME).unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    res = cli("calibrate", model, "--text", base["text"], "--nsamples", "1", "--seqlen", "16", "--out", tmp_path / "s")
    assert "cannot be read" in assert_clean_error(res, str(model))
    assert not marker.exists() and not (tmp_path / "s").exists()


def test_a_run_that_solved_nothing_does_not_block_its_fix(base, tmp_path):
    """A group size that does not divide the layers fails before the first layer is committed: no
    .partial/ is left and the corrected command runs."""
    out = tmp_path / "q"
    res = cli("quantize", base["model"], "--stats", base["stats"], "--out", out, "--backend", "numpy",
              "--method", "rtn", "--group-size", "48")
    assert "group" in assert_clean_error(res, "group_size")
    assert not out.exists()
    out.mkdir()  # an empty folder the user made is kept, and reused
    interrupted(base["model"], base["stats"], out, after=0)
    assert sorted(p.name for p in out.iterdir()) == []
    assert quantize(base["model"], base["stats"], out).exit_code == 0
    assert_finished_like_ref(out, base["ref"])


def test_finished_folder_with_a_leftover_partial(base, tmp_path):
    """Final files plus a header-less .partial/ (a kill while finalize removed it): readers say to
    re-run; the re-run tidies it and has nothing else to do."""
    out = tmp_path / "q"
    shutil.copytree(base["ref"], out)
    (out / PARTIAL).mkdir()
    shutil.copy(next((base["cut"] / PARTIAL).glob("unit-*")), out / PARTIAL)
    with pytest.raises(ValueError, match="re-run the command"):
        read_checkpoint(out)
    res = quantize(base["model"], base["stats"], out)
    assert res.exit_code == 0 and "nothing to do" in flat(res.output), res.output
    assert_finished_like_ref(out, base["ref"])


def test_stats_of_another_model_are_refused(base, tmp_path):
    """Same shapes, other weights: refused naming --allow-other-stats; with it, a warning; stats
    without a recorded fingerprint give a warning."""
    other = save_tiny(tmp_path / "other", "llama", seed=1, num_hidden_layers=1)
    res = quantize(other, base["stats"], tmp_path / "q")
    assert "--allow-other-stats" in assert_clean_error(res, "stats.json")
    res = quantize(other, base["stats"], tmp_path / "q", "--allow-other-stats")
    assert res.exit_code == 0 and "warning" in flat(res.output) and "another model" in flat(res.output)
    stats = tmp_path / "stats"
    shutil.copytree(base["stats"], stats)
    meta = json.loads((stats / "stats.json").read_text())
    del meta["model_fingerprint"]
    (stats / "stats.json").write_text(json.dumps(meta))
    res = quantize(base["model"], stats, tmp_path / "q2")
    assert res.exit_code == 0 and "records no model fingerprint" in flat(res.output)


def test_text_that_is_not_text(base, tmp_path):
    """A binary file is refused; a few bad bytes are replaced and counted; eval --seqlen beyond the
    model's max_position_embeddings is a clear error."""
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    res = cli("eval", base["model"], "--text", binary, "--seqlen", "32", "--max-tokens", "64")
    assert "not a text file" in assert_clean_error(res, "bin.txt")
    mostly = tmp_path / "mostly.txt"
    mostly.write_bytes(base["text"].read_bytes() + b"\xff\xfe")
    res = cli("eval", base["model"], "--text", mostly, "--seqlen", "32", "--max-tokens", "64")
    assert res.exit_code == 0 and "2 bytes that are not UTF-8 were replaced" in flat(res.output), res.output
    res = cli("eval", base["model"], "--text", base["text"], "--seqlen", "512")
    assert "max_position_embeddings 256" in assert_clean_error(res, "--seqlen")


def test_ctrl_c_says_the_run_resumes(base, tmp_path):
    res = interrupted(base["model"], base["stats"], tmp_path / "q", after=2, error=KeyboardInterrupt)
    assert res.exit_code == 130 and "same command resumes" in flat(res.output), res.output
    assert not (tmp_path / "q" / LOCK_NAME).exists()
    assert quantize(base["model"], base["stats"], tmp_path / "q").exit_code == 0
    assert_finished_like_ref(tmp_path / "q", base["ref"])


# --- fuzz: malformed checkpoints and stats --------------------------------------------------------

STATS_FIELDS = [("format",), ("version",), ("layers", "*", "out"), ("layers", "*", "in"), ("layers", "*", "transposed")]
CONFIG_FIELDS = [("format",), ("format_version",), ("bits",), ("group_size",), ("layers", "*", "shape"),
                 ("layers", "*", "transposed"), ("layers", "*", "hp_channels")]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda kids: st.lists(kids, max_size=3)
                           | st.dictionaries(st.text(max_size=6), kids, max_size=3), max_leaves=6)


def corrupt_json(path: Path, fields: list[tuple], data) -> None:
    """Replace one checked field (in a random layer for "*") with a different JSON value; a boolean
    field only by a non-boolean (flipping 'transposed' of a square layer cannot be detected)."""
    obj = json.loads(path.read_text())
    keys = list(data.draw(st.sampled_from(fields)))
    if "*" in keys:
        keys[keys.index("*")] = data.draw(st.sampled_from(sorted(obj["layers"])))
    parent = obj
    for k in keys[:-1]:
        parent = parent[k]
    old = parent.get(keys[-1])
    new = data.draw(JSON_VALUES.filter(lambda v: v != old and not (isinstance(old, bool) and isinstance(v, bool))))
    parent[keys[-1]] = new
    path.write_text(json.dumps(obj))


def truncate(path: Path, data) -> None:
    raw = path.read_bytes()
    cut = data.draw(st.integers(0, len(raw) - (3 if path.suffix == ".json" else 1)))  # not just the last newline
    path.write_bytes(raw[:cut])


def rename_layer(stats: Path, data) -> None:
    from decoupleq_ref.model.atomic import write_safetensors
    from decoupleq_ref.model.safefiles import read_safetensors

    meta = json.loads((stats / "stats.json").read_text())
    old = data.draw(st.sampled_from(sorted(meta["layers"])))
    new = data.draw(st.text(min_size=0, max_size=40).filter(lambda n: n not in meta["layers"]))
    meta["layers"][new] = meta["layers"].pop(old)
    (stats / "stats.json").write_text(json.dumps(meta))
    H, _ = read_safetensors(stats / "hessians.safetensors", "--stats", "")
    H[new] = H.pop(old)
    write_safetensors(stats / "hessians.safetensors", H)


@pytest.mark.slow
@settings(max_examples=45, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_malformed_checkpoints_and_stats(base, data):
    """Random truncation, field corruption and layer names in the files a command reads: exit 1 or
    2, one line naming the file and a fix, nothing written outside --out; after the file is put
    back the same command succeeds and leaves no temporary file (a quantize: the reference bytes)."""
    target = data.draw(st.sampled_from(["model", "hessians", "stats", "stats-field", "stats-name", "unit",
                                        "config", "config-field", "weights"]))
    event(target)
    with tempfile.TemporaryDirectory(dir=base["root"]) as tmp:
        work = Path(tmp)
        model = copy_model(base, work / "model") if target == "model" else base["model"]
        stats, out = work / "stats", work / "out"
        shutil.copytree(base["stats"], stats)
        if target == "unit":
            shutil.copytree(base["cut"], out)
        if target.startswith("config") or target == "weights":
            shutil.copytree(base["ref"], out)
        file = {"model": model / WEIGHTS_NAME, "hessians": stats / "hessians.safetensors", "unit": None,
                "weights": out / WEIGHTS_NAME, "config": out / CONFIG_NAME, "config-field": out / CONFIG_NAME
                }.get(target, stats / "stats.json")
        if target == "unit":
            file = data.draw(st.sampled_from(sorted((out / PARTIAL).glob("unit-*"))))
        original = file.read_bytes()
        if target.endswith("-field"):
            corrupt_json(file, STATS_FIELDS if target.startswith("stats") else CONFIG_FIELDS, data)
        elif target == "stats-name":
            rename_layer(stats, data)
        else:
            truncate(file, data)
        before = listing(work, skip=out)
        reader = target.startswith("config") or target == "weights"
        command = (lambda: evaluate(model, out, base["text"])) if reader else (lambda: quantize(model, stats, out))
        res = command()
        named = "hessians.safetensors" if target == "stats-name" and "hessians" in flat(res.output) else file.name
        assert_clean_error(res, named, codes=(1, 2))
        assert listing(work, skip=out) == before
        if target == "stats-name":
            shutil.rmtree(stats)
            shutil.copytree(base["stats"], stats)
        else:
            file.write_bytes(original)
        res = command()
        assert res.exit_code == 0, res.output
        assert not [p for p in work.rglob("*") if TEMP_NAME.fullmatch(p.name) or p.name == LOCK_NAME]
        if not reader:
            assert_finished_like_ref(out, base["ref"], model_path_differs=target == "model")
