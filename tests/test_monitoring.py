"""Watching a run: the per-round worker line, the job's name, Ray Train's state API and the
Prometheus endpoint, checked against a real CLI run with --dashboard (conftest.cli_run)."""
import glob
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import CLI_ROUNDS
from ray_fedat.monitoring import (EXPORTED_PREFIX, GAUGES, TRAIN_RUNS_API, exported_name, gauge_name,
                                  submission_id, worker_round_line)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worker_round_line_is_short_and_names_rank_and_node():
    record = {"round": 3, "natural_acc": 0.9712, "robust_acc": 0.8144, "train_loss": 0.42, "round_s": 12.34}
    assert worker_round_line(1, "10.0.0.2", record, 10) == \
        "[rank 1 @ 10.0.0.2] round 3/10  nat 97.1%  rob 81.4%  loss 0.420  12.3 s"
    skipped = {**record, "natural_acc": None, "robust_acc": None}  # a round without evaluation, plan unknown
    assert worker_round_line(0, "n1", skipped, None) == "[rank 0 @ n1] round 3/?  nat -  rob -  loss 0.420  12.3 s"


def test_gauges_are_named_so_that_prometheus_sees_ray_fedat():
    # Ray prepends "ray_" to custom metric names.
    assert ["ray_" + gauge_name(k) for k in GAUGES] == [exported_name(k) for k in GAUGES]
    assert exported_name("round") == "ray_fedat_round" and EXPORTED_PREFIX == "ray_fedat_"


@pytest.mark.parametrize("env, expected", [
    (None, None),
    ('{"metadata": {"job_submission_id": "mnist-iid-1", "job_name": "mnist-iid-1"}}', "mnist-iid-1"),
    ('{"metadata": {"job_submission_id": "../evil"}}', None),  # names a directory: refused
    ('{"runtime_env": {}}', None),
    ("not json", None),
])
def test_submission_id_comes_from_the_job_config_ray_hands_the_entrypoint(monkeypatch, env, expected):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    if env is not None:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", env)
    assert submission_id() == expected


def test_the_dashboard_stays_on_this_machine_unless_asked():
    from ray_fedat.config import parse_config

    assert parse_config(["--dataset", "digits"]).dashboard_host == "127.0.0.1"
    assert parse_config(["--dataset", "digits", "--dashboard-host", "0.0.0.0"]).dashboard_host == "0.0.0.0"


class Console:
    """The CLI's stdout, read in a thread so that the test can wait for lines."""

    def __init__(self, proc, stream="stdout"):
        self.lines = []
        self.thread = threading.Thread(target=self._read, args=(getattr(proc, stream),), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, proc, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; console:\n" + "\n".join(self.lines[-40:]))


def get(url, token=None, timeout=10):
    """(status, body) of a GET; errors are statuses too."""
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return None, str(e)


def scrape(endpoint, run):
    """{exported name: value} of our gauges for `run`, parsed as Prometheus text format."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = get(endpoint)
    if status != 200:
        return {}
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(EXPORTED_PREFIX) and sample.labels.get("run") == run:
                values[sample.name] = sample.value
    return values


@pytest.mark.ray
@pytest.mark.slow
def test_a_dashboard_run_shows_in_the_train_api_the_jobs_list_the_logs_and_prometheus(cli_run):
    """The watched CLI run (conftest.cli_run: --dashboard, its own local Ray, so the dashboard and
    metrics agent are real): Ray Train's state API lists it with its workers, the Jobs list names
    it, each worker logs a line per round, and the metrics endpoint the console names exports
    ray_fedat_* gauges with the run label and the values of metrics.jsonl."""
    run = cli_run
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.dashboard_line == "until the run ends; it asks for the token: the value of $RAY_AUTH_TOKEN"
    # Ray Train's state API: refused without the token, lists the run and its workers with it.
    assert run.runs_api_without_token == 401
    assert run.train_run is not None, f"the run never showed with its workers in {TRAIN_RUNS_API}"
    assert sorted(w["world_rank"] for w in run.train_run["attempts"][-1]["workers"]) == [0, 1]
    # The Jobs list's Name column is the job's metadata job_name: the run name.
    status, body = run.jobs
    assert status == 200 and [j["metadata"].get("job_name") for j in json.loads(body)] == ["e2e"]

    # Prometheus: every gauge, with the values of metrics.jsonl.
    scrapes = run.scrapes
    assert scrapes, "the metrics endpoint never exported ray_fedat_* gauges for the run"
    # The last round at least (a fast CPU ends 3 digits rounds within one 2 s export); every
    # value scraped is checked against metrics.jsonl below.
    assert CLI_ROUNDS in {s["ray_fedat_round"] for s in scrapes}, scrapes
    assert set(scrapes[-1]) == {exported_name(k) for k in GAUGES}
    records = {}
    for line in (run.run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["round"]] = record
    matching = [s for s in scrapes
                if s.get("ray_fedat_round") in records
                and all(s[exported_name(k)] == pytest.approx(records[s["ray_fedat_round"]][k], rel=1e-6)
                        for k in ("natural_acc", "robust_acc", "train_loss") if exported_name(k) in s)]
    assert matching and "ray_fedat_natural_acc" in matching[-1], f"no scrape matched metrics.jsonl: {scrapes[-3:]}"
    for s in scrapes:  # every value exported was some round's value
        assert s["ray_fedat_train_loss"] in [pytest.approx(r["train_loss"], rel=1e-6) for r in records.values()]
        if "ray_fedat_natural_acc" in s:
            assert any(s["ray_fedat_natural_acc"] == pytest.approx(r["natural_acc"], rel=1e-6)
                       for r in records.values() if r["natural_acc"] is not None)

    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["watch"]["metrics_endpoint"] == run.endpoint and summary["watch"]["dashboard"] == run.dashboard
    assert summary["watch"]["metrics_label"] == {"run": "e2e"}

    # Each worker's log (what the dashboard's Logs page shows) has one line per round.
    logs_dir = os.path.dirname(os.path.dirname(run.train_run["controller_log_file_path"]))
    for rank in (0, 1):
        lines = [ln for path in glob.glob(os.path.join(logs_dir, "worker-*.out"))
                 for ln in open(path, errors="replace") if ln.startswith(f"[rank {rank} @ ")]
        assert [int(re.search(rf"round (\d+)/{CLI_ROUNDS}", ln).group(1)) for ln in lines] == list(
            range(1, CLI_ROUNDS + 1)), lines


def test_the_grafana_dashboard_queries_exactly_our_exported_gauges():
    with open(os.path.join(REPO, "cluster", "grafana-ray-fedat.json")) as f:
        dashboard = json.load(f)
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    used = {name for q in queries for name in re.findall(r"\b(ray_\w+)", q)}
    assert used == {exported_name(k) for k in GAUGES}
    assert all('run=~"$run"' in q for q in queries if "label_values" not in q)
