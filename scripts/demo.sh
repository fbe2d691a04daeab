#!/usr/bin/env bash
# Builds memsync and runs the guided tour on the embedded default mem: store. Extra arguments go
# to `memsync demo` (try --help; --quick for a smaller run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
cargo build --release --locked -p memsync
exec "$CARGO_TARGET_DIR/release/memsync" demo "$@"
