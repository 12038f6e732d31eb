"""Checkpoints, resume and surviving a killed worker (real Ray Train runs; the faulted CLI run keeps
its checkpoints in a real S3 store, the `s3` fixture in conftest.py)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import INTERRUPTED, same_rounds
from test_ray_training import final_state, max_abs_diff, train

pytestmark = pytest.mark.ray


def read_records(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for_records(proc, run_dir, done, what, console):
    """Poll metrics.jsonl until `done(records)`; fail with the run's console if it ends or stalls first."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        records = read_records(run_dir)
        if done(records):
            return records
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run ended or stalled before {what}:\n" + "\n".join(console.lines[-40:]))


@pytest.mark.slow
def test_a_killed_worker_then_ctrl_c_then_resume_on_s3_end_with_the_uninterrupted_model(
        tmp_path, uninterrupted, s3):
    """One CLI run meets both faults a user meets, with its checkpoints in an S3 store (a real
    SeaweedFS server) and its own files in a local --output-dir: a worker SIGKILLed after round
    2 (the group restarts from the store's last checkpoint and goes on), then Ctrl-C in a round
    the restarted group ran (a clean stop). `--resume` finishes it from the store, equal to the
    uninterrupted run round by round (the 2-host run in test_cluster.py is compared with the
    same reference and tests `--resume --rounds N` past the plan). The run has the dashboard on with token authentication: the dashboard's job,
    actor and task APIs (which show every runtime_env to anyone with the token) never hold the
    secret key, and nothing the runs printed or wrote holds it either."""
    import secrets as tokens

    import pyarrow.fs

    from conftest import S3_SECRET as SECRET
    from test_monitoring import Console, get

    uri, fs, env = s3
    out = tmp_path / "out"
    token = tokens.token_hex(32)
    run_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    run_env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", *INTERRUPTED, "--dashboard", "--storage-path", uri, "--name", "cut",
                             "--output-dir", str(out), "--max-failures", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env)
    console = Console(proc)
    try:
        dashboard = console.wait_for(r"ray_fedat: dashboard (http://127\.0\.0\.1:\d+)", proc, 240).group(1)
        console.wait_for(r"round\s+1/6", proc, 300)  # the workers run: their actors exist
        shown = {}
        for api in ("/api/jobs/", "/api/v0/actors?detail=1&limit=1000", "/api/v0/tasks?detail=1&limit=1000"):
            status, body = get(dashboard + api, token, timeout=60)
            assert status == 200, (api, status, body[:300])
            shown[api] = body
        wait_for_records(proc, out, lambda records: len(records) >= 2, "a worker could be killed", console)
        with open(out / "workers.json") as f:
            victim = next(w for w in json.load(f) if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_after = len(read_records(out))
        wait_for_records(proc, out, lambda records: any(r["resumed_from"] > 1 for r in records),
                         "a round ran in a restarted worker group", console)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    console.thread.join(timeout=10)
    printed = "\n".join(console.lines)
    assert proc.returncode == 130, printed[-3000:]

    # The kill: the group restarted from a checkpoint in the store (not round 1) in new processes.
    records = read_records(out)
    restarted = [r for r in records if r["resumed_from"] > 1]
    assert 2 <= restarted[0]["resumed_from"] <= killed_after + 1
    assert all(r["resumed_from"] == 1 for r in records[: restarted[0]["resumed_from"] - 1])
    stored = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector("rayfedat/runs/cut", recursive=True))]
    assert any("/checkpoint_" in p and p.endswith("/model.pt") for p in stored), stored
    assert not any(p.name.startswith("checkpoint_") for p in out.iterdir())  # checkpoints: only in the store
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
    # The Ctrl-C: one line saying how to go on, and everything written so far kept.
    assert "interrupted after round" in printed and "--resume" in printed and "Traceback" not in printed
    cut_at = len(records)
    assert 3 <= cut_at < 6, "the run was not cut short"
    with open(out / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == cut_at
    assert victim["pid"] not in [w["pid"] for w in summary["workers"]]

    def resume(*extra):
        done = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--resume", str(out), *extra],
                              capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    printed += resume()  # no --rounds: it finishes the run it had planned
    resumed = read_records(out)
    full, full_dir = uninterrupted
    assert [r["round"] for r in resumed] == list(range(1, 7))
    # Every round as in the uninterrupted run: the same lr, attack, scores, and evaluated on the
    # same rounds (validation 1, 4, 6; the test set at the last), the restarted groups' first
    # rounds included.
    assert same_rounds(resumed) == same_rounds(full)
    assert [r["round"] for r in resumed if r["val_natural_acc"] is not None] == [1, 4, 6]
    assert [r["round"] for r in resumed if r["natural_acc"] is not None] == [6]
    assert max_abs_diff(final_state(out), final_state(full_dir)) <= 1e-6

    with open(out / "summary.json") as f:
        assert json.load(f)["config"]["storage_path"] == uri  # the store, not the local --output-dir

    # The secret: the workers inherit it from the nodes' environment; no API shows it.
    actors = json.loads(shown["/api/v0/actors?detail=1&limit=1000"])["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(workers) == 2 and all("serialized_runtime_env" in a for a in workers)
    # what the driver does send (--deterministic's cuBLAS setting) is seen there
    assert all("CUBLAS_WORKSPACE_CONFIG" in a["serialized_runtime_env"] for a in workers)
    for api, body in shown.items():
        assert SECRET not in body and "AWS_SECRET_ACCESS_KEY" not in body, api
    # Nothing the two runs printed or wrote (metrics, summary, workers, curves, ...) holds it.
    assert SECRET not in printed
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("make_bad", [
    lambda p, good: p.write_bytes(good.read_bytes()[:200]),            # truncated
    lambda p, good: p.write_bytes(b"\x00" * 64),                        # random bytes
    lambda p, good: torch.save([1, 2, 3], p),                           # foreign object
])
def test_corrupt_checkpoints_give_a_one_line_error_naming_the_file(tmp_path, make_bad, capsys):
    """In-process (`python -m ray_fedat.evaluate` is this main): any other exception than the
    one-line error would fail the test with its traceback."""
    from ray_fedat.evaluate import main
    from ray_fedat.models import build_model

    good = tmp_path / "good.pt"
    torch.save({"state_dict": build_model("mlp", (1, 8, 8), 10).state_dict(), "model": "mlp", "round": 1}, good)
    bad = tmp_path / "bad.pt"
    make_bad(bad, good)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(bad)])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1, lines
    assert str(bad) in lines[0]


def test_nan_stops_the_run_with_a_clear_error_and_keeps_what_was_written(tmp_path, ray_session):
    from ray_fedat.errors import RunFailed

    with pytest.raises(RunFailed) as e:
        train(tmp_path, "nan", "--workers", "1", "--model", "mlp", "--lr", "1e12", "--rounds", "3")
    assert e.value.code == 1
    with open(tmp_path / "nan" / "summary.json") as f:
        summary = json.load(f)
    assert summary["status"] == "failed"
    assert "nan" in summary["error"].lower() or "inf" in summary["error"].lower()
