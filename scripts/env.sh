# Sourced by the scripts: one cargo target directory outside the checkout, so CI runs and
# fresh clones reuse earlier builds on this machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/memsync-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
