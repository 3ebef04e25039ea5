#!/usr/bin/env bash
# The gpu backend's checks on a real CUDA GPU, as one prepared script (a lent GPU machine's time is short):
#   1. the gpu kernel tests with the simulator off (tests/gpu/test_gpu_kernels.py, real kernels: here the
#      W2 quad GEMV also runs its linked CUDA C step, gpu/packed_quad.cu, and the incremental init);
#   2. the cuda backend on the whole conformance suite at reference level (decoupleq validate);
#   3. the packed matmul against the input battery (decoupleq check-kernel);
#   4. bench/bench_gpu.py: matmul vs torch fp16 (W2 fp16 batch ≤ 4 through the linked quad GEMV),
#      GEMV block shapes with the quad GEMV's C and Python steps, solver seconds per layer.
# Each step has its own time limit (seconds: T_TESTS, T_VALIDATE, T_BENCH) so one slow step cannot
# starve the others; STEPS picks steps; arguments go to bench_gpu.py (default: --profile
# --solver-budget 150). Logs go to $OUT (or ./gpu-check-logs).
#
#     bash bench/gpu_device_check.sh            # python3 must have torch (CUDA), numba-cuda, scipy, typer
#     STEPS=tests,bench bash bench/gpu_device_check.sh --solver-layers down_proj --solver-groups 64
set -uo pipefail
OUT=${OUT:-gpu-check-logs}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0
PY=${PY:-python3}
STEPS=${STEPS:-tests,validate,kernel,bench}
step() { [[ ",$STEPS," == *",$1,"* ]]; }
[ $# -gt 0 ] || set -- --profile --solver-budget 150
cli() { "$PY" -c "from decoupleq_ref.cli import app; app()" "$@"; }

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
  "$PY" -c "import sys, numpy, numba, torch, scipy; from numba import cuda; import numba_cuda
print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__,
      'numba-cuda', numba_cuda.__version__, 'torch', torch.__version__, 'scipy', scipy.__version__)
print('cuda device:', cuda.get_current_device().name, 'cc', cuda.get_current_device().compute_capability)"
} 2>&1 | tee "$OUT/env.log"

step tests && echo "== 1. gpu kernel tests, simulator off" && \
timeout "${T_TESTS:-120}" "$PY" -m pytest -q -p no:cacheprovider --maxfail=5 tests/gpu/test_gpu_kernels.py 2>&1 | tee "$OUT/tests.log"

step validate && echo "== 2. cuda backend on the conformance suite (reference level)" && \
timeout "${T_VALIDATE:-80}" bash -c "$(declare -f cli); PY=$PY; cli validate --impl cuda --level reference --details 3" \
  2>&1 | tail -n 25 | tee "$OUT/validate.log"

step kernel && echo "== 3. packed matmul on the input battery" && \
timeout 45 bash -c "$(declare -f cli); PY=$PY; cli check-kernel --matmul gpu:packed_matmul --signature layer \
  --dtypes float32,float16" 2>&1 | tail -n 15 | tee "$OUT/check_kernel.log"

step bench && echo "== 4. benchmarks" && \
timeout "${T_BENCH:-250}" "$PY" bench/bench_gpu.py "$@" 2>&1 \
  | tee "$OUT/bench.log"
echo "done: $(date -u)"
