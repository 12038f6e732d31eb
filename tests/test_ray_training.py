"""Real Ray Train runs on a local Ray (one shared instance, see conftest.ray_session)."""
import glob
import json
import os
import re
import struct
import subprocess
import sys

import pytest
import torch

from ray_fedat.config import parse_config
from ray_fedat.train import run

pytestmark = pytest.mark.ray

TIMING_KEYS = {"round_s", "train_s", "aggregate_s", "eval_s", "started_at", "ended_at"}


def train(tmp_path, name, *argv):
    """A digits run on the shared Ray. No final attack unless the test asks for one: it has its
    own tests (test_final_attack.py, the CLI end-to-end run), and it costs every run seconds."""
    if "--final-attack" not in argv:
        argv = (*argv, "--final-attack", "none")
    cfg = parse_config(["--dataset", "digits", "--storage-path", str(tmp_path), "--name", name, *argv])
    summary = run(cfg)
    run_dir = os.path.join(str(tmp_path), name)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return summary, records, run_dir


def comparable(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def final_state(run_dir):
    return torch.load(os.path.join(run_dir, "final_model.pt"), weights_only=True)


def max_abs_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
def test_cli_end_to_end_on_local_ray_with_two_workers(cli_run):
    """conftest.cli_run: the CLI on its own local Ray, 3 rounds, the default final attack on 50
    images (and --dashboard, which test_monitoring checks)."""
    proc, run_dir = cli_run, cli_run.run_dir
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round   3/3" in proc.stdout and "Traceback" not in proc.stderr
    # Rounds before the last are scored on validation only (--test-every 5), the last round on both.
    assert "round   1/3  val nat" in proc.stdout and "round   2/3  val nat" in proc.stdout
    # A private local Ray keeps its token and says nothing about it (no advice to disable it).
    assert "RAY_AUTH_MODE" not in proc.stdout + proc.stderr and "Token authentication" not in proc.stderr
    for name in ("metrics.jsonl", "summary.json", "final_model.pt", "best_natural.pt", "best_robust.pt"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("val_natural_acc", "val_robust_acc", "train_loss", "round_s", "train_s", "aggregate_s", "eval_s"):
            assert isinstance(r[key], float), key
        assert r["val_robust_acc"] <= r["val_natural_acc"]
    assert records[0]["natural_acc"] is None and records[0]["eval_images"] == 0  # test: not this round
    assert records[-1]["robust_acc"] <= records[-1]["natural_acc"] and records[-1]["eval_images"] == 359
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["status"] == "finished"
    assert [w["rank"] for w in summary["workers"]] == [0, 1]
    assert len({w["pid"] for w in summary["workers"]}) == 2
    assert all(w["node_ip"] and w["node_id"] and w["device"] == "cpu" for w in summary["workers"])
    assert [c["size"] for c in summary["clients"]] and sum(c["size"] for c in summary["clients"]) == 1438 - 144
    best_on_val = max(records, key=lambda r: (r["val_robust_acc"], -r["round"]))  # chosen on validation
    assert summary["best"]["robust"]["round"] == best_on_val["round"]
    assert summary["config"]["epsilon"] == 0.1 and summary["wall_s"] > 0
    state = torch.load(run_dir / "final_model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    # A default run ends with APGD-CE + APGD-T on the final model: the headline number, everywhere.
    attack = summary["final_attack"]
    assert attack["attack"] == "APGD-CE + APGD-T" and attack["workers"] == 2
    final = attack["models"]["final"]
    assert final["images"] == attack["images"] == 50
    assert 0 <= final["robust_acc"] <= final["yardstick_acc"] + 0.02 and final["robust_acc"] <= final["natural_acc"]
    assert summary["headline"]["robust_acc"] == final["robust_acc"] and summary["headline"]["images"] == final["images"]
    assert f"final model: robust {100 * final['robust_acc']:.1f}% under APGD-CE + APGD-T" in proc.stdout
    pace = re.search(r"final attack: 50 images x ([12]) models? in \d+ s \(([\d.]+) images/s, 2 workers\)", proc.stdout)
    assert pace and int(pace.group(1)) == attack["models_attacked"], proc.stdout[-2000:]
    assert float(pace.group(2)) == pytest.approx(50 * attack["models_attacked"] / attack["seconds"], rel=0.05, abs=0.1)
    assert records[-1]["final_attack"]["final_robust_acc"] == final["robust_acc"]


# Aggregation over gloo is tested with two real ranks in test_sharded_aggregation.py; here, end to
# end: a run gives the same model whichever worker hosts a client.
# The comparisons below pin --precision fp32: auto is bf16 on CPUs with native bf16 (precision.py),
# and the README's reproducibility claims are checked in fp32 whatever CPU runs the tests.
FP32 = ("--precision", "fp32")


def no_ddp_loop(config):
    import torch.nn.parallel

    def refuse(*args, **kwargs):
        raise AssertionError("DistributedDataParallel must never wrap a federated client model")

    torch.nn.parallel.DistributedDataParallel.__init__ = refuse
    from ray_fedat.worker import train_loop_per_worker

    train_loop_per_worker(config)


# The federated run: 6 Dirichlet(0.1) clients, half of them each round, 3 rounds, 2 checkpoints kept;
# an MLP, since what these tests read does not depend on the network (its rounds are 5x quicker).
FEDERATED = ("--model", "mlp", "--clients", "6", "--client-fraction", "0.5", "--partition", "dirichlet", "--beta", "0.1",
             "--min-client-size", "20", "--rounds", "3", "--keep-checkpoints", "2", *FP32)


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, ray_session):
    """One run that the tests below read (a run costs ~20 s of Ray start-up here): FEDERATED on 2
    workers, with a worker loop in which building a DistributedDataParallel wrapper fails."""
    import ray_fedat.worker

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_fedat.worker, "train_loop_per_worker", no_ddp_loop)
        return train(tmp_path_factory.mktemp("federated"), "fed", "--workers", "2", *FEDERATED)


def test_no_ddp_wrapper_is_created_during_federated_training(federated_run):
    summary, records, _ = federated_run
    assert summary["status"] == "finished" and [r["round"] for r in records] == [1, 2, 3]
    assert not any(w["deterministic"] for w in summary["workers"])  # no --deterministic: off (test_cifar_path: on)


def test_client_fraction_samples_clients_and_records_them(federated_run):
    from ray_fedat.federation import assign_clients

    summary, records, _ = federated_run
    for r in records:
        assert len(r["participants"]) == 3 and set(r["participants"]) <= set(range(6))
    assert len({tuple(r["participants"]) for r in records}) > 1
    # every client is placed once, by sample count (federation.assign_clients, unit-tested)
    sizes = [c["size"] for c in sorted(summary["clients"], key=lambda c: c["client"])]
    assert list(summary["client_assignment"].values()) == assign_clients(6, 2, sizes)


def test_dirichlet_clients_report_their_statistics(federated_run):
    summary, _, _ = federated_run
    assert len(summary["clients"]) == 6
    for c in summary["clients"]:
        assert c["size"] == sum(c["class_counts"]) >= 20
    # beta = 0.1: strongly skewed, some client misses some classes entirely
    assert any(0 in c["class_counts"] for c in summary["clients"])


def test_retention_and_best_models_chosen_on_validation(federated_run):
    summary, records, run_dir = federated_run
    checkpoints = [d for d in os.listdir(run_dir) if d.startswith("checkpoint_") and os.path.isdir(os.path.join(run_dir, d))]
    assert 1 <= len(checkpoints) <= 2  # 3 rounds checkpointed, 2 kept
    # chosen on the validation split (the default --val-fraction 0.1), first round on ties
    best = max(records, key=lambda r: (r["val_robust_acc"], -r["round"]))
    saved = torch.load(os.path.join(run_dir, "best_robust.pt"), weights_only=True)
    assert saved["round"] == best["round"] == summary["best"]["robust"]["round"]
    assert saved["metrics"]["val_robust_acc"] == best["val_robust_acc"]
    best_nat = torch.load(os.path.join(run_dir, "best_natural.pt"), weights_only=True)
    assert best_nat["metrics"]["val_natural_acc"] == max(r["val_natural_acc"] for r in records)


def test_the_same_model_on_one_and_two_workers_and_evaluate_round_trips(tmp_path, federated_run):
    """The federated run again with all six clients in one worker, evaluated every 3rd round
    (rounds 1 and 3): the same model and the same metrics whichever worker hosts a client (the clients'
    updates meet inside a worker and across ranks) and however often the run evaluates
    (evaluation draws from its own random streams and leaves the model as it was), so a run is
    reproducible and --eval-every may change on resume; and `evaluate` of the saved model
    scores what the run did. (A run on more workers than the session's CPUs is left out: on
    the project's 2-core machine it costs as much as these two together.)"""
    one = train(tmp_path, "w1", "--workers", "1", "--eval-every", "3", *FEDERATED)
    two = federated_run
    assert max_abs_diff(final_state(one[2]), final_state(two[2])) <= 1e-5
    trained = ("round", "train_loss", "participants", "lr", "epsilon", "attack_steps")
    assert [{k: r[k] for k in trained} for r in one[1]] == [{k: r[k] for k in trained} for r in two[1]]
    assert one[1][1]["val_natural_acc"] is None and two[1][1]["val_natural_acc"] is not None  # round 2
    for i in (0, 2):  # rounds 1 and 3 evaluated in both (round 1 always: an early point on the curves)
        evaluated = set(comparable(two[1])[i]) - {"eval_every", "best_natural", "best_robust"}
        assert {k: one[1][i][k] for k in evaluated} == {k: two[1][i][k] for k in evaluated}
    assigned = two[0]["client_assignment"]
    assert sorted(assigned) == ["0", "1"] and sorted(sum(assigned.values(), [])) == list(range(6))
    assert all(clients for clients in assigned.values())
    assert len({w["pid"] for w in two[0]["workers"]}) == 2

    from ray_fedat.evaluate import evaluate

    _, records, run_dir = two
    result = evaluate(["--checkpoint", os.path.join(run_dir, "final_model.pt")])
    assert result["natural_acc"] == pytest.approx(records[-1]["natural_acc"])
    assert result["robust_acc"] <= result["natural_acc"]
    assert os.path.isfile(os.path.join(run_dir, "final_model.pt.eval.json"))


def test_a_run_starts_no_ray_train_actor_it_does_not_use(federated_run):
    """No DatasetManager (the run passes no Ray Datasets) and, on a local Ray, no placement-group
    cleaner and no AutoscalingCoordinator (Ray Train's controller asks it for resources and waits
    up to 5 s): each is a process importing Ray Train or Ray Data, started beside the workers
    (launch.lean_trainer). Every run in this session's Ray went through run(), so none may ever
    have started one."""
    import ray._private.state

    started = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= started, started
    assert not started & {"DatasetManager", "PlacementGroupCleaner", "_AutoscalingCoordinatorActor"}, started


def read_tensorboard_scalars(run_dir):
    """Parse the TFRecord event files with tensorboardX's protobufs: {tag: [(step, value)]}."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12: offset + 12 + length])
            offset += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
    return scalars


@pytest.mark.slow
def test_report_curves_and_tensorboard_for_two_runs(cli_run, federated_run):
    """`python -m ray_fedat.report` over two finished runs (the CLI run, with its final attack, and
    the federated one), their curves.png and the CLI run's TensorBoard scalars."""
    dir_a = cli_run.run_dir
    summary_b, _, dir_b = federated_run
    summary_a = json.loads((dir_a / "summary.json").read_text())
    records_a = [json.loads(line) for line in (dir_a / "metrics.jsonl").read_text().splitlines()]
    for run_dir in (dir_a, dir_b):
        with open(os.path.join(run_dir, "curves.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(os.path.join(run_dir, "curves.png")).shape[0] > 100
    scalars = read_tensorboard_scalars(dir_a)
    tested = [r for r in records_a if r["natural_acc"] is not None]  # the test set: round 3 only (--test-every 5)
    assert [step for step, _ in scalars["natural_acc"]] == [r["round"] for r in tested] == [3]
    assert [v for _, v in scalars["robust_acc"]] == pytest.approx([r["robust_acc"] for r in tested])
    assert [step for step, _ in scalars["val_natural_acc"]] == [1, 2, 3]
    headline = summary_a["headline"]  # the final attack's number, at the last round
    assert scalars["final_attack/final_robust_acc"] == [(3, pytest.approx(headline["robust_acc"]))]

    proc = subprocess.run([sys.executable, "-m", "ray_fedat.report", str(dir_a), dir_b], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "dataset", "method"]
    row_a = next(ln for ln in lines if ln.startswith("e2e "))
    assert "calfat" in row_a and f"{100 * records_a[-1]['robust_acc']:.1f}%" in row_a
    assert f"{100 * headline['robust_acc']:.1f}% APGD-CE + APGD-T, {headline['images']} images" in row_a
    assert any(ln.startswith("fed ") and summary_b["config"]["method"] in ln for ln in lines)
    bad = subprocess.run([sys.executable, "-m", "ray_fedat.report", os.path.join(dir_b, "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no summary.json" in bad.stderr


def test_dry_run_prints_the_partition_table_and_starts_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", "--clients", "5",
                           "--partition", "shards", "--shards-per-client", "2", "--dry-run",
                           "--storage-path", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [ln for ln in proc.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit() and "|" in ln]
    assert len(rows) == 5
    for row in rows:  # at most 2 labels per client with 2 shards each
        assert sum(int(v) > 0 for v in row.split("|")[1].split()) <= 2
    assert not any(tmp_path.iterdir())  # nothing written, no run started


def test_npz_on_nodes_real_mnist_two_workers(tmp_path, ray_session, mnist_npz):
    summary, records, run_dir = train(tmp_path, "npz", "--dataset", "npz", "--data-file", mnist_npz,
                                      "--data-on", "nodes", "--model", "mlp", "--method", "pgd", "--rounds", "1",
                                      "--eval-samples", "400", "--attack-steps", "3", "--eval-steps", "5",
                                      "--epsilon", "0.1", "--step-size", "0.03", "--lr", "0.05")
    assert summary["config"]["dataset"] == "npz" and sum(c["size"] for c in summary["clients"]) == 8000 - 800  # 10% validation
    assert records[-1]["eval_images"] == 400 and records[-1]["val_images"] == 400  # each node split alike
    assert 0.4 < records[-1]["natural_acc"] and records[-1]["robust_acc"] <= records[-1]["natural_acc"]


@pytest.mark.slow
def test_a_failed_final_attack_fails_the_run_and_resume_runs_only_the_attack(tmp_path, ray_session, monkeypatch):
    """The run is `attacking` (not finished) while its final attack runs; a final attack that
    fails fails the run (exit 1, status failed, the reason in one line); --resume of that run,
    whose rounds are all done, starts no worker group and runs the final attack again."""
    import ray_fedat.final_attack as final_attack
    from ray_fedat.errors import RunFailed

    seen = []

    def lost(cfg, run_dir, *args):  # what run_final_attack returns when a task of it raised
        with open(os.path.join(run_dir, "summary.json")) as f:
            seen.append(json.load(f)["status"])
        return {"attack": "PGD-100", "error": "RayTaskError(OSError): the attack's node was lost"}

    monkeypatch.setattr(final_attack, "run_final_attack", lost)
    flags = ["--dataset", "digits", "--storage-path", str(tmp_path), "--name", "r", "--rounds", "2", "--model", "mlp",
             "--final-attack", "pgd-100", "--final-samples", "50"]
    with pytest.raises(RunFailed) as e:
        run(parse_config(flags))
    run_dir = os.path.join(str(tmp_path), "r")
    assert e.value.code == 1 and seen == ["attacking"]
    assert str(e.value) == (f"final attack PGD-100 failed: RayTaskError(OSError): the attack's node was "
                            f"lost (the trained models are kept in {run_dir}; --resume {run_dir} runs the final attack "
                            "again)")
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["status"] == "failed" and summary["rounds_completed"] == 2 and summary["headline"] is None
    assert summary["error"] == "final attack PGD-100 failed: RayTaskError(OSError): the attack's node was lost"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        trained = [json.loads(line) for line in f]

    monkeypatch.undo()
    import ray._private.state

    def controllers():
        return sum(a["ActorClassName"] == "TrainController" for a in ray._private.state.actors().values())

    before = controllers()
    summary = run(parse_config(["--resume", run_dir]))
    assert controllers() == before  # every round was done: no Ray Train run, straight to the attack
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        after = [json.loads(line) for line in f]
    assert summary["status"] == "finished" and summary["error"] is None
    assert summary["headline"]["attack"] == "PGD-100" and summary["headline"]["images"] == 50
    assert [r["started_at"] for r in after] == [r["started_at"] for r in trained]  # no round trained again
    assert after[-1]["final_attack"]["images"] == 50
