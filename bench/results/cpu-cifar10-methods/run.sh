#!/usr/bin/env bash
# Does each method learn? CIFAR-10, ResNet-18 with the CIFAR stem, the same CPU budget for every
# method (15 minutes of training on the idle 2-core VM: each <method>-r18-cifar-cpu preset's epochs
# come from its measured throughput), plus SIM's ViT on sim-demo-cifar-cpu. Then, for every
# checkpoint and for the random-init baselines: weighted kNN (k=200), the linear probe and the
# label-free correspondence metric. Run from the repository root:
#   bash bench/results/cpu-cifar10-methods/run.sh DATA_DIR WORK_DIR
# DATA_DIR holds CIFAR-10 as train/<class>/*.jpg and test/<class>/*.jpg
# (tar xzf ../shared/data/cifar10_jpg.tar.gz -C DATA_DIR).
set -euo pipefail
DATA=${1:?DATA_DIR}
WORK=${2:?WORK_DIR}
HERE=$(dirname "$0")
mkdir -p "$WORK"
EVAL_SUBSET=(--max-train 10000 --max-val 5000 --workers 2 --quiet)

evaluate() {  # evaluate NAME CHECKPOINT_ARGS...
  local name=$1
  shift
  for task in knn linear; do
    python -m engine.eval "$task" "$@" --train-data "$DATA/train" --val-data "$DATA/test" \
      "${EVAL_SUBSET[@]}" --out "$HERE/eval_${task}_${name}.json"
  done
  python -m engine.eval correspondence "$@" --val-data "$DATA/test" --max-val 2000 \
    --workers 2 --quiet --out "$HERE/eval_correspondence_${name}.json"
}

for method in ${METHODS:-mocov2 densecl pixpro densesiam lcloss sim swav regioncl detco scfs ccop}; do
  preset=$method-r18-cifar-cpu
  [ "$method" = sim ] && preset=sim-demo-cifar-cpu
  extra=()
  if [ "$method" = ccop ]; then   # selective search once, on the 32 px images as they are
    python -m engine.proposals --data "$DATA/train" --size 0 --out "$WORK/proposals-train.bin" \
      --quiet
    extra=(--proposals "$WORK/proposals-train.bin")
  fi
  if [ ! -f "$WORK/$method/checkpoint.pt" ]; then
    /usr/bin/time -f "%e s wall" python -m engine.pretrain --preset "$preset" --data "$DATA/train" \
      --out "$WORK/$method" --no-fused "${extra[@]}" 2>&1 | tr '\r' '\n' | grep -v '^\[' \
      > "$HERE/train_$method.log"
  fi
  cp "$WORK/$method/metrics.jsonl" "$HERE/metrics_$method.jsonl"
  cp "$WORK/$method/config.json" "$HERE/config_$method.json"
  cp "$WORK/$method/loss_curve.png" "$HERE/loss_curve_$method.png"
  evaluate "$method" --checkpoint "$WORK/$method"
done
# Random-init baselines: every ResNet-18 method starts from the same weights (seed 0, the backbone
# is built first), so one ResNet-18 baseline serves them all; SIM's ViT has its own.
# SKIP_BASELINES=1 leaves their committed results as they are (adding one method to the table).
[ "${SKIP_BASELINES:-0}" = 1 ] && exit 0
evaluate random-resnet18 --random-init --preset mocov2-r18-cifar-cpu
evaluate random-vit --random-init --preset sim-demo-cifar-cpu
