import json

import pytest

from ray_fedat.schedule import epsilon_at, lr_at, plan_rounds


def test_cosine_lr_starts_at_base_and_decays_monotonically():
    lrs = [lr_at(r, 10, 0.1, "cosine") for r in range(1, 11)]
    assert lrs[0] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert 0 < lrs[-1] < 0.01
    assert lr_at(7, 10, 0.1, "constant") == 0.1


def test_epsilon_warms_up_linearly_then_stays():
    assert [epsilon_at(r, 0.3, 2) for r in range(1, 6)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert epsilon_at(1, 0.3, 0) == 0.3


def test_plan_rounds_fits_the_time_left():
    assert plan_rounds(1, seconds_left=100, seconds_per_round=10, reserve_s=5, max_rounds=1000) == 10
    assert plan_rounds(3, seconds_left=4, seconds_per_round=10, reserve_s=5, max_rounds=1000) == 3  # no time: stop
    assert plan_rounds(1, seconds_left=1e6, seconds_per_round=1, reserve_s=0, max_rounds=50) == 50


@pytest.mark.ray
def test_time_budget_plans_rounds_and_finishes_inside_it(tmp_path, ray_session):
    from test_ray_training import train

    budget = 30
    summary, records, run_dir = train(tmp_path, "budget", "--time-budget", str(budget), "--eps-warmup-rounds", "2",
                                      "--lr-schedule", "cosine", "--local-epochs", "2")
    plan = summary["time_budget"]
    assert plan["budget_s"] == budget and plan["planned_rounds"] == summary["rounds_completed"] >= 3
    assert plan["elapsed_s"] <= budget
    assert records[0]["planned_rounds"] is None and records[-1]["planned_rounds"] == records[-1]["round"]
    assert [r["epsilon"] for r in records[:3]] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert records[-1]["lr"] < records[1]["lr"] < records[0]["lr"]  # cosine decay over the planned rounds
    with open(f"{run_dir}/summary.json") as f:
        assert json.load(f)["final"]["round"] == summary["rounds_completed"]  # a full evaluation at the end
