#!/usr/bin/env bash
# Installs everything the build and the tests need. Idempotent: on a machine that has it all,
# it only checks and returns.
set -euo pipefail

apt_pkgs=()
need() { # need COMMAND PACKAGE
  command -v "$1" >/dev/null 2>&1 || apt_pkgs+=("$2")
}
need cc gcc
need git git
# The C library and kernel headers (gcc only recommends them, and --no-install-recommends skips
# recommendations): the memsync-sys test that checks the ioctl numbers against
# <linux/userfaultfd.h> needs them, and fails under CI without them.
printf '#include <stdio.h>\n#include <linux/userfaultfd.h>\n' | cc -E -x c - >/dev/null 2>&1 ||
  apt_pkgs+=(libc6-dev linux-libc-dev)
# Peers used by the tests (later issues add theirs here).
need qemu-img qemu-utils
# NBD peers (issue 4): nbdkit, libnbd tools, and the Python binding nbdsh runs on
# (Debian's /usr/bin/python3, which may differ from a python3 earlier on PATH).
need nbdkit nbdkit
need nbdinfo libnbd-bin
need nbdcopy libnbd-bin
/usr/bin/python3 -c 'import nbd' >/dev/null 2>&1 || apt_pkgs+=(python3-libnbd)
# Remote stores (issue 6): redis-server (single node and cluster), redis-cli, redis-benchmark.
need redis-server redis-server
need redis-cli redis-tools
need redis-benchmark redis-tools
# The third-party S3 client of the `stores` bench: boto3 for the python3 on PATH, from PyPI
# where that python3 has pip, else Debian's python3-boto3.
boto3_pip=false
if ! python3 -c 'import boto3' >/dev/null 2>&1; then
  if python3 -m pip --version >/dev/null 2>&1; then
    boto3_pip=true
  else
    apt_pkgs+=(python3-boto3)
  fi
fi
# Delta sync (issue 13): rsync is the peer of the `sync` bench; `ip` makes the network
# namespaces of the sync tests.
need rsync rsync
need ip iproute2

if ((${#apt_pkgs[@]})); then
  echo "setup: installing ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi

if $boto3_pip; then
  echo "setup: installing boto3"
  python3 -m pip install --quiet boto3 ||
    python3 -m pip install --quiet --break-system-packages boto3
fi

# The test runner.
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
# The S3-compatible server of the memsync-s3 tests and the `stores` bench: s3s-fs 0.14.1 (0.17
# needs a newer rustc). Built once (~2-3 min) into a cache outside the checkout, reused by later
# runs on the same machine. Garage (a real distributed store) takes 6+ min to build cold: too much
# for the CI budget.
tools=/var/tmp/memsync-tools
if [ ! -x "$tools/bin/s3s-fs" ]; then
  echo "setup: installing s3s-fs 0.14.1 into $tools"
  CARGO_TARGET_DIR="$tools/build" cargo install --locked s3s-fs@0.14.1 --features binary --root "$tools"
  rm -rf "$tools/build"
fi
# fmt and clippy ship with the toolchain here; add them if a machine lacks them.
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# The unprivileged-user tests run the test binaries as 'nobody'.
id nobody >/dev/null 2>&1 || useradd --system --no-create-home nobody
echo "setup: ok"
