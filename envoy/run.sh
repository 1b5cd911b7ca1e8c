#!/usr/bin/env bash
# Runs tokengate locally: the control plane, the demo upstream and Envoy with the filter,
# the proxy-wasm one (FLAVOR=wasm, the default) or the native dynamic module (FLAVOR=native).
# Called by `make run` (which installs and builds first); Ctrl-C stops all three.
#
# State lives in .run/ (git-ignored; RUN_DIR moves it): the SQLite database, the rendered
# Envoy config and one log per process. The database survives restarts, so tokens created
# in one session still work in the next one if you reuse the admin token (export
# TOKENGATE_ADMIN_TOKEN).
#
# Ports, each moved by the variable of the same name (`make run LISTEN_PORT=10100 ...`):
# LISTEN_PORT (Envoy's listener), ADMIN_PORT (Envoy's admin), UPSTREAM_PORT (the demo
# upstream), CONTROL_PLANE_PORT (tokengate serve); BASE_ID is Envoy's --base-id.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ENVOY_BIN="${ENVOY_BIN:-.tools/envoy/envoy/_bin/envoy}"
WASM="${WASM:-target/wasm32-wasip1/release/tokengate_filter.wasm}"
MODULE="${MODULE:-target/native/libtokengate_native.so}"
FLAVOR="${FLAVOR:-wasm}"
TOKENGATE_BIN="${TOKENGATE_BIN:-target/release/tokengate}"
DEMO_UPSTREAM_BIN="${DEMO_UPSTREAM_BIN:-target/release/demo-upstream}"
LISTEN_PORT="${LISTEN_PORT:-10000}"
ADMIN_PORT="${ADMIN_PORT:-9901}"
UPSTREAM_PORT="${UPSTREAM_PORT:-8080}"
CONTROL_PLANE_PORT="${CONTROL_PLANE_PORT:-8081}"
# Envoy's --base-id, fixed for `make run` (the tests use one per stack) so the run never
# shares an id with a test's Envoy. Hot restart is off: a local run has no use for it and
# it would leave shared memory behind in /dev/shm after every kill.
BASE_ID="${BASE_ID:-7301}"
RUN_DIR="${RUN_DIR:-$ROOT/.run}"

die() { echo "run: $*" >&2; exit 1; }

for bin in "$ENVOY_BIN" "$TOKENGATE_BIN" "$DEMO_UPSTREAM_BIN"; do
  [ -x "$bin" ] || die "$bin is missing: use \`make run\`, which installs and builds everything"
done
case "$FLAVOR" in
  wasm)   FILTER="$WASM"; TEMPLATE=envoy/envoy.yaml; FILTER_VAR=WASM_PATH; STATS=wasmcustom.tokengate ;;
  native) FILTER="$MODULE"; TEMPLATE=envoy/envoy-native.yaml; FILTER_VAR=MODULE_PATH; STATS=dynamicmodulescustom.tokengate ;;
  *) die "FLAVOR must be wasm or native, not \`$FLAVOR\`" ;;
esac
[ -f "$FILTER" ] || die "$FILTER is missing: use \`make run\`, which builds it"
case "$FILTER" in /*) FILTER_PATH="$FILTER" ;; *) FILTER_PATH="$ROOT/$FILTER" ;; esac
command -v curl >/dev/null || die "curl is needed to check readiness"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for var in LISTEN_PORT ADMIN_PORT UPSTREAM_PORT CONTROL_PLANE_PORT; do
  port="${!var}"
  if port_busy "$port"; then
    die "127.0.0.1:$port ($var) is already in use (another \`make run\`?); stop it, or move this port: make run $var=<free port>"
  fi
done

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

mkdir -p "$RUN_DIR"
chmod 700 "$RUN_DIR"
umask 077

if [ -n "${TOKENGATE_ADMIN_TOKEN:-}" ]; then
  admin_source="from your TOKENGATE_ADMIN_TOKEN"
else
  TOKENGATE_ADMIN_TOKEN="$(random_hex)"
  admin_source="generated for this run"
fi
# The sync credential only lets Envoy read /v1/sync; a fresh one each run is fine.
TOKENGATE_SYNC_TOKEN="$(random_hex)"
# Each credential goes only to the process that needs it: both to the control plane, the
# sync credential to Envoy through its rendered configuration, none to the demo upstream.
# An admin token exported by the caller would otherwise reach every child's environment.
export -n TOKENGATE_ADMIN_TOKEN TOKENGATE_SYNC_TOKEN

env LISTEN_PORT=$LISTEN_PORT ADMIN_PORT=$ADMIN_PORT UPSTREAM_PORT=$UPSTREAM_PORT \
  CONTROL_PLANE_PORT=$CONTROL_PLANE_PORT "$FILTER_VAR=$FILTER_PATH" SYNC_TOKEN="$TOKENGATE_SYNC_TOKEN" \
  envoy/render.sh "$TEMPLATE" "$RUN_DIR/envoy.yaml" || die "cannot render $TEMPLATE"

pids=()
cleanup() {
  trap - INT TERM EXIT
  if [ "${#pids[@]}" -gt 0 ]; then
    echo
    echo "stopping tokengate, demo-upstream and envoy..."
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

TOKENGATE_ADMIN_TOKEN="$TOKENGATE_ADMIN_TOKEN" TOKENGATE_SYNC_TOKEN="$TOKENGATE_SYNC_TOKEN" \
  "$TOKENGATE_BIN" serve --listen "127.0.0.1:$CONTROL_PLANE_PORT" --db "$RUN_DIR/tokengate.db" \
  >>"$RUN_DIR/control-plane.log" 2>&1 &
pids+=($!)
DEMO_UPSTREAM_LISTEN="127.0.0.1:$UPSTREAM_PORT" "$DEMO_UPSTREAM_BIN" \
  >>"$RUN_DIR/demo-upstream.log" 2>&1 &
pids+=($!)
# Envoy logs to stderr, kept in $RUN_DIR/envoy.log (unlike --log-path, written line by line).
"$ENVOY_BIN" -c "$RUN_DIR/envoy.yaml" --concurrency 2 --base-id "$BASE_ID" --disable-hot-restart -l info \
  >>"$RUN_DIR/envoy.log" 2>&1 &
pids+=($!)

wait_for() { # name url log
  local i
  for i in $(seq 1 600); do
    if curl -fsS -o /dev/null --max-time 1 "$2" 2>/dev/null; then return 0; fi
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { tail -n 30 "$3" >&2; die "$1 exited; see $3"; }
    done
    sleep 0.1
  done
  tail -n 30 "$3" >&2
  die "$1 not ready after 60 s; see $3"
}
wait_for "control plane" "http://127.0.0.1:$CONTROL_PLANE_PORT/healthz" "$RUN_DIR/control-plane.log"
wait_for "demo upstream" "http://127.0.0.1:$UPSTREAM_PORT/" "$RUN_DIR/demo-upstream.log"
wait_for "envoy" "http://127.0.0.1:$ADMIN_PORT/ready" "$RUN_DIR/envoy.log"

cat <<MSG

tokengate is running ($FLAVOR filter)
  Envoy (protected API)  http://127.0.0.1:$LISTEN_PORT    admin http://127.0.0.1:$ADMIN_PORT
  control plane          http://127.0.0.1:$CONTROL_PLANE_PORT
  web console            http://127.0.0.1:$CONTROL_PLANE_PORT/   (sign in with the admin token)
  demo upstream          http://127.0.0.1:$UPSTREAM_PORT
  state and logs         $RUN_DIR/

Admin token ($admin_source):
  $TOKENGATE_ADMIN_TOKEN

Open the web console at http://127.0.0.1:$CONTROL_PLANE_PORT/ and paste the admin token to
sign in; generate a token there and call the API with it as below. Or, in another terminal:

  export TOKENGATE_URL=http://127.0.0.1:$CONTROL_PLANE_PORT
  export TOKENGATE_ADMIN_TOKEN=$TOKENGATE_ADMIN_TOKEN

  # create a token (its secret is shown once) and note its id
  $TOKENGATE_BIN token create --name demo --max-rps 5

  # call the API through Envoy with it
  curl -i -H "X-API-Token: <paste the token>" http://127.0.0.1:$LISTEN_PORT/hello
  curl -i -H "Authorization: Bearer <paste the token>" http://127.0.0.1:$LISTEN_PORT/hello

  # no token, then too fast: 401, then 429 after 5 quick calls
  curl -i http://127.0.0.1:$LISTEN_PORT/hello
  for i in \$(seq 10); do curl -s -o /dev/null -w '%{http_code}\n' -H "X-API-Token: <paste>" http://127.0.0.1:$LISTEN_PORT/hello; done

  # live changes, no restart
  $TOKENGATE_BIN token suspend <id>        # now 403
  $TOKENGATE_BIN token reactivate <id>     # 200 again
  $TOKENGATE_BIN token update <id> --max-rps 50
  $TOKENGATE_BIN token rotate <id> --grace 1m   # new secret; the old one works for a minute
  $TOKENGATE_BIN token list                # last use and request counts (reported every 5 s)
  $TOKENGATE_BIN audit --token <id>        # who changed what
  $TOKENGATE_BIN token revoke <id>         # 401 from then on

  # filter stats
  curl -s http://127.0.0.1:$ADMIN_PORT/stats | grep $STATS

Press Ctrl-C to stop.
MSG

# Stay in the foreground until Ctrl-C, or until one of the three exits.
set +e
wait -n "${pids[@]}"
status=$?
set -e
echo "run: a process exited (status $status); see the logs in $RUN_DIR/" >&2
exit "$status"
