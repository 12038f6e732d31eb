"""Config files, report, curves, TensorBoard and Ctrl-C."""
import glob
import json
import os
import subprocess
import sys

import pytest

from ray_fedat.config import parse_config
from ray_fedat.defaults import DATASET_DEFAULTS
from ray_fedat.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_command_line_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("dataset: digits\nrounds: 7\nlr: 0.2\nepsilon: 8/255\nstep-size: 0.01\nlocal-epochs: 2\n")
    cfg = parse_config(["--config", str(path), "--rounds", "3"])
    assert (cfg.rounds, cfg.lr, cfg.local_epochs) == (3, 0.2, 2)
    assert cfg.epsilon == pytest.approx(8 / 255) and cfg.step_size == 0.01  # a fraction and a plain YAML number
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "digits"\nrounds = 9\nmethod = "trades"\n')
    cfg = parse_config(["--config", str(toml), "--method", "pgd"])
    assert (cfg.rounds, cfg.method) == (9, "pgd")


@pytest.mark.parametrize("text, message", [
    ("dataset: digits\nlearning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("dataset: digits\nrounds: many\n", "rounds = 'many' is not a valid value"),
    ("dataset: digits\nrounds: 2.5\n", "rounds = 2.5 is not a valid value"),
    ("- just\n- a list\n", "expected a mapping"),
    ("dataset: [unclosed\n", "cannot parse it"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_config(["--config", str(path)])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*"))))
def test_example_configs_parse(path):
    cfg = parse_config(["--config", path])
    assert cfg.method in ("calfat", "trades", "pgd", "natural")
    if cfg.dataset != "digits":  # the article's settings, whatever our defaults become
        assert cfg.step_size == cfg.eval_step_size and cfg.lr_schedule == "constant" and cfg.eps_warmup_rounds == 0
        assert cfg.attack_steps == {"mnist": 40, "fmnist": 10, "cifar10": 10}[cfg.dataset]


def test_print_config_shows_the_resolved_configuration_and_exits(tmp_path, capsys):
    from ray_fedat.train import main

    path = tmp_path / "run.yaml"
    path.write_text("dataset: mnist\nrounds: 7\n")
    main(["--config", str(path), "--lr", "0.5", "--print-config"])
    import yaml

    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["rounds"] == 7 and shown["lr"] == 0.5 and shown["epsilon"] == 0.3
    assert shown["attack_steps"] == DATASET_DEFAULTS["mnist"].attack_steps  # per-dataset defaults filled in


def closed_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_store_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """In-process: the object store is asked before any data is loaded or Ray started."""
    from ray_fedat.train import main

    port = closed_port()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--dataset", "digits", "--storage-path", f"s3://bucket/runs?endpoint_override=127.0.0.1:{port}&scheme=http"])
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1, err
    assert lines[0].startswith("ray_fedat: error:") and f"the object store at 127.0.0.1:{port} did not answer" in lines[0]
    assert out == ""  # no data loaded, no partition table: the mistake comes first
    assert not any(tmp_path.iterdir())  # and no run directory is left behind


@pytest.mark.slow
@pytest.mark.parametrize("flags, expected", [
    (["--address", "127.0.0.1:{port}"], "cannot reach a Ray cluster at 127.0.0.1:{port}"),
])
def test_an_unreachable_cluster_is_one_line_before_any_work(tmp_path, flags, expected):
    """The real CLI process (a Ray may already run in the test process, which connect_ray would reuse)."""
    port = closed_port()
    flags = [f.format(port=port) for f in flags]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", "--dataset", "digits", *flags],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("ray_fedat: error:") and expected.format(port=port) in lines[0]
    assert proc.stdout == ""  # no data loaded, no partition table: the mistake comes first
    assert not any(tmp_path.iterdir())  # and no run directory is left behind


@pytest.mark.ray
@pytest.mark.parametrize("flags, expected", [
    (["--device", "cuda"], "--device cuda needs 2 GPUs in the cluster (one per worker), found 0"),
    (["--worker-nodes", "10.213.99.1,10.213.99.2"], "--worker-nodes: no live Ray node has IP 10.213.99.1, 10.213.99.2"),
])
def test_cluster_mistakes_are_found_before_the_data_is_loaded(tmp_path, ray_session, capsys, flags, expected):
    from ray_fedat.train import run

    with pytest.raises(ConfigError) as e:
        run(parse_config(["--dataset", "digits", "--storage-path", str(tmp_path), "--name", "r", *flags]))
    out = capsys.readouterr().out
    assert expected in str(e.value)
    assert "partition" not in out and "train /" not in out  # no data was loaded
    assert not any(tmp_path.iterdir())


def test_rounds_run_again_after_a_resume_are_printed(tmp_path, capsys):
    """--resume restarts from the last checkpoint: the rounds after it run again, replace
    the old records, and the console shows them."""
    from ray_fedat.train import print_new_rounds, shown_rounds

    def write(records):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def record(round_, started_at):
        return {"round": round_, "started_at": started_at, "natural_acc": 0.5, "robust_acc": 0.25,
                "train_loss": 1.0, "round_s": 1.0, "planned_rounds": 4}

    write([record(r, 100 + r) for r in (1, 2, 3)])  # the old run; its checkpoint is round 1's
    printed = shown_rounds(str(tmp_path))
    write([record(1, 101), record(2, 200), record(3, 201), record(4, 202)])  # 2 and 3 replayed, 4 new
    printed = print_new_rounds(str(tmp_path), printed, 4, 0.0, 3)
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == ["2/4", "3/4", "4/4"]
    print_new_rounds(str(tmp_path), printed, 4, 0.0, 3)
    assert capsys.readouterr().out == ""  # each once


def fake_run(run_dir, checks):
    """A run directory as train.run leaves it: two rounds on 360 test images, a final attack
    on 100 images whose AutoAttack checks warned `checks`."""
    os.makedirs(run_dir, exist_ok=True)
    record = {"natural_acc": 0.9, "robust_acc": 0.6, "eval_images": 360, "train_loss": 0.5, "round_s": 1.0}
    records = [{**record, "round": 1}, {**record, "round": 2, "robust_acc": 0.62}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    model = {"natural_acc": 0.9, "yardstick_acc": 0.62, "robust_acc": 0.55, "images": 100, "checks": checks}
    final_attack = {"attack": "APGD-CE + APGD-T", "yardstick": "PGD-10 CE+margin", "images": 100, "epsilon": 0.1,
                    "models": {"final": model, "best_robust": {**model, "checks": checks[:1]}}, "warning": None,
                    "seconds": 12.5, "workers": 2, "models_attacked": 2}
    summary = {"status": "finished", "error": None, "rounds_completed": 2, "wall_s": 3.0, "final": records[-1],
               "best": {"natural": None, "robust": {"round": 2, "robust_acc": 0.62, "natural_acc": 0.9,
                                                    "chosen_on": "test", "file": "best_robust.pt"}},
               "client_robustness": {"robust": {"worst": 0.5, "worst_client": 1, "bottom_clients": 1,
                                                "bottom_mean": 0.5}},
               "config": {"eval_steps": 10, "dataset": "digits", "method": "pgd", "partition": "iid", "clients": 2},
               "final_attack": final_attack,
               "headline": {"text": "robust 55.0% under APGD-CE + APGD-T (eps 0.1, 100 test images), natural 90.0%"}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def test_every_robust_number_says_its_images_and_autoattack_checks_are_printed(tmp_path, capsys):
    """The end of a run and `ray_fedat.report`: each robust number with the test images behind
    it, and AutoAttack's check warnings (they say the number may overstate) once each."""
    from ray_fedat.report import format_table, summarize
    from ray_fedat.train import print_summary

    checks = ["there are 3 points with zero gradient!", "it seems to be a randomized defense!"]
    summary = fake_run(tmp_path / "a", checks)
    print_summary(summary, str(tmp_path / "a"))
    out = capsys.readouterr().out
    numbers = [ln for ln in out.splitlines() if "%" in ln]  # every line with a robust number
    assert len(numbers) == 6 and all(" images" in ln for ln in numbers), out
    assert "robust 62.0% (PGD-10 CE+margin yardstick, test, 360 images)" in out
    assert "best robust: test 62.0%, 360 images at round 2" in out
    assert "clients (test, 360 images, own label mix)" in out
    assert "  final attack: 100 images x 2 models in 12 s (16.0 images/s, 2 workers)" in out
    assert "  AutoAttack check (final, best_robust): there are 3 points with zero gradient!" in out
    assert "  AutoAttack check (final): it seems to be a randomized defense!" in out
    table = format_table([summarize(str(tmp_path / "a"))])
    row = table.splitlines()[2]
    assert "62.0% (360 img)" in row and "50.0% (360 img)" in row and "55.0% APGD-CE + APGD-T, 100 images" in row
    assert table.splitlines()[3:] == [
        "a: AutoAttack check (final, best_robust): there are 3 points with zero gradient!",
        "a: AutoAttack check (final): it seems to be a randomized defense!"]


def test_the_final_attack_name_says_when_apgd_t_ran_on_cross_entropy():
    from ray_fedat.final_attack import final_attack_error, noted_attack_name

    assert noted_attack_name("APGD-CE + APGD-T", "apgd", 10) == "APGD-CE + APGD-T"
    assert noted_attack_name("APGD-CE + APGD-T", "apgd", 3) == \
        "APGD-CE + APGD-T (APGD-T CE-targeted, fewer than 4 classes)"
    assert noted_attack_name("PGD-100", "pgd-100", 2) == "PGD-100"  # no APGD-T in it
    assert final_attack_error({"attack": "PGD-100", "error": "RayTaskError: node lost\nTraceback ..."}) == \
        "final attack PGD-100 failed: RayTaskError: node lost"


def test_a_resume_with_every_round_done_trains_nothing():
    """train.rounds_left: a resumed run whose rounds are all done and whose final model is saved
    (stopped in its final attack) goes straight to the attack; anything else trains."""
    import dataclasses

    from ray_fedat.train import rounds_left

    cfg = parse_config(["--dataset", "digits", "--rounds", "3"])
    resumed = dataclasses.replace(cfg, resume="/runs/r")
    assert not rounds_left(resumed, 3, final_model_saved=True)
    assert rounds_left(resumed, 2, final_model_saved=True)  # a round is missing
    assert rounds_left(resumed, 3, final_model_saved=False)  # stopped before the final model was saved
    assert rounds_left(dataclasses.replace(resumed, rounds=5), 3, final_model_saved=True)  # an extension
    assert rounds_left(cfg, 3, final_model_saved=True)  # not a resume
