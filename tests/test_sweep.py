"""Experiment grids (ray_fedat.sweep) and their table (ray_fedat.sweep_table).

The pure functions are tested without Ray; one test runs a real grid on Ray Tune, kills its
driver halfway and runs the same command again."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ray_fedat.config import parse_config
from ray_fedat.errors import ConfigError
from ray_fedat.sweep import (concurrent_runs, eta_seconds, expand_grid, failed_runs_line,
                             final_samples_clash, flags_to_argv, plan_runs, read_grid_file, record_failure, run_state,
                             sweep_record)
from ray_fedat.sweep_table import cell_row, format_csv, format_markdown, write_table

GRID = {"dataset": "digits", "workers": 1, "rounds": 2, "method": ["pgd", "trades"], "beta": [0.1, 0.5],
        "partition": "dirichlet", "seed": [0, 1]}


def write_summary(run_dir, status="finished", natural=0.9, robust=0.6, worst=0.5, error=None, final_attack=None,
                  rounds=2, wall=10.0):
    os.makedirs(run_dir, exist_ok=True)
    summary = {"status": status, "error": error, "config": {"eval_steps": 10}, "rounds_completed": rounds,
               "final": {"natural_acc": natural, "robust_acc": robust}, "wall_s": wall,
               "client_robustness": {"robust": {"worst": worst}}, "final_attack": final_attack}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_grid_expands_into_cells_times_seeds_in_file_order_seed_by_seed(tmp_path):
    grid = expand_grid(dict(GRID))
    assert [c.name for c in grid.cells] == ["pgd_beta0.1", "pgd_beta0.5", "trades_beta0.1", "trades_beta0.5"]
    assert grid.cells[1].values == {"method": "pgd", "beta": 0.5}
    assert grid.seeds == [0, 1] and grid.shared == {"dataset": "digits", "workers": 1, "rounds": 2,
                                                    "partition": "dirichlet"}
    runs = plan_runs(grid, str(tmp_path))
    # seed by seed: a sweep stopped part-way has compared every cell already
    assert [r.name for r in runs][:5] == ["pgd_beta0.1_s0", "pgd_beta0.5_s0", "trades_beta0.1_s0",
                                          "trades_beta0.5_s0", "pgd_beta0.1_s1"]
    assert len(runs) == 8 and {r.state for r in runs} == {"new"}


def test_a_run_is_the_train_command_line_the_cli_parses(tmp_path):
    grid = expand_grid({**GRID, "epsilon": "8/255", "download": False, "deterministic": True,
                        "data_dir": "rel/data"})
    run = plan_runs(grid, str(tmp_path), time_budget=30)[5]  # the second seed of the second cell
    assert run.argv[:2] == ["--dataset", "digits"] and "--no-download" in run.argv and "--deterministic" in run.argv
    cfg = parse_config(run.argv)  # the CLI's own parser and validation
    assert (cfg.method, cfg.beta, cfg.seed, cfg.name) == ("pgd", 0.5, 1, "pgd_beta0.5_s1")
    assert cfg.storage_path == str(tmp_path) and cfg.time_budget == 30 and cfg.epsilon == pytest.approx(8 / 255)
    assert cfg.data_dir == os.path.abspath("rel/data") and cfg.deterministic and not cfg.download
    assert flags_to_argv({"verbose": False, "rounds": 3}) == ["--rounds", "3"]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", [os.path.join(REPO, "grids", "digits-methods.yaml"),
                                  os.path.join(REPO, "benchmarks", "sweep_mnist.yaml")])
def test_shipped_grids_expand_into_valid_runs(path, tmp_path):
    raw = read_grid_file(path)
    if raw.get("data_file"):  # the MNIST grid's npz is made by benchmarks/common.py: any file parses here
        raw["data_file"] = str(tmp_path / "mnist8k.npz")
        (tmp_path / "mnist8k.npz").write_bytes(b"")
    runs = plan_runs(expand_grid(raw), str(tmp_path))
    cfgs = [parse_config(r.argv) for r in runs]
    assert len({(c.method, c.seed) for c in cfgs}) == len(runs) >= 4 and all(c.workers == 1 for c in cfgs)


def test_one_value_gives_one_cell_named_base():
    grid = expand_grid({"dataset": "digits", "seed": 3})
    assert [c.name for c in grid.cells] == ["base"] and grid.seeds == [3]


@pytest.mark.parametrize("grid, message", [
    ({"metod": ["pgd"]}, "unknown key 'metod'"),
    ({"name": "x"}, "'name' cannot be set in a grid"),
    ({"resume": "runs/x"}, "'resume' cannot be set in a grid"),
    ({"method": []}, "empty list"),
    ({"seed": [0, 0]}, "seed lists a seed twice"),
    ({"seed": ["a"]}, "seed must be an integer"),
    ({"storage_path": ["a", "b"]}, "storage_path cannot vary"),
    ({"epsilon": ["8/255", "8_255"]}, "same directory name"),
    ({"final_samples": [500, 1000]}, "final_samples cannot vary within a sweep: every run's final attack must score "
                                     "the same test images"),
])
def test_bad_grids_are_named(grid, message):
    with pytest.raises(ConfigError, match=message):
        expand_grid(grid)


def test_a_cell_may_carry_settings_of_its_own(tmp_path):
    """`method: [pgd, {method: mart, lr: 0.01}]`: the mart cell trains at its own lr (chosen on
    validation), named by it; the others keep the shared value; a mapping must name its key."""
    path = tmp_path / "g.yaml"
    path.write_text("dataset: digits\nlr: 0.05\nmethod: [pgd, {method: mart, mart-beta: 3, lr: 0.01}]\n")
    grid = expand_grid(read_grid_file(str(path)))
    assert [c.name for c in grid.cells] == ["pgd", "mart_mart-beta3_lr0.01"]
    runs = {r.cell: parse_config(r.argv) for r in plan_runs(grid, str(tmp_path))}
    assert (runs["pgd"].method, runs["pgd"].lr) == ("pgd", 0.05)
    assert (runs["mart_mart-beta3_lr0.01"].method, runs["mart_mart-beta3_lr0.01"].lr,
            runs["mart_mart-beta3_lr0.01"].mart_beta) == ("mart", 0.01, 3)
    with pytest.raises(ConfigError, match="sets no method"):
        expand_grid({"dataset": "digits", "method": ["pgd", {"lr": 0.01}]})
    with pytest.raises(ConfigError, match="lr varies across the grid already"):
        expand_grid({"dataset": "digits", "lr": [0.1, 0.2], "method": ["pgd", {"method": "mart", "lr": 0.01}]})
    with pytest.raises(ConfigError, match="'final_samples' cannot be set for one cell"):
        expand_grid({"dataset": "digits", "method": ["pgd", {"method": "mart", "final_samples": 10}]})


def test_grid_file_reads_flag_spellings(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text("dataset: digits\nlocal-epochs: [1, 2]\n--rounds: 3\n")
    assert read_grid_file(str(path)) == {"dataset": "digits", "local_epochs": [1, 2], "rounds": 3}
    toml = tmp_path / "g.toml"
    toml.write_text('method = ["pgd", "mart"]\nseed = [0, 1]\n')
    assert read_grid_file(str(toml)) == {"method": ["pgd", "mart"], "seed": [0, 1]}
    with pytest.raises(ConfigError, match="no such grid file"):
        read_grid_file(str(tmp_path / "nope.yaml"))


def test_finished_runs_are_skipped_and_cut_short_ones_resumed(tmp_path):
    grid = expand_grid({"dataset": "digits", "method": ["pgd", "trades"], "seed": [0, 1]})
    write_summary(tmp_path / "pgd_s0")
    write_summary(tmp_path / "pgd_s1", status="running", rounds=1)  # the driver was killed
    write_summary(tmp_path / "trades_s0", status="failed", error="FloatingPointError: NaN")
    states = {r.name: (r.state, r.argv) for r in plan_runs(grid, str(tmp_path))}
    assert states["pgd_s0"][0] == "finished" and states["trades_s0"][0] == "failed"
    assert states["pgd_s1"] == ("resume", ["--resume", str(tmp_path / "pgd_s1")])
    assert states["trades_s1"][0] == "new"
    assert run_state(str(tmp_path / "trades_s0"), retry_failed=True)[0] == "resume"
    # the grid edited since: a run in progress takes how it is evaluated and attacked, not what it learns
    edited = expand_grid({"dataset": "digits", "method": ["pgd", "trades"], "seed": [0, 1], "eval_every": 5,
                          "final_attack_models": "final", "lr": 0.1})
    resumed = {r.name: r.argv for r in plan_runs(edited, str(tmp_path))}["pgd_s1"]
    assert resumed == ["--resume", str(tmp_path / "pgd_s1"), "--eval-every", "5", "--final-attack-models", "final"]
    assert parse_config(resumed[2:] + ["--dataset", "digits"]).eval_every == 5  # flags train accepts


def test_kept_results_carry_ended_runs_to_a_new_machine(tmp_path):
    """benchmarks/keep_results.py: a sweep's ended runs saved on one machine are skipped by the
    same sweep on an empty one; the run in progress is neither kept nor overwritten."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import keep_results

    grid = expand_grid({"dataset": "digits", "method": ["pgd", "trades"], "seed": [0]})
    old, kept, new = tmp_path / "old" / "grid", tmp_path / "kept", tmp_path / "new" / "grid"
    write_summary(old / "pgd_s0")
    write_summary(old / "trades_s0", status="running", rounds=1)
    assert keep_results.save(str(old), str(kept)) == ["pgd_s0"]
    assert keep_results.save(str(old), str(kept)) == []  # kept once: its machine stays the one it ran on
    assert "cpu" in json.loads((kept / "grid" / "pgd_s0" / "machine.json").read_text())
    write_summary(new / "trades_s0", status="running", rounds=1, natural=0.1)
    assert keep_results.restore(str(new), str(kept)) == ["pgd_s0"]
    states = {r.name: r.state for r in plan_runs(grid, str(new))}
    assert states == {"pgd_s0": "finished", "trades_s0": "resume"}
    assert json.loads((new / "trades_s0" / "summary.json").read_text())["final"]["natural_acc"] == 0.1


def test_compare_partitions_reports_the_change_in_a_methods_lead_under_skew(tmp_path):
    """benchmarks/compare_partitions.py: a method's lead over another under IID and under label
    skew, and its change, from two sweeps' own files (finished runs only), with Welch's SE."""
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import compare_partitions

    grid = expand_grid({"dataset": "digits", "method": ["calfat", "trades"], "seed": [0, 1, 2, 3]})
    scores = {"iid": {"calfat": [0.80, 0.82, 0.84], "trades": [0.85, 0.87, 0.89]},
              "skew": {"calfat": [0.60, 0.62, 0.64], "trades": [0.50, 0.52, 0.54]}}
    for half, cells in scores.items():
        for cell, values in cells.items():
            for seed, value in enumerate(values):
                write_summary(tmp_path / half / f"{cell}_s{seed}",
                              final_attack={"models": {"final": {"robust_acc": value}}})
        write_summary(tmp_path / half / "trades_s3", status="failed",  # calfat_s3 never ran
                      final_attack={"models": {"final": {"robust_acc": 0.0}}})
        with open(tmp_path / half / "sweep.json", "w") as f:
            json.dump(sweep_record("g.yaml", grid, plan_runs(grid, str(tmp_path / half))), f)
    assert compare_partitions.cell_scores(str(tmp_path / "iid")) == scores["iid"]
    report = compare_partitions.compare(scores["iid"], scores["skew"], "calfat")
    se = 0.02 / 3 ** 0.5 * 2 ** 0.5 * 100  # two cells of 3 seeds, sample std 0.02 each
    assert f"| calfat | 82.0 ± 2.0 (n=3) | 62.0 ± 2.0 (n=3) | +20.0 ± {se:.1f}, t = {20 / se:.1f} |" in report
    assert f"| trades | -5.0 ± {se:.1f}, t = {-5 / se:.1f} | +10.0 ± {se:.1f}, t = {10 / se:.1f} | " \
           f"+15.0 ± {se * 2 ** 0.5:.1f}, t = {15 / (se * 2 ** 0.5):.1f} |" in report
    with pytest.raises(SystemExit, match="no cell 'mart' in both sweeps"):
        compare_partitions.compare(scores["iid"], scores["skew"], "mart")


def test_a_run_killed_in_its_final_attack_is_resumed_not_finished(tmp_path):
    """train.run writes `attacking` once the rounds are done: a run killed during its final
    attack has no headline number yet, so the sweep resumes it (which runs the attack again)."""
    write_summary(tmp_path / "r", status="attacking", rounds=2)
    assert run_state(str(tmp_path / "r")) == ("resume", "attacking after round 2")


def test_a_run_that_failed_before_its_summary_is_recorded_failed(tmp_path):
    """A run that stopped before train.run wrote summary.json (--device cuda without GPUs) is
    marked failed, not left new to fail again at every invocation; --retry-failed starts it
    anew. One cut short while resuming keeps its rounds and resumes on a retry."""
    never = tmp_path / "never_s0"
    assert run_state(str(never))[0] == "new"
    record_failure(str(never), "--device cuda needs 1 GPUs in the cluster (one per worker), found 0",
                   {"dataset": "digits"})
    assert run_state(str(never)) == ("failed", "--device cuda needs 1 GPUs in the cluster (one per worker), found 0")
    assert run_state(str(never), retry_failed=True)[0] == "new"
    summary = json.loads((never / "summary.json").read_text())
    assert summary["started"] is False and summary["config"] == {"dataset": "digits"}
    cut = tmp_path / "cut_s0"
    write_summary(cut, status="running", rounds=3)
    record_failure(str(cut), "ValueError: bad")
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 3 and "started" not in summary
    assert run_state(str(cut), retry_failed=True)[0] == "resume"


def test_failed_runs_are_one_line_and_final_samples_must_stay_the_same(tmp_path):
    assert failed_runs_line([], 4) is None
    line = failed_runs_line([("pgd_s0", "no GPUs"), ("pgd_s1", "no GPUs")], 4)
    assert line == ("2 of 4 run(s) failed (pgd_s0, pgd_s1); pgd_s0: no GPUs; the table shows them, --retry-failed "
                    "runs them again")
    grid = expand_grid({"dataset": "digits", "method": ["pgd", "trades"], "final_samples": 500})
    write_summary(tmp_path / "pgd_s0")  # an older summary without final_samples: nothing to compare
    runs = plan_runs(grid, str(tmp_path))
    assert final_samples_clash(runs, str(tmp_path), 500) is None
    summary = json.loads((tmp_path / "pgd_s0" / "summary.json").read_text())
    summary["config"]["final_samples"] = 1000
    (tmp_path / "pgd_s0" / "summary.json").write_text(json.dumps(summary))
    clash = final_samples_clash(runs, str(tmp_path), 500)
    assert clash.startswith("run pgd_s0 was started with final-samples 1000, the grid now says 500")
    assert "\n" not in clash


def test_concurrency_fits_the_largest_run_in_the_cluster():
    assert concurrent_runs({"CPU": 2.0}, [{"CPU": 1.0}]) == 2  # --workers 1 on two 1-CPU nodes
    assert concurrent_runs({"CPU": 2.0}, [{"CPU": 1.0}, {"CPU": 2.0}]) == 1  # --workers 2: one at a time
    assert concurrent_runs({"CPU": 16.0, "GPU": 2.0}, [{"CPU": 2.0, "GPU": 2.0}]) == 1
    assert concurrent_runs({"CPU": 1.0}, [{"CPU": 4.0}]) == 1  # never zero (Ray queues the workers)
    assert concurrent_runs({"CPU": 8.0}, [{"CPU": 1.0}], limit=3) == 3


def test_eta_spreads_the_remaining_runs_over_the_concurrent_ones():
    assert eta_seconds([], 4, 2) is None
    assert eta_seconds([10.0, 30.0], 4, 2) == pytest.approx(40.0)  # two waves of 20 s
    assert eta_seconds([10.0], 3, 2) == pytest.approx(20.0)


def test_a_cell_averages_finished_runs_and_shows_the_failed_one():
    """n per cell and, where a number averages fewer runs, per number; every robust column
    says on how many test images it was scored."""
    cell = {"name": "pgd", "values": {"method": "pgd"}, "runs": ["pgd_s0", "pgd_s1", "pgd_s2"]}
    new_style = {"attack": "APGD-CE + APGD-T", "images": 500,
                 "models": {"final": {"natural_acc": 0.9, "yardstick_acc": 0.6, "robust_acc": 0.55},
                            "best_robust": {"natural_acc": 0.9, "yardstick_acc": 0.6, "robust_acc": 0.55}}}
    summaries = {"pgd_s0": {"status": "finished", "final": {"natural_acc": 0.9, "robust_acc": 0.6, "eval_images": 360},
                            "final_attack": new_style, "rounds_completed": 2, "wall_s": 10.0,
                            "config": {"eval_steps": 10}},
                 "pgd_s1": {"status": "finished", "final": {"natural_acc": 0.8, "robust_acc": 0.4},
                            "rounds_completed": 2, "wall_s": 20.0},  # an old summary: no final attack, no clients
                 "pgd_s2": {"status": "failed", "error": "FloatingPointError: round 2: NaN/inf parameters"}}
    row = cell_row(cell, summaries)
    assert row["n"] == 2 and row["runs"] == 3 and row["status"] == "s2 diverged"
    assert row["natural"]["mean"] == pytest.approx(0.85) and row["natural"]["std"] == pytest.approx(0.0707, abs=1e-3)
    assert row["final_attack_robust"] == {"mean": 0.55, "std": None, "n": 1}
    assert row["worst_client_robust"]["mean"] is None and row["rounds"] == "2" and row["wall_s"] == 15.0
    md = format_markdown([row])
    assert "| pgd | 2/3 | 85.0 ± 7.1 | 50.0 ± 14.1 | 55.0 (n=1) |  | 2 | 15 | s2 diverged |" in md
    assert "| robust PGD-10 (360 img) % | robust APGD-CE + APGD-T (500 img) % |" in md
    csv_lines = format_csv([row]).splitlines()
    assert csv_lines[0].startswith("cell,method,runs,n,natural_mean,natural_std,natural_n,yardstick_robust_mean")
    assert csv_lines[1].startswith("pgd,pgd,3,2,0.8500,0.0707,2,0.5000,0.1414,2,0.5500,,1,,,0,")
    one_class = {"status": "finished", "final": {"natural_acc": 0.1145, "robust_acc": 0.1145,
                                                 "per_class": {"images": [192, 229, 219, 210, 175, 181, 211, 203, 197, 183]}}}
    summaries["pgd_s1"]["final"]["per_class"] = {"images": [10] * 10}  # 80% on 10 balanced classes: trained
    row = cell_row(cell, {**summaries, "pgd_s2": one_class})  # a model that names class 1 (229 of 2000) only
    assert row["n"] == 3 and row["status"] == "s2 predicts one class (counted)"
    assert row["natural"]["mean"] == pytest.approx((0.9 + 0.8 + 0.1145) / 3)
    nothing = cell_row({"name": "x", "runs": ["x_s0"]}, {"x_s0": None})
    assert nothing["n"] == 0 and nothing["status"] == "s0 not run" and nothing["natural"]["mean"] is None


def test_table_files_and_report_sweep(tmp_path, capsys):
    from ray_fedat import report

    grid = expand_grid({"dataset": "digits", "method": ["pgd", "trades"], "seed": [0, 1]})
    runs = plan_runs(grid, str(tmp_path))
    with open(tmp_path / "sweep.json", "w") as f:
        json.dump(sweep_record(str(tmp_path / "g.yaml"), grid, runs), f)
    write_summary(tmp_path / "pgd_s0", natural=0.9, robust=0.6)
    write_summary(tmp_path / "pgd_s1", natural=0.8, robust=0.5)
    write_summary(tmp_path / "trades_s0", status="running")
    paths = write_table(str(tmp_path))
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    report.main(["--sweep", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| pgd | 2/2 | 85.0 ± 7.1 | 55.0 ± 7.1 |" in out
    assert "| trades | 0/2 |" in out and "s0 unfinished; s1 not run" in out
    with pytest.raises(SystemExit) as e:
        report.main(["--sweep", str(tmp_path / "nope")])
    assert e.value.code == 2 and "no sweep.json" in capsys.readouterr().err


def test_dry_run_prints_cells_and_runs_and_bad_grids_are_one_line(tmp_path, capsys):
    from ray_fedat import sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(f"dataset: digits\nworkers: 1\nmethod: [pgd, trades]\nseed: [0, 1]\nstorage-path: {tmp_path}\n")
    sweep.main([str(grid), "--dry-run"])
    out = capsys.readouterr().out
    assert "2 cell(s) x 2 seed(s) = 4 runs" in out and "cell trades: " in out
    assert "run trades_s1: new" in out and "--method trades --seed 1 --name trades_s1" in out
    assert not (tmp_path / "g").exists()  # nothing started, nothing written
    grid.write_text("dataset: digits\nmethod: [pgd, nope]\n")
    with pytest.raises(SystemExit) as e:
        sweep.main([str(grid), "--dry-run"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["ray_fedat: error: run nope_s0: --method 'nope' is not "
                                                            "one of calfat, trades, mart, pgd, fgsm-rs, natural"]


def test_cells_holds_the_other_cells_runs_for_a_later_invocation(tmp_path, capsys):
    """--cells runs a comparison's cells first: the other cells' runs still to do are held
    (finished ones stay finished), and the dry run shows it; an unknown cell is one line."""
    from ray_fedat import sweep

    grid = tmp_path / "g.yaml"
    grid.write_text(f"dataset: digits\nworkers: 1\nmethod: [pgd, trades, mart]\nseed: [0, 1]\n"
                    f"storage-path: {tmp_path}\n")
    write_summary(tmp_path / "g" / "mart_s0")
    write_summary(tmp_path / "g" / "trades_s1", status="running", rounds=1)
    runs = sweep.hold_other_cells(expand_grid(read_grid_file(str(grid))),
                                  plan_runs(expand_grid(read_grid_file(str(grid))), str(tmp_path / "g")), ["pgd"])
    assert {r.name: r.state for r in runs} == {"pgd_s0": "new", "trades_s0": "held", "mart_s0": "finished",
                                               "pgd_s1": "new", "trades_s1": "held", "mart_s1": "held"}
    sweep.main([str(grid), "--dry-run", "--cells", "pgd,mart"])
    out = capsys.readouterr().out
    assert "run trades_s1: held (resume; its cell is not in --cells)" in out and "run mart_s1: new" in out
    with pytest.raises(SystemExit) as e:
        sweep.main([str(grid), "--dry-run", "--cells", "pgd,nope"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("ray_fedat: error: --cells: no cell 'nope' in the grid "
                                               "(its cells: pgd, trades, mart)")


def test_a_table_that_cannot_be_written_does_not_stop_the_sweep(tmp_path, capsys):
    from ray_fedat import sweep

    sweep.refresh_table(str(tmp_path))  # no sweep.json: the table cannot be made
    assert "ray_fedat.sweep: table not refreshed (FileNotFoundError" in capsys.readouterr().out


def sweep_command(grid):
    return [sys.executable, "-m", "ray_fedat.sweep", str(grid)]


RUNS = ("base_s0", "base_s1")  # the killed sweep's runs: one cell (nothing varies but the seed), 2 seeds


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_sweep_finishes_only_the_missing_runs(tmp_path, mlflow_server):
    """1 method x 2 seeds, 2 rounds, 1 worker per trial, one trial at a time, PGD-100 at the end.
    The driver gets SIGINT once the first run has finished: it stops at once, with the second
    run cut short; the same command runs the rest.
    The sweep logs to a real MLflow server: one experiment, a parent run with the table, one
    run per cell and seed, and a run cut short goes on in the tracker run it started."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"dataset: digits\nworkers: 1\nrounds: 2\nmethod: pgd\nseed: [0, 1]\n"
                    f"attack-steps: 2\neval-steps: 2\neval-samples: 100\nval-fraction: 0\n"
                    f"final-attack: pgd-100\nfinal-samples: 50\n"
                    f"track: mlflow\ntrack-uri: {mlflow_server}\ntrack-artifacts: small\n"
                    f"storage-path: {tmp_path}\n")
    sweep_dir = tmp_path / "grid"
    command = sweep_command(grid) + ["--max-concurrent", "1"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 1200  # generous: a shared machine can be slow; a short run is about a minute
    finished = []
    while time.time() < deadline and proc.poll() is None and not finished:
        finished = [d for d in RUNS if run_state(str(sweep_dir / d))[0] == "finished"]
        time.sleep(0.2)
    alive = proc.poll() is None
    # SIGINT to the driver alone (`kill -INT`, not a terminal's Ctrl-C to the whole process
    # group): the sweep stops now, with the run in progress cut short, not after that run ends.
    proc.send_signal(signal.SIGINT)
    try:
        first_out = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the sweep did not stop within 60 s of SIGINT") from None
    assert finished and alive, first_out[-3000:]
    assert proc.returncode == 130 and "interrupted; finished runs are kept" in first_out, first_out[-3000:]
    assert "1 at a time" in first_out, first_out[-3000:]
    finished = [d for d in RUNS if run_state(str(sweep_dir / d))[0] == "finished"]
    assert finished == ["base_s0"], finished  # one at a time: the second had only started
    # An interrupted sweep writes its table too: the run that finished is in it.
    rows = [ln for ln in (sweep_dir / "table.md").read_text().splitlines() if ln.startswith("| base")]
    assert [r.split(" | ")[:2] for r in rows] == [["| base", "1/2"]], rows
    before = {d: (sweep_dir / d / "summary.json").stat().st_mtime for d in finished}
    unfinished = [d for d in RUNS if d not in finished]
    # The tracker runs started before the kill (a run's tracking.json is written after its summary.json).
    tracked = {d: json.loads((sweep_dir / d / "tracking.json").read_text())["mlflow"]["run_id"]
               for d in unfinished if (sweep_dir / d / "tracking.json").exists()}
    parent_id = json.loads((sweep_dir / "tracking.json").read_text())["mlflow"]["run_id"]

    again = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout
    assert "1 of 2 runs to go" in out
    for d in finished:  # not run again
        assert f"started {d}" not in out
        assert (sweep_dir / d / "summary.json").stat().st_mtime == before[d]
    for d in unfinished:
        assert f"started {d}" in out and run_state(str(sweep_dir / d))[0] == "finished"
    rows = [ln for ln in (sweep_dir / "table.md").read_text().splitlines() if ln.startswith("| base")]
    assert [r.split(" | ")[:2] for r in rows] == [["| base", "2/2"]]
    assert all(r.rstrip().endswith("| ok |") for r in rows)
    header = (sweep_dir / "table.md").read_text().splitlines()[0]
    # The final attack ran inside the trials (its task left the trial's group), on 50 images.
    assert "robust PGD-100 (50 img) %" in header
    assert all(r.split(" | ")[4].strip() for r in rows)
    table_csv = (sweep_dir / "table.csv").read_text().splitlines()
    assert len(table_csv) == 2 and (sweep_dir / "table.png").is_file()
    for d in RUNS:
        records = [json.loads(ln) for ln in (sweep_dir / d / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in records] == [1, 2]

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_server)
    runs = mlflow.search_runs(experiment_names=["grid"], output_format="list")  # the sweep's experiment
    finished_runs = {r.info.run_name: r for r in runs if r.info.status == "FINISHED"}
    assert sorted(finished_runs) == ["base_s0", "base_s1", "grid"]
    parent = finished_runs["grid"]
    assert parent.info.run_id == parent_id  # the second invocation went on in the parent the first started
    client = MlflowClient(mlflow_server)
    assert {"table.md", "table.csv", "table.png"} <= {a.path for a in client.list_artifacts(parent_id)}
    for name in RUNS:
        run = finished_runs[name]
        tags = run.data.tags
        assert (tags["seed"], tags["cell"], tags["mlflow.parentRunId"]) == (name[-1], "base", parent_id)
        assert run.data.metrics["robust_pgd_100"] == pytest.approx(
            json.loads((sweep_dir / name / "summary.json").read_text())["headline"]["robust_acc"])
        assert run.data.metrics["final_attack_images"] == 50
    for name, run_id in tracked.items():  # cut short, resumed: the same tracker run, not a second one
        assert finished_runs[name].info.run_id == run_id
        assert [r.info.run_id for r in runs if r.info.run_name == name] == [run_id]


@pytest.mark.ray
def test_runs_that_fail_before_their_summary_are_recorded_failed_not_retried(tmp_path, ray_session, capsys):
    """--device cuda without GPUs: every run stops before train.run writes its summary. Each is
    recorded failed with train's one-line reason, the sweep exits 1 in one line, and the same
    command does not start them again (it used to exit 130 and "resume" them forever). With
    --cells, only the named cell's runs start; the same command without it runs the rest.
    In-process (`python -m ray_fedat.sweep` is this main) on the session's Ray, which has no GPU."""
    from ray_fedat.sweep import main

    if ray_session.cluster_resources().get("GPU"):
        pytest.skip("the session's Ray has a GPU here: --device cuda would not fail")
    grid = tmp_path / "gpu.yaml"
    grid.write_text(f"dataset: digits\nworkers: 1\nrounds: 1\ndevice: cuda\nlr: [0.1, 0.05]\nseed: [0, 1]\n"
                    f"storage-path: {tmp_path}\n")

    def sweep(*extra):
        with pytest.raises(SystemExit) as e:
            main([str(grid), *extra])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    reason = "--device cuda needs 1 GPUs in the cluster (one per worker), found 0"

    def one_error_line(err, failed, total):
        errors = [ln for ln in err.splitlines() if ln.startswith("ray_fedat: error:")]
        assert errors == [f"ray_fedat: error: {len(failed)} of {total} run(s) failed ({', '.join(failed)}); "
                          f"{failed[0]}: {reason}; the table shows them, --retry-failed runs them again"], err[-3000:]

    code, out, err = sweep("--cells", "lr0.1")  # one cell first: the other's runs are held, not started
    assert code == 1, out[-3000:] + err[-3000:]
    one_error_line(err, ["lr0.1_s0", "lr0.1_s1"], 4)
    assert "2 run(s) held (their cells are not in --cells)" in out and "started lr0.05" not in out
    assert not (tmp_path / "gpu" / "lr0.05_s0").exists()
    code, out, err = sweep()  # then the rest
    assert code == 1 and "2 of 4 runs to go" in out, out[-3000:] + err[-3000:]
    one_error_line(err, ["lr0.1_s0", "lr0.05_s0", "lr0.1_s1", "lr0.05_s1"], 4)
    for run in ("lr0.1_s0", "lr0.05_s1"):
        summary = json.loads((tmp_path / "gpu" / run / "summary.json").read_text())
        assert (summary["status"], summary["error"], summary["started"]) == ("failed", reason, False)
        assert summary["config"]["device"] == "cuda"
    assert "| lr0.05 | 0/2 |" in (tmp_path / "gpu" / "table.md").read_text()
    code, out, err = sweep()
    assert code == 1 and "all 4 runs are done already" in out, err[-3000:]
    assert "started lr" not in out
    main([str(grid), "--dry-run", "--retry-failed"])  # returns: a dry run starts nothing
    assert "run lr0.1_s0: new (failed before it started: " in capsys.readouterr().out  # a retry starts it anew


@pytest.mark.ray
def test_a_run_inside_a_ray_worker_uses_that_ray(ray_session):
    """A Tune trial is a Ray worker: launch.connect_ray must reuse its Ray, not start or
    shut down one."""
    import ray

    from ray_fedat.launch import connect_ray

    cfg = parse_config(["--dataset", "digits", "--workers", "1"])

    @ray.remote(num_cpus=0)
    def inside():
        return ray.is_initialized(), connect_ray(cfg), ray.is_initialized()

    before, (where, owns_ray), after = ray.get(inside.remote(), timeout=120)
    assert before and after and not owns_ray and where == "the Ray already running in this process"
