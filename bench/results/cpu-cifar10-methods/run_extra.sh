#!/usr/bin/env bash
# After run.sh: (1) the correspondence metric on 2x renderings of the same crops for the ResNets
# (64 px -> an 8x8 C5 map, where the same-position shortcut is much weaker than on 4x4), and
# (2) DenseCL with its repository's lambda warm-up (DenseCLWarmupHook, lambda = 0 for the first
# half of the run; mmselfsup's port turns it on by default), same budget as the other runs;
# (3) DenseSiam at twice the budget and (4) DenseSiam's global term alone, both with the online
# kNN monitor.
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

# (3) DenseSiam at twice the budget (1.5 epochs), with the online kNN monitor every 0.25 epoch on
# 1,000 train / 500 test images per class (symlinked subsets), to see whether its kNN tie with
# random init at 0.75 epochs is a slow start or a method that does not learn.
SUB=$WORK/cifar_sub
if [ ! -d "$SUB/val5k" ]; then
  for c in $(ls "$DATA/train"); do
    mkdir -p "$SUB/train10k/$c" "$SUB/val5k/$c"
    ls "$DATA/train/$c" | head -1000 | while read -r f; do ln -sf "$(realpath "$DATA/train/$c/$f")" "$SUB/train10k/$c/$f"; done
    ls "$DATA/test/$c" | head -500 | while read -r f; do ln -sf "$(realpath "$DATA/test/$c/$f")" "$SUB/val5k/$c/$f"; done
  done
fi
if [ ! -f "$WORK/densesiam-2x/checkpoint.pt" ]; then
  /usr/bin/time -f "%e s wall" python -m engine.pretrain --preset densesiam-r18-cifar-cpu \
    --data "$DATA/train" --epochs 1.5 --eval-data "$SUB/train10k,$SUB/val5k" --eval-every 0.25 \
    --out "$WORK/densesiam-2x" --no-fused 2>&1 | tr '\r' '\n' | grep -v '^\[' > "$HERE/train_densesiam-2x.log"
fi
for f in metrics.jsonl config.json loss_curve.png; do
  cp "$WORK/densesiam-2x/$f" "$HERE/${f%%.*}_densesiam-2x.${f#*.}"
done
for task in knn linear; do
  python -m engine.eval "$task" --checkpoint "$WORK/densesiam-2x" --train-data "$DATA/train" \
    --val-data "$DATA/test" --max-train 10000 --max-val 5000 --workers 2 --quiet \
    --out "$HERE/eval_${task}_densesiam-2x.json"
done
for size in 32 64; do
  suffix=$([ "$size" = 64 ] && echo "-64" || true)
  python -m engine.eval correspondence --checkpoint "$WORK/densesiam-2x" --val-data "$DATA/test" \
    --max-val 2000 --img-size "$size" --workers 2 --quiet \
    --out "$HERE/eval_correspondence_densesiam-2x${suffix}.json"
done

# (4) The same DenseSiam preset with the pixel and region terms off (global SimSiam alone), the
# original budget and the same monitor: is the slow kNN start the dense terms' doing or SimSiam's?
if [ ! -f "$WORK/densesiam-global-only/checkpoint.pt" ]; then
  /usr/bin/time -f "%e s wall" python -m engine.pretrain --preset densesiam-r18-cifar-cpu \
    --data "$DATA/train" --method-arg pixel_weight=0 --method-arg region_weight=0 \
    --eval-data "$SUB/train10k,$SUB/val5k" --eval-every 0.25 --out "$WORK/densesiam-global-only" \
    --no-fused 2>&1 | tr '\r' '\n' | grep -v '^\[' > "$HERE/train_densesiam-global-only.log"
fi
for f in metrics.jsonl config.json loss_curve.png; do
  cp "$WORK/densesiam-global-only/$f" "$HERE/${f%%.*}_densesiam-global-only.${f#*.}"
done
python -m engine.eval knn --checkpoint "$WORK/densesiam-global-only" --train-data "$DATA/train" \
  --val-data "$DATA/test" --max-train 10000 --max-val 5000 --workers 2 --quiet \
  --out "$HERE/eval_knn_densesiam-global-only.json"
