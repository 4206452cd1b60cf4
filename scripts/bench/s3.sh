#!/usr/bin/env bash
# S3 benchmark on the loopback S3 server (scripts/s3-server.sh, moto), in one
# run, against a direct reader and two peers mounting the same server:
#   1. cold sequential read of a SIZE file (default 1 GiB): tarn mount of an
#      S3 lake (empty chunk cache, caches dropped) vs a direct ranged-GET
#      reader of the same bytes stored as one object (boto3, 8 MiB ranges,
#      CONC in flight), vs `rclone mount` (--vfs-cache-mode full) and `s3fs`
#      reading that object
#   2. write of a SIZE file (dd bs=1M conv=fsync, until it is in the store)
#   3. write of FILES small files (4 KiB, until they are in the store)
# Needs root (drop_caches, mounts); installs rclone and s3fs from Debian.
# Appends a table to docs/BENCHMARKS.md.
#   scripts/bench/s3.sh [SIZE_MIB] [FILES]
set -euo pipefail
cd "$(dirname "$0")/../.."
SIZE_MIB=${1:-1024}
FILES=${2:-5000}
CONC=8
for tool in rclone s3fs; do
  command -v $tool >/dev/null || { apt-get update -qq && apt-get install -y -qq rclone s3fs >/dev/null; }
done
cargo build --release -q
T=$PWD/target/release/tarn
. scripts/bench/lib.sh
WORK=$(mktemp -d /tmp/tarn-bench-s3.XXXXXX)
export TARN_S3_STATE=$WORK/s3
URL=$(scripts/s3-server.sh start | tail -1)
export AWS_ENDPOINT_URL=$URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
PIDS=()
MNTS=()
cleanup() {
  for m in "${MNTS[@]}"; do fusermount3 -uz "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  scripts/s3-server.sh stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_mounted() { for _ in $(seq 300); do mountpoint -q "$1" && return 0; sleep 0.05; done; echo "$1 did not mount" >&2; exit 1; }
for b in lake peers; do scripts/s3-server.sh bucket $b >/dev/null; done
SIZE=$((SIZE_MIB << 20))
DATA=$WORK/data.bin
head -c "$SIZE" /dev/urandom >"$DATA"
py() { python3 - "$URL" "$@"; }
# The same bytes as one object, for the direct reader and the peers.
py "$DATA" <<'PY'
import sys, boto3
from boto3.s3.transfer import TransferConfig
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
s3.upload_file(sys.argv[2], "peers", "data.bin", Config=TransferConfig(multipart_threshold=1 << 40))
PY

# --- tarn: an S3 lake holding the same bytes, committed.
L=s3://lake/bench
"$T" init "$L" >/dev/null
"$T" --lake "$L" repo create b >/dev/null
"$T" --lake "$L" put "$DATA" b/main/data.bin >/dev/null
"$T" --lake "$L" commit b/main -m data >/dev/null
tarn_mount() { # DIR CACHE [args]
  local dir=$1 cache=$2; shift 2
  mkdir -p "$dir"; "$T" --lake "$L" mount "$dir" --cache-dir "$cache" "$@" >"$WORK/tarn-mount.log" 2>&1 &
  PIDS+=($!); MNTS+=("$dir"); wait_mounted "$dir"
}
rd() { dd if="$1" of=/dev/null bs=1M status=none; }

echo "== cold reads" >&2
tarn_mount "$WORK/tarn-r" "$WORK/cache-r" --ref b/main
drop; tarn_read=$(timed rd "$WORK/tarn-r/data.bin")
echo "tarn cold read: $tarn_read s" >&2
drop; direct=$(timed py "$SIZE" "$CONC" <<'PY'
import sys, boto3
from concurrent.futures import ThreadPoolExecutor
url, size, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
step = 8 << 20
def get(off):
    return len(s3.get_object(Bucket="peers", Key="data.bin", Range=f"bytes={off}-{min(off + step, size) - 1}")["Body"].read())
with ThreadPoolExecutor(conc) as ex:
    assert sum(ex.map(get, range(0, size, step))) == size
PY
)
echo "direct ranged GETs: $direct s" >&2

cat >"$WORK/rclone.conf" <<EOF
[peers]
type = s3
provider = Other
endpoint = $URL
access_key_id = testing
secret_access_key = testing
region = us-east-1
EOF
rclone_mount() { # DIR
  mkdir -p "$1"
  env -u AWS_CA_BUNDLE rclone mount peers:peers "$1" --config "$WORK/rclone.conf" --vfs-cache-mode full \
    --cache-dir "$WORK/rclone-cache" --s3-no-head --daemon
  MNTS+=("$1"); wait_mounted "$1"
}
s3fs_mount() { # DIR
  mkdir -p "$1"; echo "testing:testing" >"$WORK/s3fs.pw"; chmod 600 "$WORK/s3fs.pw"
  s3fs peers "$1" -o url="$URL",use_path_request_style,passwd_file="$WORK/s3fs.pw"
  MNTS+=("$1"); wait_mounted "$1"
}
rclone_mount "$WORK/rclone"
drop; rclone_read=$(timed rd "$WORK/rclone/data.bin")
echo "rclone cold read: $rclone_read s" >&2
s3fs_mount "$WORK/s3fs"
drop; s3fs_read=$(timed rd "$WORK/s3fs/data.bin")
echo "s3fs cold read: $s3fs_read s" >&2

echo "== writes" >&2
tarn_mount "$WORK/tarn-w" "$WORK/cache-w"
# tarn: close() returns once the file is staged in the store.
tarn_write=$(timed dd if="$DATA" of="$WORK/tarn-w/b/main/copy.bin" bs=1M conv=fsync status=none)
# Peers: until the object is on the server (rclone's full cache uploads after close).
on_server() { # KEY SIZE: wait until the peers bucket holds KEY with SIZE bytes
  py "$1" "$2" <<'PY'
import sys, time, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
deadline = time.time() + 600
while time.time() < deadline:
    try:
        if s3.head_object(Bucket="peers", Key=sys.argv[2])["ContentLength"] == int(sys.argv[3]): sys.exit(0)
    except Exception: pass
    time.sleep(0.2)
sys.exit(1)
PY
}
peer_write() { dd if="$DATA" of="$1/$2" bs=1M conv=fsync status=none; on_server "$2" "$SIZE"; }
rclone_write=$(timed peer_write "$WORK/rclone" rclone-copy.bin)
s3fs_write=$(timed peer_write "$WORK/s3fs" s3fs-copy.bin)
echo "writes: tarn $tarn_write s, rclone $rclone_write s, s3fs $s3fs_write s" >&2

small() { # DIR PREFIX: FILES files of 4 KiB
  mkdir -p "$1/$2"
  python3 - "$1/$2" "$FILES" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
blob = os.urandom(4096)
for i in range(n):
    with open(f"{d}/f{i:05d}", "wb") as f: f.write(blob)
PY
}
small_peer() { small "$1" "$2"; on_server "$2/f$(printf %05d $((FILES - 1)))" 4096; }
tarn_small=$(timed small "$WORK/tarn-w/b/main" small)
rclone_small=$(timed small_peer "$WORK/rclone" rsmall)
s3fs_small=$(timed small_peer "$WORK/s3fs" ssmall)
echo "small files: tarn $tarn_small s, rclone $rclone_small s, s3fs $s3fs_small s" >&2

{
  echo
  echo "## s3.sh — $(machine); loopback moto S3 server"
  echo
  echo "One run each. Reads: caches dropped, tarn's chunk cache empty; peers read the same bytes stored as one object. Writes: \`dd bs=1M conv=fsync\`, timed until the data is in the store (tarn: until close returns, which is after staging; rclone full cache mode uploads after close, so it is timed until the object is on the server). Small files: $FILES × 4 KiB, until the last is on the server. moto loads a whole object for every ranged GET, which penalises readers of one big object (the direct reader, rclone, s3fs) more than tarn, whose chunks are separate ~1 MiB objects: see BENCH-NOTES."
  echo
  echo "| operation | tarn | direct ranged GETs ($CONC in flight) | rclone mount (full cache) | s3fs |"
  echo "|---|---|---|---|---|"
  echo "| ${SIZE_MIB} MiB read, cold | $tarn_read s ($(mbps "$tarn_read" "$SIZE") MB/s) | $direct s (tarn/direct speed $(ratio "$direct" "$tarn_read")) | $rclone_read s | $s3fs_read s |"
  echo "| ${SIZE_MIB} MiB write | $tarn_write s | | $rclone_write s | $s3fs_write s |"
  echo "| $FILES × 4 KiB writes | $tarn_small s | | $rclone_small s | $s3fs_small s |"
} | tee -a docs/BENCHMARKS.md
