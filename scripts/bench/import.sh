#!/usr/bin/env bash
# Import benchmark: zero-copy import of N objects by reference, and graft.
#   local: tarn import file://TREE r/main/data -m ... of an N-file tree
#          (listing, tree build, one staged op, commit), against `find -printf`
#          of the same tree (stat of every file: the floor any importer pays)
#   graft: tarn import tarn://r/main/data g/main/inputs (stage + commit), and
#          staging alone (--no-commit)
#   s3:    the same import of N_S3 objects from the loopback S3 server
#          (scripts/s3-server.sh), against a plain boto3 listing of the prefix
#
#   scripts/bench/import.sh [N] [N_S3]      (default: 1000000 100000; N_S3=0 skips S3)
# Appends a table to docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
N=${1:-1000000}
N_S3=${2:-100000}
WORK=$(mktemp -d /tmp/tarn-bench-import.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

echo "== building a tree of $N files" >&2
make_tree "$WORK/src" "$N"
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
export TARN_LAKE=file://$WORK/lake
"$T" init >/dev/null; "$T" repo create r >/dev/null; "$T" repo create g >/dev/null

# Baseline: stat every file once (warm dentry cache, as the import sees it after).
find "$WORK/src" -type f -printf '%s %T@ %m\n' >/dev/null
t0=$(now); find "$WORK/src" -type f -printf '%s %T@ %m %i\n' >/dev/null; t1=$(now)
find_s=$(secs "$t0" "$t1")
t0=$(now); "$T" import "file://$WORK/src/" r/main/data -m "import $N" >/dev/null; t1=$(now)
imp_s=$(secs "$t0" "$t1")
imp_rate=$(awk -v n="$N" -v s="$imp_s" 'BEGIN {printf "%.0f", n / s}')
echo "local import: $imp_s s ($imp_rate objects/s); find: $find_s s" >&2
[ "$("$T" cat r/main/data/d0000/f0007.txt)" = "7" ] || { echo "import reads wrong bytes" >&2; exit 1; }

gs=(); gc=()
for i in 1 2 3; do
  t0=$(now); "$T" import tarn://r/main/data "g/main/in$i" --no-commit >/dev/null; t1=$(now)
  gs+=("$(secs "$t0" "$t1")")
  "$T" reset g/main >/dev/null
  t0=$(now); "$T" import tarn://r/main/data "g/main/in$i" -m "graft $i" >/dev/null; t1=$(now)
  gc+=("$(secs "$t0" "$t1")")
done
echo "graft: stage $(ms "$(median "${gs[@]}")") ms, stage+commit $(ms "$(median "${gc[@]}")") ms" >&2

S3_ROW="| S3 import ($N_S3 objects, loopback moto) | not run | | |"
if [ "$N_S3" -gt 0 ]; then
  URL=$(scripts/s3-server.sh start | tail -1)
  export AWS_ENDPOINT_URL=$URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
  scripts/s3-server.sh bucket legacy >/dev/null
  echo "== uploading $N_S3 objects to the loopback S3 server" >&2
  python3 - "$URL" "$N_S3" <<'PY'
import sys, boto3
from concurrent.futures import ThreadPoolExecutor
url, n = sys.argv[1], int(sys.argv[2])
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
def put(i): s3.put_object(Bucket="legacy", Key=f"sales/d{i // 1000:04d}/part-{i % 1000:04d}.csv", Body=f"row,{i}\n".encode())
with ThreadPoolExecutor(16) as ex: list(ex.map(put, range(n)))
PY
  t0=$(now)
  python3 - "$URL" <<'PY'
import sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
n = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket="legacy", Prefix="sales/"):
    n += len(page.get("Contents", []))
print(n, file=sys.stderr)
PY
  t1=$(now); list_s=$(secs "$t0" "$t1")
  export TARN_LAKE=file://$WORK/lake-s3
  "$T" init >/dev/null; "$T" repo create r >/dev/null
  t0=$(now); "$T" import s3://legacy/sales/ r/main/data -m "import s3" >/dev/null; t1=$(now)
  s3_s=$(secs "$t0" "$t1")
  [ "$("$T" cat r/main/data/d0000/part-0007.csv)" = "row,7" ] || { echo "S3 import reads wrong bytes" >&2; exit 1; }
  S3_ROW="| S3 import ($N_S3 objects, loopback moto) | $s3_s s ($(awk -v n="$N_S3" -v s="$s3_s" 'BEGIN {printf "%.0f", n / s}') objects/s) | boto3 list_objects_v2 of the prefix: $list_s s | $(ratio "$list_s" "$s3_s") |"
  echo "$S3_ROW" >&2
  scripts/s3-server.sh stop >/dev/null
fi

{
  echo
  echo "## import.sh — $(machine)"
  echo
  echo "Import by reference (listing + tree build + one staged op + commit, one run, whole process). Baselines in the same run: \`find -printf\` stat of every file of the same tree; a plain boto3 listing of the same S3 prefix. Graft: medians of 3."
  echo
  echo "| what | tarn | baseline | baseline / tarn |"
  echo "|---|---|---|---|"
  echo "| local import ($N files) | $imp_s s ($imp_rate objects/s) | find -printf: $find_s s | $(ratio "$find_s" "$imp_s") |"
  echo "| graft of the $N-file tree into another repo, staged | $(ms "$(median "${gs[@]}")") ms | | |"
  echo "| graft, staged and committed | $(ms "$(median "${gc[@]}")") ms | | |"
  echo "$S3_ROW"
} | tee -a docs/BENCHMARKS.md
