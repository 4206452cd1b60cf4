#!/usr/bin/env bash
# Fuzz every decoder of on-store bytes (fuzz/fuzz_targets/) with libFuzzer,
# SECONDS each (default 30). Installs cargo-fuzz if missing. Uses the
# nightly toolchain with AddressSanitizer when there is one; else stable
# without a sanitizer (RUSTC_BOOTSTRAP lets cargo-fuzz's flags through).
# A crash fails the run and leaves its input in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-30}
if ! command -v cargo-fuzz >/dev/null; then
  echo "installing cargo-fuzz from crates.io..." >&2
  cargo install cargo-fuzz --locked -q
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  run=(cargo +nightly fuzz run)
else
  export RUSTC_BOOTSTRAP=1
  run=(cargo fuzz run -s none)
fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
for target in $(cargo fuzz list); do
  echo "== fuzz $target for ${SECS}s" >&2
  if ! "${run[@]}" "$target" -- -max_total_time="$SECS" -rss_limit_mb=4096 -print_final_stats=1 >"$LOG" 2>&1; then
    tail -40 "$LOG" >&2
    echo "fuzz $target failed (a crash leaves its input in fuzz/artifacts/$target/)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units' "$LOG" | sed "s/^/  $target /" >&2
done
echo "fuzz: all targets ran ${SECS}s each without a crash"
