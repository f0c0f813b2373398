#!/usr/bin/env bash
# The n=64 quality comparison on one GPU within a hard time limit (issue 10, item 5).
#
#   bash results/quality/gpu_n64.sh [LIMIT_S=300] [DEST=$OUT]
#
# Runs `tokprune-quality --device cuda` for at most LIMIT_S seconds (SIGINT at the limit: rows finished so far
# are recorded; the work order puts dense + noise row + CAT@0.3 first, then every plan row at 0.5, 0.4, 0.6,
# 0.75, the rest of 0.3, then the diffusers caches), rebuilds the report from the records (a cut-off run
# gives a valid partial report: each row says its n), and copies quality.json, quality.md and
# .work/records.jsonl (plus quality.png when PNG=1) to DEST. Rebuild or resume elsewhere with the same flags:
#   tokprune-quality $ARGS --out DIR --report-only      (DIR/.work/records.jsonl = the copied records)
# Environment: WORK (default /tmp/q64), ARGS (default: the flags below), PNG=1 to copy the plot too.
set -u
LIMIT=${1:-300}
DEST=${2:-${OUT:-.}}
WORK=${WORK:-/tmp/q64}
ARGS=${ARGS:---device cuda --n 64 --chunk 16 --noise-n 16}
BIN=${TOKPRUNE_QUALITY:-tokprune-quality}
$BIN --help 2>/dev/null | grep -q -- --metric-workers || {
  echo "the installed $BIN is not this tree's (no --metric-workers): pip install --no-deps --no-build-isolation -e ." >&2
  exit 3
}
start=$(date +%s)
# shellcheck disable=SC2086
timeout -s INT -k 20 "$LIMIT" $BIN $ARGS --quiet --log-level info --out "$WORK"
echo "tokprune-quality exit $? after $(( $(date +%s) - start )) s (124 = stopped at the ${LIMIT} s limit)"
# shellcheck disable=SC2086
$BIN $ARGS --quiet --out "$WORK" --report-only
mkdir -p "$DEST"
cp "$WORK/quality.json" "$WORK/quality.md" "$WORK/.work/records.jsonl" "$DEST"/
if [ "${PNG:-0}" = 1 ]; then cp "$WORK/quality.png" "$DEST"/; fi
ls -l "$DEST"
