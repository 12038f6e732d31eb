"""CLI driver: `python -m ray_fedat.train --dataset digits --workers 2 --rounds 3`.

Validates the flags, loads and partitions the data, connects to (or starts) Ray, runs a
Ray Train TorchTrainer with `worker.train_loop_per_worker`, prints one line per round,
and writes summary.json and final_model.pt into <storage-path>/<name>/.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from typing import Optional, Sequence

from .config import parse_config
from .defaults import DATASET_DEFAULTS
from .errors import ConfigError, RunFailed, fail, root_cause
from .launch import (REPORT_POLL_INTERVAL_S, build_worker_plan, connect_ray, default_name, describe_data,
                     joins_cluster, lean_trainer, pinned_nodes, plan_placement, plan_storage_and_nodes,
                     training_share, worker_env)
from .monitoring import enable_state_tracking, submission_id, watch_lines
from .run_config import RunConfig, recipe_rounds_warning


def format_round(record: dict, total_rounds: Optional[int], started: float, rounds_before: int = 0) -> str:
    """`round 3/10  nat 97.1%  rob 81.4%  loss 0.42   12.3 s  ETA 4m10s` (total None: not planned yet);
    a round scored on validation only shows `val nat ... val rob ...`."""
    def pct(v):
        return "   -  " if v is None else f"{100 * v:5.1f}%"

    eta = "?"
    if total_rounds is not None:
        seconds = (time.time() - started) / max(record["round"] - rounds_before, 1) * (total_rounds - record["round"])
        eta = f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if record.get("natural_acc") is None and record.get("val_natural_acc") is not None:
        scores = f"val nat {pct(record['val_natural_acc'])}  val rob {pct(record['val_robust_acc'])}"
    else:
        scores = f"nat {pct(record['natural_acc'])}  rob {pct(record['robust_acc'])}"
    return (f"round {record['round']:>3}/{total_rounds or '?'}  {scores}  loss {record['train_loss']:.3f}  "
            f"{record['round_s']:5.1f} s  ETA {eta}")


def shown_rounds(run_dir: str) -> dict:
    """{round: its start time} of the records in metrics.jsonl: what is already on screen or
    from an earlier run (print_new_rounds prints a round when this changes)."""
    from .recorder import read_metrics

    return {r["round"]: r.get("started_at") for r in read_metrics(run_dir)}


def print_new_rounds(run_dir: str, printed: dict, total_rounds: int, started: float, rounds_before: int,
                     cfg: Optional[RunConfig] = None) -> dict:
    """Print the records of metrics.jsonl not printed yet, new rounds and rounds run again
    (after a restart or --resume, the rounds after the last checkpoint are replayed and
    replace the old ones); returns what has now been printed. With `cfg` of a --time-budget
    run, the first planned round also says when the plan is too short for the recipe."""
    from .recorder import read_metrics

    try:
        records = read_metrics(run_dir)
    except (OSError, ValueError):  # caught mid-replace: next poll
        return printed
    printed = dict(printed)
    for record in records:
        if record["round"] not in printed or printed[record["round"]] != record.get("started_at"):
            print(format_round(record, record.get("planned_rounds", total_rounds), started, rounds_before), flush=True)
            planned = record.get("planned_rounds")
            if cfg is not None and cfg.time_budget and planned and record["round"] == rounds_before + 1:
                warning = recipe_rounds_warning(cfg, planned)
                if warning:
                    print(f"ray_fedat: {warning}", flush=True)
            printed[record["round"]] = record.get("started_at")
    return printed


# Drawing curves.png takes a fraction of a second: redraw at most this often while training.
CURVES_EVERY_S = 10.0


def fit_with_progress(trainer, run_dir: str, total_rounds: int, started: float, rounds_before: int,
                      title: str = "", cfg: Optional[RunConfig] = None, tracking=None):
    """Run trainer.fit() in a thread while this (main) thread prints each round, logs it to
    the trackers (`tracking`, tracking.Trackers: here, never in the training thread or on a
    worker), redraws curves.png now and then, and listens for Ctrl-C. Returns (result,
    error, interrupted)."""
    from .recorder import WORKERS_FILE, draw_curves, read_metrics

    def log_rounds() -> None:
        if tracking is not None and tracking.trackers:
            try:
                records = read_metrics(run_dir)
            except (OSError, ValueError):  # caught mid-replace: next poll
                return
            tracking.log_rounds(records, os.path.join(run_dir, WORKERS_FILE))

    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    printed = shown_rounds(run_dir)
    drawn = time.monotonic()
    try:
        while thread.is_alive():
            thread.join(0.5)
            latest = print_new_rounds(run_dir, printed, total_rounds, started, rounds_before, cfg)
            if latest != printed:
                log_rounds()
            if latest != printed and time.monotonic() - drawn >= CURVES_EVERY_S:
                draw_curves(run_dir, read_metrics(run_dir), title)
                drawn = time.monotonic()
            printed = latest
    except KeyboardInterrupt:
        print_new_rounds(run_dir, printed, total_rounds, started, rounds_before, cfg)
        log_rounds()
        return None, None, True
    print_new_rounds(run_dir, printed, total_rounds, started, rounds_before, cfg)
    log_rounds()
    return outcome.get("result"), outcome.get("error"), False


def run(cfg: RunConfig, callbacks: Sequence = (), tracking: Optional[dict] = None) -> dict:
    """Run one federated adversarial training job; returns the summary dict.
    `callbacks`: more Ray Train callbacks beside the run's recorder (a sweep adds Tune's).
    `tracking`: a sweep's tracking.TrackContext for --track (as a dict: experiment, parent, tags).
    Raises ConfigError for a mistake found before training, RunFailed for a run that started
    and did not finish (its summary.json says why).

    What needs no data is checked first (the object store answers, the run directory is
    free, the cluster answers and has the GPUs and nodes asked for): a mistake there is one
    line before seconds of loading, and leaves nothing behind."""
    launched = time.time()  # a --time-budget counts from here: loading data and starting Ray included
    if cfg.dry_run:
        describe_data(cfg)
        print(json.dumps(cfg.to_dict(), indent=1))
        return {}

    from .storage import StorageError, check_store_answers, default_output_dir

    try:
        check_store_answers(cfg.storage_path)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    name = cfg.name or submission_id() or default_name(cfg)  # a submitted job: its run is named like it
    run_dir = cfg.output_dir or default_output_dir(cfg.storage_path, name)
    if cfg.resume:
        print(f"ray_fedat: resuming {run_dir} up to round {cfg.rounds}")
        if cfg.rounds > cfg.schedule_rounds and not cfg.time_budget:
            print(f"ray_fedat: the lr schedule and late attack keep the run's plan of {cfg.schedule_rounds} rounds: "
                  f"rounds after {cfg.schedule_rounds} train with round {cfg.schedule_rounds}'s values")
    elif os.path.exists(run_dir) and os.listdir(run_dir):
        raise ConfigError(f"run directory {run_dir} already holds a run; choose another --name, or --resume {run_dir}")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    if not joins_cluster(cfg):
        # A private local Ray has no spot nodes to lose: its preemption-watcher actor (a process
        # started with every run) watches nothing.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if cfg.dashboard or joins_cluster(cfg):
        # Only a dashboard reads it, and it costs seconds of start-up per run (measured: the
        # first round of a local digits run began 6 s later with it), so a local run
        # without --dashboard leaves it off.
        enable_state_tracking()
    if not cfg.verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)

    import ray
    import ray.train
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig

    from .final_attack import attempt_final_attack, final_attack_error, record_final_attack
    from .precision import deterministic_env_vars
    from .recorder import RunRecorder, draw_curves, read_metrics
    from .summary import FINAL_MODEL_FILE, save_final_model, save_summary, write_summary
    from .tracking import artifact_files, start_run_tracking
    from .worker import train_loop_per_worker

    where, owns_ray = connect_ray(cfg, name)
    trackers = None
    try:
        use_gpu, strategy, placement = plan_placement(cfg)
        pinned = pinned_nodes(cfg)  # before loading the data: an unknown IP is one line
        data, parts, counts, val_images = describe_data(cfg)
        os.makedirs(run_dir, exist_ok=True)
        storage, selectors, storage_note = plan_storage_and_nodes(cfg, name, use_gpu, pinned)
        print_header(cfg, name, run_dir, where, placement, use_gpu, storage_note, owns_ray)
        title = f"{name}: {cfg.method} on {cfg.dataset}, {cfg.clients} clients ({cfg.partition})"
        # With --time-budget the workers plan their rounds to end before this wall-clock time.
        deadline = launched + training_share(cfg) * cfg.time_budget if cfg.time_budget else None
        plan = build_worker_plan(cfg, data, parts, counts, use_gpu, storage, deadline)
        trainer = lean_trainer(
            not joins_cluster(cfg), train_loop_per_worker=train_loop_per_worker,
            train_loop_config={"plan": plan},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker},
                                                   placement_strategy=strategy, label_selector=selectors),
            run_config=RayRunConfig(
                name=name, storage_path=cfg.storage_path,
                worker_runtime_env={"env_vars": {**worker_env(cfg), **deterministic_env_vars(cfg.deterministic)}},
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                callbacks=[RunRecorder(run_dir, title, run_name=name), *callbacks]),
        )

        def summarise(status: str, write: bool = True, **outcome) -> dict:
            return write_summary(run_dir, cfg, counts, placement, status, launched=launched, storage=storage_note,
                                 run_name=name, val_images=val_images, write=write, **outcome)

        summarise("running")
        # The driver's trackers (never raises). After summary.json: a run cut short from here
        # on is resumed, never started anew, so its tracking.json is read again.
        trackers = start_run_tracking(cfg, name, run_dir, tracking)
        started = time.time()
        rounds_done = len(read_metrics(run_dir))
        trains = rounds_left(cfg, rounds_done, os.path.isfile(os.path.join(run_dir, FINAL_MODEL_FILE)))
        if trains:
            result, exc, interrupted = fit_with_progress(trainer, run_dir, cfg.rounds, started, rounds_done, title,
                                                         cfg, trackers)
        else:  # a resumed run whose rounds are all done (stopped in its final attack): no worker group
            result, exc, interrupted = None, None, False
        status, error = "finished", None
        if interrupted:
            status, error = "interrupted", "interrupted by the user (Ctrl-C)"
        elif exc is not None:  # Ray wraps a worker's error in TrainingFailedError
            status, error = "failed", root_cause(exc)
        records = read_metrics(run_dir)
        if records:  # the recorder redraws at most every few seconds: the final curves come from here
            draw_curves(run_dir, records, title)
        final_model = save_final_model(run_dir, result, records) if trains else FINAL_MODEL_FILE
        wall_s = time.time() - started
        final_attack = None
        if cfg.final_attack != "none" and status == "finished":
            # Not finished yet: a run stopped during its final attack is resumed (the sweep does
            # it too), and resuming a run whose rounds are all done runs the final attack again.
            summarise("attacking", wall_s=wall_s, final_model=final_model)
            final_attack = attempt_final_attack(cfg, run_dir, data, final_model, records, use_gpu)
            if final_attack.get("error"):
                status, error = "failed", final_attack_error(final_attack)
            else:
                record_final_attack(run_dir, final_attack)
        summary = summarise(status, write=False, wall_s=wall_s, final_model=final_model, error=error,
                            final_attack=final_attack)
        # The trackers get the end before summary.json says so: a run that reads finished has
        # its tracker runs finished too (a sweep never resumes it to complete them).
        trackers.finish(summary, artifact_files(run_dir, cfg.track_artifacts), status)
        save_summary(run_dir, summary)
    finally:
        if trackers is not None:
            trackers.end("failed")  # only when the run ended before its summary (a no-op after finish)
        if owns_ray:
            ray.shutdown()
    if status == "interrupted":
        raise RunFailed(f"interrupted after round {summary['rounds_completed']}; what was written is kept in "
                        f"{run_dir} (continue with --resume {run_dir})", code=130)
    if error and final_attack and final_attack.get("error"):
        raise RunFailed(f"{error} (the trained models are kept in {run_dir}; --resume {run_dir} runs the final "
                        "attack again)")
    if error:
        raise RunFailed(f"training failed: {error} (what was written is in {run_dir})")
    print_summary(summary, run_dir)
    return summary


def rounds_left(cfg: RunConfig, rounds_done: int, final_model_saved: bool) -> bool:
    """Whether the run has rounds to train. A resumed run whose rounds are all done and whose
    final model is saved has none: it goes straight to its final attack, without starting a
    worker group (seconds per run, and a sweep redoes every run stopped in its final attack)."""
    return not (cfg.resume and rounds_done >= cfg.rounds and final_model_saved)


def print_header(cfg: RunConfig, name: str, run_dir: str, where: str, placement: str, use_gpu: bool,
                 storage_note: str, owns_ray: bool) -> None:
    """The lines before round 1: the recipe, where it runs, where results go, and how to watch it."""
    print(f"ray_fedat: {cfg.method} eps={cfg.epsilon:.4g} step={cfg.step_size:.4g} attack={cfg.attack_steps} "
          f"eval=PGD-{cfg.eval_steps} (CE, then margin) step={cfg.eval_step_size:.4g}, model {cfg.model}, "
          f"{f'time budget {cfg.time_budget:g} s' if cfg.time_budget else f'{cfg.rounds} rounds'}; {where}, {placement}, "
          f"{'GPU/nccl' if use_gpu else 'CPU/gloo'}")
    print(f"ray_fedat: results in {run_dir}; {storage_note}")
    recipe = DATASET_DEFAULTS.get(cfg.preset or cfg.dataset)
    if cfg.time_budget and recipe is not None and recipe.unmasked_after_rounds:
        print(f"ray_fedat: the default {cfg.preset or cfg.dataset} recipe was measured free of gradient masking "
              f"from {recipe.unmasked_after_rounds} rounds on; the rounds this budget affords are known after round 1",
              flush=True)
    elif not cfg.time_budget and recipe_rounds_warning(cfg, cfg.rounds):
        print(f"ray_fedat: {recipe_rounds_warning(cfg, cfg.rounds)}", flush=True)
    if cfg.compile == "on" and not use_gpu:
        import torch

        from .precision import compile_toolchain_missing

        missing = compile_toolchain_missing(torch.device("cpu"))
        if missing:  # the workers find the same on this machine; on a cluster each checks its own node
            print(f"ray_fedat: --compile on, but {missing}: the workers train eager", flush=True)
    for line in watch_lines(name, owns_ray and not joins_cluster(cfg)):
        print(line)


def attack_pace(attack: dict) -> str:
    """`1000 images x 2 models in 412 s (4.9 images/s, 2 workers)`: what the final attack cost."""
    models = attack.get("models_attacked", 1)
    seconds = attack["seconds"]  # the caller prints the pace only where the attack's time is known
    return (f"{attack['images']} images x {models} model{'s' if models > 1 else ''} in {seconds:.0f} s "
            f"({attack['images'] * models / seconds:.1f} images/s, {attack['workers']} "
            f"worker{'s' if attack['workers'] > 1 else ''})")


def print_summary(summary: dict, run_dir: str) -> None:
    from .final_attack import yardstick_name
    from .report import check_lines

    final, best = summary["final"], summary["best"]
    print(f"ray_fedat: done, {summary['rounds_completed']} rounds in {summary['wall_s']:.1f} s")
    if summary.get("headline"):
        print(f"  final model: {summary['headline']['text']}")
        if summary["final_attack"].get("seconds"):
            print(f"  final attack: {attack_pace(summary['final_attack'])}")
    test_images = images_note((final or {}).get("eval_images"))
    if final:
        yardstick = f"{yardstick_name(summary['config']['eval_steps'])} yardstick"
        print(f"  final:  natural {100 * final['natural_acc']:.1f}%  robust {100 * final['robust_acc']:.1f}% "
              f"({yardstick}, test{test_images})")
    for kind in ("natural", "robust"):
        if best[kind]:
            chosen = best[kind]["chosen_on"]
            val_images = images_note((final or {}).get("val_images"))
            on_val = (f", validation {100 * best[kind]['val_' + kind + '_acc']:.1f}%{val_images}"
                      if chosen == "validation" else "")
            test = best[kind][kind + "_acc"]
            test = "test not scored that round" if test is None else f"test {100 * test:.1f}%{test_images}"
            print(f"  best {kind}: {test}{on_val} at round {best[kind]['round']}, "
                  f"chosen on {chosen} -> {os.path.join(run_dir, best[kind]['file'])}")
    clients = summary.get("client_robustness")
    if clients and clients["robust"]["worst"] is not None:
        rob = clients["robust"]
        print(f"  clients (test{test_images}, own label mix): worst robust {100 * rob['worst']:.1f}% "
              f"(client {rob['worst_client']}), "
              f"bottom {rob['bottom_clients']} mean {100 * rob['bottom_mean']:.1f}%")
    attack = summary.get("final_attack")
    if attack and attack.get("error"):
        print(f"  final attack {attack['attack']} failed: {attack['error']}")
    elif attack:
        for name, r in attack["models"].items():
            print(f"  {name}: {attack['attack']} {100 * r['robust_acc']:.1f}% vs {attack['yardstick']} "
                  f"{100 * r['yardstick_acc']:.1f}% (natural {100 * r['natural_acc']:.1f}%, {attack['images']} images)")
        if attack["warning"]:
            print(f"  {attack['warning']}")
        for line in check_lines(attack):
            print(f"  {line}")
    print(f"  outputs: {run_dir}/{{metrics.jsonl,summary.json,final_model.pt}}")


def images_note(images: Optional[int]) -> str:
    """`, 360 images` beside a robust number (blank when the record predates the count)."""
    return f", {images} images" if images else ""


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The command: every error ends here, as one line and an exit code (2: a mistake in the
    flags or the setup; 1: the run failed; 130: interrupted)."""
    try:
        cfg = parse_config(argv)
        if cfg.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return
        run(cfg)
    except ConfigError as e:
        fail(str(e))
    except RunFailed as e:
        fail(str(e), code=e.code)
    except KeyboardInterrupt:
        fail("interrupted; everything written so far is kept", code=130)


if __name__ == "__main__":
    main()
