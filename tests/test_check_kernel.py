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
from validate.kernel import check_kernel, random_layer, rtol_for
from validate.report import FAIL

ROOT = Path(__file__).resolve().parents[1]
MISTAKES = ["reversed_bit_order", "interleaved_nibbles", "transposed_scales", "group_misaligned",
            "negated_zero", "zero_point", "signed_codes", "off_by_one_group", "column_major_packing"]


def two_bit_kernel(mistake: str | None = None):
    """fn(x, packed, scale, zero, group_size) for b = 2 decoding little-endian uint32 words,
    with one planted mistake."""

    def decode(words: np.ndarray, n_rows: int, n_cols: int) -> np.ndarray:
        q = np.zeros((n_rows, n_cols), dtype=np.int64)
        for c in range(n_cols):
            r = c % 16
            if mistake == "reversed_bit_order":
                r = (r // 4) * 4 + 3 - r % 4              # MSB-first inside each byte
            elif mistake == "interleaved_nibbles":
                r = 2 * r if r < 8 else 2 * (r - 8) + 1   # expects evens then odds in a word
            q[:, c] = (words[:, c // 16].astype(np.int64) >> (2 * r)) & 3
        return q

    def kernel(x, packed, scale, zero, group_size):
        out, n_in = scale.shape[0], np.asarray(x).shape[1]
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
        if mistake == "signed_codes":
            q = np.where(q >= 2, q - 4, q)
        S, Z = s[:, grp], z[:, grp]
        W = S * q - Z if mistake == "negated_zero" else S * (q - Z) if mistake == "zero_point" else S * q + Z
        return (np.asarray(x, dtype=np.float32) @ W.T.astype(np.float32)).astype(np.float32)

    return kernel


def test_correct_two_bit_kernel_passes():
    rep = check_kernel(two_bit_kernel(), dtypes=("float32", "float16"), batches=(1, 7, 64))
    assert rep.ok, str(rep)
    assert not rep.defects


@pytest.mark.parametrize("mistake", MISTAKES)
def test_planted_mistake_is_named(mistake):
    rep = check_kernel(two_bit_kernel(mistake), dtypes=("float32",), batches=(1, 16))
    assert not rep.ok
    assert mistake in rep.defects, str(rep)
    assert set(rep.defects) == {mistake}, str(rep)  # and nothing else is blamed
    loc = next(f for f in rep.findings if f.check == "kernel.locate" and f.rows)
    assert loc.groups and "output channels" in loc.message


def test_transposed_scales_message_names_rows():
    rep = check_kernel(two_bit_kernel("transposed_scales"), dtypes=("float32",), batches=(4,))
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
    assert all("ml_dtypes" in f.message for f in rep.findings if f.status == "skip")


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

    rep = check_kernel(drops_nan, dtypes=("float32",), batches=(2,))
    assert rep.finding("kernel.aligned_64x256_g64.float32.nonfinite").status == FAIL
    rep = check_kernel(bad_big_batch, dtypes=("float32",), batches=(1, 16))
    assert rep.finding("kernel.odd_7x40_g8.float32.random.b16").status == FAIL
    assert rep.finding("kernel.odd_7x40_g8.float32.random.b1").status == "pass"


def test_fp16_tolerance_is_dtype_aware():
    """An fp16 kernel (Ŵ and y rounded to fp16, fp32 accumulation) passes at fp16 tolerance and
    would fail the fp32 one."""
    good = two_bit_kernel()

    def half(x, packed, scale, zero, g):
        return good(np.asarray(x, np.float16), packed, scale, zero, g).astype(np.float16)

    assert check_kernel(half, dtypes=("float16",), batches=(8,)).ok
    assert rtol_for("float16", 256) > 50 * rtol_for("float32", 256)


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
