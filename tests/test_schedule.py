import json

import pytest

from ray_fedat.config import parse_config
from ray_fedat.schedule import (epsilon_at, eval_interval, late_phase, lr_at, plan_rounds, round_schedule,
                                schedule_round)


def test_cosine_lr_starts_at_base_and_decays_monotonically():
    lrs = [lr_at(r, 10, 0.1, "cosine") for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0 < lrs[-1] < 0.01
    assert lr_at(7, 10, 0.1, "constant") == 0.1


def test_an_extension_keeps_the_first_plan_and_trains_at_its_end_values():
    """A 5-round cosine run extended to 10 rounds: rounds 6-10 keep round 5's lr (MNIST's
    0.02 * 0.095 = 0.0019), not a 10-round plan's 0.01, and the late attack stays on."""
    lrs = [lr_at(schedule_round(r, 5), 5, 0.02, "cosine") for r in range(1, 11)]
    assert lrs[:5] == [lr_at(r, 5, 0.02, "cosine") for r in range(1, 6)]
    assert lrs[5:] == [lrs[4]] * 5 and lrs[4] == pytest.approx(0.0019, abs=1e-4)
    late = [late_phase(schedule_round(r, 5), 5, 0.5) for r in range(1, 21)]
    assert late == [False] * 2 + [True] * 18
    assert schedule_round(3, 5) == 3 and schedule_round(9, 5) == 5


def test_epsilon_warms_up_linearly_then_stays():
    assert [epsilon_at(r, 0.3, 2) for r in range(1, 6)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert epsilon_at(1, 0.3, 0) == 0.3


def test_late_phase_is_the_rounds_after_its_share_of_the_plan():
    assert [late_phase(r, 10, 0.5) for r in range(1, 11)] == [False] * 5 + [True] * 5
    assert [late_phase(r, 10, 0.0) for r in (1, 10)] == [True, True]
    assert not late_phase(7, 10, 0.7) and late_phase(8, 10, 0.7)


def test_a_round_schedule_joins_lr_epsilon_and_the_attack():
    """What the worker and benchmarks/collapse_check.py train each round with: the attack's step
    shrinks with a warming-up epsilon, the late attack starts after its share and stays."""
    cfg = parse_config(["--dataset", "digits", "--lr", "0.1", "--lr-schedule", "cosine", "--epsilon", "0.3",
                        "--step-size", "0.06", "--attack-steps", "5", "--eps-warmup-rounds", "2",
                        "--late-attack-steps", "10", "--late-step-size", "0.03", "--late-attack-from", "0.5"])
    first = round_schedule(cfg, 1, 10)
    assert first == pytest.approx((0.1, 0.1, 5, 0.02, False))
    assert round_schedule(cfg, 6, 10) == pytest.approx((lr_at(6, 10, 0.1, "cosine"), 0.3, 10, 0.03, True))
    assert round_schedule(cfg, 2, 10, late=True).attack_steps == 10  # once started, it stays
    assert round_schedule(cfg, 12, 10).lr == lr_at(10, 10, 0.1, "cosine")  # an extension keeps the plan's end


def test_plan_rounds_fits_the_time_left():
    assert plan_rounds(1, seconds_left=100, seconds_per_round=10, reserve_s=5, max_rounds=1000) == 10
    assert plan_rounds(3, seconds_left=4, seconds_per_round=10, reserve_s=5, max_rounds=1000) == 3  # no time: stop
    assert plan_rounds(1, seconds_left=1e6, seconds_per_round=1, reserve_s=0, max_rounds=50) == 50


def test_eval_interval_keeps_evaluation_under_its_share():
    assert eval_interval(train_s=20, eval_s=10, share=0.2) == 2  # 10 / (2 * 20 + 10) = 20%
    assert eval_interval(train_s=20, eval_s=11, share=0.2) == 3
    assert eval_interval(train_s=100, eval_s=10, share=0.2) == 1
    assert eval_interval(train_s=1, eval_s=100, share=0.2) == 10  # capped: best models still get picked
    assert eval_interval(train_s=5, eval_s=0, share=0.2) == 1
    for train_s, eval_s in [(20, 10), (3, 7), (0.7, 0.3)]:
        k = eval_interval(train_s, eval_s, 0.2)
        assert eval_s / (k * train_s + eval_s) <= 0.2 + 1e-9
        assert k == 1 or eval_s / ((k - 1) * train_s + eval_s) > 0.2  # and it is the smallest such k


@pytest.mark.ray
def test_time_budget_plans_rounds_and_finishes_inside_it(tmp_path, ray_session):
    from test_ray_training import train

    # Rounds of a second or two (an MLP, a 1-step attack, a 2-step yardstick on 120 images), so that
    # a short budget still holds several after the worker group's start (15-25 s on this machine).
    budget = 35
    summary, records, run_dir = train(tmp_path, "budget", "--time-budget", str(budget), "--eps-warmup-rounds", "2",
                                      "--lr-schedule", "cosine", "--model", "mlp", "--attack-steps", "1",
                                      "--eval-steps", "2", "--eval-samples", "120",
                                      "--final-attack", "none")  # its 15% reserve: test_final_attack_reserve
    plan = summary["time_budget"]
    assert plan["budget_s"] == budget and plan["planned_rounds"] == summary["rounds_completed"] >= 3
    # The plan, not the clock (a busy machine can overrun any budget): the plan fills the
    # budget's rounds, and its reserve keeps the summary's own elapsed time recorded.
    assert plan["elapsed_s"] is not None and plan["elapsed_s"] > 0
    assert all(r["planned_rounds"] >= r["round"] for r in records)
    assert records[-1]["planned_rounds"] == records[-1]["round"]
    # Validation in round 1, every eval_every rounds after, and at the end (the planner's choice);
    # the test set in round 1 (the plan needs its time), every test_every evaluations, and at the end.
    for r in records:
        last = r["round"] in (1, len(records))
        assert (r["val_natural_acc"] is not None) == (last or r["round"] % r["eval_every"] == 0)
        assert (r["natural_acc"] is not None) == (last or r["round"] % (5 * r["eval_every"]) == 0)
    assert [r["epsilon"] for r in records[:3]] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert records[-1]["lr"] < records[1]["lr"] < records[0]["lr"]  # cosine decay over the planned rounds
    with open(f"{run_dir}/summary.json") as f:
        assert json.load(f)["final"]["round"] == summary["rounds_completed"]  # a full evaluation at the end


def test_final_attack_reserve_of_a_time_budget():
    """A --time-budget run plans its rounds in 85% of the budget when a final attack follows."""
    from ray_fedat.train import training_share

    with_attack = parse_config(["--dataset", "digits", "--time-budget", "100"])
    assert training_share(with_attack) == pytest.approx(0.85)
    assert training_share(parse_config(["--dataset", "digits", "--final-attack", "none"])) == 1.0


def test_a_run_shorter_than_the_recipe_needs_is_warned(monkeypatch):
    """With the default recipe's unmasked_after_rounds set, a run planned for fewer rounds gets
    one line; as many rounds, another recipe, or an unmeasured recipe (0) gets none."""
    import dataclasses

    from ray_fedat import run_config
    from ray_fedat.run_config import recipe_rounds_warning

    cfg = parse_config(["--dataset", "mnist"])
    measured = dict(run_config.DATASET_DEFAULTS)
    measured["mnist"] = dataclasses.replace(measured["mnist"], unmasked_after_rounds=12)
    monkeypatch.setattr(run_config, "DATASET_DEFAULTS", measured)
    warning = recipe_rounds_warning(cfg, 11)
    assert warning and "12" in warning and "11 rounds" in warning and "\n" not in warning
    assert recipe_rounds_warning(cfg, 12) is None
    assert recipe_rounds_warning(dataclasses.replace(cfg, method="trades"), 1) is None
    assert recipe_rounds_warning(dataclasses.replace(cfg, attack_steps=7), 1) is None
    assert recipe_rounds_warning(dataclasses.replace(cfg, dataset="npz", preset="mnist"), 1)
    measured["mnist"] = dataclasses.replace(measured["mnist"], unmasked_after_rounds=0)
    assert recipe_rounds_warning(cfg, 1) is None
