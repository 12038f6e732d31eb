"""Per-round schedules: learning rate across rounds, epsilon warm-up, and the round plan
that fits a time budget. Pure functions of the round number."""
from __future__ import annotations

import math
from typing import NamedTuple

LR_SCHEDULES = ("constant", "cosine")


def lr_at(round_: int, total_rounds: int, base_lr: float, schedule: str) -> float:
    """Client learning rate in round `round_` (1-based) of `total_rounds`."""
    if schedule == "constant" or total_rounds <= 1:
        return base_lr
    if schedule == "cosine":  # from base_lr in round 1 down towards 0 in the last round
        return base_lr * 0.5 * (1 + math.cos(math.pi * (round_ - 1) / total_rounds))
    raise ValueError(f"unknown learning-rate schedule {schedule!r}")


def schedule_round(round_: int, schedule_rounds: int) -> int:
    """The round of the planned schedule that round `round_` trains with.

    The lr schedule and the late attack are planned for `schedule_rounds` rounds (the run's
    first --rounds; with --time-budget, the current plan). A run extended past its plan
    (`--resume DIR --rounds N`) keeps that plan: every round after its end trains with the
    plan's last round's values, so a cosine lr stays at its end value instead of jumping
    back up, and a late attack that had started stays on."""
    return min(round_, schedule_rounds)


def epsilon_at(round_: int, epsilon: float, warmup_rounds: int) -> float:
    """Linear epsilon warm-up: eps/(W+1), 2eps/(W+1), ... reaching eps after W rounds.
    Starting large-epsilon adversarial training (MNIST's 0.3) at full strength is a known
    cause of collapse to chance accuracy."""
    if warmup_rounds <= 0:
        return epsilon
    return epsilon * min(1.0, round_ / (warmup_rounds + 1))


def late_phase(round_: int, total_rounds: int, late_from: float) -> bool:
    """Whether `round_` is in the last part of the run that trains against the stronger
    attack: the rounds after late_from * total_rounds."""
    return round_ > late_from * total_rounds


class RoundSchedule(NamedTuple):
    """What one round trains with: its lr and its attack."""
    lr: float
    epsilon: float
    attack_steps: int
    step_size: float
    late: bool  # the late attack has started (it stays)


def round_schedule(cfg, round_: int, planned_rounds: int, late: bool = False) -> RoundSchedule:
    """Round `round_`'s lr, epsilon and attack from a run's schedules (cfg: a RunConfig),
    for a plan of `planned_rounds` rounds; `late`: the late attack already started. The
    attack's step size scales with a warming-up epsilon, so the attack keeps its shape."""
    at = schedule_round(round_, planned_rounds)
    epsilon = epsilon_at(round_, cfg.epsilon, cfg.eps_warmup_rounds)
    late = late or (cfg.late_attack_steps is not None and late_phase(at, planned_rounds, cfg.late_attack_from))
    steps, step_size = ((cfg.late_attack_steps, cfg.late_step_size or cfg.step_size) if late
                        else (cfg.attack_steps, cfg.step_size))
    return RoundSchedule(lr_at(at, planned_rounds, cfg.lr, cfg.lr_schedule), epsilon, steps,
                         step_size * epsilon / max(cfg.epsilon, 1e-12), late)


def plan_rounds(done_rounds: int, seconds_left: float, seconds_per_round: float, reserve_s: float,
                max_rounds: int) -> int:
    """How many rounds in total fit: the rounds done plus as many more as the time left
    (less a reserve for the final outputs) holds at the measured pace; at least the
    rounds already done."""
    more = math.floor((seconds_left - reserve_s) / max(seconds_per_round, 1e-9))
    return max(done_rounds, min(max_rounds, done_rounds + max(more, 0)))


def eval_interval(train_s: float, eval_s: float, share: float, most: int = 10) -> int:
    """Evaluate every k rounds, the smallest k (at most `most`) for which evaluation takes at
    most `share` of the time: eval_s / (k * train_s + eval_s) <= share."""
    if eval_s <= 0:
        return 1
    k = math.ceil(eval_s * (1 - share) / (share * max(train_s, 1e-9)) - 1e-9)
    return max(1, min(most, k))
