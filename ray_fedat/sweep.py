"""Experiment grids: `python -m ray_fedat.sweep GRID.yaml` runs every cell x seed of a grid as a
Ray Tune trial and writes the paper's table (mean ± std over seeds).

The grid is a run config file (the keys of `python -m ray_fedat.train --config`) where a list
means "vary this": `method: [pgd, trades]`, `beta: [0.1, 0.5]`; `seed: [0, 1]` gives each cell
its seeds. Every run is the CLI's own code path: its flags go through `config.parse_config`
and it trains with `train.run`, inside a Tune trial (Ray's Train V2 + Tune pattern: the trial
function builds and fits the TorchTrainer, `TuneReportCallback` forwards each round to Tune).

Runs live in <storage-path>/<sweep>/<cell>_s<seed>/, laid out exactly like a CLI run (so
`ray_fedat.report`, `ray_fedat.evaluate` and `train --resume` work on each); the sweep's own
files (sweep.json, table.md, table.csv, table.png) sit beside them. Re-running the same
command skips finished runs and resumes interrupted ones from their checkpoints.

The functions down to `plan_runs` are pure (no Ray): they expand, name and plan the runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .config import build_parser, parse_config
from .errors import ConfigError, RunFailed, fail
from .sweep_table import SWEEP_FILE

# Keys a grid may not set: the sweep chooses them for every run.
SWEEP_OWNED = ("name", "output_dir", "resume", "config", "print_config", "dry_run")
# Keys that must be the same for every run: where the sweep's Ray and directory are.
SHARED_ONLY = ("storage_path", "address", "dashboard", "dashboard_host", "track", "track_uri")
# Keys that must be the same for every run so that their numbers compare, and why.
COMPARABLE_ONLY = {"final_samples": "every run's final attack must score the same test images for the robust "
                                    "accuracies of the table to compare"}
# What a resumed run takes from the grid as it is now (an edited grid reaches the runs in progress):
# how it is evaluated, attacked at the end and checkpointed, which never changes what it learns
# (config.RESUMABLE lists every flag a resume may change; rounds and placement stay the run's own).
FROM_GRID_ON_RESUME = ("eval_every", "test_every", "final_attack", "final_attack_models", "final_samples",
                       "checkpoint_every", "keep_checkpoints")
PATH_KEYS = ("data_dir", "data_file", "storage_path")  # made absolute: Tune trials run elsewhere
DRIVER_MEMORY = 256 * 2**20  # bytes a trial reserves for its run's driver (data, Ray handles)
# A run's summary.json status -> what the sweep does with it.
DONE_STATUSES = ("finished", "failed")  # failed: kept and shown as failed (--retry-failed resumes it)


@dataclass
class Cell:
    name: str
    values: Dict[str, object]  # the varying keys' values for this cell (file order)


@dataclass
class PlannedRun:
    name: str
    cell: str
    seed: int
    argv: List[str]  # the `python -m ray_fedat.train` flags of this run
    state: str = "new"  # new, resume, finished, failed, or held (its cell not in --cells this time)
    note: str = ""


@dataclass
class Grid:
    shared: Dict[str, object]
    varying: Dict[str, list]
    seeds: List[int]
    cells: List[Cell] = field(default_factory=list)


def read_grid_file(path: str) -> dict:
    """The grid file's mapping, keys as the train flags' names with underscores."""
    from .config import read_mapping_file

    raw = read_mapping_file(path, path, "no such grid file", "a mapping of train flag names to values (lists vary)")

    def flag_name(key) -> str:
        return str(key).lstrip("-").replace("-", "_")

    def cell_value(v):  # a mapping in a list: one cell's own settings, spelled as flags too
        return {flag_name(k): x for k, x in v.items()} if isinstance(v, dict) else v

    return {flag_name(k): [cell_value(x) for x in v] if isinstance(v, list) else v for k, v in raw.items()}


def expand_grid(raw: dict) -> Grid:
    """Split a grid mapping into shared values, varying keys (lists) and seeds, and list the
    cells: the cartesian product of the varying keys, in file order, the first key slowest."""
    known = {a.dest for a in build_parser()._actions} - {"help"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown key {key!r} (keys are the train flags, e.g. method, beta, seed)")
        if key in SWEEP_OWNED:
            raise ConfigError(f"{key!r} cannot be set in a grid: the sweep names and places every run itself")
    seeds = raw.get("seed", 0)
    seeds = list(seeds) if isinstance(seeds, list) else [seeds]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seed must be an integer or a list of integers (got {raw.get('seed')!r})")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seed lists a seed twice: {seeds}")
    varying, shared = {}, {}
    for key, value in raw.items():
        if key == "seed":
            continue
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{key}: an empty list gives no runs")
            if key in SHARED_ONLY:
                raise ConfigError(f"{key} cannot vary within a sweep (all its runs share one Ray and one directory)")
            if key in COMPARABLE_ONLY:
                raise ConfigError(f"{key} cannot vary within a sweep: {COMPARABLE_ONLY[key]}; set one value")
            if len(set(map(repr, value))) != len(value):
                raise ConfigError(f"{key} lists a value twice: {value}")
            varying[key] = value
        else:
            shared[key] = value
    for key, values in varying.items():
        for value in values:
            if isinstance(value, dict):
                check_cell_settings(key, value, known, varying)
    grid = Grid(shared, varying, seeds)
    combos: List[Dict[str, object]] = [{}]
    for key, values in varying.items():  # a mapping in a list is one value with its own settings
        combos = [{**c, **(v if isinstance(v, dict) else {key: v})} for c in combos for v in values]
    grid.cells = [Cell(cell_name(c), c) for c in combos]
    names = [c.name for c in grid.cells]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"two cells get the same directory name {clash[0]!r}; make the varying values distinct")
    return grid


def check_cell_settings(key: str, value: dict, known: set, varying: dict) -> None:
    """A mapping among a key's values, e.g. `method: [pgd, {method: mart, lr: 0.01}]`: the value
    of `key` with settings of its own (a method's learning rate chosen on validation). It must
    name `key`'s value, and may set only train flags that nothing else varies."""
    if key not in value:
        raise ConfigError(f"{key}: {value} sets no {key} (write e.g. {{{key}: <value>, lr: 0.01}})")
    for k in value:
        k_flag = str(k)
        if k_flag not in known or k_flag == "seed" or k_flag in SWEEP_OWNED or k_flag in SHARED_ONLY \
                or k_flag in COMPARABLE_ONLY:
            raise ConfigError(f"{key}: {value}: {k_flag!r} cannot be set for one cell")
        if k_flag != key and k_flag in varying:
            raise ConfigError(f"{key}: {value}: {k_flag} varies across the grid already")


def name_part(value: object) -> str:
    """A value as it appears in a directory name: 8/255 -> 8_255, True -> true."""
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "none"


def cell_name(values: Dict[str, object]) -> str:
    """`pgd_beta0.1_clients4`: the method's name alone, every other varying key as key+value;
    `base` when nothing varies."""
    parts = [name_part(v) if k == "method" else f"{k.replace('_', '-')}{name_part(v)}" for k, v in values.items()]
    return "_".join(parts) or "base"


def run_name(cell: str, seed: int) -> str:
    return f"{cell}_s{seed}"


def flags_to_argv(values: Dict[str, object]) -> List[str]:
    """Train flags (dest -> value) as a command line, spelled as the CLI's parser reads them."""
    actions = {a.dest: a for a in build_parser()._actions}
    argv: List[str] = []
    for key, value in values.items():
        action = actions[key]
        flag = next(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(flag)
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def sweep_dir_of(raw: dict, sweep_name: str) -> str:
    from .storage import absolute, is_uri

    storage = raw.get("storage_path", "./runs")
    if is_uri(str(storage)):
        raise ConfigError(f"storage_path {storage}: a sweep keeps its runs in a local directory (a mounted path "
                          "works on a cluster); storage URIs are not supported in sweeps yet")
    return os.path.join(absolute(str(storage)), sweep_name)


def run_argv(grid: Grid, cell: Cell, seed: int, sweep_dir: str, time_budget: Optional[float],
             rounds: Optional[int] = None) -> List[str]:
    """The complete train command line of one run: shared values, the cell's, its seed, and
    its place (--storage-path <sweep dir> --name <run>), paths made absolute."""
    from .storage import absolute

    values = {**grid.shared, **cell.values, "seed": seed, "storage_path": sweep_dir,
              "name": run_name(cell.name, seed)}
    if time_budget is not None:
        values["time_budget"] = time_budget
    if rounds is not None:
        values["rounds"] = rounds
    for key in PATH_KEYS:
        if values.get(key) is not None:
            values[key] = absolute(str(values[key]))
    return flags_to_argv(values)


def run_state(run_dir: str, retry_failed: bool = False) -> Tuple[str, str]:
    """(state, note) of a run directory: new (nothing there), finished, failed (both kept),
    or resume (any other status: started and cut short by a killed driver, Ctrl-C or a lost
    node, in training or in its final attack; resuming a run whose rounds are all done runs
    its final attack again). A failed run retried with `retry_failed` resumes, or starts
    anew when it failed before it started (record_failure: nothing of it to keep)."""
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        return "new", ""
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return "resume", "summary.json unreadable"
    status = summary.get("status")
    if status == "finished" or (status == "failed" and not retry_failed):
        return status, summary.get("error") or ""
    if status == "failed" and summary.get("started") is False:
        return "new", f"failed before it started: {summary.get('error') or ''}"
    return "resume", f"{status} after round {summary.get('rounds_completed', 0)}"


def record_failure(run_dir: str, error: str, config: Optional[dict] = None) -> None:
    """Mark a run failed that ended without saying so itself: it stopped before train.run
    wrote its summary (a --device cuda without GPUs, a bad resume), or while resuming,
    before rewriting it. Unmarked, the sweep would take it for new or cut short and retry it
    at every invocation, failing the same way each time. An existing summary keeps its
    rounds; a new one says `started: false`."""
    from .recorder import atomic_write_text

    path = os.path.join(run_dir, "summary.json")
    try:
        with open(path) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {"config": config, "rounds_completed": 0, "final": None, "final_attack": None, "started": False}
    summary.update(status="failed", error=error)
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(path, json.dumps(summary, indent=1))


def plan_runs(grid: Grid, sweep_dir: str, time_budget: Optional[float] = None,
              retry_failed: bool = False, rounds: Optional[int] = None) -> List[PlannedRun]:
    """Every cell x seed, with what this invocation does with it. Seed by seed: every cell's
    first seed runs before any cell's second, so a sweep stopped part-way already compares
    every cell (on fewer seeds) instead of holding all the seeds of the first cells only."""
    runs = []
    for seed in grid.seeds:
        for cell in grid.cells:
            name = run_name(cell.name, seed)
            run_dir = os.path.join(sweep_dir, name)
            state, note = run_state(run_dir, retry_failed)
            argv = run_argv(grid, cell, seed, sweep_dir, time_budget, rounds)
            if state == "resume":  # train's --resume: the run's own saved settings, from its checkpoint
                now = {k: v for k, v in {**grid.shared, **cell.values}.items() if k in FROM_GRID_ON_RESUME}
                argv = ["--resume", run_dir] + flags_to_argv(now) + ([] if rounds is None else ["--rounds", str(rounds)])
            runs.append(PlannedRun(name, cell.name, seed, argv, state, note))
    return runs


def hold_other_cells(grid: Grid, runs: List[PlannedRun], names: Optional[Sequence[str]]) -> List[PlannedRun]:
    """--cells: the runs still to do outside the named cells are held for a later invocation
    (a sweep of hours can finish the cells a comparison needs first; the table keeps every
    cell). Unknown names are a ConfigError naming the grid's cells."""
    if not names:
        return runs
    known = [c.name for c in grid.cells]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"--cells: no cell {', '.join(map(repr, unknown))} in the grid (its cells: {', '.join(known)})")
    return [replace(r, state="held", note=f"{r.state}; its cell is not in --cells")
            if r.cell not in names and r.state in ("new", "resume") else r for r in runs]


def final_samples_clash(runs: Sequence[PlannedRun], sweep_dir: str, expected: int) -> Optional[str]:
    """One line when a run already started with another --final-samples than the grid's (the
    grid was edited between invocations; a resumed run keeps its own), else None: the robust
    numbers of one table must rest on the same test images."""
    for r in runs:
        if r.state == "new":
            continue
        try:
            with open(os.path.join(sweep_dir, r.name, "summary.json")) as f:
                n = (json.load(f).get("config") or {}).get("final_samples")
        except (OSError, ValueError):
            continue
        if n is not None and n != expected:
            return (f"run {r.name} was started with final-samples {n}, the grid now says {expected}: all the runs "
                    f"of a sweep use one; set final-samples: {n} again, or start a new sweep with --name")
    return None


def sweep_record(grid_path: str, grid: Grid, runs: List[PlannedRun]) -> dict:
    """sweep.json: which runs make which cell (the table reads it)."""
    return {"grid_file": os.path.abspath(grid_path), "shared": grid.shared, "varying": grid.varying,
            "seeds": grid.seeds,
            "cells": [{"name": c.name, "values": c.values,
                       "runs": [run_name(c.name, s) for s in grid.seeds]} for c in grid.cells]}


def run_resources(cfg) -> Dict[str, float]:
    """What one run's Train workers hold while it trains."""
    need = {"CPU": float(cfg.workers * cfg.cpus_per_worker)}
    if cfg.device == "cuda":
        need["GPU"] = float(cfg.workers)
    return need


def concurrent_runs(cluster: Dict[str, float], needs: Sequence[Dict[str, float]], limit: Optional[int] = None) -> int:
    """How many runs fit side by side without starving each other's workers: the cluster's
    resources over the largest run's needs (at least one; never more than `limit`)."""
    fit = min((int(cluster.get(k, 0) // v) for need in needs for k, v in need.items() if v > 0), default=1)
    fit = max(1, fit)
    return min(fit, limit) if limit else fit


def eta_seconds(durations: Sequence[float], remaining: int, concurrency: int) -> Optional[float]:
    """Remaining runs x the mean run so far, spread over the runs that go side by side."""
    if not durations:
        return None
    return math.ceil(remaining / max(concurrency, 1)) * (sum(durations) / len(durations))


def format_seconds(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---- running it (Ray from here on) ----

def sweep_trial(config: dict, runs: Dict[str, dict]) -> dict:
    """One Tune trial: the CLI's own path (parse_config, then train.run), with Tune's report
    callback added to the run's Train callbacks. Never raises: the run's status is in its
    summary.json (record_failure writes it when the run could not), and a failed run is a
    row of the table, not a lost trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from .train import run

    config = runs[config["name"]]
    run_dir = config["run_dir"]
    os.chdir(config["cwd"])  # Tune starts a trial in its own directory: relative paths mean the user's
    cfg = None
    try:
        cfg = parse_config(config["argv"])
        summary = run(cfg, callbacks=[TuneReportCallback()], tracking=config.get("tracking"))
        return {"status": summary.get("status", "finished"), "run": config["name"]}
    except ConfigError as e:  # before training: no summary says why
        record_failure(run_dir, str(e), cfg.to_dict() if cfg else None)
        return {"status": "failed", "run": config["name"], "error": str(e)}
    except RunFailed as e:  # after its summary: the run wrote its status and error there
        if e.code != 130 and run_state(run_dir)[0] not in DONE_STATUSES:  # 130: interrupted, resumable
            record_failure(run_dir, str(e), cfg.to_dict())
        status, note = run_state(run_dir)
        return {"status": status, "run": config["name"], "error": note}
    except Exception as e:  # noqa: BLE001 - an unexpected error fails this run, not the sweep
        error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
        if run_state(run_dir)[0] not in DONE_STATUSES:
            record_failure(run_dir, error, cfg.to_dict() if cfg else None)
        return {"status": "failed", "run": config["name"], "error": error}


def refresh_table(sweep_dir: str) -> None:
    """Rewrite the table from the runs finished so far: after each run and when the sweep is
    interrupted, so that a sweep of hours never leaves a table older than its last run."""
    from .sweep_table import write_table

    try:
        write_table(sweep_dir)
    except Exception as e:  # the table is a view of the runs' own files: it never stops the sweep
        print(f"ray_fedat.sweep: table not refreshed ({type(e).__name__}: {e})", flush=True)


def make_progress_callback(total: int, done_before: int, concurrency: int, sweep_dir: str):
    """A Tune callback on the sweep driver: one line per run started and ended, with the ETA;
    the table is rewritten as each run ends."""
    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self):
            self.started: Dict[str, float] = {}
            self.durations: List[float] = []
            self.done = done_before

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()
            print(f"ray_fedat.sweep: started {trial.config['name']}", flush=True)

        def _ended(self, trial, how: str):
            self.done += 1
            self.durations.append(time.time() - self.started.get(trial.trial_id, time.time()))
            status = (trial.last_result or {}).get("status", how)
            eta = eta_seconds(self.durations, total - self.done, concurrency)
            print(f"ray_fedat.sweep: {trial.config['name']} {status} in {format_seconds(self.durations[-1])}; "
                  f"{self.done}/{total} runs done, ETA {format_seconds(eta)}", flush=True)
            refresh_table(sweep_dir)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._ended(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "failed")

    return Progress()


def run_sweep(grid_path: str, sweep_dir: str, grid: Grid, runs: List[PlannedRun], args) -> None:
    import ray
    from ray import tune

    from .launch import REPORT_POLL_INTERVAL_S, connect_ray
    from .tracking import finish_sweep_tracking, run_context, start_sweep_tracking

    todo = [r for r in runs if r.state in ("new", "resume")]
    cfgs = {r.name: parse_config(r.argv) for r in todo}
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, SWEEP_FILE), "w") as f:
        json.dump(sweep_record(grid_path, grid, runs), f, indent=1)
    held = sum(r.state == "held" for r in runs)
    if not todo:
        print(f"ray_fedat.sweep: all {len(runs) - held} runs are done already"
              + (f" ({held} held: their cells are not in --cells)" if held else ""))
        write_and_print_table(sweep_dir)
        fail_if_any_failed(sweep_dir, runs)
        return
    for r in todo:
        run_dir = os.path.join(sweep_dir, r.name)
        if r.state == "new" and os.path.isdir(run_dir):  # cut short before its summary: nothing to keep
            shutil.rmtree(run_dir)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    # Ctrl-C (SIGINT) stops the sweep now. Tune's own handler ends "gracefully": it waits for the
    # running trials to end, and a trial is a whole training run, so a SIGINT sent to the driver
    # alone (`kill -INT`, a supervisor) waited up to an hour. Without it, KeyboardInterrupt leaves
    # tuner.fit at once; the runs in progress stop with this driver and resume next time.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    first = next(iter(cfgs.values()))
    sweep_name = os.path.basename(sweep_dir)
    where, owns_ray = connect_ray(first, sweep_name)
    # --track: one experiment (W&B group) for the sweep, a parent run for its table; never raises.
    tracking = start_sweep_tracking(first, sweep_dir, sweep_name)
    cells = {c.name: c for c in grid.cells}
    tune_ended = False
    try:
        concurrency = concurrent_runs(ray.cluster_resources(), [run_resources(c) for c in cfgs.values()],
                                      args.max_concurrent)
        budgets = [c.time_budget for c in cfgs.values()]
        eta = "" if None in budgets else \
            f", ETA {format_seconds(eta_seconds([max(budgets)], len(todo), concurrency))} from the time budget"
        print(f"ray_fedat.sweep: {len(todo)} of {len(runs) - held} runs to go "
              f"({sum(r.state == 'resume' for r in todo)} resumed), {concurrency} at a time on {where}{eta}; "
              f"results in {sweep_dir}", flush=True)
        # Train V2 workers get their own placement group, outside the trial's: a trial that
        # reserved its workers' CPUs would count them twice (one run at a time where two
        # fit). So the trial (the run's driver) reserves no CPU, only the memory a driver
        # holds, and the concurrency limit, sized from the largest run's workers, is what
        # keeps the running trials' workers within the cluster, as Ray's Train V2 + Tune
        # guide does. The trial is pinned to this node (a sliver of its node:<ip>
        # resource): a run's driver reads the data and writes the run directory on its own
        # disk, as the CLI does here.
        here = f"node:{ray.util.get_node_ip_address()}"
        runs_by_name = {r.name: {"name": r.name, "argv": r.argv, "run_dir": os.path.join(sweep_dir, r.name),
                                 "cwd": os.getcwd(),
                                 "tracking": run_context(sweep_name, tracking.ids(), r.cell, r.seed,
                                                         cells[r.cell].values) if tracking.trackers else None}
                        for r in todo}
        trainable = tune.with_resources(tune.with_parameters(sweep_trial, runs=runs_by_name),
                                         {"cpu": 0, "memory": DRIVER_MEMORY, here: 0.001})
        tuner = tune.Tuner(
            trainable,
            param_space={"name": tune.grid_search(list(runs_by_name))},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(
                name="tune", storage_path=sweep_dir, verbose=0,
                callbacks=[make_progress_callback(len(runs) - held, len(runs) - held - len(todo), concurrency,
                                                  sweep_dir)]),
        )
        tuner.fit()
        tune_ended = True
    finally:
        if owns_ray:
            ray.shutdown()
        if not tune_ended:
            tracking.end("interrupted")
            refresh_table(sweep_dir)  # the runs finished before the interrupt
    write_and_print_table(sweep_dir)
    left = [r.name for r in todo if run_state(os.path.join(sweep_dir, r.name))[0] not in DONE_STATUSES]
    failed = any(run_state(os.path.join(sweep_dir, r.name))[0] == "failed" for r in runs)
    finish_sweep_tracking(tracking, sweep_dir, "interrupted" if left else "failed" if failed else "finished")
    if held:
        print(f"ray_fedat.sweep: {held} run(s) held (their cells are not in --cells); the command without --cells runs them")
    if left:  # Ctrl-C (Tune stops its trials), or a trial lost with its node
        raise RunFailed(f"{len(left)} run(s) not finished ({', '.join(left)}); the same command resumes them",
                        code=130)
    fail_if_any_failed(sweep_dir, runs)


def failed_runs_line(failed: Sequence[Tuple[str, str]], total: int) -> Optional[str]:
    """One line naming the failed runs (name, error) and the first one's error; None when none failed."""
    if not failed:
        return None
    name, error = failed[0]
    return (f"{len(failed)} of {total} run(s) failed ({', '.join(n for n, _ in failed)}); {name}: {error}; "
            "the table shows them, --retry-failed runs them again")


def fail_if_any_failed(sweep_dir: str, runs: Sequence[PlannedRun]) -> None:
    """RunFailed (exit 1, one line) when a run of the sweep failed: the table is written, but
    the sweep did not produce every number it was asked for."""
    states = [(r.name, run_state(os.path.join(sweep_dir, r.name))) for r in runs]
    line = failed_runs_line([(name, note) for name, (state, note) in states if state == "failed"], len(runs))
    if line:
        raise RunFailed(line)


def write_and_print_table(sweep_dir: str) -> None:
    from .sweep_table import write_table

    paths = write_table(sweep_dir)
    with open(paths["md"]) as f:
        print(f.read(), end="")
    print(f"ray_fedat.sweep: table in {', '.join(paths.values())}")


def print_plan(grid: Grid, runs: List[PlannedRun], sweep_dir: str) -> None:
    print(f"ray_fedat.sweep: {len(grid.cells)} cell(s) x {len(grid.seeds)} seed(s) = {len(runs)} runs in {sweep_dir}")
    print(f"  shared: {json.dumps(grid.shared)}")
    for cell in grid.cells:
        print(f"  cell {cell.name}: {json.dumps(cell.values)}")
    for r in runs:
        note = f" ({r.note})" if r.note else ""
        print(f"  run {r.name}: {r.state}{note}\n    python -m ray_fedat.train {' '.join(r.argv)}")


def build_sweep_parser() -> argparse.ArgumentParser:
    from .config import OneLineParser

    p = OneLineParser(prog="python -m ray_fedat.sweep", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", metavar="GRID", help="YAML or TOML grid file: train flags, lists where a value varies")
    p.add_argument("--name", default=None, help="the sweep's directory under storage_path (default: the grid file's name)")
    p.add_argument("--dry-run", action="store_true", help="print the cells and runs (and what would run) and exit")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="each run's --time-budget (overrides the grid's time_budget)")
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="each run's --rounds (overrides the grid's rounds; e.g. a 2-round smoke test of a grid)")
    p.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                   help="at most N runs at once (default: as many as the cluster's CPUs/GPUs hold)")
    p.add_argument("--cells", type=lambda v: [c for c in v.split(",") if c], default=None, metavar="CELL[,CELL]",
                   help="run only these cells' runs this time (a comparison's cells first); the table keeps every cell")
    p.add_argument("--retry-failed", action="store_true", help="resume failed runs too (default: keep them as failed)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_sweep_parser().parse_args(argv)
    try:
        if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
            raise ConfigError(f"--time-budget must be a positive number of seconds (got {args.time_budget})")
        if args.max_concurrent is not None and args.max_concurrent < 1:
            raise ConfigError(f"--max-concurrent must be >= 1 (got {args.max_concurrent})")
        raw = read_grid_file(args.grid)
        grid = expand_grid(raw)
        name = args.name or os.path.splitext(os.path.basename(args.grid))[0]
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError(f"--name {name!r} must be a plain directory name")
        sweep_dir = sweep_dir_of(raw, name)
        runs = hold_other_cells(grid, plan_runs(grid, sweep_dir, args.time_budget, args.retry_failed, args.rounds),
                                args.cells)
        for r in runs:  # every run's flags checked before anything starts
            try:
                parse_config(r.argv)
            except ConfigError as e:
                raise ConfigError(f"run {r.name}: {e}") from None
        grid_cfg = parse_config(run_argv(grid, grid.cells[0], grid.seeds[0], sweep_dir, args.time_budget, args.rounds))
        clash = final_samples_clash(runs, sweep_dir, grid_cfg.final_samples)
        if clash:
            raise ConfigError(clash)
        if args.dry_run:
            print_plan(grid, runs, sweep_dir)
            return
        run_sweep(args.grid, sweep_dir, grid, runs, args)
    except ConfigError as e:
        fail(str(e))
    except RunFailed as e:
        fail(str(e), code=e.code)
    except KeyboardInterrupt:
        fail("interrupted; finished runs are kept, and the same command resumes the rest", code=130)


if __name__ == "__main__":
    main()
