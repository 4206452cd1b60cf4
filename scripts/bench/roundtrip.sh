#!/usr/bin/env bash
# Where the time of a small-file untar goes on a --writeback mount, against
# local disk in the same run:
#   - requests the kernel sends per file (fuse_request_send tracepoint);
#   - the cost of one request round trip (fchmod → SETATTR, the cheapest
#     request tar makes), caller pinned to one CPU, vs fchmod on local disk;
#   - untar of 20k × 4 KiB, caller pinned: elapsed, tar's CPU, and the CPU
#     of the daemon's queue threads split into user space (tarn's own work)
#     and kernel (the transport); elapsed minus the queue threads' user time
#     is what the untar would take if tarn's work cost nothing.
# Needs root (tracefs, mount) and the io_uring transport (Linux 6.14+).
# Runs on a freshly made file system when it can (see fresh_fs in lib.sh).
# Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
bench_dirs rt
TR=/sys/kernel/tracing
cleanup() {
  echo 0 >"$TR/events/fuse/fuse_request_send/enable" 2>/dev/null || true
  bench_cleanup
}
trap cleanup EXIT

for n in 20000 2000; do
  make_tree "$WORK/tree$n" "$n" 4096
  tar -C "$WORK/tree$n" -cf "$WORK/tree$n.tar" .
done

"$T" init >/dev/null; "$T" repo create bench >/dev/null
start_mount "$WORK/mount.log" --cache-dir "$WORK/cache" --writeback
B=$MNT/bench/main
for _ in $(seq 200); do ls /proc/$PID/task/*/comm >/dev/null 2>&1 && grep -qs tarn-uring /proc/$PID/task/*/comm && break; sleep 0.05; done
grep -qs tarn-uring /proc/$PID/task/*/comm || { echo "no io_uring queue threads: this kernel serves the mount through /dev/fuse" >&2; exit 1; }

# queue_cpu: user and system seconds of the daemon's io_uring queue threads
queue_cpu() {
  local tck u=0 s=0 t
  tck=$(getconf CLK_TCK)
  for t in /proc/$PID/task/*; do
    grep -qs '^tarn-uring' "$t/comm" || continue
    read -r -a f <"$t/stat"
    # fields 14 and 15 (utime, stime); comm has no spaces here
    u=$((u + f[13])); s=$((s + f[14]))
  done
  awk -v u="$u" -v s="$s" -v c="$tck" 'BEGIN {printf "%.3f %.3f", u / c, s / c}'
}

echo "== requests per file" >&2
mkdir "$B/count"
echo >"$TR/trace"
echo 1 >"$TR/events/fuse/fuse_request_send/enable"
taskset -c 0 tar -C "$B/count" -xf "$WORK/tree2000.tar"
echo 0 >"$TR/events/fuse/fuse_request_send/enable"
# Lines read "... fuse_request_send: connection C req R opcode N (FUSE_X) len L"
requests=$(grep 'fuse_request_send:' "$TR/trace" | grep -o '(FUSE_[A-Z_0-9]*)' | sort | uniq -c | sort -rn |
  awk '$1 >= 20 {gsub(/[()]|FUSE_/, "", $2); printf "%s%s %.2f", sep, $2, $1 / 2000; sep = ", "}')
per_file=$(grep -c 'fuse_request_send:' "$TR/trace" | awk '{printf "%.2f", $1 / 2000}')

echo "== round trip" >&2
cat >"$WORK/rt.py" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
n = 100000
t = time.perf_counter()
for i in range(n):
    os.fchmod(fd, 0o644 if i & 1 else 0o600)
print(f"{(time.perf_counter() - t) / n * 1e6:.2f}")
PY
rt_tarn=$(taskset -c 0 python3 "$WORK/rt.py" "$B/rt")
rt_local=$(taskset -c 0 python3 "$WORK/rt.py" "$WORK/local/rt")

echo "== untar 20k x 4 KiB, pinned" >&2
el=(); tar_cpu=(); q_user=(); q_sys=(); local_t=()
for i in 1 2 3; do
  mkdir -p "$WORK/local/t$i"
  sync; t0=$(now); taskset -c 0 tar -C "$WORK/local/t$i" -xf "$WORK/tree20000.tar"; sync; t1=$(now)
  local_t+=("$(secs "$t0" "$t1")")
  mkdir "$B/t$i"
  read -r u0 s0 <<<"$(queue_cpu)"
  t0=$(now)
  tc=$( { /usr/bin/time -f "%U %S" taskset -c 0 tar -C "$B/t$i" -xf "$WORK/tree20000.tar"; } 2>&1 | tail -1)
  t1=$(now)
  read -r u1 s1 <<<"$(queue_cpu)"
  el+=("$(secs "$t0" "$t1")")
  tar_cpu+=("$(awk -v a="$tc" 'BEGIN {split(a, x, " "); printf "%.2f", x[1] + x[2]}')")
  q_user+=("$(awk -v a="$u0" -v b="$u1" 'BEGIN {printf "%.2f", b - a}')")
  q_sys+=("$(awk -v a="$s0" -v b="$s1" 'BEGIN {printf "%.2f", b - a}')")
done
m_el=$(median "${el[@]}"); m_qu=$(median "${q_user[@]}"); m_qs=$(median "${q_sys[@]}")
m_tar=$(median "${tar_cpu[@]}"); m_local=$(median "${local_t[@]}")
fastest_local=$(printf '%s\n' "${local_t[@]}" | sort -g | head -1)
floor=$(awk -v e="$m_el" -v u="$m_qu" 'BEGIN {printf "%.2f", e - u}')
{
  echo
  echo "## roundtrip.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. A --writeback mount, io_uring transport; callers pinned to CPU 0 (their requests are served on that CPU's queue). Medians of 3."
  echo
  echo "| measure | value |"
  echo "|---|---|"
  echo "| requests per file of a 4 KiB untar | ${per_file} (${requests}) |"
  echo "| one fchmod: on the mount / on local disk | ${rt_tarn} µs / ${rt_local} µs |"
  echo "| untar 20k × 4 KiB on the mount | ${m_el} s (runs: ${el[*]}) |"
  echo "| — tar's own CPU (user + system) | ${m_tar} s |"
  echo "| — the queue threads in the kernel (transport) / in user space (tarn's work) | ${m_qs} s / ${m_qu} s |"
  echo "| the untar less tarn's work (every request answered at no cost) | ${floor} s |"
  echo "| local untar + sync (runs: ${local_t[*]}) | median ${m_local} s, fastest ${fastest_local} s |"
  echo "| ratio local / tarn: as measured; with tarn's work at no cost (fastest local) | $(ratio "$fastest_local" "$m_el")×; $(ratio "$fastest_local" "$floor")× |"
} | tee -a docs/BENCHMARKS.md
