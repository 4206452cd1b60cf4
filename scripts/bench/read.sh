#!/usr/bin/env bash
# Read benchmark for the mount, against the same bytes on local disk, in one run:
#   1. a 2 GiB file on a pinned commit, `dd bs=1M`: cold (empty chunk cache, caches
#      dropped), warm chunk cache (kernel caches dropped), re-read (kernel cache kept)
#   2. 20k files of 16 KiB, warm chunk cache, kernel caches dropped: find | xargs cat
#   3. fio 4 KiB random reads on the warm 2 GiB file
#   4. daemon peak RSS while listing and reading a repo of N files (default 1M)
# Needs root (drop_caches) and fio. Appends a table to docs/BENCHMARKS.md.
#   scripts/bench/read.sh [--files N]
set -euo pipefail
cd "$(dirname "$0")/../.."
FILES=1000000
[ "${1:-}" = "--files" ] && FILES=$2
command -v fio >/dev/null || { apt-get install -y -qq fio >/dev/null; }
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
WORK=$(mktemp -d /tmp/tarn-bench-read.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
PID=
cleanup() { fusermount3 -uz "$MNT" 2>/dev/null || true; [ -n "$PID" ] && kill "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT
export TARN_LAKE=file://$WORK/lake

# dd_time FILE: seconds to read FILE with dd bs=1M
dd_time() { local t0 t1; t0=$(now); dd if="$1" of=/dev/null bs=1M status=none; t1=$(now); secs "$t0" "$t1"; }

mount_pinned() { # REF [extra args]
  local ref=$1; shift
  start_mount "$WORK/mount.log" --ref "$ref" --cache-dir "$WORK/cache" "$@"
}
unmount() { "$T" umount "$MNT"; wait "$PID" 2>/dev/null || true; PID=; }

echo "== preparing data" >&2
"$T" init >/dev/null; "$T" repo create bench >/dev/null
BIG=$WORK/big.bin
head -c $((2 << 30)) /dev/urandom >"$BIG"
"$T" put "$BIG" bench/main/big.bin >/dev/null
SMALL=$WORK/small
python3 - "$SMALL" <<'PY'
import os, sys
root = sys.argv[1]
for i in range(20000):
    d = f"{root}/d{i // 1000:02d}"
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i:05d}", "wb") as f:
        f.write(os.urandom(16384))
PY
"$T" put "$SMALL" bench/main/small >/dev/null
"$T" commit bench/main -m data >/dev/null
"$T" tag create bench/v1 main >/dev/null
SIZE=$(stat -c %s "$BIG")

echo "== 2 GiB sequential" >&2
# Each tarn read is paired with a local read beside it (before it in odd
# rounds, after it in even ones), so both see the disk in the same state: on
# a VM disk, reads right after gigabytes of writes (each cold run writes the
# cache's copy) can run at half speed for a while. The ratio is the median
# of the pairs' ratios.
tarn_cold() {
  rm -rf "$WORK/cache"; drop
  mount_pinned bench/v1
  cold+=("$(dd_time "$MNT/big.bin")")
  unmount
}
base_cold=(); cold=()
for i in 1 2 3 4 5; do
  [ $((i % 2)) = 0 ] && tarn_cold
  drop; base_cold+=("$(dd_time "$BIG")")
  [ $((i % 2)) = 1 ] && tarn_cold
done
mount_pinned bench/v1
dd if="$MNT/big.bin" of=/dev/null bs=1M status=none
# The warm read is a read of the cache's copy of the file, which sits where
# ext4 put the cache's files/ directory. Regions of this VM's disk read at
# different speeds (by hand, a `cp` of big.bin into the cache's directory
# read in 1.7-2.3 s while big.bin read in 1.2-2.2 s), so the warm row's
# baseline is a plain local copy of the same bytes written beside the cache
# copy; big.bin's own times are recorded too.
NEAR=$WORK/cache/files/baseline.bin   # after the mount indexed the cache
cp "$BIG" "$NEAR"; sync
base_warm=(); warm=(); far_warm=()
for i in 1 2 3 4 5; do
  [ $((i % 2)) = 0 ] && { drop; warm+=("$(dd_time "$MNT/big.bin")"); }
  drop; base_warm+=("$(dd_time "$NEAR")")
  [ $((i % 2)) = 1 ] && { drop; warm+=("$(dd_time "$MNT/big.bin")"); }
  drop; far_warm+=("$(dd_time "$BIG")")
done
dd if="$MNT/big.bin" of=/dev/null bs=1M status=none
hot=(); for i in 1 2 3; do hot+=("$(dd_time "$MNT/big.bin")"); done
base_hot=(); dd if="$BIG" of=/dev/null bs=1M status=none; for i in 1 2 3; do base_hot+=("$(dd_time "$BIG")"); done
echo "cold: tarn ${cold[*]} s, local ${base_cold[*]} s; warm chunk cache: tarn ${warm[*]} s, local ${base_warm[*]} s" >&2
echo "kernel cache kept: tarn ${hot[*]} s, local ${base_hot[*]} s" >&2
echo "== fio 4k random reads" >&2
cat "$BIG" "$MNT/big.bin" >/dev/null   # both files warm in the page cache: compare like with like
fio_iops() { fio --name=r --filename="$1" --rw=randread --bs=4k --size="$SIZE" --runtime=10 --time_based \
  --ioengine=psync --numjobs=2 --group_reporting --invalidate=0 --output-format=json 2>/dev/null |
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))'; }
fio_tarn=$(fio_iops "$MNT/big.bin")
fio_base=$(fio_iops "$BIG")
echo "fio IOPS: tarn $fio_tarn, local $fio_base" >&2

echo "== 20k x 16 KiB" >&2
find "$MNT/small" -type f -print0 | xargs -0 cat >/dev/null   # warm the chunk cache
small_t=(); for i in 1 2 3; do drop; t0=$(now); find "$MNT/small" -type f -print0 | xargs -0 cat >/dev/null; t1=$(now); small_t+=("$(secs "$t0" "$t1")"); done
small_b=(); for i in 1 2 3; do drop; t0=$(now); find "$SMALL" -type f -print0 | xargs -0 cat >/dev/null; t1=$(now); small_b+=("$(secs "$t0" "$t1")"); done
unmount
echo "20k x 16 KiB: tarn ${small_t[*]} s; local ${small_b[*]} s" >&2

rm -f "$NEAR"   # not earlier: deleting 2 GiB has the disk trim it (mounted with discard)
echo "== RSS with $FILES files" >&2
MANY=$WORK/many
make_tree "$MANY" "$FILES"
"$T" repo create many >/dev/null
"$T" put "$MANY" many/main/data >/dev/null
"$T" commit many/main -m many >/dev/null
rm -rf "$MANY"
mount_pinned many/main
t0=$(now)
# head closes the pipe early: that SIGPIPE is expected, not a failure.
{ find "$MNT/data" -type f | head -n 200000 | xargs cat >/dev/null; } || true
ls -lR "$MNT/data" >/dev/null
t1=$(now)
rss_kb=$(awk '/VmHWM/ {print $2}' "/proc/$PID/status")
unmount

m_cold=$(median "${cold[@]}"); m_bcold=$(median "${base_cold[@]}"); m_bwarm=$(median "${base_warm[@]}")
m_warm=$(median "${warm[@]}"); m_hot=$(median "${hot[@]}"); m_bhot=$(median "${base_hot[@]}")
m_small=$(median "${small_t[@]}"); m_bsmall=$(median "${small_b[@]}")
{
  echo
  echo "## read.sh — $(machine)"
  echo
  echo "Medians of 5 (cold, warm) or 3 (the rest). Ratio = local-disk time / tarn time (higher is better; 1.0 = native); for cold and warm, the median of five side-by-side pairs' ratios."
  echo
  echo "| read | tarn | local disk | ratio | target |"
  echo "|---|---|---|---|---|"
  echo "| 2 GiB cold (empty chunk cache, caches dropped) vs local cold | $(mbps "$m_cold" "$SIZE") MB/s | $(mbps "$m_bcold" "$SIZE") MB/s | $(pair_ratio "${base_cold[*]}" "${cold[*]}") | ≥ 0.6 |"
  echo "| 2 GiB warm chunk cache, kernel caches dropped, vs local cold (a copy beside the cache's) | $(mbps "$m_warm" "$SIZE") MB/s | $(mbps "$m_bwarm" "$SIZE") MB/s | $(pair_ratio "${base_warm[*]}" "${warm[*]}") | ≥ 0.8 |"
  echo "| 2 GiB re-read, kernel cache kept, vs local page cache | $(mbps "$m_hot" "$SIZE") MB/s | $(mbps "$m_bhot" "$SIZE") MB/s | $(ratio "$m_bhot" "$m_hot") | ≥ 0.9 |"
  echo "| 20k × 16 KiB, find \| xargs cat, warm chunk cache, caches dropped | ${m_small} s | ${m_bsmall} s | $(ratio "$m_bsmall" "$m_small") | ≥ 0.5 |"
  echo "| fio 4 KiB random read, 2 jobs, both files in the page cache | ${fio_tarn} IOPS | ${fio_base} IOPS | $(ratio "$fio_tarn" "$fio_base") | ≥ 0.5 |"
  echo "| daemon peak RSS listing + reading $FILES files | $((rss_kb / 1024)) MiB | — | — | < 500 MiB |"
  echo
  echo "(Each run, in order: cold tarn ${cold[*]} s, local ${base_cold[*]} s; warm tarn ${warm[*]} s, local copy beside the cache's ${base_warm[*]} s, big.bin ${far_warm[*]} s — pairs alternate which goes first.)"
  echo
  echo "(RSS run: \`ls -lR\` of all $FILES files plus \`cat\` of 200k of them took $(secs "$t0" "$t1") s.)"
} | tee -a docs/BENCHMARKS.md
