#!/usr/bin/env bash
# Stop the Ray processes of this node: cluster/stop.sh
# Safe to run when nothing is running.
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"
RAY_BIN=${RAY_BIN:-ray}
command -v "$RAY_BIN" >/dev/null 2>&1 || die "Ray is not installed here ('$RAY_BIN' not found); set RAY_BIN"
"$RAY_BIN" stop >/dev/null 2>&1 || true
say "stopped the Ray processes on this machine"
