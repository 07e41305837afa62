#!/usr/bin/env bash
# One GPU session in one command: build the extension with CUDA, run the CUDA tests, the GPU
# benchmarks and a compute-sanitizer pass (most important first; each step time-boxed), then
# optionally the GPU quality preset. Logs go to $OUT/gpu_logs.tgz (the device tool returns at
# most 8 files); a summary goes to stdout. Usage on a CUDA machine, from the repository root:
#     OUT=/some/dir bash benchmarks/run_gpu_checks.sh
# Environment: PYTEST_K narrows the tests (e.g. "not bad_input", see benchmarks/RESULTS.md);
# SKIP_BENCH=1 skips the benchmarks, SANITIZER_TIMEOUT=0 the sanitizer; QUALITY_SECONDS=N runs
# `quality.py --preset gpu` for at most N seconds into runs/quality-gpu (carry that folder to
# resume a grid: finished runs are skipped), QUALITY_CONFIGS=a,b limits it to some configurations.
set -u
OUT="${OUT:-gpu_out}"
LOGS="$(mktemp -d)/gpu_logs"
mkdir -p "$OUT" "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
START=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - START )) s] $*"; }
pack() { [ -d runs/quality-gpu ] && tar cf "$LOGS/quality-gpu.tar" --exclude='*.pt' --exclude='*.npy' runs/quality-gpu
         tar czf "$OUT/gpu_logs.tgz" -C "$(dirname "$LOGS")" gpu_logs; }
trap pack EXIT

step environment
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nvcc --version | tail -1
  python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'numpy', numpy.__version__)"
} 2>&1 | tee "$LOGS/env.txt"

step build
if ! timeout 300 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; then
  tail -60 "$LOGS/build.log"; exit 1
fi

step CUDA tests
timeout 200 python3 -m pytest -q -p no:cacheprovider --maxfail=20 -k "${PYTEST_K:-}" \
  tests/test_grouped_mse.py tests/test_clustering_batched.py tests/test_cuda_training.py \
  tests/test_affinity.py::test_auto_packs_timesteps_on_a_gpu \
  tests/test_sampling.py::test_noise_level_groups_cuda_matches_cpu > "$LOGS/cuda_tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$LOGS/cuda_tests.log" | tail -25

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  step grouped-loss benchmark
  timeout 270 python3 benchmarks/bench_grouped_loss.py --device cuda --json "$LOGS/bench_grouped_loss.json" \
    > "$LOGS/bench_grouped_loss.txt" 2>&1; grep -v Warning "$LOGS/bench_grouped_loss.txt" | tail -20
  step batched DP benchmark
  timeout 60 python3 benchmarks/bench_dp.py --quick --json "$LOGS/bench_dp.json" > "$LOGS/bench_dp.txt" 2>&1
  tail -12 "$LOGS/bench_dp.txt"
  step MTL step-time benchmark
  timeout 150 python3 benchmarks/bench_mtl.py --device cuda --quick --steps 15 --threads 4 > "$LOGS/bench_mtl.txt" 2>&1
  cat "$LOGS/bench_mtl.txt"
  step affinity benchmark
  timeout 150 python3 benchmarks/bench_affinity.py --device cuda --quick > "$LOGS/bench_affinity.txt" 2>&1
  timeout 120 python3 benchmarks/bench_affinity.py --device cuda --models dit-s --max-full-gb 0 >> "$LOGS/bench_affinity.txt" 2>&1
  grep -v "^$" "$LOGS/bench_affinity.txt" | tail -14
fi

if [ "${SANITIZER_TIMEOUT:-90}" != 0 ]; then
  step compute-sanitizer memcheck
  timeout "${SANITIZER_TIMEOUT:-90}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 tests/cuda_smoke.py > "$LOGS/sanitizer.log" 2>&1
  echo "sanitizer exit code: $?"; tail -8 "$LOGS/sanitizer.log"
fi

if [ "${QUALITY_SECONDS:-0}" != 0 ]; then
  step "GPU quality preset (at most $QUALITY_SECONDS s)"
  timeout "$QUALITY_SECONDS" python3 benchmarks/quality.py --preset gpu --configs "${QUALITY_CONFIGS:-all}" \
    > "$LOGS/quality.log" 2>&1; echo "quality exit code: $?"; tail -45 "$LOGS/quality.log"
fi
step done
