# Shared by the cluster scripts: settings, input checks and one-line errors.
set -euo pipefail

die() { echo "$(basename "$0"): error: $*" >&2; exit 2; }
say() { echo "$(basename "$0"): $*"; }

load_settings() {
    local here env_file
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    env_file="${CLUSTER_ENV:-$here/cluster.env}"
    [ -f "$env_file" ] || die "settings file $env_file not found (set CLUSTER_ENV=/path/to/cluster.env)"
    # shellcheck disable=SC1090
    source "$env_file"
    command -v "$RAY_BIN" >/dev/null 2>&1 \
        || die "Ray is not installed here ('$RAY_BIN' not found); pip install 'ray[default,train]' or set RAY_BIN"
    # Jobs run their entrypoint (`python -m ray_fedat.train`) with Ray's PATH: make `python`
    # the interpreter of the environment Ray itself runs from.
    PATH="$(dirname "$(command -v "$RAY_BIN")"):$PATH"
    export PATH
    if [ ! -e "/sys/class/net/$NET_IFACE" ]; then
        die "network interface '$NET_IFACE' does not exist on this node (have: $(ls /sys/class/net | tr '\n' ' ')); set NET_IFACE"
    fi
    if [ -z "$NODE_IP" ]; then
        NODE_IP="$(ip -4 -o addr show dev "$NET_IFACE" 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -n1)"
        [ -n "$NODE_IP" ] || die "interface '$NET_IFACE' has no IPv4 address; set NODE_IP"
    fi
    # NCCL (GPU) and gloo (CPU) pick their own interface unless told: tell them, per node.
    export NCCL_SOCKET_IFNAME="$NET_IFACE" GLOO_SOCKET_IFNAME="$NET_IFACE"
    # Jobs and drivers started through this node inherit it: Ray Train's state API sees their runs.
    export RAY_TRAIN_ENABLE_STATE_TRACKING
    if [ -n "${STORAGE_ENV_FILE:-}" ]; then  # object-store credentials: inherited by `ray start`, never sent
        [ -r "$STORAGE_ENV_FILE" ] || die "STORAGE_ENV_FILE $STORAGE_ENV_FILE cannot be read"
        set -a
        # shellcheck disable=SC1090
        source "$STORAGE_ENV_FILE"
        set +a
    fi
    RESOURCE_FLAGS=()
    [ -n "${METRICS_EXPORT_PORT:-}" ] && RESOURCE_FLAGS+=(--metrics-export-port "$METRICS_EXPORT_PORT")
    [ -n "$NUM_GPUS" ] && RESOURCE_FLAGS+=(--num-gpus "$NUM_GPUS")
    [ -n "$NUM_CPUS" ] && RESOURCE_FLAGS+=(--num-cpus "$NUM_CPUS")
    return 0
}

use_auth() {
    # token: every Ray process and client on this node reads the token file.
    if [ "$AUTH" = "token" ]; then
        export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH
    elif [ "$AUTH" = "none" ]; then
        export RAY_AUTH_MODE=disabled
        echo "WARNING: $(basename "$0"): token authentication is OFF: anyone who can reach this node's ports" \
             "can run arbitrary code on the cluster. Use only on a network you fully trust." >&2
    else
        die "AUTH must be 'token' or 'none' (got '$AUTH')"
    fi
}

raylet_running_for() {
    # Is a Ray node for this IP already running on this machine?
    pgrep -f "raylet.*--node_ip_address=$1( |$)" >/dev/null 2>&1
}
