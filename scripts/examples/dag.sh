#!/usr/bin/env bash
# An orchestrator's DAG run (Airflow/Dagster style) as a plain shell script:
#
#   main ──► dag-<run> ──► job-orders    (ingest, commit, merge into the DAG branch
#                     └──► job-customers  after the DAG branch's checks pass)
#        ◄── dag-<run>                    (merged to main only if main's checks pass)
#
# Every step is one tarn command with --json; its exit code says what
# happened (0 ok, 3 conflict, 4 a check refused, 5 protected; see
# docs/ORCHESTRATION.md). A job whose data fails the checks is not merged;
# its candidate stays inspectable and main is untouched.
#
# Usage: scripts/examples/dag.sh [RUN_ID]
#   TARN=path/to/tarn (default: tarn on PATH), TARN_LAKE=URL (default: a
#   scratch lake in a temp dir). With BAD_JOB=customers, that job writes a
#   file with a wrong header, to show a refused merge.
set -euo pipefail

TARN=${TARN:-tarn}
RUN=${1:-$(date +%Y%m%d%H%M%S)}
if [ -z "${TARN_LAKE:-}" ]; then
  TARN_LAKE=file://$(mktemp -d /tmp/tarn-dag.XXXXXX)/lake
  export TARN_LAKE
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
REPO=sales
DAG=dag-$RUN

step() { printf '== %s\n' "$*"; }
# tarn_json ARGS...: run a tarn command with --json; prints its JSON, returns its exit code.
tarn_json() { "$TARN" --json "$@"; }

# --- One-time set-up (idempotent): the repository, its checks, protection.
"$TARN" init >/dev/null
if ! "$TARN" repo list | grep -qx "$REPO"; then
  step "set up $REPO: checks in _tarn/hooks, main protected"
  "$TARN" repo create "$REPO" >/dev/null
  mkdir -p "$WORK/setup/_tarn/hooks" "$WORK/setup/checks"
  cat >"$WORK/setup/_tarn/hooks/quality.toml" <<'TOML'
# Every CSV under raw/ must have the header day,amount: checked before a
# merge into main or into any DAG branch.
on = ["pre-merge"]
branches = ["main", "dag-*"]
[[check]]
name = "schema"
exec = "sh checks/schema.sh"
timeout = "60s"
TOML
  cat >"$WORK/setup/checks/schema.sh" <<'SH'
status=0
for f in $(find raw -name '*.csv' 2>/dev/null); do
  head -1 "$f" | grep -qx 'day,amount' || { echo "bad header in $f: $(head -1 "$f")"; status=1; }
done
exit $status
SH
  "$TARN" put "$WORK/setup/_tarn" "$REPO/main/_tarn" >/dev/null
  "$TARN" put "$WORK/setup/checks" "$REPO/main/checks" >/dev/null
  "$TARN" commit "$REPO/main" -m "quality checks" >/dev/null
  "$TARN" branch protect "$REPO/main" >/dev/null
fi

# --- The DAG run: a branch for the run, a branch per job.
step "DAG run $RUN: branch $DAG from main"
tarn_json branch create "$REPO/$DAG" --from main >/dev/null

failed=()
for job in orders customers; do
  step "job $job: ingest on job-$job-$RUN"
  tarn_json branch create "$REPO/job-$job-$RUN" --from "$DAG" >/dev/null
  header=day,amount
  [ "${BAD_JOB:-}" = "$job" ] && header=date,value
  printf '%s\nmon,%d\n' "$header" "$RANDOM" >"$WORK/$job.csv"
  tarn_json put "$WORK/$job.csv" "$REPO/job-$job-$RUN/raw/$job/$RUN.csv" >/dev/null
  tarn_json commit "$REPO/job-$job-$RUN" -m "$job for $RUN" --meta dag_run="$RUN" >/dev/null
  set +e
  out=$(tarn_json merge "$REPO/job-$job-$RUN" "$REPO/$DAG" -m "merge $job" 2>/dev/null)
  rc=$?
  set -e
  case $rc in
    0) step "job $job: merged into $DAG" ;;
    4) failed+=("$job")
       run=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["run"])')
       step "job $job: refused by checks (run $run); main untouched"
       "$TARN" hooks log "$REPO" --run "$run" | sed 's/^/   /' ;;
    *) echo "job $job: merge failed with exit $rc: $out" >&2; exit "$rc" ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  step "DAG run $RUN failed (${failed[*]}): $DAG is kept for inspection, main is unchanged"
  exit 4
fi
step "DAG run $RUN: merge $DAG into main"
tarn_json merge "$REPO/$DAG" "$REPO/main" -m "DAG run $RUN" >/dev/null
step "done: main is $("$TARN" --json log "$REPO/main" -n 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"][:12])')"
