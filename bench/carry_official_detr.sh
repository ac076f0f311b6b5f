#!/usr/bin/env bash
# Put the official UP-DETR (dddzg/up-detr) and DETReg (amirbar/DETReg) code into the IGNORED folder
# .official/, so that a GPU call can bring it along:  run(..., carry=[".official"]).
# Both are Apache-2.0 (their LICENSE files are copied with them); still, they are not ours and are
# never committed: .official/ is in .gitignore.
#
#   bash bench/carry_official_detr.sh [UPDETR_MIRROR] [DETREG_MIRROR]
#
# Each MIRROR is a git directory of the public repository (the agent's `fetch github:dddzg/up-detr`
# and `fetch github:amirbar/DETReg` return one; defaults below), or set DENSESIM_UPDETR_MIRROR /
# DENSESIM_DETREG_MIRROR. Only the files the model + criterion forward/backward and the training
# step need are copied (about 500 kB with DETReg's MSDeformAttn CUDA sources, which
# bench/official_detr.py builds with nvcc on the GPU machine), each folder with a PROVENANCE file
# (URL, commit, date, licence). bench/official_detr.py reads them from $DENSESIM_OFFICIAL_UPDETR
# (default .official/up-detr) and $DENSESIM_OFFICIAL_DETREG (default .official/DETReg).
# A mirror that is missing is reported and skipped (exit 3 when neither could be copied).
set -euo pipefail
cd "$(dirname "$0")/.."
UPDETR_MIRROR=${1:-${DENSESIM_UPDETR_MIRROR:-/work/.mirror/dddzg+up-detr/repo}}
DETREG_MIRROR=${2:-${DENSESIM_DETREG_MIRROR:-/work/.mirror/amirbar+DETReg/repo}}

# UP-DETR: models/__init__.build_model's whole import closure (segmentation.py is imported by
# models/__init__.py and detr.py), util/, main.py (its get_args_parser is read from the file) and
# engine.py (its train_one_epoch is read from the file; the file's COCO-evaluation imports are not
# executed).
UPDETR_FILES=(LICENSE README.md main.py engine.py
              models/__init__.py models/updetr.py models/detr.py models/backbone.py
              models/transformer.py models/matcher.py models/position_encoding.py
              models/segmentation.py
              util/__init__.py util/misc.py util/box_ops.py
              datasets/selfdet.py)
# DETReg: models/__init__.build_model's import closure (it imports the DETR variant too), the
# MSDeformAttn op (Python wrappers, C++/CUDA sources, setup.py), util/ (default_args holds the
# parser), engine.py (train_one_epoch read from the file), datasets/data_prefetcher.py (the loop's
# prefetcher, loaded by path), the ImageNet pre-training config, main.py and datasets/selfdet.py
# (for reference: how the SwAV embedding net and the targets are made).
DETREG_FILES=(LICENSE README.md main.py engine.py configs/DETReg_top30_in.sh
              models/__init__.py models/backbone.py models/deformable_detr.py
              models/deformable_transformer.py models/def_matcher.py models/detr.py
              models/detr_matcher.py models/transformer.py models/position_encoding.py
              models/segmentation.py models/swav_resnet50.py
              models/ops/setup.py models/ops/make.sh models/ops/test.py
              models/ops/functions/__init__.py models/ops/functions/ms_deform_attn_func.py
              models/ops/modules/__init__.py models/ops/modules/ms_deform_attn.py
              models/ops/src/ms_deform_attn.h models/ops/src/vision.cpp
              models/ops/src/cpu/ms_deform_attn_cpu.cpp models/ops/src/cpu/ms_deform_attn_cpu.h
              models/ops/src/cuda/ms_deform_attn_cuda.cu models/ops/src/cuda/ms_deform_attn_cuda.h
              models/ops/src/cuda/ms_deform_im2col_cuda.cuh
              util/__init__.py util/misc.py util/box_ops.py util/default_args.py
              datasets/data_prefetcher.py datasets/selfdet.py)

mkdir -p .official
git check-ignore -q .official/ || { echo "error: .official/ is not ignored by git" >&2; exit 2; }

copied=0
carry() {  # carry NAME URL MIRROR DEST FILES...
  local name=$1 url=$2 mirror=$3 dest=$4
  shift 4
  if ! git --git-dir="$mirror" rev-parse --verify -q HEAD > /dev/null 2>&1; then
    echo "warning: $mirror is not a git directory of $name (fetch it first): skipped" >&2
    return 0
  fi
  local commit
  commit=$(git --git-dir="$mirror" rev-parse HEAD)
  rm -rf "$dest"
  mkdir -p "$dest"
  git --git-dir="$mirror" archive --format=tar "$commit" -- "$@" | tar -x -C "$dest"
  {
    echo "url $url"
    echo "commit $commit"
    echo "date $(git --git-dir="$mirror" log -1 --format=%cI "$commit")"
    echo "licence Apache-2.0 (see LICENSE); copied by bench/carry_official_detr.sh, never committed"
  } > "$dest/PROVENANCE"
  echo "official $name code at $dest (commit ${commit:0:12}, $(du -sh "$dest" | cut -f1))"
  copied=$((copied + 1))
}
carry UP-DETR https://github.com/dddzg/up-detr "$UPDETR_MIRROR" .official/up-detr "${UPDETR_FILES[@]}"
carry DETReg https://github.com/amirbar/DETReg "$DETREG_MIRROR" .official/DETReg "${DETREG_FILES[@]}"
if [ "$copied" = 0 ]; then
  echo "error: no official DETR code copied" >&2
  exit 3
fi
echo "carry it with carry=[\".official\"]"
