"""validate.check_kernel: every listed layout mistake, planted in a small wrong 2-bit
kernel written here (its own word-and-shift decoding, not validate.layout's), is named; the
project's own matmuls pass (reference here, Numba when built, gpu in the CUDA simulator)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import decoupleq_ref as dq
from validate.kernel import check_kernel, random_layer
from validate.kernel_layers import DEPLOY_COLS, DEPLOY_ROWS, default_layers
from validate.report import FAIL, PASS, SKIP

from support import REPO as ROOT  # noqa: E402
MISTAKES = ["reversed_bit_order", "interleaved_nibbles", "transposed_scales", "group_misaligned",
            "negated_zero", "zero_point", "signed_codes", "off_by_one_group", "column_major_packing"]
# tile, row and chunk mistakes: planted mistake -> the defect that must be named (on TILED_LAYER)
TILE_MISTAKES = {"output_pairs_swapped": "output_rows_permuted", "output_interleaved_halves": "output_rows_permuted",
                 "scale_row_half": "scale_row_mismatch", "scale_row_tile64": "scale_row_mismatch",
                 "zero_group0": "one_group_for_all", "split_k_256": "split_k_group_restart",
                 "codes_tile64": "codes_tile_reused", "batch_column_major": "batch_layout"}


def tiled_layer():
    """Taller than a 128-row tile (136 = 128 + 8 rows) and wider than a 256-column chunk."""
    return random_layer(136, 1024, 2, 64, seed=21)


def two_bit_kernel(mistake: str | None = None):
    """fn(x, packed, scale, zero, group_size) for b = 2 decoding little-endian uint32 words,
    with one planted mistake."""

    def decode(words: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
        c = np.arange(n_cols)
        r = c % 16
        if mistake == "reversed_bit_order":
            r = (r // 4) * 4 + 3 - r % 4              # MSB-first inside each byte
        elif mistake == "interleaved_nibbles":
            r = np.where(r < 8, 2 * r, 2 * (r - 8) + 1)   # expects evens then odds in a word
        return (words[:, c // 16].astype(np.int64) >> (2 * r)) & 3

    def kernel(x, packed, scale, zero, group_size):
        x = np.asarray(x, dtype=np.float32)
        out, (batch, n_in) = scale.shape[0], x.shape
        rows = np.arange(out)
        if mistake == "batch_column_major":
            x = x.reshape(-1).reshape(n_in, batch).T  # indexes x[r, j] at r + j·batch
        if mistake == "column_major_packing":
            rb = -(-((out * 2 + 7) // 8) // 4) * 4
            flat = np.zeros(n_in * rb, np.uint8)
            src = packed.reshape(-1)[: n_in * rb]
            flat[: src.size] = src
            q = decode(flat.view("<u4").reshape(n_in, -1), n_in, out).T
        else:
            q = decode(np.ascontiguousarray(packed).view("<u4"), out, n_in)
        g = n_in if group_size == -1 else group_size
        G = n_in // g
        grp = np.arange(n_in) // g
        s, z = scale.astype(np.float64), zero.astype(np.float64)
        if mistake == "transposed_scales":
            s, z = s.reshape(-1).reshape(G, out).T, z.reshape(-1).reshape(G, out).T
        elif mistake == "group_misaligned":
            grp = np.minimum(np.arange(n_in) // (2 * g), G - 1)
        elif mistake == "off_by_one_group":
            grp = np.minimum((np.arange(n_in) + 1) // g, G - 1)
        elif mistake == "split_k_256":
            grp = (np.arange(n_in) % 256) // g
        elif mistake in ("scale_row_half", "scale_row_tile64"):
            src = rows // 2 if mistake == "scale_row_half" else rows % 64
            s, z = s[src], z[src]
        elif mistake == "zero_group0":
            z = np.repeat(z[:, :1], G, axis=1)
        elif mistake == "codes_tile64":
            q = q[rows % 64]
        if mistake == "signed_codes":
            q = np.where(q >= 2, q - 4, q)
        S, Z = s[:, grp], z[:, grp]
        W = S * q - Z if mistake == "negated_zero" else S * (q - Z) if mistake == "zero_point" else S * q + Z
        y = (x @ W.T.astype(np.float32)).astype(np.float32)
        if mistake == "output_pairs_swapped":
            y = y[:, np.minimum(rows ^ 1, out - 1)]
        elif mistake == "output_interleaved_halves":
            h = (out + 1) // 2
            y = y[:, np.where(rows % 2 == 0, rows // 2, h + rows // 2)]
        return y

    return kernel


def small_layers():
    """Aligned, odd (rows padded to a word) and per-channel layers: quick to diagnose."""
    return [("aligned_64x256_g64", random_layer(64, 256, 2, 64, seed=1)),
            ("odd_7x40_g8", random_layer(7, 40, 2, 8, seed=2)),
            ("per_channel_5x48", random_layer(5, 48, 2, -1, seed=3))]


def test_correct_two_bit_kernel_passes():
    rep = check_kernel(two_bit_kernel(), dtypes=("float32", "float16"), batches=(1, 7, 64))
    assert rep.ok, str(rep)
    assert not rep.defects


def test_default_battery_has_deployment_shapes():
    layers = dict(default_layers(2))
    assert DEPLOY_ROWS >= 2 * 128 and DEPLOY_ROWS % 2 == 1 and DEPLOY_COLS >= 4096
    assert {lay.group_size for lay in layers.values() if lay.shape == (DEPLOY_ROWS, DEPLOY_COLS)} == {32, 64, 128, -1}


@pytest.mark.parametrize("mistake", ["scale_row_tile64", "split_k_256"])
def test_default_battery_catches_tile_and_chunk_mistakes(mistake):
    """Invisible on layers of at most 64 rows / 256 columns: the deployment shapes fail them."""
    rep = check_kernel(two_bit_kernel(mistake), dtypes=("float32",), batches=(1,), diagnose_failures=False)
    assert not rep.ok
    assert all(f.status == PASS for f in rep.findings if "odd_7x40" in f.check)  # too small to show them


@pytest.mark.parametrize("mistake", MISTAKES)
def test_planted_mistake_is_named(mistake):
    rep = check_kernel(two_bit_kernel(mistake), small_layers(), dtypes=("float32",), batches=(1, 16))
    assert not rep.ok
    assert mistake in rep.defects, str(rep)
    assert set(rep.defects) == {mistake}, str(rep)  # and nothing else is blamed
    loc = next(f for f in rep.findings if f.check == "kernel.locate" and f.rows)
    assert loc.groups and "output channels" in loc.message


@pytest.mark.parametrize("mistake", sorted(TILE_MISTAKES))
def test_tile_row_and_chunk_mistakes_are_named(mistake):
    rep = check_kernel(two_bit_kernel(mistake), tiled_layer(), dtypes=("float32",), batches=(1, 16))
    assert not rep.ok
    assert set(rep.defects) == {TILE_MISTAKES[mistake]}, str(rep)
    assert "closest" not in str(rep)


def test_row_permutation_and_row_map_messages_say_which():
    rep = check_kernel(two_bit_kernel("output_pairs_swapped"), tiled_layer(), dtypes=("float32",), batches=(2,))
    assert "swapped in pairs" in rep.finding("defect.output_rows_permuted").message
    rep = check_kernel(two_bit_kernel("scale_row_tile64"), tiled_layer(), dtypes=("float32",), batches=(2,))
    assert "row % 64" in rep.finding("defect.scale_row_mismatch").message
    rep = check_kernel(two_bit_kernel("zero_group0"), tiled_layer(), dtypes=("float32",), batches=(2,))
    assert "group 0's zero" in rep.finding("defect.one_group_for_all").message


def test_any_output_row_permutation_is_named_with_its_pattern():
    good = two_bit_kernel()

    def reversed_rows(x, packed, scale, zero, g):
        return good(x, packed, scale, zero, g)[:, ::-1]

    rep = check_kernel(reversed_rows, tiled_layer(), dtypes=("float32",), batches=(2,))
    assert rep.defects == ["output_rows_permuted"], str(rep)
    assert "channel<-row 0<-135, 1<-134" in rep.finding("defect.output_rows_permuted").message


def test_ranges_are_compact():
    from validate.kernel_diagnosis import ranges

    assert ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert ranges([]) == "none"
    assert ranges(range(0, 40, 2), limit=3) == "0, 2, 4, ... (20 in all)"


def test_dense_weights_are_named_when_given():
    layer = tiled_layer()
    rng = np.random.default_rng(4)
    W_hat = layer.dequantize_packed()
    step = np.repeat(layer.scale.astype(np.float64), 64, axis=1)
    dense = W_hat + step * rng.uniform(-0.45, 0.45, W_hat.shape)  # the float weights these codes round

    def uses_dense(x, packed, scale, zero, g):
        return np.asarray(x, np.float32) @ dense.T.astype(np.float32)

    rep = check_kernel(uses_dense, layer, dtypes=("float32",), batches=(3,), dense=dense)
    assert rep.defects == ["dense_weights"], str(rep)


def test_unexplained_failure_is_located_not_guessed():
    good = two_bit_kernel()

    def odd_damage(x, packed, scale, zero, g):
        y = good(x, packed, scale, zero, g).astype(np.float64)
        damaged = np.isin(np.arange(y.shape[1]), range(5, 10))  # rows 5-9 see columns 100-199 twice
        return y + 0.01 * np.asarray(x, np.float64)[:, 100:200].sum(axis=1, keepdims=True) * damaged

    rep = check_kernel(odd_damage, tiled_layer(), dtypes=("float32",), batches=(4,))
    assert not rep.ok and not rep.defects
    diag = rep.finding("kernel.diagnosis").message
    assert "no mistake in the catalogue explains" in diag
    assert "output channels 5-9" in diag and "input columns 100-199" in diag
    assert "closest" not in str(rep)


def test_batch_dependent_failure_names_batch_rows():
    good = two_bit_kernel()

    def last_row_wrong(x, packed, scale, zero, g):
        y = good(x, packed, scale, zero, g)
        if len(y) > 8:
            y[-1] *= 1.01
        return y

    rep = check_kernel(last_row_wrong, tiled_layer(), dtypes=("float32",), batches=(16,))
    diag = rep.finding("kernel.diagnosis").message
    assert "weights are read right" in diag and "batch rows 15 of 16" in diag, str(rep)


def test_a_crash_fails_with_the_traceback_line():
    good = two_bit_kernel()

    def crashes_in_half(x, packed, scale, zero, g):
        if np.asarray(x).dtype == np.float16:
            return np.empty(0)[5]  # IndexError
        return good(x, packed, scale, zero, g)

    rep = check_kernel(crashes_in_half, small_layers(), dtypes=("float32", "float16"), batches=(1, 2))
    assert not rep.ok
    crash = next(f for f in rep.failures if "float16" in f.check)
    assert "IndexError" in crash.message
    assert "test_check_kernel.py:" in crash.message and "crashes_in_half" in crash.message
    assert "more probes of float16" in crash.message  # one finding per distinct error


def test_only_explicit_refusals_skip_and_all_skipped_fails():
    good = two_bit_kernel()

    def fp32_only(x, packed, scale, zero, g):
        if np.asarray(x).dtype != np.float32:
            raise NotImplementedError("fp32 activations only")
        return good(x, packed, scale, zero, g)

    rep = check_kernel(fp32_only, small_layers(), dtypes=("float32", "float16"), batches=(1,))
    assert rep.ok and any(f.status == SKIP and "refuses float16" in f.message for f in rep.findings)

    def declared(x, packed, scale, zero, g):
        return good(x, packed, scale, zero, g)

    declared.supported_dtypes = ("float32",)
    rep = check_kernel(declared, small_layers(), dtypes=("float16",), batches=(1,))
    assert not rep.ok and rep.finding("kernel.coverage").status == FAIL
    assert "every check was skipped" in rep.finding("kernel.coverage").message
    assert "supported_dtypes" in rep.finding("kernel.coverage").message


def test_bfloat16_without_ml_dtypes_fails_loudly(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes -> ImportError
    rep = check_kernel(dq.matmul, small_layers(), signature="layer", dtypes=("bfloat16",), batches=(1,))
    assert not rep.ok
    assert any("install ml_dtypes" in f.message for f in rep.failures), str(rep)


def test_precision_model_margins():
    """A correct fp16/bf16 kernel passes every battery layer at >= 10x margin; the same kernel
    accumulating in fp16 fails from 1024 columns."""
    from validate.kernel_evidence import accumulating_in_dtype, correct_kernel

    rep = check_kernel(correct_kernel(), signature="layer", dtypes=("float16", "bfloat16"))
    assert rep.ok, str(rep)
    worst = max(f.value for f in rep.findings if f.status == PASS and f.value is not None)
    assert worst <= 0.1, worst
    assert check_kernel(correct_kernel(in_dtype_arithmetic=True), signature="layer", dtypes=("float16",),
                        batches=(16,)).ok  # Ŵ formed in fp16 arithmetic: inside the model too
    rep = check_kernel(accumulating_in_dtype, random_layer(64, 1024, 2, 128, seed=5), signature="layer",
                       dtypes=("float16",), batches=(16,), diagnose_failures=False)
    assert rep.finding("kernel.layer.float16.random.b16").status == FAIL, str(rep)


def test_transposed_scales_message_names_rows():
    rep = check_kernel(two_bit_kernel("transposed_scales"), small_layers(), dtypes=("float32",), batches=(4,))
    msg = rep.finding("defect.transposed_scales").message
    assert "output channel 1 group 0 uses the scale of row 0 group 1" in msg


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_reference_matmul_passes_at_other_widths(bits):
    from validate.kernel import default_layers

    for name, lay in default_layers(bits, hp=True):
        assert check_kernel(dq.matmul, lay, signature="layer", dtypes=("float32",), batches=(1, 9)).ok


def test_reference_matmul_passes_with_branch_and_odd_shapes():
    rep = check_kernel(dq.matmul, signature="layer", batches=(1, 3, 256))
    assert rep.ok, str(rep)
    assert any("hp3" in f.check and f.status == "pass" for f in rep.findings)
    assert not [f for f in rep.findings if f.status == SKIP]  # bf16 through ml_dtypes, a test dependency


def test_missing_branch_is_named():
    def no_branch(x, layer):
        return np.asarray(x, np.float64) @ layer.dequantize_packed().T

    rep = check_kernel(no_branch, random_layer(12, 64, 2, 32, seed=9, hp_channels=3), signature="layer",
                       dtypes=("float32",), batches=(2,))
    assert rep.defects == ["missing_hp_branch"], str(rep)


def test_input_dependent_failures_are_caught():
    good = two_bit_kernel()

    def drops_nan(x, packed, scale, zero, g):
        return np.nan_to_num(good(x, packed, scale, zero, g))

    def bad_big_batch(x, packed, scale, zero, g):
        y = good(x, packed, scale, zero, g)
        return y * (1.01 if len(y) > 8 else 1.0)

    rep = check_kernel(drops_nan, small_layers(), dtypes=("float32",), batches=(2,))
    assert rep.finding("kernel.aligned_64x256_g64.float32.nonfinite").status == FAIL
    rep = check_kernel(bad_big_batch, small_layers(), dtypes=("float32",), batches=(1, 16))
    assert rep.finding("kernel.odd_7x40_g8.float32.random.b16").status == FAIL
    assert rep.finding("kernel.odd_7x40_g8.float32.random.b1").status == "pass"


def test_fp16_tolerance_is_dtype_aware():
    """An fp16 kernel (y rounded to fp16, fp32 accumulation) passes at fp16 tolerance; the same
    rounding fails the fp32 model."""
    good = two_bit_kernel()

    def half(x, packed, scale, zero, g):
        return good(np.asarray(x, np.float16), packed, scale, zero, g).astype(np.float16)

    assert check_kernel(half, small_layers(), dtypes=("float16",), batches=(8,)).ok

    def rounds_to_half(x, packed, scale, zero, g):
        with np.errstate(over="ignore"):  # the 2^40 probe overflows fp16, as it should
            return good(x, packed, scale, zero, g).astype(np.float16)

    assert not check_kernel(rounds_to_half, small_layers(), dtypes=("float32",), batches=(8,),
                            diagnose_failures=False).ok


def test_bfloat16_through_torch():
    torch = pytest.importorskip("torch")
    layer = random_layer(8, 32, 2, 16, seed=5)

    def torch_kernel(x, lay):  # output in the activation dtype, bf16 included
        W = torch.from_numpy(lay.dequantize()).to(x.dtype)
        return x @ W.T

    rep = check_kernel(torch_kernel, layer, signature="layer", inputs="torch", batches=(1, 5))
    assert rep.ok, str(rep)
    assert rep.finding("kernel.layer.bfloat16.random.b5").status == "pass"


def test_bad_arguments():
    with pytest.raises(ValueError, match="signature"):
        check_kernel(dq.matmul, signature="nope")
    with pytest.raises(ValueError, match="dtypes"):
        check_kernel(dq.matmul, signature="layer", dtypes=("int8",))
    with pytest.raises(ValueError, match="dense"):
        check_kernel(dq.matmul, random_layer(4, 16, 2, 8), signature="layer", dense=np.zeros((16, 4)))


def _numba_matmul():
    """kernels_numba.packed_matmul when numba is installed (the package imports without it)."""
    try:
        kn = importlib.import_module("kernels_numba")
        return kn.packed_matmul if kn.available() else None
    except (ImportError, AttributeError):
        return None


@pytest.mark.skipif(_numba_matmul() is None, reason='kernels_numba.packed_matmul needs numba: pip install -e ".[numba]"')
def test_numba_packed_matmul_passes():
    from validate.kernel import default_layers

    for bits in (1, 2, 3, 4):
        for name, lay in default_layers(bits, hp=True):
            rep = check_kernel(_numba_matmul(), lay, signature="layer", batches=(1, 7, 64), name=name)
            assert rep.ok, str(rep)


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason='numba-cuda is not installed: pip install -e ".[cuda]" to run the gpu matmul in the simulator')
def test_gpu_packed_matmul_passes_in_the_simulator():
    script = textwrap.dedent("""
        import gpu
        from validate.kernel import check_kernel, random_layer
        layers = [random_layer(4, 32, 2, 16, seed=1), random_layer(3, 40, 2, 8, seed=2),
                  random_layer(5, 32, 2, 32, seed=3, hp_channels=2)]
        for lay in layers:
            rep = check_kernel(gpu.packed_matmul, lay, signature="layer", dtypes=("float32", "float16"),
                               batches=(1, 9))
            print(rep)
            assert rep.ok
        print("ALL OK")
    """)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-3000:]


transposed_scales_kernel = two_bit_kernel("transposed_scales")  # for the CLI test (file.py:function)


def test_cli_check_kernel_names_the_mistake(tmp_path):
    from typer.testing import CliRunner

    from decoupleq_ref.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["check-kernel", "--matmul", f"{__file__}:transposed_scales_kernel",
                            "--dtypes", "float32", "--json", str(tmp_path / "k.json")])
    assert r.exit_code == 1 and "defect.transposed_scales" in r.output, r.output
    r = runner.invoke(app, ["check-kernel", "--matmul", "decoupleq_ref:matmul", "--signature", "layer",
                            "--dtypes", "float32,float16"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["check-kernel", "--matmul", "decoupleq_ref:nothing"])
    assert r.exit_code == 2 and "--matmul" in r.output


scale_row_tile64_kernel = two_bit_kernel("scale_row_tile64")


def test_cli_shape_group_size_and_checkpoint_layer(tmp_path):
    from typer.testing import CliRunner

    from decoupleq_ref.cli import app
    from support import project_checkpoint

    runner = CliRunner()
    r = runner.invoke(app, ["check-kernel", "--matmul", f"{__file__}:scale_row_tile64_kernel", "--dtypes", "float32",
                            "--shape", "136x512", "--group-size", "64"])
    assert r.exit_code == 1 and "defect.scale_row_mismatch" in r.output and "(136, 512) b2 g64" in r.output, r.output
    ck = project_checkpoint(tmp_path / "ck")
    r = runner.invoke(app, ["check-kernel", "--matmul", "decoupleq_ref:matmul", "--signature", "layer",
                            "--layer", f"{ck}:blocks.0.mlp"])
    assert r.exit_code == 0 and "blocks.0.mlp: (8, 40) b2 g8" in r.output, r.output
    for args, hint in ((["--shape", "12"], "--shape"), (["--layer", f"{ck}:nope"], "--layer"),
                       (["--group-size", "48"], "--group-size"), (["--group-size", "x"], "--group-size")):
        r = runner.invoke(app, ["check-kernel", "--matmul", "decoupleq_ref:matmul", *args])
        assert r.exit_code == 2 and hint in r.output, (args, r.output)
