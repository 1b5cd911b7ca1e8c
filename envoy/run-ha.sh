#!/usr/bin/env bash
# Runs tokengate with no single point of failure, locally: a PostgreSQL cluster under
# .run/pg, two control-plane replicas on it, the demo upstream, and an Envoy whose
# control-plane cluster lists both replicas. Called by `make run-ha` (which installs and
# builds first); Ctrl-C stops everything (the database is kept for the next run).
#
# State lives in .run/ (RUN_DIR moves it): the cluster in pg/, one log per process. Ports,
# each moved by the variable of the same name: LISTEN_PORT (Envoy's listener), ADMIN_PORT
# (Envoy's admin), UPSTREAM_PORT (the demo upstream), CONTROL_PLANE_PORT and
# CONTROL_PLANE_PORT_2 (the replicas), PG_PORT (PostgreSQL; 0: a free one); BASE_ID is
# Envoy's --base-id.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

ENVOY_BIN="${ENVOY_BIN:-.tools/envoy/envoy/_bin/envoy}"
WASM="${WASM:-target/wasm32-wasip1/release/tokengate_filter.wasm}"
TOKENGATE_BIN="${TOKENGATE_BIN:-target/release/tokengate}"
DEMO_UPSTREAM_BIN="${DEMO_UPSTREAM_BIN:-target/release/demo-upstream}"
LISTEN_PORT="${LISTEN_PORT:-10000}"
ADMIN_PORT="${ADMIN_PORT:-9901}"
UPSTREAM_PORT="${UPSTREAM_PORT:-8080}"
# The two replicas: CONTROL_PLANE_PORT and CONTROL_PLANE_PORT_2.
CONTROL_PLANE_PORT="${CONTROL_PLANE_PORT:-8081}"
CONTROL_PLANE_PORT_2="${CONTROL_PLANE_PORT_2:-8082}"
# PostgreSQL listens on loopback only; PG_PORT 0 picks a free port.
PG_PORT="${PG_PORT:-0}"
BASE_ID="${BASE_ID:-7302}"
RUN_DIR="${RUN_DIR:-$ROOT/.run}"
PG_DIR="$RUN_DIR/pg"

die() { echo "run-ha: $*" >&2; exit 1; }

for bin in "$ENVOY_BIN" "$TOKENGATE_BIN" "$DEMO_UPSTREAM_BIN"; do
  [ -x "$bin" ] || die "$bin is missing: use \`make run-ha\`, which installs and builds everything"
done
[ -f "$WASM" ] || die "$WASM is missing: use \`make run-ha\`, which builds it"
case "$WASM" in /*) WASM_PATH="$WASM" ;; *) WASM_PATH="$ROOT/$WASM" ;; esac
command -v curl >/dev/null || die "curl is needed to check readiness"

PG_BINDIR="${PG_BINDIR:-$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)}"
[ -x "$PG_BINDIR/initdb" ] && [ -x "$PG_BINDIR/pg_ctl" ] ||
  die "PostgreSQL's server binaries are missing (initdb, pg_ctl): \`make run-ha\` installs Debian's postgresql, or set PG_BINDIR"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for var in LISTEN_PORT ADMIN_PORT UPSTREAM_PORT CONTROL_PLANE_PORT CONTROL_PLANE_PORT_2; do
  if port_busy "${!var}"; then
    die "127.0.0.1:${!var} ($var) is already in use (another \`make run\`?); stop it, or move this port: make run-ha $var=<free port>"
  fi
done
if [ "$PG_PORT" = 0 ]; then
  for _ in $(seq 1 50); do
    PG_PORT=$(( 20000 + RANDOM % 20000 ))
    port_busy "$PG_PORT" || break
  done
elif port_busy "$PG_PORT"; then
  die "127.0.0.1:$PG_PORT is already in use; set PG_PORT to a free port (or 0)"
fi

random_hex() { od -An -N32 -tx1 /dev/urandom | tr -d ' \n'; }

mkdir -p "$RUN_DIR"
umask 077
# PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres user, who
# must be able to reach .run/pg (the files in .run stay readable by their owner only).
if [ "$(id -u)" = 0 ]; then
  as_pg() { runuser -u postgres -- "$@"; }
  chmod 711 "$RUN_DIR"
else
  as_pg() { "$@"; }
  chmod 700 "$RUN_DIR"
fi
if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
  echo "run-ha: initialising a PostgreSQL cluster in $PG_DIR"
  mkdir -p "$PG_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$PG_DIR"
  # Trust on loopback: a local demo database. Production uses a password or certificates.
  as_pg "$PG_BINDIR/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 --locale=C \
    >"$PG_DIR/initdb.log" 2>&1 || { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }
fi
as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
  -o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1" start >/dev/null ||
  { tail -n 20 "$PG_DIR/server.log" >&2; die "PostgreSQL did not start; see $PG_DIR/server.log"; }
pg_stop() { as_pg "$PG_BINDIR/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; }
if [ "$(as_pg "$PG_BINDIR/psql" -X -A -t -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
        -c "SELECT 1 FROM pg_database WHERE datname = 'tokengate'")" != 1 ]; then
  as_pg "$PG_BINDIR/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE DATABASE tokengate" || { pg_stop; die "cannot create the tokengate database"; }
fi
DB_URL="postgres://postgres@127.0.0.1:$PG_PORT/tokengate"

if [ -n "${TOKENGATE_ADMIN_TOKEN:-}" ]; then
  admin_source="from your TOKENGATE_ADMIN_TOKEN"
else
  TOKENGATE_ADMIN_TOKEN="$(random_hex)"
  admin_source="generated for this run"
fi
TOKENGATE_SYNC_TOKEN="$(random_hex)"
# Each credential goes only to the process that needs it: both to the replicas, the sync
# credential to Envoy through its rendered configuration, none to the demo upstream.
export -n TOKENGATE_ADMIN_TOKEN TOKENGATE_SYNC_TOKEN

LISTEN_PORT=$LISTEN_PORT ADMIN_PORT=$ADMIN_PORT UPSTREAM_PORT=$UPSTREAM_PORT \
  CONTROL_PLANE_PORTS="$CONTROL_PLANE_PORT $CONTROL_PLANE_PORT_2" \
  WASM_PATH="$WASM_PATH" SYNC_TOKEN="$TOKENGATE_SYNC_TOKEN" \
  envoy/render.sh envoy/envoy.yaml "$RUN_DIR/envoy-ha.yaml" || die "cannot render envoy/envoy.yaml"

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo
  echo "stopping the replicas, demo-upstream, envoy and PostgreSQL..."
  if [ "${#pids[@]}" -gt 0 ]; then
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
  pg_stop
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT
trap 'cleanup; exit 143' TERM

replica() { # n port
  TOKENGATE_ADMIN_TOKEN="$TOKENGATE_ADMIN_TOKEN" TOKENGATE_SYNC_TOKEN="$TOKENGATE_SYNC_TOKEN" \
    "$TOKENGATE_BIN" serve --listen "127.0.0.1:$2" --db "$DB_URL" \
    >>"$RUN_DIR/replica-$1.log" 2>&1 &
  echo $! >"$RUN_DIR/replica-$1.pid"
  pids+=($!)
}
replica 1 "$CONTROL_PLANE_PORT"
replica 2 "$CONTROL_PLANE_PORT_2"
DEMO_UPSTREAM_LISTEN="127.0.0.1:$UPSTREAM_PORT" "$DEMO_UPSTREAM_BIN" \
  >>"$RUN_DIR/demo-upstream.log" 2>&1 &
pids+=($!)
"$ENVOY_BIN" -c "$RUN_DIR/envoy-ha.yaml" --concurrency 2 --base-id "$BASE_ID" --disable-hot-restart -l info \
  >>"$RUN_DIR/envoy-ha.log" 2>&1 &
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
wait_for "replica 1" "http://127.0.0.1:$CONTROL_PLANE_PORT/readyz" "$RUN_DIR/replica-1.log"
wait_for "replica 2" "http://127.0.0.1:$CONTROL_PLANE_PORT_2/readyz" "$RUN_DIR/replica-2.log"
wait_for "demo upstream" "http://127.0.0.1:$UPSTREAM_PORT/" "$RUN_DIR/demo-upstream.log"
wait_for "envoy" "http://127.0.0.1:$ADMIN_PORT/ready" "$RUN_DIR/envoy-ha.log"

cat <<MSG

tokengate is running with two control-plane replicas on PostgreSQL
  Envoy (protected API)  http://127.0.0.1:$LISTEN_PORT    admin http://127.0.0.1:$ADMIN_PORT
  replica 1              http://127.0.0.1:$CONTROL_PLANE_PORT   (pid $(cat "$RUN_DIR/replica-1.pid"))
  replica 2              http://127.0.0.1:$CONTROL_PLANE_PORT_2   (pid $(cat "$RUN_DIR/replica-2.pid"))
  PostgreSQL             $DB_URL   (data in $PG_DIR)
  demo upstream          http://127.0.0.1:$UPSTREAM_PORT
  logs                   $RUN_DIR/: replica-1.log, replica-2.log, envoy-ha.log

Admin token ($admin_source):
  $TOKENGATE_ADMIN_TOKEN

In another terminal:

  export TOKENGATE_ADMIN_TOKEN=$TOKENGATE_ADMIN_TOKEN
  R1=http://127.0.0.1:$CONTROL_PLANE_PORT R2=http://127.0.0.1:$CONTROL_PLANE_PORT_2

  # create a token on replica 1, call the API with it through Envoy
  $TOKENGATE_BIN token create --url \$R1 --name demo
  curl -i -H "X-API-Token: <paste the token>" http://127.0.0.1:$LISTEN_PORT/hello

  # which replica holds Envoy's long-poll, and which are healthy
  curl -s http://127.0.0.1:$ADMIN_PORT/clusters | grep tokengate_control_plane | grep -E 'health_flags|rq_active'

  # kill one replica the hard way: Envoy carries on with the other
  kill -9 \$(cat $RUN_DIR/replica-1.pid)
  curl -s http://127.0.0.1:$ADMIN_PORT/clusters | grep tokengate_control_plane | grep health_flags
  $TOKENGATE_BIN token suspend --url \$R2 <id>    # through the survivor
  curl -i -H "X-API-Token: <paste the token>" http://127.0.0.1:$LISTEN_PORT/hello   # 403 within ms
  curl -s http://127.0.0.1:$ADMIN_PORT/stats | grep -E 'tokengate.sync.(success|failure)'

  # each replica's readiness and metrics
  curl -s \$R2/readyz; curl -s \$R2/metrics | grep -E '^tokengate_(ready|sync_polls_held|sync_version)'

Press Ctrl-C to stop (the database stays in $PG_DIR; make clean-run removes .run/).
MSG

# Stay in the foreground until Ctrl-C. A replica may be killed on purpose: only Envoy or the
# demo upstream exiting ends the run.
set +e
while kill -0 "${pids[2]}" 2>/dev/null && kill -0 "${pids[3]}" 2>/dev/null; do
  sleep 1
done
echo "run-ha: envoy or the demo upstream exited; see the logs in $RUN_DIR/" >&2
exit 1
