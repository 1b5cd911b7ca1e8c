#!/bin/sh
# Renders envoy/envoy.yaml or envoy/envoy-native.yaml: every ${NAME} placeholder from the
# variable NAME, with the `make run` values as defaults. Used by `make run`, `make validate`
# and the compose Envoy (POSIX sh and sed only: the official Envoy image has nothing more).
#   usage: render.sh TEMPLATE OUTPUT
#   SYNC_TOKEN is required, and WASM_PATH (envoy.yaml) or MODULE_PATH (envoy-native.yaml).
# CONTROL_PLANE_PORTS="8081 8082" lists several control-plane replicas on CONTROL_PLANE_HOST:
# the endpoint line is repeated, one per port.
set -eu
template=$1 out=$2
: "${SYNC_TOKEN:?SYNC_TOKEN is required}"
ports=${CONTROL_PLANE_PORTS:-${CONTROL_PLANE_PORT:-8081}}
first=${ports%% *}
tmp="$out.tmp"
cp "$template" "$tmp"
for port in ${ports#"$first"}; do
  # Print the endpoint line as it is, then a copy for this port.
  sed -e "/port_value: \${CONTROL_PLANE_PORT} /{p;s|\${CONTROL_PLANE_PORT}|$port|;}" "$tmp" > "$tmp.next"
  mv "$tmp.next" "$tmp"
done
# The filter's path: whichever of the two the template uses (the check below says if it is
# missing).
set --
[ -n "${WASM_PATH:-}" ] && set -- "$@" -e "s|\${WASM_PATH}|${WASM_PATH}|g"
[ -n "${MODULE_PATH:-}" ] && set -- "$@" -e "s|\${MODULE_PATH}|${MODULE_PATH}|g"
sed "$@" -e "s|\${LISTEN_ADDRESS}|${LISTEN_ADDRESS:-127.0.0.1}|g" \
    -e "s|\${LISTEN_PORT}|${LISTEN_PORT:-10000}|g" \
    -e "s|\${ADMIN_ADDRESS}|${ADMIN_ADDRESS:-127.0.0.1}|g" \
    -e "s|\${ADMIN_PORT}|${ADMIN_PORT:-9901}|g" \
    -e "s|\${UPSTREAM_HOST}|${UPSTREAM_HOST:-127.0.0.1}|g" \
    -e "s|\${UPSTREAM_PORT}|${UPSTREAM_PORT:-8080}|g" \
    -e "s|\${CONTROL_PLANE_HOST}|${CONTROL_PLANE_HOST:-127.0.0.1}|g" \
    -e "s|\${CONTROL_PLANE_PORT}|$first|g" \
    -e "s|\${SYNC_TOKEN}|${SYNC_TOKEN}|g" \
    "$tmp" > "$out"
rm -f "$tmp"
if grep -n '\${' "$out" >&2; then
  echo "render.sh: unrendered placeholder in $template" >&2
  exit 1
fi
