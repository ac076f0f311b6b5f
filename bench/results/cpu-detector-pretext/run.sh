#!/usr/bin/env bash
# Does detector pre-training learn its pretext? (issue 13's label-free check.) Imagenette at
# 128 px (train: pre-training; val: held-out), each detector method's CPU demo preset (ResNet-18,
# CIFAR stem, 64 px views, a 2+2-layer transformer of width 64, batch 16) for about the same CPU
# time on the idle 2-core VM, then `python -m engine.eval pretext` on 256 held-out images: the
# random-initialised detector (the same seed: the run's own starting point) and the trained one.
# The frozen CNN is random too (no backbone_checkpoint): the check measures whether the
# detector learns to find its pretext targets, not the backbone. Run from the repository root:
#   bash bench/results/cpu-detector-pretext/run.sh DATA_DIR WORK_DIR
# DATA_DIR holds imagenette128/{train,val} (tar xzf ../shared/data/imagenette128_{train,val}.tar.gz).
set -euo pipefail
DATA=${1:?DATA_DIR}/imagenette128
WORK=${2:?WORK_DIR}
HERE=$(dirname "$0")
mkdir -p "$WORK"
declare -A STEPS=([updetr]=180 [detreg]=240 [pairdetr]=480)   # ~8 min each on the idle VM

for method in ${METHODS:-updetr detreg pairdetr}; do
  if [ "$method" != updetr ]; then   # selective search once per folder (cached beside it)
    for split in train val; do
      python -m engine.proposals --data "$DATA/$split" --quiet
    done
  fi
  if [ ! -f "$WORK/$method/checkpoint.pt" ]; then
    /usr/bin/time -f "%e s wall" python -m engine.pretrain --preset "$method-demo-cpu" \
      --data "$DATA/train" --steps "${STEPS[$method]}" --out "$WORK/$method" --no-fused \
      --workers 2 --log-every 20 2>&1 | tr '\r' '\n' | grep -v '^\[' > "$HERE/train_$method.log"
  fi
  cp "$WORK/$method/metrics.jsonl" "$HERE/metrics_$method.jsonl"
  cp "$WORK/$method/config.json" "$HERE/config_$method.json"
  for init in random trained; do
    flag=(); [ "$init" = random ] && flag=(--random-init)
    python -m engine.eval pretext --checkpoint "$WORK/$method" "${flag[@]}" \
      --val-data "$DATA/val" --max-val 256 --workers 2 --device cpu --quiet \
      --out "$HERE/pretext_${method}_${init}.json"
  done
done
python "$HERE/table.py" > "$HERE/table.md"
