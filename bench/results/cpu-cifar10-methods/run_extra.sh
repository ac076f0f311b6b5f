#!/usr/bin/env bash
# After run.sh: (1) the correspondence metric on 2x renderings of the same crops for the ResNets
# (64 px -> an 8x8 C5 map, where the same-position shortcut is much weaker than on 4x4), and
# (2) DenseCL with its repository's lambda warm-up (DenseCLWarmupHook, lambda = 0 for the first
# half of the run; mmselfsup's port turns it on by default), same budget as the other runs.
#   bash bench/results/cpu-cifar10-methods/run_extra.sh DATA_DIR WORK_DIR
set -euo pipefail
DATA=${1:?DATA_DIR}
WORK=${2:?WORK_DIR}
HERE=$(dirname "$0")

if [ ! -f "$WORK/densecl-warmup/checkpoint.pt" ]; then
  /usr/bin/time -f "%e s wall" python -m engine.pretrain --preset densecl-r18-cifar-cpu \
    --data "$DATA/train" --method-arg dense_warmup_steps=450 --out "$WORK/densecl-warmup" \
    --no-fused 2>&1 | tr '\r' '\n' | grep -v '^\[' > "$HERE/train_densecl-warmup.log"
fi
cp "$WORK/densecl-warmup/metrics.jsonl" "$HERE/metrics_densecl-warmup.jsonl"
cp "$WORK/densecl-warmup/config.json" "$HERE/config_densecl-warmup.json"
cp "$WORK/densecl-warmup/loss_curve.png" "$HERE/loss_curve_densecl-warmup.png"
for task in knn linear; do
  python -m engine.eval "$task" --checkpoint "$WORK/densecl-warmup" --train-data "$DATA/train" \
    --val-data "$DATA/test" --max-train 10000 --max-val 5000 --workers 2 --quiet \
    --out "$HERE/eval_${task}_densecl-warmup.json"
done
python -m engine.eval correspondence --checkpoint "$WORK/densecl-warmup" --val-data "$DATA/test" \
  --max-val 2000 --workers 2 --quiet --out "$HERE/eval_correspondence_densecl-warmup.json"

# (the native-size files are rewritten too: the first three runs were evaluated before the metric
# gained its displaced-cell headline)
for method in mocov2 densecl pixpro densesiam lcloss; do
  python -m engine.eval correspondence --checkpoint "$WORK/$method" --val-data "$DATA/test" \
    --max-val 2000 --workers 2 --quiet --out "$HERE/eval_correspondence_${method}.json"
done
python -m engine.eval correspondence --random-init --preset mocov2-r18-cifar-cpu \
  --val-data "$DATA/test" --max-val 2000 --workers 2 --quiet \
  --out "$HERE/eval_correspondence_random-resnet18.json"
for method in mocov2 densecl densecl-warmup pixpro densesiam lcloss; do
  python -m engine.eval correspondence --checkpoint "$WORK/$method" --val-data "$DATA/test" \
    --max-val 2000 --img-size 64 --workers 2 --quiet \
    --out "$HERE/eval_correspondence_${method}-64.json"
done
python -m engine.eval correspondence --random-init --preset mocov2-r18-cifar-cpu \
  --val-data "$DATA/test" --max-val 2000 --img-size 64 --workers 2 --quiet \
  --out "$HERE/eval_correspondence_random-resnet18-64.json"
