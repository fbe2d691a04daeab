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
# Virtual machines (issue 15): qemu (TCG only here) boots stock Debian kernels; busybox-static is
# the guest's shell and tools and builds the initramfs (`busybox cpio`; the host has no cpio).
need qemu-system-x86_64 qemu-system-x86
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
  apt_pkgs+=(busybox-static)
# depmod writes the unpacked kernels' modules.dep (the packages' postinst would); xz unpacks
# the compressed modules of newer kernels.
need depmod kmod
need xz xz-utils
# mkfs.ext4 goes into the guests of the direct-mount test (its libraries come along).
need mkfs.ext4 e2fsprogs

if ((${#apt_pkgs[@]})); then
  echo "setup: installing ${apt_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}"
fi
# A machine may carry a newer qemu-utils (a backport) than the qemu-system-x86 apt offers: apt
# then removes qemu-utils to install qemu-system-x86, leaving no qemu-img. Install the
# qemu-utils of the same release.
if ! command -v qemu-img >/dev/null 2>&1; then
  echo "setup: installing qemu-utils (removed by the qemu-system-x86 install)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-utils
fi
for cmd in qemu-img qemu-io qemu-nbd qemu-system-x86_64; do
  command -v "$cmd" >/dev/null 2>&1 || { echo "setup: $cmd is missing after the install" >&2; exit 1; }
done

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
# The guest kernels of the VM tests (memsync_testkit::vm): Debian 12's 6.1 LTS (no UFFDIO_MOVE,
# UFFDIO_POISON, WP_ASYNC: the fallbacks) and the newer 6.12 that bookworm also ships. Each is
# downloaded (not installed) and unpacked into $tools/vm/RELEASE; $tools/vm/6.1 and
# $tools/vm/6.12 link to the newest release apt offers. Older releases are removed.
vm_kernel() { # vm_kernel META-PACKAGE SHORT-NAME
  local pkg rel dir
  pkg=$(apt-cache depends "$1" 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache depends "$1" | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')
  fi
  [ -n "$pkg" ] || { echo "setup: apt offers no $1" >&2; return 1; }
  rel=${pkg#linux-image-}
  dir="$tools/vm/$rel"
  if [ ! -f "$dir/lib/modules/$rel/modules.dep" ]; then
    echo "setup: unpacking kernel $pkg into $dir"
    local tmp
    tmp=$(mktemp -d "$tools/vm/.dl.XXXXXX")
    # As root, apt downloads as _apt, which cannot write into a mktemp directory.
    local get=(apt-get download -qq -o APT::Sandbox::User=root "$pkg")
    (cd "$tmp" && "${get[@]}") || { apt-get update -qq && (cd "$tmp" && "${get[@]}"); }
    rm -rf "$dir" "$dir.tmp"
    dpkg -x "$tmp"/*.deb "$dir.tmp"
    rm -rf "$tmp" "$dir.tmp/usr/share"
    depmod -b "$dir.tmp" "$rel"
    mv "$dir.tmp" "$dir"
  fi
  local old
  old=$(readlink "$tools/vm/$2" 2>/dev/null || true)
  ln -sfn "$rel" "$tools/vm/$2"
  if [ -n "$old" ] && [ "$old" != "$rel" ]; then rm -rf "${tools:?}/vm/$old"; fi
}
mkdir -p "$tools/vm"
vm_kernel linux-image-amd64 6.1
vm_kernel linux-image-6.12-amd64 6.12
# fmt and clippy ship with the toolchain here; add them if a machine lacks them.
cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
cargo clippy --version >/dev/null 2>&1 || rustup component add clippy

# The unprivileged-user tests run the test binaries as 'nobody'.
id nobody >/dev/null 2>&1 || useradd --system --no-create-home nobody
echo "setup: ok"
