import subprocess
import sys

import pytest

from ray_fedat.config import parse_config
from ray_fedat.errors import ConfigError


def test_per_dataset_defaults_keep_the_articles_threat_model_and_evaluation():
    mnist = parse_config(["--dataset", "mnist"])
    assert (mnist.epsilon, mnist.eval_step_size, mnist.eval_steps) == (0.3, 0.0375, 20)
    # our training attack, from a uniform random start: 5 x 0.075 crosses the ball (judged by AutoAttack)
    assert (mnist.step_size, mnist.attack_steps, mnist.attack_start, mnist.batch_size) == (0.075, 5, "uniform", 64)
    assert mnist.step_size * mnist.attack_steps >= mnist.epsilon - 1e-9
    fmnist = parse_config(["--dataset", "fmnist"])
    assert (fmnist.epsilon, fmnist.eval_step_size, fmnist.eval_steps) == (0.3, 0.0375, 20)
    cifar = parse_config(["--dataset", "cifar10"])
    assert cifar.epsilon == pytest.approx(8 / 255) and cifar.step_size == pytest.approx(2 / 255)
    assert cifar.model == "resnet18"


@pytest.mark.parametrize("dataset", ["mnist", "fmnist", "cifar10", "digits", "npz"])
def test_every_default_yardstick_can_reach_the_edge_of_the_ball(dataset, tmp_path):
    """Madry's rule: steps x step >= 2.5 eps, so the per-round PGD is not a soft yardstick."""
    argv = ["--dataset", dataset]
    if dataset == "npz":
        import numpy as np

        path = tmp_path / "d.npz"
        x, y = np.zeros((20, 8, 8), np.uint8), np.arange(20) % 2
        np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
        argv += ["--data-file", str(path)]
    cfg = parse_config(argv)
    assert cfg.eval_steps * cfg.eval_step_size >= 2.5 * cfg.epsilon - 1e-9
    assert cfg.final_attack == "apgd"  # and every run ends with the strong attack


def test_mnist_methods_that_collapse_at_the_shared_lr_default_to_their_own(tmp_path):
    # PGD-AT and MART fell to one class at lr 0.04 under label skew (benchmarks/collapse_check.py)
    lrs = {m: parse_config(["--dataset", "mnist", "--method", m]).lr for m in ("calfat", "trades", "pgd", "mart")}
    assert lrs == {"calfat": 0.04, "trades": 0.04, "pgd": 0.02, "mart": 0.01}
    (tmp_path / "x.npz").write_bytes(b"")  # only its name is checked here
    npz = ["--dataset", "npz", "--data-file", str(tmp_path / "x.npz"), "--preset", "mnist"]
    assert parse_config(npz + ["--method", "pgd"]).lr == 0.02
    assert parse_config(["--dataset", "fmnist", "--method", "mart"]).lr == 0.01
    assert parse_config(["--dataset", "mnist", "--method", "pgd", "--lr", "0.04"]).lr == 0.04  # a flag wins
    assert parse_config(["--dataset", "digits", "--method", "pgd"]).lr == parse_config(["--dataset", "digits"]).lr


def test_evaluation_step_size_is_a_fixed_yardstick():
    # Training with a larger attack step must not change the attack the run is judged by.
    cfg = parse_config(["--dataset", "mnist", "--step-size", "0.04", "--attack-steps", "10"])
    assert cfg.step_size == 0.04 and cfg.eval_step_size == 0.0375
    assert parse_config(["--dataset", "digits"]).eval_step_size == 0.025  # no separate default: the training step
    assert parse_config(["--dataset", "mnist", "--eval-step-size", "0.02"]).eval_step_size == 0.02
    assert parse_config(["--dataset", "cifar10"]).eval_step_size == pytest.approx(2 / 255)


def test_epsilon_accepts_a_fraction_and_clients_default_to_workers():
    cfg = parse_config(["--dataset", "cifar10", "--epsilon", "4/255", "--workers", "3"])
    assert cfg.epsilon == pytest.approx(4 / 255)
    assert cfg.clients == 3


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--epsilon", "-0.1"], ["--clients", "0"],
                                  ["--client-fraction", "0"], ["--model", "vgg99"], ["--partition", "zipf"]])
def test_bad_values_raise_config_error(argv):
    with pytest.raises(ConfigError):
        parse_config(["--dataset", "digits", *argv])


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "imagenet"], "--dataset 'imagenet' is not one of"),
    (["--dataset", "digits", "--rounds", "0"], "--rounds must be >= 1"),
    (["--dataset", "digits", "--epsilon", "-0.3"], "--epsilon must be in [0, 1]"),
    (["--dataset", "npz"], "--dataset npz needs --data-file"),
    (["--dataset", "digits", "--epsilon", "eight"], "is not a number or a fraction"),
    (["--dataset", "digits", "--wrokers", "2"], "unrecognized arguments"),
    (["--dataset", "digits", "--final-attack-models", "best"], "--final-attack-models 'best' is not one of both, final"),
])
def test_cli_rejects_bad_input_with_one_line_before_ray_starts(argv, expected, capsys, monkeypatch):
    """In-process: main() prints the mistake as one line and exits 2 before it would connect to Ray."""
    import ray_fedat.train as train

    def no_ray(*args, **kwargs):
        raise AssertionError("a bad flag must be refused before Ray starts")

    monkeypatch.setattr(train, "connect_ray", no_ray)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    out, err = capsys.readouterr()
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(err_lines) == 1, err
    assert expected in err_lines[0] and out == ""


def test_a_local_ray_that_does_not_start_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """Ray raises a bare Exception when its node times out starting (a busy 2-core machine):
    the CLI says so in one line, exit 1, and nothing was written."""
    import ray

    import ray_fedat.train as train

    def slow_node(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", slow_node)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset", "digits", "--storage-path", str(tmp_path)])
    err_lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 1 and len(err_lines) == 1, err_lines
    assert "the local Ray node did not start in time (The current node timed out during startup." in err_lines[0]
    assert "run the same command again" in err_lines[0] and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_cli_refuses_a_bad_flag_without_importing_ray():
    """The real process: one line, exit 2, no traceback, and Ray never imported."""
    code = ("import sys\nfrom ray_fedat.train import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code, 'ray-imported', 'ray' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code, "--dataset", "digits", "--rounds", "0"], capture_output=True,
                          text=True, timeout=120)
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and "--rounds must be >= 1" in err_lines[0], proc.stderr
    assert proc.stdout.strip() == "exit 2 ray-imported False"


def test_help_documents_every_public_flag(capsys):
    from ray_fedat.train import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for flag in ["--dataset", "--data-file", "--data-dir", "--download", "--no-download", "--clients", "--partition",
                 "--beta", "--rounds", "--local-epochs", "--batch-size", "--lr", "--momentum", "--weight-decay",
                 "--method", "--epsilon", "--step-size", "--attack-steps", "--eval-steps", "--model", "--workers",
                 "--device", "--address", "--storage-path", "--name", "--seed"]:
        assert flag in out, flag
