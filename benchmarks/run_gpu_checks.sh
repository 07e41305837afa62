#!/usr/bin/env bash
# One GPU session in one command: build the extension with CUDA, run the CUDA tests, the GPU
# benchmarks and a compute-sanitizer pass (most important first; each step time-boxed). Logs go to $OUT
# (default ./gpu_out). Usage on a CUDA machine, from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu_checks.sh
set -u
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
step() { echo; echo "=== $* ($(date +%T))"; }

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -1
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step build
if ! python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"; exit 1
fi
grep -c "nvcc" "$OUT/build.log" | sed 's/^/nvcc invocations: /'

step CUDA tests
# PYTEST_K narrows the selection, e.g. PYTEST_K="not bad_input" (see benchmarks/RESULTS.md).
timeout 150 python3 -m pytest -q -p no:cacheprovider --maxfail=20 -k "${PYTEST_K:-}" \
  tests/test_grouped_mse.py tests/test_clustering_batched.py tests/test_affinity.py::test_auto_packs_timesteps_on_a_gpu \
  2>&1 | tee "$OUT/cuda_tests.log" | tail -25

step grouped-loss benchmark
timeout 270 python3 benchmarks/bench_grouped_loss.py --device cuda --json "$OUT/bench_grouped_loss.json" \
  2>&1 | tee "$OUT/bench_grouped_loss.txt"

step batched DP benchmark
timeout 60 python3 benchmarks/bench_dp.py --quick --json "$OUT/bench_dp.json" 2>&1 | tee "$OUT/bench_dp.txt"

step MTL step-time benchmark
timeout 150 python3 benchmarks/bench_mtl.py --device cuda --quick --steps 15 --threads 4 2>&1 | tee "$OUT/bench_mtl.txt"

step affinity benchmark
timeout 150 python3 benchmarks/bench_affinity.py --device cuda --quick 2>&1 | tee "$OUT/bench_affinity.txt"
timeout 120 python3 benchmarks/bench_affinity.py --device cuda --models dit-s --max-full-gb 0 2>&1 | tee -a "$OUT/bench_affinity.txt"

step compute-sanitizer memcheck
[ "${SANITIZER_TIMEOUT:-90}" = 0 ] && { echo skipped; exit 0; }
timeout "${SANITIZER_TIMEOUT:-90}" compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 tests/cuda_smoke.py > "$OUT/sanitizer.log" 2>&1
echo "sanitizer exit code: $?"; tail -8 "$OUT/sanitizer.log"
step done
