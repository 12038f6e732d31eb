"""Experiment tracking (ray_fedat.tracking, --track mlflow,wandb) against the real trackers.

The pure parts (params, metric names, files, the W&B mode) are tested without Ray. The rest
talks to a real `mlflow server` (sqlite backend, started here) and a real offline wandb, whose
run file is read back with wandb's own protobuf records; one real training run on the shared
Ray logs to both, and one logs to an MLflow URL nobody answers."""
import json
import os
import struct
import subprocess
import sys
import time

import pytest

from conftest import free_port, need  # noqa: F401 - and the session's mlflow_server fixture
from ray_fedat.config import parse_config
from ray_fedat.errors import ConfigError
from ray_fedat.run_config import RunConfig
from ray_fedat.tracking import (TRACKING_FILE, artifact_files, attack_slug, final_metrics, final_tags, flat_params,
                                round_metrics, run_context, run_params, wandb_mode, worker_params)

# A finished run's summary, as summary.write_summary shapes it (the parts tracking reads).
SUMMARY = {
    "status": "finished", "error": None, "rounds_completed": 2, "wall_s": 31.5,
    "best": {"natural": {"round": 1, "natural_acc": None, "robust_acc": None, "chosen_on": "validation",
                         "file": "best_natural.pt", "val_natural_acc": 0.9, "val_robust_acc": 0.5},
             "robust": {"round": 2, "robust_acc": 0.62, "natural_acc": 0.93, "chosen_on": "validation",
                        "file": "best_robust.pt", "val_natural_acc": 0.88, "val_robust_acc": 0.59}},
    "client_robustness": {"round": 2, "split": "test",
                          "natural": {"worst": 0.91, "worst_client": 1, "bottom_mean": 0.91, "bottom_clients": 1},
                          "robust": {"worst": 0.6, "worst_client": 0, "bottom_mean": 0.6, "bottom_clients": 1}},
    "final_attack": {"attack": "APGD-CE + APGD-T", "images": 40, "epsilon": 0.1,
                     "models": {"final": {"natural_acc": 0.925, "yardstick_acc": 0.65, "robust_acc": 0.575,
                                          "images": 40},
                                "best_robust": {"natural_acc": 0.925, "yardstick_acc": 0.65, "robust_acc": 0.575,
                                                "images": 40}}},
    "headline": {"natural_acc": 0.925, "robust_acc": 0.575, "attack": "APGD-CE + APGD-T", "images": 40,
                 "epsilon": 0.1, "text": "robust 57.5% under APGD-CE + APGD-T (eps 0.1, 40 test images), natural 92.5%"},
}
RECORDS = [  # metrics.jsonl: round 1 scored validation only, round 2 both splits
    {"round": 1, "started_at": 100.0, "natural_acc": None, "robust_acc": None, "val_natural_acc": 0.9,
     "val_robust_acc": 0.5, "train_loss": 2.1, "lr": 0.05, "epsilon": 0.1, "attack_steps": 2, "round_s": 3.5,
     "train_s": 3.0, "aggregate_s": 0.1, "eval_s": 0.4, "participants": [0, 1], "best_natural": True},
    {"round": 2, "started_at": 104.0, "natural_acc": 0.93, "robust_acc": 0.62, "val_natural_acc": 0.88,
     "val_robust_acc": 0.59, "train_loss": 1.2, "lr": 0.05, "epsilon": 0.1, "attack_steps": 2, "round_s": 2.5,
     "train_s": 2.0, "aggregate_s": 0.1, "eval_s": 0.4, "participants": [0, 1], "best_natural": False},
]
WORKERS = [{"rank": 0, "node_ip": "10.0.0.1", "device": "cpu", "device_name": "Intel(R) Xeon(R)", "precision": "fp32"},
           {"rank": 1, "node_ip": "10.0.0.1", "device": "cpu", "device_name": "Intel(R) Xeon(R)", "precision": "fp32"}]


# ---- the pure parts ----

def test_params_are_the_resolved_config_flat_with_the_code_and_what_computed():
    cfg = parse_config(["--dataset", "digits", "--method", "pgd"])
    params = run_params(cfg.to_dict(), "0.1.0", "abc123")
    assert {k: params[k] for k in ("method", "epsilon", "model", "lr", "rounds")} == \
        {"method": "pgd", "epsilon": cfg.epsilon, "model": cfg.model, "lr": cfg.lr, "rounds": 10}
    assert set(RunConfig().to_dict()) <= set(params)  # every field of the run's one description
    assert (params["ray_fedat_version"], params["git_commit"], params["yardstick"]) == \
        ("0.1.0", "abc123", f"PGD-{cfg.eval_steps} CE+margin")
    assert run_params(cfg.to_dict(), "0.1.0", None)["git_commit"] == "unknown"
    assert flat_params({"a": 1, "b": {"c": 2, "d": {"e": None}}, "f": [1, 2]}) == {"a": 1, "b.c": 2, "b.d.e": None,
                                                                                 "f": [1, 2]}
    assert worker_params(WORKERS) == {"precision_used": "fp32", "device_name": "Intel(R) Xeon(R)",
                                      "device_type": "cpu", "nodes_used": 1}
    gpus = [{"node_ip": "a", "device": "cuda:0", "device_name": "NVIDIA H100", "precision": "bf16"},
            {"node_ip": "b", "device": "cuda:0", "device_name": "NVIDIA A100", "precision": "bf16"}]
    assert worker_params(gpus) == {"precision_used": "bf16", "device_name": "NVIDIA A100; NVIDIA H100",
                                   "device_type": "cuda", "nodes_used": 2}


def test_round_metrics_are_labelled_by_split_and_skip_what_was_not_scored():
    assert round_metrics(RECORDS[0]) == {"val/natural_acc": 0.9, "val/yardstick_acc": 0.5, "train/loss": 2.1,
                                         "train/lr": 0.05, "train/epsilon": 0.1, "train/attack_steps": 2.0,
                                         "time/round_s": 3.5, "time/train_s": 3.0, "time/aggregate_s": 0.1,
                                         "time/eval_s": 0.4}
    second = round_metrics(RECORDS[1])
    assert (second["test/natural_acc"], second["test/yardstick_acc"]) == (0.93, 0.62)
    assert "participants" not in second and "best_natural" not in second  # lists and flags are no metrics


def test_the_headline_is_named_with_its_attack_and_image_count():
    assert attack_slug("APGD-CE + APGD-T") == "apgd_ce_t"
    assert attack_slug("APGD-CE + APGD-T (APGD-T CE-targeted, fewer than 4 classes)") == "apgd_ce_t"
    assert attack_slug("PGD-100") == "pgd_100" and attack_slug("AutoAttack (standard)") == "autoattack"
    m = final_metrics(SUMMARY)
    assert (m["robust_apgd_ce_t"], m["final_attack_images"], m["final_natural_acc"]) == (0.575, 40.0, 0.925)
    assert m["final_yardstick_acc"] == 0.65 and m["best_robust_model_robust_apgd_ce_t"] == 0.575
    assert (m["worst_client_natural_acc"], m["worst_client_yardstick_acc"], m["bottom_clients_yardstick_acc"]) == \
        (0.91, 0.6, 0.6)
    assert (m["best_natural_round"], m["best_natural_val_natural_acc"]) == (1.0, 0.9)
    assert "best_natural_test_natural_acc" not in m  # not scored on test that round
    assert (m["best_robust_round"], m["best_robust_val_yardstick_acc"], m["best_robust_test_yardstick_acc"]) == \
        (2.0, 0.59, 0.62)
    assert (m["rounds_completed"], m["wall_s"]) == (2.0, 31.5)
    assert final_tags(SUMMARY) == {"status": "finished", "headline": SUMMARY["headline"]["text"],
                                   "final_attack": "APGD-CE + APGD-T", "worst_client": "0"}
    no_attack = {**SUMMARY, "headline": None, "final_attack": None}
    assert not any(k.startswith("robust_") or k.startswith("final_") for k in final_metrics(no_attack))


def test_files_logged_follow_track_artifacts(tmp_path):
    for name in ("curves.png", "metrics.jsonl", "final_model.pt", "best_robust.pt", "summary.json"):
        (tmp_path / name).write_bytes(b"x")
    names = lambda mode: [os.path.basename(p) for p in artifact_files(str(tmp_path), mode)]  # noqa: E731
    assert names("all") == ["curves.png", "metrics.jsonl", "final_model.pt", "best_robust.pt"]
    assert names("small") == ["curves.png", "metrics.jsonl"] and names("none") == []


def test_wandb_is_offline_unless_a_key_is_known(tmp_path, monkeypatch):
    from ray_fedat.tracking import netrc_has_wandb_key

    assert wandb_mode({}, netrc_has_key=False) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "k" * 40}, netrc_has_key=False) is None  # wandb's own default: online
    assert wandb_mode({}, netrc_has_key=True) is None
    assert wandb_mode({"WANDB_MODE": "disabled"}, netrc_has_key=False) is None  # the user's word wins
    netrc = tmp_path / "netrc"
    assert not netrc_has_wandb_key({"NETRC": str(netrc)})
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert netrc_has_wandb_key({"NETRC": str(netrc)})  # what `wandb login` writes
    assert not netrc_has_wandb_key({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.com"})


def test_sweep_runs_are_tagged_with_their_cells_values():
    ctx = run_context("digits-methods", {"mlflow": "abc"}, "pgd_beta0.1", 1, {"method": "pgd", "beta": 0.1})
    assert ctx == {"experiment": "digits-methods", "parent": {"mlflow": "abc"},
                   "tags": {"sweep": "digits-methods", "cell": "pgd_beta0.1", "seed": "1", "method": "pgd",
                            "beta": "0.1"}}


@pytest.mark.parametrize("argv, message", [
    (["--track", "comet"], "--track 'comet': 'comet' is not one of none, mlflow, wandb (or both, comma-separated)"),
    (["--track", "mlflow,mlflow"], "--track 'mlflow,mlflow' names a tracker twice"),
    (["--track-uri", "http://127.0.0.1:5000"], "--track-uri is MLflow's tracking URI: it needs --track mlflow"),
    (["--track", "mlflow", "--track-artifacts", "big"], "--track-artifacts 'big' is not one of all, small, none"),
    (["--track", "mlflow", "--track-uri", "https://me:s3cret@mlflow.example.com"],
     "--track-uri https://***@mlflow.example.com: credentials in the tracking URI are refused"),
])
def test_tracking_mistakes_are_one_line(argv, message):
    with pytest.raises(ConfigError) as e:
        parse_config(["--dataset", "digits", *argv])
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and "s3cret" not in str(e.value)


def test_track_flags_resolve_and_credentials_stay_on_the_driver(tmp_path, monkeypatch):
    from ray_fedat.launch import worker_env

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["--dataset", "digits", "--track", "mlflow,wandb"])
    assert (cfg.trackers(), cfg.track_uri, cfg.track_artifacts) == (["mlflow", "wandb"], str(tmp_path / "mlruns"), "all")
    assert parse_config(["--dataset", "digits"]).trackers() == []
    assert parse_config(["--track", "mlflow", "--track-uri", "http://h:5000"]).track_uri == "http://h:5000"
    assert parse_config(["--track", "mlflow", "--track-uri", "store"]).track_uri == str(tmp_path / "store")
    # The trackers' credentials are read by their libraries in the driver; the workers get none.
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "secret-token")
    env = worker_env(cfg)
    assert not any(k.startswith(("WANDB", "MLFLOW")) for k in env)
    assert "secret-token" not in json.dumps(cfg.to_dict()) and "k" * 40 not in json.dumps(cfg.to_dict())


@pytest.mark.slow
def test_without_tracking_the_libraries_are_never_imported_and_a_missing_one_is_one_line(tmp_path):
    """In a Python whose site-packages lack mlflow and wandb (every other package linked in):
    --help and an untracked config import neither, and --track mlflow is one line naming the extra."""
    import site

    packages = tmp_path / "site"
    packages.mkdir()
    for source in site.getsitepackages():
        for entry in os.listdir(source):
            if not entry.lower().startswith(("mlflow", "wandb")) and not (packages / entry).exists():
                (packages / entry).symlink_to(os.path.join(source, entry))
    prelude = f"import site, sys; site.addsitedir({str(packages)!r}); "
    check = (prelude + "from ray_fedat.config import build_parser, parse_config; build_parser().format_help(); "
             "parse_config(['--dataset', 'digits']); import importlib.util; "
             "print(importlib.util.find_spec('mlflow'), 'mlflow' in sys.modules, 'wandb' in sys.modules)")
    proc = subprocess.run([sys.executable, "-S", "-c", check], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.stdout.split() == ["None", "False", "False"], proc.stderr[-2000:]
    main = prelude + "from ray_fedat.train import main; main(['--dataset', 'digits', '--track', 'mlflow'])"
    proc = subprocess.run([sys.executable, "-S", "-c", main], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ['ray_fedat: error: --track mlflow: the mlflow library is not '
                                                'installed; pip install -e ".[track]"']


# ---- the real trackers ----

def fake_run_dir(path):
    """A run directory as train.run leaves it: metrics, workers, curves and models."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    (path / "workers.json").write_text(json.dumps(WORKERS))
    (path / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (path / "final_model.pt").write_bytes(b"weights")
    (path / "best_robust.pt").write_bytes(b"weights")
    return str(path)


def mlflow_run(url, experiment, name):
    import mlflow

    mlflow.set_tracking_uri(url)
    runs = mlflow.search_runs(experiment_names=[experiment], filter_string=f"attributes.run_name = '{name}'",
                              output_format="list")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


@pytest.mark.slow
def test_a_run_and_its_resume_are_one_mlflow_run_on_a_real_server(mlflow_server, tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from ray_fedat.tracking import start_run_tracking

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "unit")
    run_dir = fake_run_dir(tmp_path / "r")
    cfg = parse_config(["--dataset", "digits", "--rounds", "2", "--track", "mlflow", "--track-uri", mlflow_server,
                        "--track-artifacts", "small"])
    trackers = start_run_tracking(cfg, "r", run_dir)
    trackers.log_rounds(RECORDS[:1], os.path.join(run_dir, "workers.json"))
    trackers.log_rounds(RECORDS, os.path.join(run_dir, "workers.json"))  # round 1 not logged twice
    trackers.end("interrupted")  # Ctrl-C: KILLED, continued by --resume
    out = capsys.readouterr().out
    assert f"ray_fedat: tracking: logging to mlflow run {mlflow_server}/#/experiments/" in out
    first = mlflow_run(mlflow_server, "unit", "r")
    assert first.info.status == "KILLED"
    saved = json.loads((tmp_path / "r" / TRACKING_FILE).read_text())["mlflow"]
    assert saved["run_id"] == first.info.run_id and saved["uri"] == mlflow_server

    resumed = parse_config(["--dataset", "digits", "--rounds", "3", "--track", "mlflow", "--track-uri", mlflow_server,
                            "--track-artifacts", "small"])
    trackers = start_run_tracking(resumed, "r", run_dir)
    assert "ray_fedat: tracking: continuing mlflow run" in capsys.readouterr().out
    replayed = [RECORDS[0], RECORDS[1], {**RECORDS[1], "round": 3, "started_at": 108.0, "natural_acc": 0.95}]
    trackers.log_rounds(replayed, os.path.join(run_dir, "workers.json"))
    trackers.finish({**SUMMARY, "rounds_completed": 3}, artifact_files(run_dir, resumed.track_artifacts), "finished")

    run = mlflow_run(mlflow_server, "unit", "r")  # still one run
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    params = run.data.params
    assert (params["dataset"], params["rounds"], params["method"]) == ("digits", "2", "calfat")
    assert run.data.tags["resumed.rounds"] == "3"  # MLflow params are fixed: the resume's change is a tag
    assert (params["precision_used"], params["device_name"], params["ray_fedat_version"]) == \
        ("fp32", "Intel(R) Xeon(R)", "0.1.0")
    assert params["git_commit"] != ""
    client = MlflowClient(mlflow_server)
    history = client.get_metric_history(run.info.run_id, "val/natural_acc")
    assert [(m.step, m.value) for m in history] == [(1, 0.9), (2, 0.88), (3, 0.88)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "test/natural_acc")] == \
        [(2, 0.93), (3, 0.95)]
    metrics = run.data.metrics
    assert (metrics["robust_apgd_ce_t"], metrics["final_attack_images"]) == (0.575, 40.0)
    assert metrics["worst_client_yardstick_acc"] == 0.6 and metrics["best_robust_round"] == 2.0
    assert run.data.tags["headline"] == SUMMARY["headline"]["text"] and run.data.tags["status"] == "finished"
    files = sorted(a.path for a in client.list_artifacts(run.info.run_id))
    assert files == ["curves.png", "metrics.jsonl", "summary.json"]  # small: no models
    summary = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    assert json.loads(open(summary).read())["headline"] == SUMMARY["headline"]


@pytest.mark.slow
def test_an_unreachable_mlflow_is_one_line_and_nothing_raises(tmp_path, capsys):
    need("mlflow")
    from ray_fedat.tracking import start_run_tracking

    url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    cfg = parse_config(["--dataset", "digits", "--track", "mlflow", "--track-uri", url])
    started = time.time()
    trackers = start_run_tracking(cfg, "r", fake_run_dir(tmp_path / "r"))
    assert time.time() - started < 60
    trackers.log_rounds(RECORDS, str(tmp_path / "r" / "workers.json"))
    trackers.finish(SUMMARY, artifact_files(str(tmp_path / "r"), "all"), "finished")
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines == [f"ray_fedat: tracking: mlflow at {url} unreachable (NewConnectionError: [Errno 111] Connection "
                     "refused); the run continues without it"]
    assert trackers.trackers == [] and not (tmp_path / "r" / TRACKING_FILE).exists()


def read_wandb_run(run_dir):
    """The records of an offline W&B run (run-<id>.wandb): wandb's own protobuf Records, in
    the LevelDB-log framing wandb writes them in (7-byte file header; 32 KiB blocks; each
    chunk with a crc32, length, type header: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    [path] = [os.path.join(run_dir, n) for n in os.listdir(run_dir) if n.endswith(".wandb")]
    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_contents(run_dir):
    """(run record, config, history rows, summary) of an offline W&B run."""
    deadline = time.time() + 30  # wandb-core, its own process, writes the file: give a loaded machine time
    while True:
        records = read_wandb_run(run_dir)
        kinds = [r.WhichOneof("record_type") for r in records]
        if {"run", "exit"} <= set(kinds) or time.time() > deadline:
            break
        time.sleep(0.5)
    assert {"run", "exit"} <= set(kinds), (kinds, sorted(os.listdir(run_dir)), open(os.path.join(run_dir, "logs", "debug.log")).read()[-3000:])
    run = records[kinds.index("run")].run
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    config.update({i.key: json.loads(i.value_json) for i in run.config.update})
    history = [{(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.summary.update})
    return run, {k: v.get("value", v) if isinstance(v, dict) else v for k, v in config.items()}, history, summary


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """wandb as a user without a key has it: no WANDB_API_KEY, no `wandb login`; its files in tmp_path."""
    need("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var, sub in (("WANDB_DIR", "wandb-dir"), ("WANDB_CONFIG_DIR", "wandb-config"), ("WANDB_CACHE_DIR", "wandb-cache"),
                     ("WANDB_DATA_DIR", "wandb-data")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "wandb-dir" / "wandb"


@pytest.mark.slow
def test_wandb_offline_run_holds_params_rounds_headline_and_files(offline_wandb, tmp_path, capsys):
    from ray_fedat.tracking import start_run_tracking

    run_dir = fake_run_dir(tmp_path / "r")
    cfg = parse_config(["--dataset", "digits", "--method", "trades", "--track", "wandb"])
    context = run_context("grid", {}, "trades", 0, {"method": "trades"})
    trackers = start_run_tracking(cfg, "trades_s0", run_dir, context)
    trackers.log_rounds(RECORDS, os.path.join(run_dir, "workers.json"))
    trackers.finish(SUMMARY, artifact_files(run_dir, "all"), "finished")
    out = capsys.readouterr().out
    [wandb_dir] = [offline_wandb / n for n in os.listdir(offline_wandb) if n.startswith("offline-run-")]
    assert "ray_fedat: tracking: logging to wandb offline run" in out and f"wandb sync {wandb_dir}" in out
    assert json.loads((tmp_path / "r" / TRACKING_FILE).read_text())["wandb"]["dir"] == str(wandb_dir)
    run, config, history, summary = wandb_contents(str(wandb_dir))
    assert (run.display_name, run.run_group, run.project) == ("trades_s0", "grid", "ray_fedat")
    assert "method=trades" in run.tags and "cell=trades" in run.tags
    assert (config["method"], config["dataset"], config["precision_used"], config["ray_fedat_version"]) == \
        ("trades", "digits", "fp32", "0.1.0")
    rounds = [(h["round"], h.get("val/natural_acc"), h.get("test/natural_acc")) for h in history if "val/natural_acc" in h]
    assert rounds == [(1, 0.9, None), (2, 0.88, 0.93)]
    assert (summary["robust_apgd_ce_t"], summary["final_attack_images"]) == (0.575, 40)
    assert summary["headline"] == SUMMARY["headline"]["text"]
    files = sorted(os.listdir(wandb_dir / "files"))
    assert {"curves.png", "metrics.jsonl", "summary.json", "final_model.pt", "best_robust.pt"} <= set(files)


# ---- real runs ----

def cheap_run(tmp_path, name, *flags):
    """A 2-round digits run on the shared Ray, as small as a run gets."""
    from ray_fedat.train import run

    cfg = parse_config(["--dataset", "digits", "--workers", "1", "--rounds", "2", "--attack-steps", "1",
                        "--eval-steps", "2", "--eval-samples", "60", "--test-every", "1",
                        "--storage-path", str(tmp_path), "--name", name, *flags])
    return run(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_a_training_run_logs_to_mlflow_and_wandb(mlflow_server, offline_wandb, tmp_path, ray_session, monkeypatch,
                                                   capsys):
    """`--track mlflow,wandb`: params, both rounds and the headline reach the real server and
    the offline W&B run, from the driver."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "e2e")
    summary = cheap_run(tmp_path, "tracked", "--final-attack", "apgd", "--final-samples", "20",
                        "--track", "mlflow,wandb", "--track-uri", mlflow_server)
    assert summary["status"] == "finished"
    out = capsys.readouterr().out
    assert "ray_fedat: tracking: logging to mlflow run" in out and "logging to wandb offline run" in out
    assert "continues without it" not in out  # no tracker failed

    run = mlflow_run(mlflow_server, "e2e", "tracked")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["workers"], params["rounds"], params["final_samples"]) == ("1", "2", "20")
    assert params["precision_used"] in ("fp32", "bf16") and params["device_name"]
    client = MlflowClient(mlflow_server)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/yardstick_acc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/natural_acc")] == [1, 2]
    headline = summary["headline"]
    assert run.data.metrics["robust_apgd_ce_t"] == pytest.approx(headline["robust_acc"])
    assert run.data.metrics["final_attack_images"] == headline["images"] == 20
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"curves.png", "summary.json", "final_model.pt", "best_robust.pt"} <= files

    [wandb_dir] = [offline_wandb / n for n in os.listdir(offline_wandb) if n.startswith("offline-run-")]
    wrun, config, history, wsummary = wandb_contents(str(wandb_dir))
    assert wrun.display_name == "tracked" and config["rounds"] == 2
    assert [h["round"] for h in history if "train/loss" in h] == [1, 2]
    assert wsummary["robust_apgd_ce_t"] == pytest.approx(headline["robust_acc"])


@pytest.mark.ray
@pytest.mark.slow
def test_training_finishes_when_the_tracker_is_unreachable(tmp_path, ray_session, capsys):
    need("mlflow")
    url = f"http://127.0.0.1:{free_port()}"
    summary = cheap_run(tmp_path, "untracked", "--final-attack", "none", "--track", "mlflow", "--track-uri", url)
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "tracking" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"ray_fedat: tracking: mlflow at {url} unreachable (")
