#!/usr/bin/env python3
"""Where should a cache's socket read land? (issue 14, docs/perf.md "Landing the socket's bytes")

Moves 1 GiB over loopback TCP from a sender thread into a fresh file on /dev/shm (a cache's
local copy on tmpfs), three ways, alternated, and prints the receiver thread's CPU seconds and
the wall time per GiB (medians of ROUNDS):
  recv+pwrite    recv 1 MiB into a reused buffer, pwrite it into the file (what the cache does)
  recv-into-map  recv straight into a shared mapping of the file (the socket's bytes land in
                 the cache's pages: one copy fewer; MADV_POPULATE_WRITE first, per 1 MiB)
  splice         splice socket -> pipe -> file (no user-space copy at all)
Each received file is checked against the sent bytes (BLAKE2b of the 1 MiB pattern per MiB).
Usage: python3 scripts/experiments/landing.py [ROUNDS]
"""
import fcntl, hashlib, mmap, os, socket, statistics, sys, threading, time

G, C = 1 << 30, 1 << 20
F_SETPIPE_SZ = 1031
MADV_POPULATE_WRITE = 23
data = os.urandom(C)
want = hashlib.blake2b(data).digest()


def sender(port):
    s = socket.create_connection(("127.0.0.1", port))
    for _ in range(G // C):
        s.sendall(data)
    s.close()


def recv_exact(c, mv):
    n = 0
    while n < len(mv):
        k = c.recv_into(mv[n:])
        if k == 0:
            raise EOFError("sender closed early")
        n += k


def run(mode):
    l = socket.socket()
    l.bind(("127.0.0.1", 0))
    l.listen(1)
    th = threading.Thread(target=sender, args=(l.getsockname()[1],))
    th.start()
    c, _ = l.accept()
    fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR, 0o600)
    os.ftruncate(fd, G)
    t, ct = time.perf_counter(), time.thread_time()
    if mode == "recv+pwrite":
        mv = memoryview(bytearray(C))
        for off in range(0, G, C):
            recv_exact(c, mv)
            os.pwrite(fd, mv, off)
    elif mode == "recv-into-map":
        m = mmap.mmap(fd, G, mmap.MAP_SHARED)
        mv = memoryview(m)
        for off in range(0, G, C):
            m.madvise(MADV_POPULATE_WRITE, off, C)
            recv_exact(c, mv[off:off + C])
        mv.release()
        m.close()
    else:
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, C)
        off = 0
        while off < G:
            n = os.splice(c.fileno(), w, C)
            if n == 0:
                raise EOFError("sender closed early")
            m = 0
            while m < n:
                m += os.splice(r, fd, n - m, offset_dst=off + m)
            off += n
        os.close(r)
        os.close(w)
    wall, cpu = time.perf_counter() - t, time.thread_time() - ct
    th.join()
    c.close()
    l.close()
    for off in range(0, G, C):
        if hashlib.blake2b(os.pread(fd, C, off)).digest() != want:
            sys.exit(f"{mode}: wrong bytes at {off}")
    os.close(fd)
    return wall, cpu


rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
modes = ["recv+pwrite", "recv-into-map", "splice"]
res = {m: [] for m in modes}
for i in range(rounds):
    for k in range(len(modes)):
        m = modes[(i + k) % len(modes)]
        res[m].append(run(m))
for m in modes:
    w = statistics.median(x[0] for x in res[m])
    c = statistics.median(x[1] for x in res[m])
    print(f"{m:14} receiver CPU {c:.3f} s/GiB  wall {w:.3f} s/GiB ({1 / w * 1.074:.2f} GB/s)"
          f"  [CPU {min(x[1] for x in res[m]):.3f}-{max(x[1] for x in res[m]):.3f}]")
