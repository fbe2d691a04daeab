#!/usr/bin/env python3
"""What fresh memory costs this machine now (issue 14, docs/perf.md "Why the FUSE subject varied")

Writes 1 GiB of random bytes into a new file (pwrite, pieces of SIZE) and prints the seconds
per GiB, then deletes the file. Each write follows PAUSE seconds of idle (0 = right after the
previous file was deleted), so that memory the guest freed has had time to be handed back to
the host (virtio-balloon free page reporting, blocks of 2^page_reporting_order pages): a write
that lands on such memory waits for the host to back it again. Cases alternate, ROUNDS times:
  ext4  DIR/fresh-memory (the page cache of a disk file: ext4 allocates folios as large as the
        piece written, up to 2 MiB)
  tmpfs /dev/shm/fresh-memory (shmem pages, one 4 KiB page at a time unless huge= is set)
Nothing is fsynced: only the allocation and the copy are timed. The bytes are read back and
compared (their BLAKE2b) after each untimed.
Usage: python3 scripts/experiments/fresh_memory.py [DIR] [ROUNDS] [PAUSE]
  (DIR defaults to /var/tmp, ROUNDS to 3, PAUSE to 5)
"""
import hashlib, os, statistics, sys, time

G, M = 1 << 30, 1 << 20
SIZES = [64 << 10, 256 << 10, 512 << 10, M]
data = os.urandom(M)
want = hashlib.blake2b(data).digest()


def write(path, piece):
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    mv = memoryview(data)
    try:
        t = time.perf_counter()
        for off in range(0, G, M):
            for j in range(0, M, piece):
                os.pwrite(fd, mv[j : j + piece], off + j)
        return time.perf_counter() - t
    finally:
        os.close(fd)


def check(path):
    with open(path, "rb") as f:
        for off in range(0, G, M):
            if hashlib.blake2b(f.read(M)).digest() != want:
                raise SystemExit(f"{path}: wrong bytes at {off}")


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "/var/tmp"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 5
    cases = [("ext4", os.path.join(d, "fresh-memory"), p) for p in SIZES]
    cases.append(("tmpfs", "/dev/shm/fresh-memory", M))
    got = {c: [] for c in cases}
    for _ in range(rounds):
        for c in cases:
            time.sleep(pause)
            _, path, piece = c
            try:
                got[c].append(write(path, piece))
                check(path)
            finally:
                os.unlink(path)
    try:
        order = open("/sys/module/page_reporting/parameters/page_reporting_order").read().strip()
    except OSError:
        order = "none (no free page reporting)"
    print(f"pause {pause} s, {rounds} rounds, page_reporting_order {order}")
    for (name, _, piece), v in got.items():
        print(
            f"{name:5} pieces of {piece >> 10:5} KiB: {statistics.median(v):.3f} s per GiB"
            f" (min {min(v):.3f}, max {max(v):.3f})"
        )


main()
