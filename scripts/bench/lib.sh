# Helpers shared by the benchmark scripts (sourced, not run).

now() { date +%s.%N; }
# secs T0 T1: seconds between two `now` readings
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", b - a}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v x="$1" -v y="$2" 'BEGIN {printf "%.2f", x / y}'; }
# pair_ratio "B1 B2 ..." "T1 T2 ...": the median of Bi / Ti over paired runs
# (baseline time / tarn time of runs made side by side)
pair_ratio() {
  local b=($1) t=($2) r=() i
  for i in "${!b[@]}"; do r+=("$(awk -v x="${b[$i]}" -v y="${t[$i]}" 'BEGIN {printf "%.4f", x / y}')"); done
  printf '%.2f' "$(median "${r[@]}")"
}
# mbps SECONDS BYTES
mbps() { awk -v s="$1" -v b="$2" 'BEGIN {printf "%.0f", b / s / 1e6}'; }
# timed CMD...: seconds CMD takes
timed() { local t0 t1; t0=$(now); "$@"; t1=$(now); secs "$t0" "$t1"; }
# synced CMD...: CMD, then sync (for timing local-disk baselines)
synced() { "$@"; sync; }
# rss FIELD: the mount daemon's VmRSS or VmHWM, in MiB
rss() { awk -v k="$1:" '$1 == k {print int($2 / 1024)}' "/proc/$PID/status"; }
# drop: write back and drop the page, dentry and inode caches (root)
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
ms() { awk -v s="$1" 'BEGIN {printf "%.1f", s*1000}'; }
# machine: the description every recorded table starts with
machine() { echo "$(date -u +%Y-%m-%d) — $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, kernel $(uname -r), local-dir lake on $(df -T /tmp | awk 'NR==2 {print $2}')"; }

make_tree() { # DIR N [BYTES]: N files in directories of 1000, each its
  # number as text, or BYTES random bytes
  python3 - "$1" "$2" "${3:-0}" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = f"{root}/d{i // 1000:04d}"
    if i % 1000 == 0:
        os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i % 1000:04d}.txt", "wb") as f:
        f.write(os.urandom(size) if size else f"{i}\n".encode())
PY
}

# fresh_fs DIR: when root, mount a new ext4 file system (a sparse image in
# /var/tmp) on DIR, so the local-disk baseline and tarn's lake and cache
# start with no history: for minutes after many files are deleted, ext4's
# inode allocator skips the recently freed inodes one by one, and the same
# 20k creates take 3-4 s instead of 0.3 s. Sets FS_NOTE (for the recorded
# table); `fresh_fs_done` unmounts it. TARN_BENCH_FS=tmp keeps /tmp's disk.
FRESH_IMG=
FS_NOTE="on the disk under /tmp"
fresh_fs() {
  [ "${TARN_BENCH_FS:-fresh}" = fresh ] && [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null || return 0
  FRESH_IMG=$(mktemp /var/tmp/tarn-bench-fs.XXXXXX)
  truncate -s 24G "$FRESH_IMG"
  if mkfs.ext4 -q -F "$FRESH_IMG" && mount -o loop "$FRESH_IMG" "$1"; then
    FS_NOTE="on a freshly made ext4 (loop device on the disk under /var/tmp), local baseline and lake alike"
  else
    rm -f "$FRESH_IMG"; FRESH_IMG=
  fi
}
fresh_fs_done() {
  [ -n "$FRESH_IMG" ] || return 0
  umount "$1" 2>/dev/null || umount -l "$1" 2>/dev/null || true
  rm -f "$FRESH_IMG"; FRESH_IMG=
}

# bench_dirs NAME: a work directory on a fresh file system when it can be
# had (see fresh_fs), with a mount point and a lake path; sets WORK, MNT,
# PID (the mount daemon, once started) and TARN_LAKE. bench_cleanup undoes
# it all, even after a failure.
bench_dirs() {
  WORK=$(mktemp -d "/tmp/tarn-bench-$1.XXXXXX")
  fresh_fs "$WORK"
  MNT=$WORK/mnt
  mkdir -p "$MNT" "$WORK/local"
  PID=
  export TARN_LAKE=file://$WORK/lake
}
# start_mount LOG [mount args...]: `tarn mount $MNT` in the background
# (its pid in PID, its output in LOG), once it is mounted.
start_mount() {
  local log=$1; shift
  "$T" mount "$MNT" "$@" >"$log" 2>&1 &
  PID=$!
  for _ in $(seq 200); do mountpoint -q "$MNT" && return 0; sleep 0.05; done
  echo "mount failed: $(tail -3 "$log")" >&2; exit 1
}
bench_cleanup() {
  fusermount3 -uz "$MNT" 2>/dev/null || true
  if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
  fresh_fs_done "$WORK"
  rm -rf "$WORK" 2>/dev/null || true
}
