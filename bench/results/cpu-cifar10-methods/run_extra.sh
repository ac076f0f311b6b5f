#!/usr/bin/env bash
# After run.sh: (1) DenseCL with its repository's lambda warm-up (DenseCLWarmupHook, lambda = 0 for
# the first half of the run; mmselfsup's port turns it on by default), same budget as the other
# runs; (2) the correspondence metric on 2x renderings of the same crops for the ResNets (64 px ->
# an 8x8 C5 map, where the same-position shortcut is much weaker than on 4x4); (3) DenseSiam at
# twice the budget and (4) DenseSiam's global term alone, both with the online kNN monitor.
#   bash bench/results/cpu-cifar10-methods/run_extra.sh DATA_DIR WORK_DIR
set -euo pipefail
DATA=${1:?DATA_DIR}
WORK=${2:?WORK_DIR}
HERE=$(dirname "$0")
PROBE_SUBSET=(--max-train 10000 --max-val 5000 --workers 2 --quiet)

train() {  # train NAME PRETRAIN_ARGS...: once (skipped when the checkpoint exists), then keep its files
  local name=$1
  shift
  if [ ! -f "$WORK/$name/checkpoint.pt" ]; then
    /usr/bin/time -f "%e s wall" python -m engine.pretrain --data "$DATA/train" \
      --out "$WORK/$name" --no-fused "$@" 2>&1 | tr '\r' '\n' | grep -v '^\[' \
      > "$HERE/train_$name.log"
  fi
  for file in metrics.jsonl config.json loss_curve.png; do
    cp "$WORK/$name/$file" "$HERE/${file%%.*}_$name.${file#*.}"
  done
}

probe() {  # probe TASK NAME: kNN or linear probe of a checkpoint on run.sh's subset
  python -m engine.eval "$1" --checkpoint "$WORK/$2" --train-data "$DATA/train" \
    --val-data "$DATA/test" "${PROBE_SUBSET[@]}" --out "$HERE/eval_$1_$2.json"
}

correspondence() {  # correspondence SUFFIX OUT_NAME CHECKPOINT_ARGS...
  local suffix=$1 name=$2
  shift 2
  local size=()
  [ "$suffix" = -64 ] && size=(--img-size 64)
  python -m engine.eval correspondence "$@" --val-data "$DATA/test" --max-val 2000 "${size[@]}" \
    --workers 2 --quiet --out "$HERE/eval_correspondence_$name$suffix.json"
}

# (1) DenseCL with the lambda warm-up
train densecl-warmup --preset densecl-r18-cifar-cpu --method-arg dense_warmup_steps=450
probe knn densecl-warmup
probe linear densecl-warmup
correspondence "" densecl-warmup --checkpoint "$WORK/densecl-warmup"

# (2) the native-size files are rewritten too (the first three runs were evaluated before the
# metric gained its displaced-cell headline), then every ResNet at 64 px
for suffix in "" -64; do
  for method in mocov2 densecl pixpro densesiam lcloss; do
    correspondence "$suffix" "$method" --checkpoint "$WORK/$method"
  done
  correspondence "$suffix" random-resnet18 --random-init --preset mocov2-r18-cifar-cpu
done
correspondence -64 densecl-warmup --checkpoint "$WORK/densecl-warmup"

# (3) DenseSiam at twice the budget (1.5 epochs), with the online kNN monitor every 0.25 epoch on
# 1,000 train / 500 test images per class (symlinked subsets), to see whether its kNN tie with
# random init at 0.75 epochs is a slow start or a method that does not learn.
SUB=$WORK/cifar_sub
if [ ! -d "$SUB/val5k" ]; then
  for split in train:train10k:1000 test:val5k:500; do
    IFS=: read -r from to count <<< "$split"
    for class_dir in "$DATA/$from"/*/; do
      class=$(basename "$class_dir")
      files=("$(realpath "$class_dir")"/*)           # sorted, as `ls` lists them
      mkdir -p "$SUB/$to/$class"
      ln -sf "${files[@]:0:$count}" "$SUB/$to/$class/"
    done
  done
fi
MONITOR=(--eval-data "$SUB/train10k,$SUB/val5k" --eval-every 0.25)
train densesiam-2x --preset densesiam-r18-cifar-cpu --epochs 1.5 "${MONITOR[@]}"
probe knn densesiam-2x
probe linear densesiam-2x
for suffix in "" -64; do
  correspondence "$suffix" densesiam-2x --checkpoint "$WORK/densesiam-2x"
done

# (4) The same DenseSiam preset with the pixel and region terms off (global SimSiam alone), the
# original budget and the same monitor: is the slow kNN start the dense terms' doing or SimSiam's?
train densesiam-global-only --preset densesiam-r18-cifar-cpu --method-arg pixel_weight=0 \
  --method-arg region_weight=0 "${MONITOR[@]}"
probe knn densesiam-global-only
