#!/usr/bin/env bash
# Files open for writing at once: N files created and held open together,
# each written (100 bytes), stat'ed and closed, on a --writeback mount and
# on local disk; and, while they are open, stats of 2000 other (closed)
# files whose cached entries have expired. No step's time per file should
# grow with N.
# Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=${TARN_BIN:-$PWD/target/release/tarn}
. scripts/bench/lib.sh
COUNTS=(100 1000 5000 15000)
need=$((COUNTS[-1] + 100))
if [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || { echo "many-open.sh needs $need open files (ulimit -n)" >&2; exit 1; }
fi
bench_dirs many-open
trap bench_cleanup EXIT

"$T" init >/dev/null; "$T" repo create bench >/dev/null
start_mount "$WORK/mount.log" --cache-dir "$WORK/cache" --writeback

# steps DIR N: µs per file of each step ("open write stat other close"), the
# caller pinned to CPU 0 (the mount's io_uring queue for it runs there too;
# unpinned, the caller moving between CPUs adds ~30 µs wakeups at random).
steps() {
  taskset -c 0 python3 - "$1" "$2" <<'PY'
import os, sys, time
d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d)
others = [f"{d}/other{i}" for i in range(2000)]
for p in others:
    with open(p, "wb") as f:
        f.write(b"y")
t = [time.perf_counter()]
fds = [os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY, 0o644) for i in range(n)]
t.append(time.perf_counter())
for fd in fds:
    os.write(fd, b"x" * 100)
t.append(time.perf_counter())
for i in range(n):
    os.stat(f"{d}/f{i}")
t.append(time.perf_counter())
time.sleep(1.2)  # the mount's metadata TTL (1 s) passes for `others`
t.append(time.perf_counter())
for p in others:
    os.stat(p)
t.append(time.perf_counter())
for fd in fds:
    os.close(fd)
t.append(time.perf_counter())
per = lambda i, k: f"{(t[i + 1] - t[i]) / k * 1e6:.1f}"
print(per(0, n), per(1, n), per(2, n), per(4, len(others)), per(5, n))
PY
}

rows=()
for n in "${COUNTS[@]}"; do
  echo "== $n open at once" >&2
  read -r o w s x c <<<"$(steps "$MNT/bench/main/n$n" "$n")"
  read -r lo lw ls lx lc <<<"$(steps "$WORK/local/n$n" "$n")"
  rows+=("| $n | $o / $lo | $w / $lw | $s / $ls | $x / $lx | $c / $lc |")
done
{
  echo
  echo "## many-open.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. A --writeback mount, the caller pinned to CPU 0; µs per file, tarn / local disk (Python's call overhead in both; one run each)."
  echo
  echo "| files open at once | create | write 100 B | stat | stat of another file (expired) | close |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee -a docs/BENCHMARKS.md
