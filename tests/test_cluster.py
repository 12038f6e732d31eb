"""cluster/ scripts: a real 2-host Ray cluster in two Linux network namespaces, token
authentication, job submission, and the scripts' input checks."""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

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
    only between them. Everything started inside is killed by pid on exit, even on failure."""

    def __init__(self, tmp_path):
        tag = uuid.uuid4().hex[:6]
        self.hosts = {"head": f"rfh{tag}", "worker": f"rfw{tag}"}
        self.nics = {"head": f"vh{tag}", "worker": f"vw{tag}"}
        self.ips = {"head": "10.213.7.1", "worker": "10.213.7.2"}
        self.tmp = tmp_path
        # Ray's unix sockets live under its temp dir: keep that path short (107-byte limit).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="rf", dir="/tmp"))

    def __enter__(self):
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
        return {"NET_IFACE": self.nics[role], "NUM_CPUS": "1", "RAY_TEMP_DIR": str(self.ray_tmp / role),
                "RAY_AUTH_TOKEN_PATH": str(self.tmp / "token"), "RAY_BIN": RAY_BIN, **extra}

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


@pytest.mark.ray
def test_two_host_cluster_with_token_auth_trains_on_two_node_ips_and_refuses_strangers(tmp_path):
    require_root()
    with NetnsCluster(tmp_path) as c:
        head, worker = c.hosts["head"], c.hosts["worker"]
        started = script("start-head.sh", env=c.env("head"), netns=head)
        assert started.returncode == 0, started.stderr
        assert f"Ray head running at {c.ips['head']}:6379" in started.stdout and "start-worker.sh" in started.stdout
        assert (tmp_path / "token").stat().st_mode & 0o077 == 0  # the token is private
        again = script("start-head.sh", env=c.env("head"), netns=head)
        assert again.returncode == 0 and "already running" in again.stdout
        joined = script("start-worker.sh", f"{c.ips['head']}:6379", env=c.env("worker"), netns=worker)
        assert joined.returncode == 0, joined.stderr

        token_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}
        train = subprocess.run(["ip", "netns", "exec", head, sys.executable, "-m", "ray_fedat.train",
                                "--address", f"{c.ips['head']}:6379", "--dataset", "digits", "--workers", "2",
                                "--rounds", "2", "--storage-path", str(tmp_path / "runs"), "--name", "netns"],
                               capture_output=True, text=True, timeout=600, env=token_env)
        assert train.returncode == 0, train.stderr[-3000:]
        assert "one worker per node (2 of 2 nodes)" in train.stdout
        summary = json.loads((tmp_path / "runs" / "netns" / "summary.json").read_text())
        assert sorted(w["node_ip"] for w in summary["workers"]) == [c.ips["head"], c.ips["worker"]]
        assert summary["rounds_completed"] == 2

        # Strangers: no token, no access to the job API or to job submission.
        probe = ("import urllib.request, urllib.error\n"
                 "try:\n    urllib.request.urlopen('http://%s:8265/api/jobs/', timeout=20); print(200)\n"
                 "except urllib.error.HTTPError as e:\n    print(e.code)\n") % c.ips["head"]
        stranger_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        stranger_env["HOME"] = str(tmp_path / "stranger")  # no ~/.ray/auth_token either
        os.makedirs(stranger_env["HOME"], exist_ok=True)
        http = subprocess.run(["ip", "netns", "exec", head, sys.executable, "-c", probe], capture_output=True,
                              text=True, timeout=60, env=stranger_env)
        assert http.stdout.strip() == "401", http.stderr
        refused = subprocess.run(["ip", "netns", "exec", head, RAY_BIN, "job", "submit", "--address",
                                  f"http://{c.ips['head']}:8265", "--no-wait", "--", "echo", "hello"],
                                 capture_output=True, text=True, timeout=120, env=stranger_env)
        assert refused.returncode != 0 or "no authentication token" in (refused.stdout + refused.stderr)
        assert "no authentication token" in (refused.stdout + refused.stderr).lower()

        # With the token, the documented job submission runs the training on the cluster.
        job = subprocess.run(["ip", "netns", "exec", head, RAY_BIN, "job", "submit", "--address",
                              f"http://{c.ips['head']}:8265", "--working-dir", str(REPO), "--",
                              "python", "-m", "ray_fedat.train", "--dataset", "digits", "--workers", "2",
                              "--rounds", "1", "--storage-path", str(tmp_path / "runs"), "--name", "job"],
                             capture_output=True, text=True, timeout=600, env=token_env)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        job_summary = json.loads((tmp_path / "runs" / "job" / "summary.json").read_text())
        assert sorted(w["node_ip"] for w in job_summary["workers"]) == [c.ips["head"], c.ips["worker"]]
        assert job_summary["status"] == "finished"
