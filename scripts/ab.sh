#!/usr/bin/env bash
# A/B of two memsync builds on the same machine at the same time:
#   scripts/ab.sh BASE_BINARY NEW_BINARY ROUNDS OUT_DIR SUITE [SUITE...] [-- BENCH_ARGS...]
# Each round runs every suite with both binaries, the first one alternating from round to round,
# so a change of load falls on both. The `--json` lines go to OUT_DIR/base.jsonl and
# OUT_DIR/new.jsonl, and `memsync bench compare` (of the new binary, or of $MEMSYNC when set)
# prints the table to OUT_DIR/compare.txt and stdout. Extra arguments after `--` go to every
# `bench SUITE` (for example `--quick` or `--runs 3`). A suite that fails in a round is
# reported and skipped there.
set -euo pipefail
if [ $# -lt 5 ]; then
  sed -n 2,11p "$0" >&2
  exit 2
fi
base=$1 new=$2 rounds=$3 out=$4
shift 4
suites=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do suites+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
: >"$out/base.jsonl"
: >"$out/new.jsonl"
run() { # side binary suite round
  echo "== round $4: $1 $3" >&2
  if ! "$2" bench "$3" --json "${@:5}" >>"$out/$1.jsonl" 2>>"$out/$1.log"; then
    echo "   $1 $3 failed in round $4 (see $out/$1.log)" >&2
  fi
}
for r in $(seq 1 "$rounds"); do
  for s in "${suites[@]}"; do
    if [ $((r % 2)) -eq 1 ]; then
      run base "$base" "$s" "$r" "$@"; run new "$new" "$s" "$r" "$@"
    else
      run new "$new" "$s" "$r" "$@"; run base "$base" "$s" "$r" "$@"
    fi
  done
done
"${MEMSYNC:-$new}" bench compare "$out/base.jsonl" "$out/new.jsonl" | tee "$out/compare.txt"
