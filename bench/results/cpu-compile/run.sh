#!/usr/bin/env bash
# The CPU figures of issue 10's --compile: cold compile seconds and compiled vs eager step time.
# Run from the repository root on an otherwise idle machine (one thread, a fresh inductor cache
# so every compile is cold):  bash bench/results/cpu-compile/run.sh
set -eu
HERE=bench/results/cpu-compile
export OMP_NUM_THREADS=1
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor-cold.XXXXXX)
PY=${PYTHON:-python}
# 1. SIM's step (sim-demo-cpu, batch 32, fp32): eager vs --compile, reference kernels; the
#    optimiser and EMA updates fused vs compiled.
$PY -m pytest -q -p no:cacheprovider bench/test_train_step.py::test_compiled_step \
  bench/test_optimizer_step.py --benchmark-only --benchmark-json $HERE/compile.json
$PY -m bench.report --strip-data $HERE/compile.json
# 2. Every method's demo preset through the CLI, 12 steps, eager then --compile: the log's
#    first-step line (compile time) and the img/s of the last log interval.
: > $HERE/methods.log
for method in sim mocov2 densecl pixpro densesiam lcloss; do
  for mode in eager compile; do
    flag=""; [ $mode = compile ] && flag="--compile"
    out=$(mktemp -d /tmp/cpu-compile-run.XXXXXX)
    start=$(date +%s.%N)
    $PY -m engine.pretrain --method $method --no-fused --steps 12 --log-every 4 --workers 0 \
      --batch-size 16 --device cpu --out $out/run $flag > $out/log 2>&1
    end=$(date +%s.%N)
    $PY - "$method" "$mode" "$out/run/metrics.jsonl" "$start" "$end" "$out/log" >> $HERE/methods.log <<'PYEOF'
import json, re, sys
method, mode, path, start, end, log = sys.argv[1:]
records = [json.loads(line) for line in open(path)]
lines = open(log).read().splitlines()
compiled = [line for line in lines if line.startswith("torch.compile")]
print(json.dumps({"method": method, "mode": mode, "wall_s": round(float(end) - float(start), 1),
                  "compile_log": compiled,
                  "img_per_s_last_interval": round(records[-1]["img_per_s"], 2),
                  "loss_at_12": round(records[-1]["loss"], 6)}))
PYEOF
    rm -rf $out
  done
done
cat $HERE/methods.log
