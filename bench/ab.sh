#!/usr/bin/env bash
# Two builds of the filter side by side: `bench/ab.sh OLD.wasm NEW.wasm [rounds] [seconds]`.
#
# Starts one control plane with one unlimited and one limited token, and two Envoys (one
# worker each, bench/envoy/tokengate.yaml), one per build; then alternates closed-loop oha
# runs (16 connections) between them, so that both see the same machine, and prints each
# run's requests/s and Envoy CPU microseconds per request, then the medians and the ratio.
# This is how each "make it fast" change in docs/benchmarks.md was measured.
set -euo pipefail
cd "$(dirname "$0")/.."

OLD=${1:?usage: bench/ab.sh OLD.wasm NEW.wasm [rounds] [seconds]}
NEW=${2:?usage: bench/ab.sh OLD.wasm NEW.wasm [rounds] [seconds]}
ROUNDS=${3:-5}
SECONDS_PER_RUN=${4:-5}
ENVOY=${ENVOY_BIN:-.tools/envoy/envoy/_bin/envoy}
OHA=${OHA:-.tools/oha/bin/oha}
TOKENGATE=${TOKENGATE_BIN:-target/release/tokengate}
for f in "$OLD" "$NEW" "$ENVOY" "$OHA" "$TOKENGATE"; do
  [ -e "$f" ] || { echo "missing: $f (make bench-build builds and installs what this needs)" >&2; exit 1; }
done

dir=$(mktemp -d /tmp/tokengate-ab.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_for() { for _ in $(seq 300); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "not ready: $1" >&2; exit 1; }
cpu_us() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ n += $1 } END { printf "%d", n / 1000 }'; }

admin=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
sync=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
cp_port=$(free_port)
TOKENGATE_ADMIN_TOKEN=$admin TOKENGATE_SYNC_TOKEN=$sync RUST_LOG=warn \
  "$TOKENGATE" serve --listen 127.0.0.1:"$cp_port" --db "$dir/db" >"$dir/cp.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$cp_port/healthz"
create() {
  curl -fsS -X POST "http://127.0.0.1:$cp_port/v1/tokens" -H "Authorization: Bearer $admin" \
    -H 'Content-Type: application/json' -d "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])'
}
unlimited=$(create '{"name": "ab-unlimited"}')
limited=$(create '{"name": "ab-limited", "max_rps": 1000000}')

start_envoy() { # $1 label, $2 wasm
  local port admin_port
  port=$(free_port); admin_port=$(free_port)
  sed -e "s|\${LISTEN_PORT}|$port|; s|\${ADMIN_PORT}|$admin_port|; s|\${WASM_PATH}|$(realpath "$2")|" \
      -e "s|\${CONTROL_PLANE_PORT}|$cp_port|; s|\${SYNC_TOKEN}|$sync|; s|\${PLUGIN_EXTRA}||" \
      bench/envoy/tokengate.yaml >"$dir/$1.yaml"
  "$ENVOY" -c "$dir/$1.yaml" --concurrency 1 --base-id "$admin_port" --disable-hot-restart -l warning \
    >"$dir/$1.log" 2>&1 &
  pids+=($!)
  eval "${1}_pid=$!; ${1}_port=$port"
  wait_for "http://127.0.0.1:$admin_port/ready"
  for _ in $(seq 300); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -H "X-API-Token: $unlimited" "http://127.0.0.1:$port/")" = 200 ] && return 0
    sleep 0.1
  done
  echo "$1: the token was never admitted" >&2; exit 1
}
start_envoy old "$OLD"
start_envoy new "$NEW"

run() { # $1 label, $2 token label, $3 token
  local pid port before after out rps n
  pid=$(eval echo "\$${1}_pid"); port=$(eval echo "\$${1}_port")
  before=$(cpu_us "$pid")
  out=$("$OHA" --no-tui --output-format json -z "${SECONDS_PER_RUN}s" -c 16 -H "X-API-Token: $3" "http://127.0.0.1:$port/")
  after=$(cpu_us "$pid")
  read -r n rps < <(python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["statusCodeDistribution"]; assert set(c)=={"200"}, c; n=sum(c.values()); print(n, n/d["summary"]["total"])' <<<"$out")
  echo "$1 $2 $rps $(( (after - before) / n ))" | tee -a "$dir/results"
}
echo "build token rps cpu_us_per_request"
for _ in $(seq "$ROUNDS"); do
  for token in unlimited limited; do
    run old $token "$(eval echo "\$$token")"
    run new $token "$(eval echo "\$$token")"
  done
done
python3 - "$dir/results" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
for token in ("unlimited", "limited"):
    med = {}
    for build in ("old", "new"):
        sel = [r for r in rows if r[0] == build and r[1] == token]
        med[build] = (statistics.median(float(r[2]) for r in sel), statistics.median(float(r[3]) for r in sel))
    print(f"{token:9}  old {med['old'][0]:8.0f} rps {med['old'][1]:5.1f} us/req   new {med['new'][0]:8.0f} rps {med['new'][1]:5.1f} us/req"
          f"   new/old: rps {med['new'][0]/med['old'][0]:.3f}, cpu {med['new'][1]/med['old'][1]:.3f}")
EOF
