#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs formatting, lints, every test
# (unit, contract, end-to-end) and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# CI sets CI=true; so does this script when CI is unset, so that a local run is the CI run: a
# test that lacks a tool, a server or a kernel feature that setup.sh or this kernel provides
# fails instead of printing SKIPPED (memsync_testkit::skip). `CI=false ./scripts/test.sh` lets
# such tests skip.
export CI="${CI:-true}"
./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The Cassandra/ScyllaDB backend is off by default (the `scylla` driver is heavy) and no CQL
# server runs here, so compile and lint it on its own: the library with its tests, and the
# binary's `cql` feature.
echo "== cargo clippy (cql)"
cargo clippy -p memsync-cql -p memsync --features memsync-cql/scylla,memsync/cql --all-targets \
  --locked -- -D warnings
echo "== cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast
# Every benchmark suite, small, with the debug binary nextest just built for the CLI tests (no
# release build in CI): the suites and their peers keep working, and `bench report` turns the run
# into a report (kept in the target directory; docs/bench/ is made from a release run). One round
# per case keeps it near 2 min here (three rounds: ~3.5 min).
echo "== memsync bench all --quick --runs 1"
bench_dir="$CARGO_TARGET_DIR/bench-smoke"
rm -rf "$bench_dir"
"$CARGO_TARGET_DIR/debug/memsync" bench all --quick --runs 1 --out "$bench_dir"
"$CARGO_TARGET_DIR/debug/memsync" bench report --in "$bench_dir" --out "$bench_dir/report"
echo "== doc tests"
cargo test --workspace --doc --locked
