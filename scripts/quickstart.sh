#!/usr/bin/env bash
# Build tarn and run it on the embedded default: a local-directory lake
# (at $TARN_LAKE, else ~/.local/share/tarn/lake) with a sample repository,
# mounted at $TARN_MOUNT (else ~/lake).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "needs a Rust toolchain (cargo): https://rustup.rs" >&2; exit 1; }
cargo build --release -q
T=$PWD/target/release/tarn
export TARN_LAKE=${TARN_LAKE:-file://$HOME/.local/share/tarn/lake}

"$T" init
"$T" repo list | grep -qx sample || "$T" repo create sample
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
mkdir -p "$SRC/raw" "$SRC/reports"
printf 'day,amount\nmon,10\ntue,12\nwed,9\n' >"$SRC/raw/daily.csv"
printf '# Weekly report\nTotal: 31\n' >"$SRC/reports/weekly.md"
head -c 3000000 /dev/urandom >"$SRC/raw/blob.bin"
"$T" put "$SRC" sample/main/data
"$T" commit sample/main -m "sample data" --meta source=quickstart || true
"$T" branch list sample | grep -q ' dev ' || "$T" branch create sample/dev --from main
echo
echo "== tarn ls -r sample/main/data"
"$T" ls -r sample/main/data
echo
echo "== tarn log sample/main -n 3"
"$T" log sample/main -n 3

# Mount the whole lake (needs /dev/fuse and fusermount3, e.g. apt-get install fuse3).
MNT=${TARN_MOUNT:-$HOME/lake}
if [ -e /dev/fuse ] && command -v fusermount3 >/dev/null; then
  mkdir -p "$MNT"
  if ! mountpoint -q "$MNT"; then
    "$T" mount "$MNT" --daemon
  fi
  echo
  echo "== through the mount: ls $MNT/sample/main/data/raw ; cat daily.csv"
  ls -l "$MNT/sample/main/data/raw"
  cat "$MNT/sample/main/data/raw/daily.csv"
  echo
  echo "mounted at $MNT (write files under $MNT/sample/dev/, then:"
  echo "  echo 'commit -m \"my change\"' > $MNT/sample/dev/.tarn/ctl ), unmount with: $T umount $MNT"
else
  echo "(no /dev/fuse or fusermount3: install fuse3 to mount the lake)"
fi
echo
echo "lake: $TARN_LAKE  (binary: $T)"
