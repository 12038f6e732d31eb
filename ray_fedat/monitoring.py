"""Where a run can be watched while it runs: the Ray dashboard and how to get in, Ray
Train's state API, the Prometheus endpoint that exports our gauges, the job's name, and
the short per-round line each worker writes to its log.

The pure helpers (names, lines) test without Ray; the others ask the Ray this process is
connected to and return None for what it does not have.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

# Ray Train keeps the runs, their attempts and their workers in a state actor only when
# this is set in the driver before the trainer starts; without it the dashboard's Train
# API answers HTTP 500.
STATE_TRACKING_ENV = "RAY_TRAIN_ENABLE_STATE_TRACKING"
# Ray Train v2's runs (what ray_fedat uses). The similar /api/train/v2/runs is Train v1's.
TRAIN_RUNS_API = "/api/train/v2/runs/v1"

# Ray puts "ray_" in front of every custom metric's name: the gauge `fedat_round` is
# exported to Prometheus as `ray_fedat_round`.
GAUGES = ("natural_acc", "robust_acc", "train_loss", "round")
GAUGE_PREFIX = "fedat_"
EXPORTED_PREFIX = "ray_" + GAUGE_PREFIX
RUN_LABEL = "run"


def gauge_name(key: str) -> str:
    """The name to give ray.util.metrics.Gauge for `key`."""
    return GAUGE_PREFIX + key


def exported_name(key: str) -> str:
    """The name Prometheus sees for `key`."""
    return EXPORTED_PREFIX + key


def enable_state_tracking() -> None:
    """Let Ray Train's state API see this run (unless the user chose otherwise); the
    caller decides when a dashboard can show it."""
    os.environ.setdefault(STATE_TRACKING_ENV, "1")


def job_config(run_name: str):
    """A JobConfig that names the Ray job after the run: the dashboard's Jobs list shows it
    in its Name column. (A job started by `ray job submit` keeps its submission's name.)"""
    from ray.job_config import JobConfig

    return JobConfig(metadata={"job_name": run_name})


def submission_id() -> Optional[str]:
    """The submission id when this process is the entrypoint of `ray job submit`, else None.
    Ray hands the entrypoint its job's metadata in RAY_JOB_CONFIG_JSON_ENV_VAR."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        value = json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    # It names the run directory: only a plain name will do.
    if not value or os.sep in value or value in (".", ".."):
        return None
    return value


def token_hint() -> Optional[str]:
    """How to get the dashboard's token, or None when token authentication is off."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode

        if get_authentication_mode() != AuthenticationMode.TOKEN:
            return None
    except ImportError:  # a Ray without token authentication
        return None
    from .auth import TOKEN_ENV, TOKEN_PATH_ENV, default_token_path

    if os.environ.get(TOKEN_ENV):  # Ray's own order: the variable, then the file
        return f"the value of ${TOKEN_ENV}"
    return f"`ray get-auth-token` prints it (from {os.environ.get(TOKEN_PATH_ENV) or default_token_path()})"


def dashboard_url() -> Optional[str]:
    """http://host:port of the connected Ray's dashboard, or None when it has none."""
    import ray

    try:
        url = ray._private.worker.get_dashboard_url()
    except Exception:  # noqa: BLE001 - not connected, or a Ray without a dashboard
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def metrics_endpoint() -> Optional[str]:
    """The Prometheus endpoint of this node's Ray metrics agent. The run's gauges are set by
    the recorder in Ray Train's controller, which Ray places on the driver's node: this one."""
    import ray

    if not ray.is_initialized():
        return None
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return None


def watch_info(run_name: str) -> Dict[str, Any]:
    """For summary.json: where this run could be watched while it ran."""
    dashboard = dashboard_url()
    return {
        "dashboard": dashboard,
        "train_runs_api": dashboard + TRAIN_RUNS_API if dashboard else None,
        "metrics_endpoint": metrics_endpoint(),
        "metrics": [exported_name(k) for k in GAUGES],
        "metrics_label": {RUN_LABEL: run_name},
    }


def watch_lines(run_name: str, owns_local_ray: bool) -> List[str]:
    """The console lines that say where to watch the run and how to get in."""
    lines = []
    dashboard = dashboard_url()
    if dashboard:
        hint = token_hint()
        lines.append(f"ray_fedat: dashboard {dashboard}" + (" until the run ends" if owns_local_ray else "")
                     + (f"; it asks for the token: {hint}" if hint else ""))
    endpoint = metrics_endpoint()
    if endpoint:
        lines.append(f"ray_fedat: Prometheus metrics {EXPORTED_PREFIX}*{{{RUN_LABEL}=\"{run_name}\"}} at {endpoint}")
    return lines


def worker_round_line(rank: int, node: str, record: Dict[str, Any], planned: Optional[int]) -> str:
    """One short line per round for the worker's log, which the dashboard shows:
    `[rank 0 @ 10.0.0.1] round 3/10  nat 97.1%  rob 81.4%  loss 0.420  12.3 s`."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    return (f"[rank {rank} @ {node}] round {record['round']}/{planned or '?'}  nat {pct(record.get('natural_acc'))}  "
            f"rob {pct(record.get('robust_acc'))}  loss {record['train_loss']:.3f}  {record['round_s']:.1f} s")
