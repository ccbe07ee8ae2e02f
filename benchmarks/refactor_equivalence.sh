#!/usr/bin/env bash
# Behaviour-unchanged check for internal refactors: runs a reduced CBST pipeline through the CLI
# and compares its outputs byte for byte (PNGs, stats.json, metrics, results, source-training
# log minus timings) with a reference folder produced the same way from an earlier commit.
#
#   benchmarks/refactor_equivalence.sh OUT                 # run the pipeline into OUT
#   benchmarks/refactor_equivalence.sh OUT REFERENCE       # run it, then compare OUT with REFERENCE
#
# The code run is whatever `cbst` imports: set PYTHONPATH to the tree under test (for the reference,
# a `git worktree add /tmp/ref COMMIT` and PYTHONPATH=/tmp/ref/src). Everything runs on the CPU in
# float32 (--no-amp) with no loader workers, so two runs on one machine must agree exactly.
# Takes about 3 minutes on 2 CPU cores.
set -euo pipefail

out=${1:?usage: refactor_equivalence.sh OUT [REFERENCE]}
ref=${2:-}
common=(--device cpu --no-amp --num-workers 0 --no-progress)

rm -rf "$out"
mkdir -p "$out"
cbst make-synthetic "$out/data" --num-source 24 --num-train 12 --num-val 6 --size 128x64 --quiet >/dev/null
cbst train-source --dataset gta5 --data-root "$out/data/gta5" --model small --batch-images 4 \
    --crop-size 64 --scale-rate-range 0.75,1.25 --lr-type poly --base-lr 0.05 --to-epoch 3 \
    --output "$out/source" "${common[@]}" >/dev/null

selftrain() {  # NAME then the method's own flags
    local name=$1
    shift
    cbst self-train --dataset gta5 --data-root "$out/data/gta5" --dataset-tgt cityscapes \
        --data-root-tgt "$out/data/cityscapes" --weights "$out/source/last.pt" \
        --output "$out/$name" --num-round 2 --epoch-per-round 1 --init-tgt-port 0.2 \
        --init-src-port 0.5 --step-src-port 0.05 --max-src-port 0.6 --base-lr 0.005 \
        --batch-images 4 --crop-size 64 --scale-rate-range 0.75,1.25 --mine-port 0.8 \
        --pseudo-batch 4 --score-pseudo-labels "${common[@]}" "$@" >/dev/null
}
selftrain st --kc-policy global
selftrain cbst --kc-policy cb
selftrain cbst_sp --kc-policy cb --with-prior source
selftrain mrkld --kc-policy cb --mr-weight-kld 0.1
selftrain lrent --kc-policy cb --lr-weight-ent 0.25 --exact-thresholds
cbst evaluate --dataset cityscapes --data-root "$out/data/cityscapes" --checkpoint "$out/cbst_sp/round_1/model.pt" \
    --test-flipping --output "$out/eval" --out "$out/eval/metrics.json" "${common[@]}" >"$out/eval_table.md"
echo "pipeline written to $out"

[[ -z $ref ]] && exit 0
python - "$out" "$ref" <<'PY'
"""Compare every PNG, stats/metrics/results JSON and the source log (without timings)."""
import json
import sys
from pathlib import Path

out, ref = Path(sys.argv[1]), Path(sys.argv[2])
TIMING = {"seconds", "time", "elapsed", "images_per_second", "took", "wall_seconds"}


def strip(value):
    """A JSON value without wall-clock fields (which differ between any two runs)."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMING and "second" not in k}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def load(path: Path):
    if path.suffix == ".jsonl":
        return [strip(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    return strip(json.loads(path.read_text()))


patterns = ("**/*.png", "**/stats.json", "**/metrics.json", "**/results.json", "source/log.jsonl")
names = sorted({p.relative_to(ref) for pat in patterns for p in ref.glob(pat)})
bad = []
for name in names:
    a, b = out / name, ref / name
    if not a.is_file():
        bad.append(f"missing: {name}")
    elif name.suffix == ".png":
        if a.read_bytes() != b.read_bytes():
            bad.append(f"differs: {name}")
    elif load(a) != load(b):
        bad.append(f"differs: {name}")
if (out / "eval_table.md").read_text() != (ref / "eval_table.md").read_text():
    bad.append("differs: eval_table.md")
print(f"compared {len(names) + 1} files with {ref}: {len(bad)} differ or are missing")
for line in bad:
    print("  " + line)
sys.exit(1 if bad else 0)
PY
