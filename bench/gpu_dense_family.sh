#!/usr/bin/env bash
# The dense family's GPU measurements in ONE unattended call (< 8 minutes), for a lent machine:
#   run(command="OUT=$OUT bash bench/gpu_dense_family.sh", timeout_s=540)
# Writes everything under $OUT (default ./gpu-out): versions, the compiled-kernel correctness tests
# of the new kernels, their benchmarks at the recipe sizes, one train step of every method at its
# published per-GPU batch, and a summary. Each stage has its own time limit, so a slow stage never
# costs the results of the others; a stage that ran out says so in summary.txt.
# Needs nothing but the checkout (PYTHONPATH=$PWD) and the GPU machine's torch + triton + pytest.
set -u
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
cd "$(dirname "$0")/.."
started=$(date +%s)
summary="$OUT/summary.txt"
: > "$summary"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] && note=" (ran out of its ${limit} s)"
  echo "$name: exit $rc after $(( $(date +%s) - t0 )) s$note" | tee -a "$summary"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python - > "$OUT/versions.txt" 2>&1 <<'EOF'
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF
cat "$OUT/versions.txt" >> "$summary"

# 1. The new kernels compiled for this GPU, against their float64 references (the Triton test
#    files put their tensors on CUDA when it is present).
stage kernels_correctness 110 python -m pytest -q -x -p no:cacheprovider \
  tests/kernels/test_queue_infonce_triton.py tests/kernels/test_pixel_propagation_triton.py \
  tests/kernels/test_dense_match_triton.py --junitxml "$OUT/kernels_correctness.xml"

# 2. queue_infonce at DenseCL's sizes (M = 1,568 / 12,544, K = 65,536, D = 128): reference vs
#    torch.compile vs Triton, bf16 and fp32 (goal: >= 3x reference, >= 1.5x compiled, memory
#    O((M + K) D)); pixel_propagation at PixPro's size (B 128, 7x7) and at 14x14 / 28x28 (decides
#    whether the fused PPM beats eager). Compiled cases only where the goal needs them.
stage bench_kernels 200 python -m pytest -q -p no:cacheprovider bench/test_queue_infonce.py \
  bench/test_pixel_propagation.py --benchmark-only \
  -k "queue_infonce or (pixel_propagation and not compiled) or (pixel_propagation and n49 and bf16)" \
  --benchmark-json "$OUT/bench_kernels.json"

# 3. One optimiser step of every method on its published recipe (ResNet-50, 224 px, per-GPU
#    batch, bf16), reference vs fused, with the stage breakdown and peak memory.
stage train_step_methods 170 python -m pytest -q -p no:cacheprovider bench/test_train_step.py \
  -k test_method_train_step --benchmark-only --benchmark-json "$OUT/train_step_methods.json"

for json in "$OUT"/bench_kernels.json "$OUT"/train_step_methods.json; do
  [ -s "$json" ] && python -m bench.report --strip-data "$json" >> "$OUT/report.log" 2>&1
done
python -m bench.report "$OUT"/*.json -o "$OUT/BENCHMARKS.md" --no-chart >> "$OUT/report.log" 2>&1
echo "total: $(( $(date +%s) - started )) s" | tee -a "$summary"
