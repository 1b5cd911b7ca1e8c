#!/bin/sh
# The compose Envoy: renders the shipped template with the compose service names (both
# control-plane replicas answer to the alias control-plane-replicas), then runs
# Envoy. Envoy cannot read environment variables from its configuration, hence the render.
set -eu
LISTEN_ADDRESS=0.0.0.0 ADMIN_ADDRESS=0.0.0.0 \
UPSTREAM_HOST=demo-upstream CONTROL_PLANE_HOST=control-plane-replicas \
WASM_PATH=/etc/tokengate/tokengate_filter.wasm \
  /etc/tokengate/render.sh /etc/tokengate/envoy.yaml /tmp/envoy.yaml
exec envoy -c /tmp/envoy.yaml --concurrency 2 --service-node "${ENVOY_NODE_ID:-tokengate-compose}" "$@"
