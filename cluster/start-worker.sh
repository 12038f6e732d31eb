#!/usr/bin/env bash
# Join this machine to a Ray cluster: cluster/start-worker.sh HEAD_IP:PORT
# Reads cluster/cluster.env (or $CLUSTER_ENV). Safe to run twice.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
[ $# -eq 1 ] || die "usage: start-worker.sh HEAD_IP:PORT (the address cluster/start-head.sh printed)"
HEAD_ADDR="$1"
[[ "$HEAD_ADDR" =~ ^[^:[:space:]]+:[0-9]+$ ]] || die "head address '$HEAD_ADDR' is not HOST:PORT (e.g. 192.168.1.100:6379)"
load_settings
use_auth
if [ "$AUTH" = "token" ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    die "no cluster token at $RAY_AUTH_TOKEN_PATH: copy the head's token file here (or set RAY_AUTH_TOKEN)"
fi

if raylet_running_for "$NODE_IP"; then
    say "a Ray node for $NODE_IP is already running here; nothing to do (cluster/stop.sh stops it)"
    exit 0
fi
"$RAY_BIN" start --address "$HEAD_ADDR" --node-ip-address "$NODE_IP" --temp-dir "$RAY_TEMP_DIR" \
    --disable-usage-stats "${RESOURCE_FLAGS[@]}" >/dev/null \
    || die "could not join the cluster at $HEAD_ADDR (is the head running, reachable from $NODE_IP, and is the token the head's?)"
say "joined the cluster at $HEAD_ADDR as $NODE_IP (interface $NET_IFACE)"
if [ -n "${METRICS_EXPORT_PORT:-}" ]; then
    say "Prometheus metrics of this node at http://$NODE_IP:$METRICS_EXPORT_PORT/metrics"
fi
