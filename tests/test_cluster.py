"""cluster/ scripts and the target setup: a real 2-host Ray cluster whose hosts share no
disk (two Linux network namespaces; the worker host has its own mount namespace with a
private Ray temp dir and a private, empty copy of the storage path), started with the
scripts as the README says; token authentication, job submission, a killed worker,
--resume, and rank 0 on either host. One cluster serves the whole module."""
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import INTERRUPTED, same_rounds
from test_fault_tolerance import read_records
from test_ray_training import final_state, max_abs_diff

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
RAY_BIN = str(Path(sys.executable).parent / "ray")


def script(name, *args, env=None, netns=None, timeout=180):
    cmd = ["bash", str(CLUSTER / name), *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def one_error_line(proc):
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr)
    return lines[0]


@pytest.mark.parametrize("args, env, expected", [
    ([], {}, "usage: start-worker.sh HEAD_IP:PORT"),
    (["not-an-address"], {}, "is not HOST:PORT"),
    (["127.0.0.1:6379"], {"NET_IFACE": "nosuchnic0"}, "network interface 'nosuchnic0' does not exist"),
    (["127.0.0.1:6379"], {"NET_IFACE": "lo", "RAY_BIN": "/nonexistent/ray"}, "Ray is not installed"),
    (["127.0.0.1:6379"], {"NET_IFACE": "lo", "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}, "no cluster token at"),
    (["127.0.0.1:6379"], {"NET_IFACE": "lo", "AUTH": "maybe"}, "AUTH must be 'token' or 'none'"),
    (["127.0.0.1:6379"], {"NET_IFACE": "lo", "STORAGE_ENV_FILE": "/nonexistent/s3.env"}, "cannot be read"),
])
def test_start_worker_rejects_bad_input_with_one_line(args, env, expected):
    env = {"RAY_BIN": RAY_BIN, **env}
    assert expected in one_error_line(script("start-worker.sh", *args, env=env))


def test_start_head_rejects_bad_input_with_one_line():
    assert "unknown argument '--fast'" in one_error_line(script("start-head.sh", "--fast"))
    assert "does not exist" in one_error_line(script("start-head.sh", env={"NET_IFACE": "nosuchnic0", "RAY_BIN": RAY_BIN}))
    assert "settings file" in one_error_line(script("start-head.sh", env={"CLUSTER_ENV": "/nonexistent.env"}))


def test_cluster_yaml_is_a_valid_launcher_config():
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["provider"]["type"] == "local" and config["provider"]["worker_ips"]
    broken = {**config, "provider": {**config["provider"]}, "head_start_commands": ["typo"]}
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


class NetnsCluster:
    """Two network namespaces ("hosts") joined by a veth pair on a private /24 that exists
    only between them. The worker host runs in its own mount namespace in which the
    storage root and its Ray temp dir are private, empty tmpfs mounts: it shares no disk
    with the head for anything a run writes. Everything started inside is killed by pid
    on exit, even on failure."""

    def __init__(self, root: Path):
        tag = uuid.uuid4().hex[:6]
        self.hosts = {"head": f"rfh{tag}", "worker": f"rfw{tag}"}
        self.nics = {"head": f"vh{tag}", "worker": f"vw{tag}"}
        self.ips = {"head": "10.213.7.1", "worker": "10.213.7.2"}
        self.root = root
        self.homes = {role: root / f"home-{role}" for role in self.hosts}  # each host's ~/.ray/auth_token
        self.storage = root / "runs"  # the head's disk; the worker host sees an empty tmpfs here
        # Ray's unix sockets live under its temp dir: keep that path short (107-byte limit).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))

    def __enter__(self):
        for d in (*self.homes.values(), self.storage, self.ray_tmp / "head", self.ray_tmp / "worker"):
            d.mkdir(parents=True, exist_ok=True)
        created = []
        try:
            for role, ns in self.hosts.items():
                subprocess.run(["ip", "netns", "add", ns], check=True)
                created.append(ns)
            subprocess.run(["ip", "link", "add", self.nics["head"], "type", "veth", "peer", "name",
                            self.nics["worker"]], check=True)
            for role, ns in self.hosts.items():
                nic = self.nics[role]
                subprocess.run(["ip", "link", "set", nic, "netns", ns], check=True)
                subprocess.run(["ip", "-n", ns, "addr", "add", f"{self.ips[role]}/24", "dev", nic], check=True)
                subprocess.run(["ip", "-n", ns, "link", "set", nic, "up"], check=True)
                subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def env(self, role, **extra):
        """The environment a user has on that host: its own HOME (token at ~/.ray/auth_token)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, "HOME": str(self.homes[role]), "NET_IFACE": self.nics[role], "NUM_CPUS": "1",
                "RAY_TEMP_DIR": str(self.ray_tmp / role), "RAY_BIN": RAY_BIN, **extra}

    def start_head(self):
        return subprocess.run(["ip", "netns", "exec", self.hosts["head"], "bash", str(CLUSTER / "start-head.sh")],
                              capture_output=True, text=True, timeout=180, env=self.env("head"))

    def start_worker(self):
        """start-worker.sh inside a fresh mount namespace with private storage and temp dirs."""
        private = f"mount -t tmpfs ray-fedat-private {self.storage} && " \
                  f"mount -t tmpfs ray-fedat-private {self.ray_tmp / 'worker'} && "
        cmd = ["ip", "netns", "exec", self.hosts["worker"], "unshare", "--mount", "--propagation", "private",
               "bash", "-c", private + f"exec bash {CLUSTER / 'start-worker.sh'} {self.ips['head']}:6379"]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env("worker"))

    def on(self, role, *cmd, timeout=600, **extra_env):
        return subprocess.run(["ip", "netns", "exec", self.hosts[role], *cmd], capture_output=True, text=True,
                              timeout=timeout, env=self.env(role, **extra_env))

    def worker_host_view(self, path):
        """What the worker host sees at `path` (entered through its raylet's mount namespace)."""
        raylet = next(p for p in subprocess.run(["ip", "netns", "pids", self.hosts["worker"]], capture_output=True,
                                                text=True).stdout.split()
                      if "raylet" in Path(f"/proc/{p}/comm").read_text())
        out = subprocess.run(["nsenter", f"--mount=/proc/{raylet}/ns/mnt", "find", str(path)], capture_output=True,
                             text=True)
        return out.stdout.split()

    def __exit__(self, *exc):
        for ns in self.hosts.values():
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        return False


def require_root():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the 2-host cluster test needs root (network namespaces) and must run under CI=true")
        pytest.skip("needs root to create network namespaces")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One 2-host cluster for the module, started with the cluster/ scripts as the README says."""
    require_root()
    with NetnsCluster(tmp_path_factory.mktemp("cluster")) as c:
        started = c.start_head()
        assert started.returncode == 0, started.stderr
        assert f"Ray head running at {c.ips['head']}:6379" in started.stdout and "start-worker.sh" in started.stdout
        assert f"Prometheus metrics at http://{c.ips['head']}:8080/metrics" in started.stdout
        token = c.homes["head"] / ".ray" / "auth_token"
        assert token.stat().st_mode & 0o077 == 0  # generated, and private
        again = c.start_head()
        assert again.returncode == 0 and "already running" in again.stdout
        (c.homes["worker"] / ".ray").mkdir()
        shutil.copy(token, c.homes["worker"] / ".ray" / "auth_token")  # the README's `scp` of the token
        joined = c.start_worker()
        assert joined.returncode == 0, joined.stderr
        yield c


@pytest.mark.ray
@pytest.mark.slow
def test_two_hosts_train_with_the_readme_job_submission_and_token_auth_refuses_strangers(cluster, killed_job,
                                                                                         tmp_path):
    c = cluster
    # With the token, the documented job submission runs the training on the cluster (the
    # killed-worker run below is that job: it survives its kill and finishes).
    code, out, err, _, run_dir = killed_job
    assert code == 0, (out + err)[-3000:]
    assert "one worker per node (2 of 2 nodes)" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(w["node_ip"] for w in summary["workers"]) == [c.ips["head"], c.ips["worker"]]
    assert summary["status"] == "finished" and summary["rounds_completed"] == 6
    writer = [w for w in summary["workers"] if w["writes_checkpoints"]]
    assert [w["node_ip"] for w in writer] == [c.ips["head"]]  # the storage is on the head's disk only
    assert any(p.name.startswith("checkpoint_") for p in run_dir.iterdir())
    assert not any("checkpoint_" in p for p in c.worker_host_view(c.storage))  # nothing landed there
    # `ray job submit` tails the job's driver log: the same console lines as the CLI's.
    assert "round   6/6  nat" in out and "ray_fedat: done, 6 rounds" in out
    # State tracking is on (the CLI sets it; the scripts, for every job): the Train API lists the run.
    runs_probe = ("import json, os, urllib.request\n"
                  "token = open(os.path.expanduser('~/.ray/auth_token')).read().strip()\n"
                  "r = urllib.request.Request('http://%s:8265/api/train/v2/runs/v1', "
                  "headers={'Authorization': 'Bearer ' + token})\n"
                  "print(json.dumps({x['name']: x['status'] for x in json.load(urllib.request.urlopen(r, timeout=30))"
                  "['train_runs']}))\n") % c.ips["head"]
    runs = c.on("head", sys.executable, "-c", runs_probe, timeout=60)
    assert {KILLED: "FINISHED"}.items() <= json.loads(runs.stdout).items(), runs.stderr

    # Strangers: no token, no access to the cluster, the job API or job submission.
    stranger = {"HOME": str(tmp_path)}
    refused = c.on("head", sys.executable, "-m", "ray_fedat.train", "--address", f"{c.ips['head']}:6379",
                   "--dataset", "digits", "--rounds", "1", "--storage-path", str(tmp_path), timeout=120, **stranger)
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip() and "gcs_client" not in ln]
    assert refused.returncode == 2 and "requires its authentication token" in lines[-1], refused.stderr[-2000:]
    assert "cannot reach" not in refused.stderr
    probe = ("import urllib.request, urllib.error\n"
             "try:\n    urllib.request.urlopen('http://%s:8265/api/jobs/', timeout=20); print(200)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code)\n") % c.ips["head"]
    http = c.on("head", sys.executable, "-c", probe, timeout=60, **stranger)
    assert http.stdout.strip() == "401", http.stderr
    job = c.on("head", RAY_BIN, "job", "submit", "--address", f"http://{c.ips['head']}:8265", "--no-wait", "--",
               "echo", "hello", timeout=120, **stranger)
    assert "no authentication token" in (job.stdout + job.stderr).lower()
    # (an address where no Ray answers: test_usability's unreachable-cluster test)


def kill_worker_after_round(proc, run_dir, after_round, node_ip=None):
    """SIGKILL the RayTrainWorker on `node_ip` (default: rank 1) once `after_round` rounds
    are recorded in `run_dir`."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(read_records(run_dir)) >= after_round:
            with open(os.path.join(run_dir, "workers.json")) as f:
                victim = next(w for w in json.load(f) if (w["node_ip"] == node_ip if node_ip else w["rank"] == 1))
            os.kill(victim["pid"], signal.SIGKILL)
            return victim
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"the run ended or stalled before a worker could be killed: {proc.communicate()[1][-3000:]}")


# The killed-worker run: the README's `ray job submit` of the conftest.INTERRUPTED run, rank 0
# pinned on the worker host, which has none of the run's files (--worker-nodes: Ray would put it
# where it creates the first worker), and rank 1 on the head, which writes the checkpoints. Rank 0
# is killed, so the restarted group restores across the hosts. It must end equal to the same run,
# uninterrupted, on one local Ray (conftest.uninterrupted): placement and a kill change nothing.
KILLED = "killed-rank0-on-worker"


@pytest.fixture(scope="module")
def killed_job(cluster):
    """The killed-worker run, submitted with the README's `ray job submit` (a job is a run
    like the CLI's): (exit code, stdout, stderr, the killed worker, the run dir)."""
    c = cluster
    order = [c.ips["worker"], c.ips["head"]]
    cmd = ["ip", "netns", "exec", c.hosts["head"], RAY_BIN, "job", "submit", "--address",
           f"http://{c.ips['head']}:8265", "--working-dir", str(REPO), "--", "python", "-m", "ray_fedat.train",
           "--dataset", "digits", *INTERRUPTED, "--storage-path", str(c.storage), "--max-failures", "1",
           "--worker-nodes", ",".join(order), "--name", KILLED]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=c.env("head", RAY_AUTH_MODE="token"))
    run_dir = c.storage / KILLED
    try:
        victim = kill_worker_after_round(proc, str(run_dir), 2, c.ips["worker"])  # the host without the files
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    return proc.returncode, out, err, victim, run_dir


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_worker_on_hosts_without_shared_disk_costs_nothing(cluster, killed_job, uninterrupted):
    """The killed run (rank 0 on the host without the run's files) restarts, restoring across
    the hosts, and ends equal, round by round, to the same run uninterrupted on one local Ray.
    `--resume --rounds N` past its plan then adds rounds, restored across the hosts again, with
    the plan's last lr and attack (a cosine lr does not jump back up)."""
    c = cluster
    full, full_dir = uninterrupted
    code, out, err, victim, run_dir = killed_job
    assert code == 0, (out + err)[-3000:]
    records = read_records(str(run_dir))
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert any(r["resumed_from"] > 1 for r in records), "no round ran in a restarted worker group"
    summary = json.loads((run_dir / "summary.json").read_text())
    ranks = {w["rank"]: w for w in summary["workers"]}
    assert ranks[0]["node_ip"] == c.ips["worker"]
    assert [w["node_ip"] for w in summary["workers"] if w["writes_checkpoints"]] == [c.ips["head"]]
    assert victim["pid"] not in [w["pid"] for w in summary["workers"]]
    assert same_rounds(records) == same_rounds(full)
    assert max_abs_diff(final_state(str(run_dir)), final_state(full_dir)) <= 1e-6

    extended = c.on("head", sys.executable, "-m", "ray_fedat.train", "--address", f"{c.ips['head']}:6379",
                    "--resume", str(run_dir), "--rounds", "7")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "the lr schedule and late attack keep the run's plan of 6 rounds" in extended.stdout
    records = read_records(str(run_dir))
    assert [r["round"] for r in records] == list(range(1, 8))
    assert [r["resumed_from"] for r in records[6:]] == [7]
    assert same_rounds(records[:6]) == same_rounds(full)  # the planned rounds, untouched
    assert records[5]["lr"] < records[0]["lr"] and records[5]["attack_steps"] == 7  # cosine; late after 0.6 * 6
    assert [(r["lr"], r["attack_steps"]) for r in records[6:]] == [(records[5]["lr"], 7)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["config"]["rounds"], summary["config"]["schedule_rounds"]) == (7, 6)
    assert summary["workers"][0]["node_ip"] == c.ips["worker"]
