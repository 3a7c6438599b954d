#!/usr/bin/env bash
# Issue 22's measurements, for an idle machine (run from the repository root):
#
#   bash benchmarks/measure_all.sh [OUT_DIR]      # default OUT_DIR=/tmp/issue22
#
# Refuses to start unless the 1-minute load average is below 1.5 (set FORCE=1 to run
# anyway; the JSON reports record the load before and after every harness run).
# Writes to OUT_DIR: side_by_side_{small,4x128}.json (3 repeats each, A B A B, both
# sides pinned to the same cores), quality_4x128.json (2,000 steps, same bytes, same
# init) and prof_{small,4x128}/summary.json (PROFILE=0 skips them). small is nanoGPT's
# 6x384, block 256, batch 64. About 25-35 minutes on 2 cores.
set -euo pipefail
OUT=${1:-/tmp/issue22}
CORES=${CORES:-$(python -c "import os; print(','.join(map(str, sorted(os.sched_getaffinity(0)))))")}
mkdir -p "$OUT"

check_idle() {
  local load
  load=$(cut -d' ' -f1 /proc/loadavg)
  echo "load average (1 min): $load  $(date -u +%FT%TZ)  before: $1" | tee -a "$OUT/load.log"
  if [[ "${FORCE:-0}" != 1 ]] && python -c "import sys; sys.exit(float('$load') < 1.5)"; then
    echo "not idle (1-minute load average $load >= 1.5): stopping; FORCE=1 to run anyway" >&2
    exit 3
  fi
}

check_idle "side by side, 4x128"
python -m launch.benchmark --against=torch --config=experiments/pretrain/small.py \
  --shape=4x128 --repeats=3 --steps=20 --cores="$CORES" \
  --out="$OUT/side_by_side_4x128.json" --keep_dir="$OUT/children_4x128"

check_idle "side by side, small"
python -m launch.benchmark --against=torch --config=experiments/pretrain/small.py \
  --shape=small --config.batch_size=64 --repeats=3 --steps=10 --cores="$CORES" \
  --out="$OUT/side_by_side_small.json" --keep_dir="$OUT/children_small"

if [[ "${PROFILE:-1}" == 1 ]]; then
  check_idle "profiles"
  python -m benchmarks.profile_step --shape=4x128 --steps=5 --out_dir="$OUT/prof_4x128"
  python -m benchmarks.profile_step --shape=small --steps=3 --out_dir="$OUT/prof_small"
fi

# Losses do not depend on the load; last, so a busy machine only delays it.
python -m benchmarks.equal_quality --shape=4x128 --steps=2000 --eval_every=250 \
  --out="$OUT/quality_4x128.json"
echo "done: $OUT"
