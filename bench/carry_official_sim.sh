#!/usr/bin/env bash
# Put the official SIM code (OpenGVLab/Siamese-Image-Modeling) into the IGNORED folder .official/,
# so that a GPU call can bring it along:  run(..., carry=[".official"]).
# It is never committed (CC BY-NC 4.0, not ours): .official/ is in .gitignore.
#
#   bash bench/carry_official_sim.sh [MIRROR]
#
# MIRROR: a git directory of https://github.com/OpenGVLab/Siamese-Image-Modeling (the agent's
# `fetch github:OpenGVLab/Siamese-Image-Modeling` returns one; default below), or set
# DENSESIM_OFFICIAL_MIRROR. Only the files the training step needs are copied (about 100 kB), with
# PROVENANCE (URL, commit, date). bench/official_sim.py reads them from
# $DENSESIM_OFFICIAL_SIM (default .official/Siamese-Image-Modeling).
set -euo pipefail
cd "$(dirname "$0")/.."
MIRROR=${1:-${DENSESIM_OFFICIAL_MIRROR:-/work/.mirror/OpenGVLab+Siamese-Image-Modeling/repo}}
DEST=.official/Siamese-Image-Modeling
FILES=(LICENSE README.md models_sim.py models_vit.py engine_pretrain.py main_pretrain.py
       configs/pretrain/dist_sim_base_1600ep.sh
       util/misc.py util/pos_embed.py util/lr_sched.py util/masking_generator.py
       util/datasets.py util/augmentation.py util/crop.py)

if ! git --git-dir="$MIRROR" rev-parse --verify -q HEAD > /dev/null; then
  echo "error: $MIRROR is not a git directory of Siamese-Image-Modeling (fetch it first)" >&2
  exit 2
fi
mkdir -p .official
git check-ignore -q .official/ || { echo "error: .official/ is not ignored by git" >&2; exit 2; }
commit=$(git --git-dir="$MIRROR" rev-parse HEAD)
rm -rf "$DEST"
mkdir -p "$DEST"
git --git-dir="$MIRROR" archive --format=tar "$commit" -- "${FILES[@]}" | tar -x -C "$DEST"
{
  echo "url https://github.com/OpenGVLab/Siamese-Image-Modeling"
  echo "commit $commit"
  echo "date $(git --git-dir="$MIRROR" log -1 --format=%cI "$commit")"
  echo "licence CC BY-NC 4.0 (see LICENSE); copied by bench/carry_official_sim.sh, never committed"
} > "$DEST/PROVENANCE"
echo "official SIM code at $DEST (commit ${commit:0:12}, $(du -sh "$DEST" | cut -f1)); carry it with carry=[\".official\"]"
