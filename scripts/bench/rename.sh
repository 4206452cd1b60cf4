#!/usr/bin/env bash
# Renames and unlinks on a branch whose files the kernel has looked up: N
# files (default 200k) committed, all listed through the mount, then 500
# files renamed and unlinked one by one, against the same on local disk;
# and a directory of 1000 files renamed. The time per rename or unlink
# should not grow with N. Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=${TARN_BIN:-$PWD/target/release/tarn}
. scripts/bench/lib.sh
COUNTS=(${TARN_BENCH_COUNTS:-20000 200000})
bench_dirs rename
trap bench_cleanup EXIT

# ops DIR: "rename unlink dir-rename" in ms (500 files made in DIR/x,
# each renamed then unlinked; 1000 files in DIR/y, then DIR/y renamed)
ops() {
  taskset -c 0 python3 - "$1" <<'PY'
import os, sys, time
d = sys.argv[1]
os.makedirs(f"{d}/x")
os.makedirs(f"{d}/y")
for i in range(500):
    with open(f"{d}/x/g{i}", "w") as f:
        f.write(str(i))
for i in range(1000):
    with open(f"{d}/y/f{i}", "w") as f:
        f.write(str(i))
t0 = time.perf_counter()
for i in range(500):
    os.rename(f"{d}/x/g{i}", f"{d}/x/h{i}")
t1 = time.perf_counter()
for i in range(500):
    os.unlink(f"{d}/x/h{i}")
t2 = time.perf_counter()
os.rename(f"{d}/y", f"{d}/z")
t3 = time.perf_counter()
print(f"{(t1 - t0) / 500 * 1e3:.3f} {(t2 - t1) / 500 * 1e3:.3f} {(t3 - t2) * 1e3:.2f}")
PY
}

"$T" init >/dev/null
rows=()
for n in "${COUNTS[@]}"; do
  echo "== $n files looked up" >&2
  repo=r$n
  make_tree "$WORK/src$n" "$n"
  "$T" repo create "$repo" >/dev/null
  "$T" put "$WORK/src$n" "$repo/main/data" >/dev/null
  "$T" commit "$repo/main" -m "$n files" >/dev/null
  rm -rf "$WORK/src$n"
  start_mount "$WORK/mount$n.log" --cache-dir "$WORK/cache$n"
  B=$MNT/$repo/main
  listed=$(find "$B/data" -type f | wc -l)
  read -r r u d <<<"$(ops "$B/ops")"
  rss=$(awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$PID/status")
  "$T" umount "$MNT"; wait "$PID" 2>/dev/null || true; PID=
  read -r lr lu ld <<<"$(ops "$WORK/local/ops$n")"
  rows+=("| $listed | $r / $lr | $u / $lu | $d / $ld | $rss MiB |")
done
{
  echo
  echo "## rename.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. A branch of N committed files, all listed through the mount (\`find\`), then files made in a new directory and renamed, unlinked; the caller pinned to CPU 0. tarn / local disk, ms per operation (Python's call overhead in both)."
  echo
  echo "| files looked up | rename a file | unlink a file | rename a directory of 1000 files | daemon RSS after |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee -a docs/BENCHMARKS.md
