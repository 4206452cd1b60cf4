#!/usr/bin/env bash
# Rewriting files a mount already holds, on a --writeback mount, against the
# same work on local disk (each with sync), in one run:
#   1. untar of 20k files of 4 KiB into an empty directory
#   2. the same untar again over them (GNU tar unlinks each file it finds,
#      then creates it anew)
#   3. rsync-style: each file written to a temporary name, then renamed
#      over the file (rounds 2 and 3 are repeated; medians of 3)
#   4. `ls -lR` of the tree, caches dropped (every file looked up again)
# Then the daemon's memory, and the inodes it holds before and after the
# kernel lets go of its own (drop_caches; root only).
# Appends a table to docs/BENCHMARKS.md. TARN_BIN: another build to time.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=${TARN_BIN:-$PWD/target/release/tarn}
. scripts/bench/lib.sh
bench_dirs rewrite
trap bench_cleanup EXIT

TAR=$WORK/tree.tar
make_tree "$WORK/src" 20000 4096
tar -cf "$TAR" -C "$WORK/src" .
rm -rf "$WORK/src"

# rsync_like DIR: every file below DIR written to a temporary name beside
# it, then renamed over it
rsync_like() {
  python3 - "$1" <<'PY'
import os, sys
root = sys.argv[1]
for d in sorted(os.listdir(root)):
    for f in sorted(os.listdir(f"{root}/{d}")):
        tmp = f"{root}/{d}/.{f}.tmp"
        with open(tmp, "wb") as o:
            o.write(os.urandom(4096))
        os.rename(tmp, f"{root}/{d}/{f}")
PY
}
lsr() { ls -lR "$1" >/dev/null; }
inodes() { python3 -c "import json,sys; print(json.load(open(sys.argv[1])).get('inodes', '-'))" "$B/.tarn/info"; }

"$T" init >/dev/null; "$T" repo create bench >/dev/null
start_mount "$WORK/mount.log" --writeback --cache-dir "$WORK/cache"
B=$MNT/bench/main
L=$WORK/local
mkdir -p "$B/t" "$L/t"

echo "== untar, untar over it, rsync-style" >&2
first_l=$(timed synced tar -xf "$TAR" -C "$L/t")
first_t=$(timed tar -xf "$TAR" -C "$B/t")
over_l=(); over_t=(); rs_l=(); rs_t=()
for _ in 1 2 3; do
  over_l+=("$(timed synced tar -xf "$TAR" -C "$L/t")")
  over_t+=("$(timed tar -xf "$TAR" -C "$B/t")")
  rs_l+=("$(timed synced rsync_like "$L/t")")
  rs_t+=("$(timed rsync_like "$B/t")")
done
echo "untar: tarn $first_t local $first_l; over: tarn ${over_t[*]} local ${over_l[*]}; rsync-like: tarn ${rs_t[*]} local ${rs_l[*]}" >&2

echo "== ls -lR" >&2
ls_l=(); ls_t=()
for _ in 1 2 3; do
  drop; ls_l+=("$(timed lsr "$L/t")")
  drop; ls_t+=("$(timed lsr "$B/t")")
done

held=$(inodes); rss_now=$(rss VmRSS); rss_peak=$(rss VmHWM)
held_after=-
if [ "$(id -u)" = 0 ]; then
  sync; echo 2 >/proc/sys/vm/drop_caches
  sleep 1
  held_after=$(inodes)
fi

m_ot=$(median "${over_t[@]}"); m_ol=$(median "${over_l[@]}")
m_rt=$(median "${rs_t[@]}"); m_rl=$(median "${rs_l[@]}")
m_lt=$(median "${ls_t[@]}"); m_ll=$(median "${ls_l[@]}")
{
  echo
  echo "## rewrite.sh — $(machine)"
  echo
  echo "Run ${FS_NOTE}. A --writeback mount; local runs end with \`sync\`. Medians of 3 where repeated. Ratio = local time / tarn time.${TARN_BIN:+ Build: $T.}"
  echo
  echo "| 20k files of 4 KiB | tarn | local disk | ratio |"
  echo "|---|---|---|---|"
  echo "| untar into an empty directory | ${first_t} s | ${first_l} s | $(ratio "$first_l" "$first_t") |"
  echo "| untar again over them (tar unlinks each, then creates it) | ${m_ot} s | ${m_ol} s | $(ratio "$m_ol" "$m_ot") |"
  echo "| rsync-style: each written to a temporary name, renamed over it | ${m_rt} s | ${m_rl} s | $(ratio "$m_rl" "$m_rt") |"
  echo "| \`ls -lR\` (kernel caches dropped first) | ${m_lt} s | ${m_ll} s | $(ratio "$m_ll" "$m_lt") |"
  echo
  echo "Each run, in order: untar over tarn ${over_t[*]} s, local ${over_l[*]} s; rsync-style tarn ${rs_t[*]} s, local ${rs_l[*]} s; ls -lR tarn ${ls_t[*]} s, local ${ls_l[*]} s."
  echo
  echo "Daemon after 140k file writes on 20k paths: ${rss_now} MiB (peak ${rss_peak} MiB); inodes held ${held}, after the kernel dropped its own ${held_after}."
} | tee -a docs/BENCHMARKS.md
