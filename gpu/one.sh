#!/usr/bin/env bash
# One study run inside one 10-minute device call: bash gpu/one.sh LIMIT_S --runs RUN_ID
# The study stops cleanly at LIMIT_S (SIGTERM: runs save and a rerun continues); the run's result.json
# and the log come back as $OUT/RUN_ID.json and $OUT/log. FINAL=1 evaluates at the final point only
# (the plan with `fractions: [1.0]`, same file name so the same plan name): a run of three evaluation
# points does not fit one call. PLAN= picks another plan (default configs/study/w4a4-125m.yaml).
set -uo pipefail
cd "$(dirname "$0")/.."
source gpu/setup.sh
limit=$1; shift
plan=${PLAN:-configs/study/w4a4-125m.yaml}
if [ "${FINAL:-0}" = 1 ]; then
  mkdir -p /tmp/final && sed 's/^fractions: .*/fractions: [1.0]/' "$plan" > "/tmp/final/$(basename "$plan")"
  plan=/tmp/final/$(basename "$plan")
fi
timeout -s TERM "$limit" python3 -m study --plan "$plan" --out /root/study --corpus gpu/corpus --no-report "$@" \
  > "$OUT/log" 2>&1
rc=$?
grep -v "^\s*$" "$OUT/log" | tail -40
for d in /root/study/arms/*/; do [ -f "$d/result.json" ] && cp "$d/result.json" "$OUT/$(basename "$d").json"; done
exit $rc
