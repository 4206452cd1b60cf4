#!/usr/bin/env bash
# Metadata benchmark: repos of N = 10k, 100k, 1M tiny files on a local-dir lake.
#   stage + commit of all N files (tarn put DIR, tarn commit)
#   branch create
#   commit of 100 changed files (put + commit)
#   log of 100 commits
#   diff of two commits differing in 100 files, merge of a branch with 100 changed files
# Baseline in the same run: `cp -r` of the same tree on local disk (the cost
# of touching every file once, for the stage+commit row).
#
#   scripts/bench/metadata.sh [N ...]      (default: 10000 100000 1000000)
# Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
SIZES=("$@"); [ ${#SIZES[@]} -gt 0 ] || SIZES=(10000 100000 1000000)
WORK=$(mktemp -d /tmp/tarn-bench-meta.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# time_cmd CMD...: seconds the command took (timed in-process, so the
# timer's own fork/exec is not counted; the command's is)
time_cmd() {
  python3 -c 'import subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL)
d = time.perf_counter() - t
print(d if r.returncode == 0 else "nan")' "$@"
}


make_changes() { # DIR N K SEED: K changed files spread over the N-file layout
  python3 - "$1" "$2" "$3" "$4" <<'PY'
import os, sys, random
root, n, k, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
random.seed(seed)
for i in random.sample(range(n), k):
    d = f"{root}/d{i // 1000:04d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/f{i % 1000:04d}.txt", "w") as f:
        f.write(f"changed {seed} {i}\n")
PY
}

ROWS=()
for N in "${SIZES[@]}"; do
  echo "== N = $N" >&2
  export TARN_LAKE=file://$WORK/lake-$N
  SRC=$WORK/src-$N
  make_tree "$SRC" "$N"
  sync
  base=$(time_cmd cp -r "$SRC" "$WORK/copy-$N"); rm -rf "$WORK/copy-$N"
  "$T" init >/dev/null; "$T" repo create m >/dev/null
  t0=$(now)
  "$T" put "$SRC" m/main/data >/dev/null
  "$T" commit m/main -m "all files" >/dev/null
  t1=$(now)
  full=$(awk -v a="$t0" -v b="$t1" 'BEGIN {print b-a}')
  rm -rf "$SRC"

  bc=(); for i in 1 2 3 4 5; do bc+=("$(time_cmd "$T" branch create "m/b$i" --from main)"); done

  c100=()
  for i in 1 2 3; do
    CH=$WORK/ch-$N-$i; make_changes "$CH" "$N" 100 "$i"
    a=$(time_cmd "$T" put "$CH" m/main/data); b=$(time_cmd "$T" commit m/main -m "100 changes $i")
    c100+=("$(awk -v a="$a" -v b="$b" 'BEGIN {print a+b}')"); rm -rf "$CH"
  done

  one=$WORK/one.txt
  for i in $(seq 100); do echo "$i" >"$one"; "$T" put "$one" m/main/log/one.txt >/dev/null; "$T" commit m/main -m "log $i" >/dev/null; done
  lg=(); for i in 1 2 3; do lg+=("$(time_cmd "$T" log m/main -n 100)"); done

  # diff of two commits 100 files apart; merge of a branch with 100 changed files
  df=(); for i in 1 2 3; do df+=("$(time_cmd "$T" diff m/main~100 m/main~101)"); done
  mg=()
  for i in 1 2 3; do
    "$T" branch create "m/feature$i" --from main >/dev/null
    CH=$WORK/mg-$N-$i; make_changes "$CH" "$N" 100 "$((i + 10))"
    "$T" put "$CH" "m/feature$i/data" >/dev/null; "$T" commit "m/feature$i" -m "feature $i" >/dev/null; rm -rf "$CH"
    echo "$i" >"$one"; "$T" put "$one" m/main/main-side.txt >/dev/null; "$T" commit m/main -m "main side $i" >/dev/null
    mg+=("$(time_cmd "$T" merge "m/feature$i" m/main -m "merge $i")")
  done

  ROWS+=("| $N | $(awk -v s="$full" 'BEGIN {printf "%.2f", s}') s | $(awk -v s="$base" 'BEGIN {printf "%.2f", s}') s | $(ms "$(median "${bc[@]}")") ms | $(ms "$(median "${c100[@]}")") ms | $(ms "$(median "${lg[@]}")") ms | $(ms "$(median "${df[@]}")") ms | $(ms "$(median "${mg[@]}")") ms |")
  echo "${ROWS[-1]}" >&2
  rm -rf "$WORK/lake-$N"
done

{
  echo
  echo "## metadata.sh — $(machine)"
  echo
  echo "Medians (stage+commit of all N: one run), each command timed as a whole process (startup included; \`tarn --version\` takes about 2.6 ms here). Baseline: \`cp -r\` of the same N-file tree on the same disk."
  echo
  echo "| N files | put + commit all | cp -r baseline | branch create | put + commit 100 changed | log -n 100 | diff (100 files) | merge (100 files) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee -a docs/BENCHMARKS.md
