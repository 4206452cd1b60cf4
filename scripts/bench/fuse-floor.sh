#!/usr/bin/env bash
# How fast can any FUSE daemon untar 20k files of 4 KiB on this machine?
# The --writeback untar row of write.sh asks for >= 0.5x local untar + sync.
# This measures, with tar and the mount's queue on one CPU (taskset -c 0;
# the per-CPU io_uring queue serves the caller's CPU):
#   - the FUSE requests one untar sends, by kind (perf, tracepoint
#     fuse:fuse_request_send);
#   - the round trip of the cheapest request (fchown of an open file, a
#     SETATTR the daemon answers at once) against the same call on tmpfs;
#   - the untar on tmpfs (tar's own work, a file system with no disk);
#   - the untar on local disk with sync, and on a --writeback tarn mount.
# floor = tmpfs untar + requests x (round trip - tmpfs call): the untar of a
# daemon that does no work at all. Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
command -v perf >/dev/null || { echo "fuse-floor.sh needs perf (linux-perf) to count FUSE requests" >&2; exit 1; }
bench_dirs floor
SHM=$(mktemp -d /dev/shm/tarn-floor.XXXXXX)
trap 'bench_cleanup; rm -rf "$SHM"' EXIT
PIN=(taskset -c 0)

"$T" init >/dev/null; "$T" repo create bench >/dev/null
start_mount "$WORK/mount.log" --cache-dir "$WORK/cache" --writeback
B=$MNT/bench/main

make_tree "$WORK/tree" 20000 4096
tar -C "$WORK/tree" -cf "$WORK/tree.tar" .
FILES=20000

# round_trip FILE: microseconds per fchown of FILE, open (Python's call
# overhead included; it cancels out in the difference).
round_trip() {
  "${PIN[@]}" python3 - "$1" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
n = 200000
t0 = time.perf_counter()
for _ in range(n):
    os.fchown(fd, 0, 0)
t1 = time.perf_counter()
os.close(fd)
print(f"{(t1 - t0) / n * 1e6:.2f}")
PY
}

echo "== requests of one untar" >&2
mkdir "$B/counted"
perf record -q -e fuse:fuse_request_send -a -o "$WORK/requests.data" 2>/dev/null &
REC=$!
sleep 0.5
"${PIN[@]}" tar -C "$B/counted" -xf "$WORK/tree.tar"
kill -INT "$REC"; wait "$REC" 2>/dev/null || true
kinds=$(perf script -i "$WORK/requests.data" 2>/dev/null | grep -o '(FUSE_[A-Z_]*)' | tr -d '()' | sort | uniq -c | sort -rn)
requests=$(echo "$kinds" | awk '{n += $1} END {print n}')
kinds_line=$(echo "$kinds" | awk '{printf "%s%s %s", sep, $2, $1; sep=", "}')

echo "== round trips" >&2
rt_tarn=(); rt_tmpfs=()
for _ in 1 2 3; do
  rt_tarn+=("$(round_trip "$B/rt")")
  rt_tmpfs+=("$(round_trip "$SHM/rt")")
done

echo "== untars" >&2
shm_tar=(); local_tar=(); tarn_tar=()
for i in 1 2 3 4 5; do
  mkdir "$SHM/t$i"
  t0=$(now); "${PIN[@]}" tar -C "$SHM/t$i" -xf "$WORK/tree.tar"; t1=$(now)
  shm_tar+=("$(secs "$t0" "$t1")"); rm -rf "$SHM/t$i"
  mkdir -p "$WORK/local/t$i"
  sync; t0=$(now); "${PIN[@]}" tar -C "$WORK/local/t$i" -xf "$WORK/tree.tar"; sync; t1=$(now)
  local_tar+=("$(secs "$t0" "$t1")")
  mkdir "$B/t$i"
  t0=$(now); "${PIN[@]}" tar -C "$B/t$i" -xf "$WORK/tree.tar"; t1=$(now)
  tarn_tar+=("$(secs "$t0" "$t1")")
done

m_rt=$(median "${rt_tarn[@]}"); m_rt0=$(median "${rt_tmpfs[@]}")
m_shm=$(median "${shm_tar[@]}"); m_local=$(median "${local_tar[@]}"); m_tarn=$(median "${tarn_tar[@]}")
floor=$(awk -v s="$m_shm" -v n="$requests" -v a="$m_rt" -v b="$m_rt0" 'BEGIN {printf "%.3f", s + n * (a - b) / 1e6}')
per_file=$(awk -v n="$requests" -v f="$FILES" 'BEGIN {printf "%.2f", n / f}')
{
  echo
  echo "## fuse-floor.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. Every tar and call pinned to CPU 0; a --writeback mount. Medians of 5 untars (3 round-trip runs of 200k calls)."
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| FUSE requests of one untar of $FILES files | $requests ($per_file per file: $kinds_line) |"
  echo "| round trip of a request answered at once (fchown of an open file) | ${m_rt} µs (tmpfs: ${m_rt0} µs) |"
  echo "| untar on tmpfs (tar's own work) | ${m_shm} s |"
  echo "| floor: tmpfs untar + requests × (round trip − tmpfs call) | ${floor} s |"
  echo "| untar on local disk + sync | ${m_local} s |"
  echo "| best ratio any daemon could reach (local / floor) | $(ratio "$m_local" "$floor") |"
  echo "| untar on the tarn mount (--writeback) | ${m_tarn} s ($(ratio "$m_local" "$m_tarn")×) |"
  echo
  echo "Each run, in order: tmpfs ${shm_tar[*]} s; local ${local_tar[*]} s; tarn ${tarn_tar[*]} s; round trips tarn ${rt_tarn[*]} µs, tmpfs ${rt_tmpfs[*]} µs."
} | tee -a docs/BENCHMARKS.md
