#!/usr/bin/env bash
# Run every test: installs what the tests need (fuse3, a loopback S3 server;
# scripts/fuzz.sh installs cargo-fuzz), starts the S3 server, runs the suite,
# fuzzes each on-store decoder for a few seconds, stops the server.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v fusermount3 >/dev/null || need_apt+=(fuse3)
command -v curl >/dev/null || need_apt+=(curl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "missing: ${need_apt[*]} (install them, e.g. sudo apt-get install ${need_apt[*]})" >&2; exit 1
  fi
fi

LOG=$(mktemp)
URL=$(scripts/s3-server.sh start | tail -1)
trap 'scripts/s3-server.sh stop; rm -f "$LOG"' EXIT
scripts/s3-server.sh bucket tarn-test
export AWS_ENDPOINT_URL=$URL AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_ALLOW_HTTP=true
export AWS_REGION=us-east-1 TARN_TEST_S3=s3://tarn-test

set +e
cargo test --release "$@" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
# Each decoder of on-store bytes under libFuzzer for a few seconds
# (TARN_FUZZ_SECONDS=0 skips it; scripts/fuzz.sh runs longer).
frc=0
if [ "${TARN_FUZZ_SECONDS:-5}" != 0 ] && [ $# -eq 0 ]; then
  scripts/fuzz.sh "${TARN_FUZZ_SECONDS:-5}"
  frc=$?
fi
set -e
# One closing line for the whole suite.
awk '/^test result:/ {p += $4; f += $6} END {printf "tests: %d passed, %d failed\n", p, f}' "$LOG"
[ "$rc" -ne 0 ] && exit "$rc"
exit "$frc"
