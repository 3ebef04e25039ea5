"""Compile every gpu kernel for a real GPU target, without a GPU.

numba's CUDA simulator runs a kernel as plain Python, so it accepts code that the CUDA compiler
refuses (``np.floor`` in a kernel, a shared-array shape written as ``TILE + 1``): all of the gpu
backend once passed the simulator tests and would have failed at its first launch on hardware.
This module closes that gap in two steps:

1. ``record_launches(path)``, in a process running under the simulator, notes every kernel
   launch with the numba types of its arguments (a kernel made by a factory such as
   ``gpu.matmul.gemv_kernel`` is noted with the factory's arguments), and writes them as JSON at
   exit;
2. ``compile_recorded(path, cc)``, in a process with the real numba-cuda (NVVM and NVRTC, no GPU
   needed), compiles each recorded (kernel, signature) to PTX for compute capability ``cc``
   (default 9.0, Hopper) and returns the failures.

    NUMBA_ENABLE_CUDASIM=1 python -c "import gpu.compile_check as c, pytest; \\
        c.record_launches('launches.json'); pytest.main(['tests/gpu/test_gpu_kernels.py'])"
    python -m gpu.compile_check launches.json [--cc 9.0]

3. ``compile_linked(cc)`` (always run by the command, the launches file is then optional):
   the linked CUDA C sources (gpu/packed_quad.cu) to PTX with NVRTC, and the kernels that call
   them, which the simulator never launches (it cannot run C), with a check that the kernel's
   extern declaration has the parameter types the source defines.

tests/gpu/test_gpu_sim.py does all three on every test run where NVVM and NVRTC can be loaded.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import re
import sys
from pathlib import Path


def record_launches(path: str | Path) -> None:
    """Under the simulator: note every kernel launch (module, name, factory arguments, argument
    types) and write the distinct ones to `path` when the process exits."""
    import numba
    from numba.cuda.simulator import kernel as sim

    seen: dict[tuple, None] = {}
    launch = sim.FakeCUDAKernel.__call__

    def typename(arg) -> str:
        return str(numba.typeof(getattr(arg, "_ary", arg)))  # a simulated device array wraps numpy's

    def recording_call(self, *args):
        if not (self._device or sim._kernel_context):  # a launch from the host, not a device call
            factory = getattr(self, "factory", None)
            key = (self.fn.__module__, factory[0] if factory else self.fn.__qualname__,
                   tuple(factory[1]) if factory else None, tuple(typename(a) for a in args))
            seen[key] = None
        return launch(self, *args)

    sim.FakeCUDAKernel.__call__ = recording_call

    @atexit.register
    def write() -> None:
        rows = [{"module": m, "name": n, "factory_args": fa, "arg_types": list(t)} for m, n, fa, t in seen]
        Path(path).write_text(json.dumps(rows, indent=1))


def parse_type(name: str):
    """A numba type from its str(): 'array(float64, 2d, C)', 'int64', 'bool', ..."""
    from numba.core import types

    m = re.fullmatch(r"array\((\w+), (\d+)d, ([CFA])\)", name)
    if m:
        return types.Array(getattr(types, m[1]), int(m[2]), m[3])
    if name == "bool":
        return types.boolean
    ty = getattr(types, name, None)
    if not isinstance(ty, types.Type):
        raise ValueError(f"launches file: cannot rebuild the numba type {name!r}")
    return ty


def compile_recorded(path: str | Path, cc: tuple[int, int] = (9, 0)) -> list[tuple[str, str]]:
    """Compile every launch recorded in `path` to PTX for `cc`; returns [(kernel and signature, error)]."""
    return compile_launches(json.loads(Path(path).read_text()), cc)


def compile_launches(rows: list[dict], cc: tuple[int, int] = (9, 0)) -> list[tuple[str, str]]:
    """compile_recorded on the rows of a launches file, already read."""
    from numba import cuda
    from numba.cuda import dispatcher

    class _Target:  # device functions ask the current device for its compute capability
        compute_capability = cc

    dispatcher.get_current_device = lambda: _Target()
    failures = []
    for row in rows:
        obj = getattr(importlib.import_module(row["module"]), row["name"])
        kernel = obj(*row["factory_args"]) if row["factory_args"] is not None else obj
        sig = tuple(parse_type(t) for t in row["arg_types"])
        made = "" if row["factory_args"] is None else str(tuple(row["factory_args"]))
        label = f"{row['module']}.{row['name']}{made}({', '.join(row['arg_types'])})"
        try:
            cuda.compile_ptx(kernel.py_func, sig, cc=cc)
        except Exception as exc:  # every compiler error is a finding, whatever its class
            failures.append((label, f"{type(exc).__name__}: {exc}"))
    return failures


def nvrtc_ptx(source: str | Path, cc: tuple[int, int] = (9, 0)) -> str:
    """PTX of a CUDA C source for `cc` by NVRTC through cuda.bindings (no driver, no GPU: numba's
    own NVRTC wrapper asks the driver for its version). Relocatable (-rdc), as numba links it."""
    from cuda.bindings import nvrtc

    path = Path(source)
    err, prog = nvrtc.nvrtcCreateProgram(path.read_bytes(), path.name.encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC could not create a program for {path.name}: {err}")
    opts = [f"--gpu-architecture=compute_{cc[0]}{cc[1]}".encode(), b"-rdc=true"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        raise RuntimeError(f"NVRTC failed on {path.name} for sm_{cc[0]}{cc[1]}:\n{log.decode(errors='replace')}")
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    return ptx.decode().rstrip("\x00")


def ptx_params(ptx: str, name: str) -> list[str] | None:
    """The PTX parameter types (b32, b64, f32, …) of function `name`, result first; None if absent."""
    m = re.search(r"\.func\s*\(([^)]*)\)\s*" + re.escape(name) + r"\s*\(([^)]*)\)", ptx)
    return None if m is None else re.findall(r"\.param\s+\.(\w+)", m[1] + m[2])


def compile_linked(cc: tuple[int, int] = (9, 0)) -> tuple[int, list[tuple[str, str]]]:
    """Compile the linked CUDA C inner step (gpu/packed_quad.cu, NVRTC) and every quad GEMV
    kernel that calls it (NVVM), and check that the kernels' extern declaration has the source's
    parameter types. Returns (number of checks, failures)."""
    from numba import cuda

    from gpu import matmul

    failures: list[tuple[str, str]] = []
    name = "w2_quad_step"
    try:
        src_params = ptx_params(nvrtc_ptx(matmul.QUAD_SOURCE, cc), name)
        if src_params is None:
            failures.append((str(matmul.QUAD_SOURCE.name), f"NVRTC's PTX defines no function {name}"))
    except Exception as exc:
        return 1, [(str(matmul.QUAD_SOURCE.name), f"{type(exc).__name__}: {exc}")]
    if matmul.linked_quad_step() is None:
        return 1, failures + [("gemv_quad_kernel(linked=True)", "cffi is missing: pip install cffi")]
    rows = [{"module": "gpu.matmul", "name": "gemv_quad_kernel", "factory_args": [batch, matmul.GEMV_WARPS,
             matmul.gemv_rows_per_warp(batch), True], "arg_types": [
             "array(float16, 2d, C)", "array(uint32, 2d, C)", "array(float32, 2d, C)", "array(float32, 2d, C)",
             "int64", "array(float32, 2d, C)"]} for batch in range(1, matmul.QUAD_MAX_BATCH + 1)]
    failures += compile_launches(rows, cc)
    for row in rows[:1]:  # one kernel suffices: they share the declaration
        kernel = matmul.gemv_quad_kernel(*row["factory_args"])
        ptx, _ = cuda.compile_ptx(kernel.py_func, tuple(parse_type(t) for t in row["arg_types"]), cc=cc)
        if ptx_params(ptx, name) != src_params:
            failures.append((f"{name} declaration", f"the kernel declares {ptx_params(ptx, name)}, "
                                                    f"packed_quad.cu defines {src_params}: fix QUAD_SIGNATURE"))
    return 1 + len(rows), failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Compile recorded gpu kernel launches and the linked CUDA C "
                                             "sources to PTX (no GPU needed).")
    ap.add_argument("launches", nargs="?", help="JSON written by record_launches (omit: linked sources only)")
    ap.add_argument("--cc", default="9.0", help="compute capability to compile for, e.g. 8.0 or 9.0")
    args = ap.parse_args(argv)
    try:
        cc = tuple(int(p) for p in args.cc.split("."))
    except ValueError:
        ap.error(f"--cc: expected MAJOR.MINOR such as 9.0, got {args.cc!r}")
    if args.launches is not None and not Path(args.launches).is_file():
        ap.error(f"launches: no file {args.launches!r}; write one with record_launches under the simulator")
    failed = False
    if args.launches is not None:
        rows = json.loads(Path(args.launches).read_text())
        failures = compile_launches(rows, cc)
        for label, err in failures:
            print(f"FAIL {label}\n  {err.strip()[:2000]}\n")
        print(f"{len(rows) - len(failures)} of {len(rows)} recorded kernel launches compile for sm_{cc[0]}{cc[1]}")
        failed = bool(failures)
    checks, failures = compile_linked(cc)
    for label, err in failures:
        print(f"FAIL {label}\n  {err.strip()[:2000]}\n")
    print(f"linked CUDA C: {checks - len(failures)} of {checks} checks pass for sm_{cc[0]}{cc[1]} "
          f"(packed_quad.cu by NVRTC, the quad GEMV kernels calling it, their declaration)")
    return 1 if failed or failures else 0


if __name__ == "__main__":
    sys.exit(main())
