#!/usr/bin/env bash
# Write benchmark for the mount, against the same work on local disk, in one run:
#   1. dd bs=1M of 2 GiB into a new file, close included
#   2. untar of 20k files of 4 KiB
#   3. commit of those 20k staged files through the control file
#   3b. untar again on a --writeback mount: until close returns, and until
#       every file is uploaded and staged
#   4. dedup: a second copy of the 2 GiB file adds no chunks; appending 1 MiB
#      uploads only the changed tail
# Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
bench_dirs write
trap bench_cleanup EXIT

chunks() { find "$WORK/lake/chunks" -type f | wc -l; }

"$T" init >/dev/null; "$T" repo create bench >/dev/null
start_mount "$WORK/mount.log" --cache-dir "$WORK/cache"
B=$MNT/bench/main
SRC=$WORK/src.bin
head -c $((2 << 30)) /dev/urandom >"$SRC"
SIZE=$(stat -c %s "$SRC")

echo "== 2 GiB dd" >&2
dd_local=(); dd_tarn=()
for i in 1 2 3; do
  sync; t0=$(now); dd if="$SRC" of="$WORK/local/copy$i.bin" bs=1M status=none; t1=$(now)
  dd_local+=("$(secs "$t0" "$t1")"); rm -f "$WORK/local/copy$i.bin"
  t0=$(now); dd if="$SRC" of="$B/copy$i.bin" bs=1M status=none; t1=$(now)
  dd_tarn+=("$(secs "$t0" "$t1")")
done

echo "== dedup" >&2
before=$(chunks)
cp "$SRC" "$B/again.bin"
after_copy=$(chunks)
head -c $((1 << 20)) /dev/urandom >>"$B/again.bin"
after_append=$(chunks)

echo "== untar 20k x 4 KiB" >&2
TREE=$WORK/tree
make_tree "$TREE" 20000 4096
tar -C "$TREE" -cf "$WORK/tree.tar" .
# Local trees are kept until the end: for a few minutes after many files are
# deleted, ext4's inode allocator skips their recently freed inodes one by
# one (`recently_deleted`, reading the inode table for each), and the same
# local untar takes 3-4 s of system time instead of 0.3 s. The deletes of an
# earlier run (or of anything else on the disk) still do that; hence the
# pairs below, and the ratio against the run's fastest local untar as well.
tar_local=(); tar_tarn=()
for i in 1 2 3; do
  mkdir -p "$WORK/local/t$i"
  sync; t0=$(now); tar -C "$WORK/local/t$i" -xf "$WORK/tree.tar"; sync; t1=$(now)
  tar_local+=("$(secs "$t0" "$t1")")
  mkdir "$B/t$i"
  t0=$(now); tar -C "$B/t$i" -xf "$WORK/tree.tar"; t1=$(now)
  tar_tarn+=("$(secs "$t0" "$t1")")
  if [ "$i" = 1 ]; then
    # The commit row: exactly one untar's 20k staged files.
    t0=$(now); echo 'commit -m "20k files"' >"$B/.tarn/ctl"; t1=$(now)
    ctl_commit=$(secs "$t0" "$t1")
  fi
done
echo 'commit -m "the other untars"' >"$B/.tarn/ctl"
staged_files=$("$T" ls -r bench/main --json | python3 -c 'import json,sys; print(sum(1 for e in json.load(sys.stdin) if e["kind"] == "file"))')

echo "== untar with --writeback" >&2
"$T" umount "$MNT"; wait "$PID" 2>/dev/null || true
start_mount "$WORK/mount-wb.log" --cache-dir "$WORK/cache-wb" --writeback
# Each --writeback untar is paired with a local untar (with sync) just before
# it: the same 20k local creates take 0.3 s or 4 s depending on what was
# deleted before (see above), so a baseline from another moment says little.
wb_tar=(); wb_up=(); wb_local=(); nosync_local=()
for i in 1 2 3 4 5; do
  mkdir -p "$WORK/local/w$i"
  sync; t0=$(now); tar -C "$WORK/local/w$i" -xf "$WORK/tree.tar"; sync; t1=$(now)
  wb_local+=("$(secs "$t0" "$t1")")
  # Context: the same untar on local disk without the sync (page cache only).
  mkdir -p "$WORK/local/n$i"
  sync; t0=$(now); tar -C "$WORK/local/n$i" -xf "$WORK/tree.tar"; t1=$(now)
  nosync_local+=("$(secs "$t0" "$t1")")
  # Written back before tarn's run, not during it (80 MB and 20k inodes).
  sync
  mkdir "$B/w$i"
  t0=$(now); tar -C "$B/w$i" -xf "$WORK/tree.tar"; t1=$(now)
  echo sync >"$B/.tarn/ctl"; t2=$(now)
  wb_tar+=("$(secs "$t0" "$t1")"); wb_up+=("$(secs "$t0" "$t2")")
done
# The daemon's memory with the five untars' 100k files staged, and after
# committing them through the control file (VmHWM is the peak).
rss_staged=$(rss VmRSS)
t0=$(now); echo 'commit -m "the --writeback untars"' >"$B/.tarn/ctl"; t1=$(now)
wb_commit=$(secs "$t0" "$t1")
rss_committed=$(rss VmRSS); rss_peak=$(rss VmHWM)

m_dd=$(median "${dd_tarn[@]}"); m_ddl=$(median "${dd_local[@]}")
m_tar=$(median "${tar_tarn[@]}"); m_tarl=$(median "${tar_local[@]}")
m_wb=$(median "${wb_tar[@]}"); m_wbup=$(median "${wb_up[@]}"); m_wbl=$(median "${wb_local[@]}")
fastest_local=$(printf '%s\n' "${tar_local[@]}" "${wb_local[@]}" | sort -g | head -1)
{
  echo
  echo "## write.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. Medians of 3; synchronous mode (close returns once the file is staged in the lake) unless the row says --writeback. Ratio = local time / tarn time."
  echo
  echo "| write | tarn | local disk | ratio | target |"
  echo "|---|---|---|---|---|"
  echo "| dd bs=1M, 2 GiB new file, close included | $(mbps "$m_dd" "$SIZE") MB/s | $(mbps "$m_ddl" "$SIZE") MB/s | $(ratio "$m_ddl" "$m_dd") | ≥ 0.4 |"
  echo "| untar 20k × 4 KiB (local: with sync) | ${m_tar} s | ${m_tarl} s | $(ratio "$m_tarl" "$m_tar") | ≥ 0.2 |"
  echo "| untar 20k × 4 KiB, --writeback (close returns once journaled; median of 5 pairs' ratios) | ${m_wb} s | ${m_wbl} s | $(pair_ratio "${wb_local[*]}" "${wb_tar[*]}") | ≥ 0.5 |"
  echo "| the same, until every file is staged in the lake (ctl sync) | ${m_wbup} s | ${m_wbl} s | $(ratio "$m_wbl" "$m_wbup") | — |"
  echo "| commit of one untar's 20k staged files through .tarn/ctl | ${ctl_commit} s | — | — | < 2 s |"
  echo
  echo "Against the fastest local untar + sync of this run (${fastest_local} s, the disk at its quietest), the synchronous untar is $(ratio "$fastest_local" "$m_tar")× and --writeback $(ratio "$fastest_local" "$m_wb")×."
  echo
  echo "Context: the same untar on local disk without \`sync\` (files in the page cache only) takes $(median "${nosync_local[@]}") s (median of 5); against that, --writeback is $(ratio "$(median "${nosync_local[@]}")" "$m_wb")×."
  echo
  echo "Each run, in order: untar tarn ${tar_tarn[*]} s, local ${tar_local[*]} s; --writeback tarn ${wb_tar[*]} s, local ${wb_local[*]} s (each local run just before its tarn run)."
  echo
  echo "Daemon memory (--writeback mount): ${rss_staged} MiB with the five untars' 100k files staged; committing them through .tarn/ctl took ${wb_commit} s, peaked at ${rss_peak} MiB and left ${rss_committed} MiB."
  echo
  echo "Dedup: chunks in the lake before a second copy of the 2 GiB file: $before, after: $after_copy (new: $((after_copy - before))); after appending 1 MiB to it: $after_append (new: $((after_append - after_copy))). Files in the commit: $staged_files."
} | tee -a docs/BENCHMARKS.md
