#!/usr/bin/env bash
# A real S3-protocol server on 127.0.0.1 for tests and demos (moto, run
# single-threaded so conditional puts are atomic).
#
#   scripts/s3-server.sh start [PORT]   # prints the endpoint URL as its last line
#   scripts/s3-server.sh stop
#   scripts/s3-server.sh bucket NAME    # create a bucket on the running server
#
# Use it with:  export AWS_ENDPOINT_URL=<url> AWS_ACCESS_KEY_ID=testing
#               AWS_SECRET_ACCESS_KEY=testing AWS_ALLOW_HTTP=true
set -euo pipefail
STATE=${TARN_S3_STATE:-/tmp/tarn-s3-server}
mkdir -p "$STATE"

ensure_moto() {
  if ! python3 -c 'import moto.server, werkzeug, flask' 2>/dev/null; then
    echo "installing moto[server] from PyPI..." >&2
    python3 -m pip install -q 'moto[server]>=5.0' >&2
  fi
}

case "${1:-}" in
start)
  if [ -f "$STATE/pid" ] && kill -0 "$(cat "$STATE/pid")" 2>/dev/null; then
    cat "$STATE/url"; exit 0
  fi
  ensure_moto
  PORT=${2:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}
  cat >"$STATE/server.py" <<'PY'
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
app = DomainDispatcherApplication(create_backend_app)
# threaded=False: moto's check-then-put for If-Match / If-None-Match is
# only atomic when one request runs at a time.
run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=False, use_reloader=False)
PY
  nohup python3 "$STATE/server.py" "$PORT" >"$STATE/server.log" 2>&1 &
  echo $! >"$STATE/pid"
  URL="http://127.0.0.1:$PORT"
  for _ in $(seq 150); do
    if curl -s -o /dev/null "$URL/"; then break; fi
    sleep 0.1
  done
  curl -sf -o /dev/null "$URL/" || { echo "S3 server did not start: $(tail -3 "$STATE/server.log")" >&2; exit 1; }
  echo "$URL" >"$STATE/url"
  echo "$URL"
  ;;
stop)
  if [ -f "$STATE/pid" ]; then kill "$(cat "$STATE/pid")" 2>/dev/null || true; rm -f "$STATE/pid" "$STATE/url"; fi
  ;;
bucket)
  URL=$(cat "$STATE/url")
  curl -sf -X PUT "$URL/${2:?bucket name}" -o /dev/null
  ;;
*)
  echo "usage: $0 start [PORT] | stop | bucket NAME" >&2; exit 2 ;;
esac
