#!/usr/bin/env bash
# The disk a 25-epoch 'cbst train-source' run of the small model leaves: the total size of its
# folder and its checkpoints. Checkpoint sizes depend only on the model (small, 19 classes) and
# on how many are kept, not on the data, so a tiny synthetic set (8 source images, 1 step per
# epoch) gives the same numbers as the demo's in a few minutes.
#
#   benchmarks/checkpoint_sizes.sh [WORK_DIR [EXTRA TRAIN-SOURCE OPTIONS ...]]
#
# e.g. with --keep-checkpoints all to see the size of keeping every epoch's weights.
set -euo pipefail
work="${1:-/tmp/cbst_checkpoint_sizes}"
shift || true
python="${PYTHON:-python}"
"$python" -m cbst make-synthetic "$work/data" --num-source 8 --num-train 2 --num-val 2 --quiet >/dev/null
rm -rf "$work/run"
"$python" -m cbst train-source --dataset gta5 --data-root "$work/data/gta5" --model small \
    --batch-images 8 --crop-size 64 --lr-type poly --base-lr 0.05 --to-epoch 25 \
    --num-workers 0 --no-progress --device cpu --output "$work/run" "$@" >/dev/null
echo "run folder: $(du -sb "$work/run" | cut -f1) bytes"
ls -l "$work/run/last.pt" "$work/run/checkpoints"
