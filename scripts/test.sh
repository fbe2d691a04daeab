#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs formatting, lints, every test
# (unit, contract, end-to-end) and the doc tests.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
./scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo nextest"
cargo nextest run --workspace --locked --no-fail-fast
echo "== doc tests"
cargo test --workspace --doc --locked
