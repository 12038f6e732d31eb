#!/usr/bin/env bash
# Start the Ray head on this machine: cluster/start-head.sh [--no-auth]
# Reads cluster/cluster.env (or $CLUSTER_ENV). Safe to run twice.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
for arg in "$@"; do
    case "$arg" in
        --no-auth) AUTH=none ;;
        -h|--help) sed -n '2,3p' "$0"; exit 0 ;;
        *) die "unknown argument '$arg' (usage: start-head.sh [--no-auth])" ;;
    esac
done
load_settings  # keeps AUTH=none from --no-auth: cluster.env only fills in unset values
use_auth

if [ "$AUTH" = "token" ] && [ ! -s "$RAY_AUTH_TOKEN_PATH" ]; then
    mkdir -p "$(dirname "$RAY_AUTH_TOKEN_PATH")"
    (umask 077 && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$RAY_AUTH_TOKEN_PATH")
    say "generated a new cluster token in $RAY_AUTH_TOKEN_PATH"
fi

if raylet_running_for "$NODE_IP"; then
    say "a Ray node for $NODE_IP is already running here; nothing to do (cluster/stop.sh stops it)"
else
    "$RAY_BIN" start --head --node-ip-address "$NODE_IP" --port "$HEAD_PORT" \
        --dashboard-host "$DASHBOARD_HOST" --dashboard-port "$DASHBOARD_PORT" \
        --temp-dir "$RAY_TEMP_DIR" --disable-usage-stats "${RESOURCE_FLAGS[@]}" ${RAY_HEAD_EXTRA_ARGS:-} >/dev/null \
        || die "ray start --head failed; see $RAY_TEMP_DIR/session_latest/logs"
    say "Ray head running at $NODE_IP:$HEAD_PORT (interface $NET_IFACE, dashboard http://$NODE_IP:$DASHBOARD_PORT)"
    if [ -n "${METRICS_EXPORT_PORT:-}" ]; then
        say "Prometheus metrics at http://$NODE_IP:$METRICS_EXPORT_PORT/metrics"
    fi
fi

cat <<NEXT

Next:
NEXT
if [ "$AUTH" = "token" ]; then
cat <<NEXT
  1. Copy the token to every worker node and every machine that submits jobs:
       scp $RAY_AUTH_TOKEN_PATH <worker>:$RAY_AUTH_TOKEN_PATH
     (or export RAY_AUTH_TOKEN=\$(cat $RAY_AUTH_TOKEN_PATH) there)
NEXT
fi
cat <<NEXT
  2. On each worker node (with its own NET_IFACE in cluster.env):
       cluster/start-worker.sh $NODE_IP:$HEAD_PORT
  3. Train from this node:
       RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH python -m ray_fedat.train --address $NODE_IP:$HEAD_PORT --workers <nodes> ...
     or submit a job from any machine holding the token:
       RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH ray job submit --address http://$NODE_IP:$DASHBOARD_PORT --working-dir . -- python -m ray_fedat.train --workers <nodes> ...
  Watch it at http://$NODE_IP:$DASHBOARD_PORT (Jobs: the job and its driver log; Logs: one line
  per round from each worker)$(if [ "$AUTH" = "token" ]; then echo "; it asks for the token in $RAY_AUTH_TOKEN_PATH"; fi).
  Prometheus: scrape every node listed in $RAY_TEMP_DIR/prom_metrics_service_discovery.json
  (or run \`ray metrics launch-prometheus\` here); Grafana: import cluster/grafana-ray-fedat.json.
NEXT
