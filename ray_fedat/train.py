"""CLI driver: `python -m ray_fedat.train --dataset digits --workers 2 --rounds 3`.

Validates the flags, loads and partitions the data, connects to (or starts) Ray, runs a
Ray Train TorchTrainer with `worker.train_loop_per_worker`, prints one line per round,
and writes summary.json and final_model.pt into <storage-path>/<name>/.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import List, Optional, Sequence

import numpy as np

from .config import parse_config
from .errors import ConfigError
from .defaults import DATASET_DEFAULTS
from .run_config import RunConfig, eval_batch_size_for, recipe_rounds_warning
from .monitoring import enable_state_tracking, job_config, submission_id, watch_info, watch_lines

# Ray Train's report() waits for the controller's next poll of the workers, which happens
# every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): seconds of dead time per round.
# Polling a handful of workers is cheap, so poll faster unless the user chose a value.
REPORT_POLL_INTERVAL_S = "0.2"
RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"


def fail(message: str, code: int = 2) -> None:
    print(f"ray_fedat: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def prepare_data(cfg: RunConfig):
    """Load the dataset, hold out the validation set, and split the rest over the clients
    (all on the driver, before Ray)."""
    from .data import hold_out_validation, load_dataset
    from .partition import class_counts, make_partition

    data = hold_out_validation(load_dataset(cfg), cfg.val_fraction, cfg.seed)
    parts = make_partition(data.y_train.numpy(), cfg.clients, cfg.partition, cfg.seed, beta=cfg.beta,
                           shards_per_client=cfg.shards_per_client, min_size=cfg.min_client_size)
    counts = class_counts(data.y_train.numpy(), parts, data.num_classes)
    return data, parts, counts


def default_name(cfg: RunConfig) -> str:
    return f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def connect_ray(cfg: RunConfig, job_name: Optional[str] = None) -> tuple:
    """(description, whether we started it). Reuse a Ray already initialised in this
    process (notebooks, tests); else join the cluster named by --address or $RAY_ADDRESS;
    else start a private local Ray for this run (address='local' never joins a stale
    cluster that the temp dir's ray_current_cluster file still names)."""
    import ray

    if ray.is_initialized():
        return "the Ray already running in this process", False
    quiet = dict(log_to_driver=cfg.verbose, logging_level=logging.INFO if cfg.verbose else logging.WARNING,
                 job_config=job_config(job_name) if job_name else None)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        from .auth import check_cluster_access, use_token_if_available

        use_token_if_available()
        problem = check_cluster_access(address)
        if problem:
            fail(problem)
        try:
            info = ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            fail(f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0]}); start one with "
                 f"`ray start --head` on the head node, or omit --address/RAY_ADDRESS to run on a local Ray")
        return f"cluster at {address}{dashboard_note(info)}", True
    num_cpus = max(os.cpu_count() or 1, cfg.workers * cfg.cpus_per_worker)
    # Ray then warns "Token authentication is enabled ... Set RAY_AUTH_MODE=disabled to opt
    # out": advice to turn security off, about a private Ray that keeps its token and that
    # nobody else joins. Nothing for the user to do, so nothing said (--verbose shows it).
    token_logger = logging.getLogger(RAY_TOKEN_SETUP_LOGGER)
    level = token_logger.level
    if not cfg.verbose:
        token_logger.setLevel(logging.ERROR)
    try:
        info = ray.init(address="local", num_cpus=num_cpus, include_dashboard=cfg.dashboard,
                        dashboard_host=cfg.dashboard_host, **quiet)
    finally:
        token_logger.setLevel(level)
    return f"local Ray ({num_cpus} CPUs{dashboard_note(info)})", True


def dashboard_note(info) -> str:
    url = getattr(info, "dashboard_url", None)
    return f", dashboard http://{url}" if url else ""


def plan_placement(cfg: RunConfig):
    """(use_gpu, placement strategy, a sentence for the log)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus >= cfg.workers)
    if cfg.device == "cuda" and gpus < cfg.workers:
        fail(f"--device cuda needs {cfg.workers} GPUs in the cluster (one per worker), found {gpus}")
    if cfg.device == "auto" and 0 < gpus < cfg.workers:
        print(f"ray_fedat: training on CPU: the cluster has {gpus} GPU(s) for {cfg.workers} workers, and "
              "--device auto uses GPUs only when every worker gets one (use --workers "
              f"{gpus} to train on the GPUs)")
    need = "GPU" if use_gpu else "CPU"
    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(need, 0) >= 1]
    if cfg.workers > 1 and len(nodes) >= cfg.workers:
        return use_gpu, "STRICT_SPREAD", f"one worker per node ({cfg.workers} of {len(nodes)} nodes)"
    return use_gpu, "PACK", f"{cfg.workers} workers packed on {len(nodes)} node(s)"


def pinned_nodes(cfg: RunConfig) -> Optional[List[str]]:
    """The node ids --worker-nodes pins the ranks to (None: Ray places them); an IP that no
    live node has is a one-line error."""
    import ray

    if cfg.worker_nodes is None:
        return None
    by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    unknown = [ip for ip in cfg.worker_node_list() if ip not in by_ip]
    if unknown:
        fail(f"--worker-nodes: no live Ray node has IP {', '.join(unknown)} (nodes: {', '.join(sorted(by_ip))})")
    return [by_ip[ip] for ip in cfg.worker_node_list()]


def plan_storage_and_nodes(cfg: RunConfig, name: str, use_gpu: bool):
    """Check who sees the storage path, pin workers to nodes where needed.
    Returns (payload['storage'], per-worker label selectors or None, a sentence for the log)."""
    import ray

    from .storage import StorageError, local_run_storage, plan_storage, probe_nodes, write_marker

    driver_node = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    pinned = pinned_nodes(cfg)
    marker_dir = local_run_storage(cfg.storage_path, name)
    token = write_marker(marker_dir) if marker_dir else None
    driver = next(n for n in alive if n["NodeID"] == driver_node)
    need = {"GPU": 1.0} if use_gpu else {}
    need["CPU"] = float(cfg.cpus_per_worker)
    driver_can_host = all(driver.get("Resources", {}).get(k, 0) >= v for k, v in need.items())
    try:
        # Nodes that could host a worker are the ones whose view of the storage matters.
        hosts = [n["NodeID"] for n in alive if all(n.get("Resources", {}).get(k, 0) >= v for k, v in need.items())]
        plan = plan_storage(cfg.storage_path, probe_nodes(marker_dir, token, sorted(set(hosts) | {driver_node})),
                            driver_node, driver_can_host, pinned)
    except StorageError as e:
        fail(str(e))
    if plan.pin_driver_node:  # one worker on this node, whatever order Ray creates them in
        pinned = [driver_node] + [None] * (cfg.workers - 1)
    selectors = None if pinned is None else [{} if n is None else {"ray.io/node-id": n} for n in pinned]
    storage = {"uri": marker_dir is None, "marker_dir": marker_dir, "marker_token": token,
               "driver_node": driver_node, "shared": plan.shared}
    return storage, selectors, plan.note


# Where the object store is, never how to get in: a runtime_env is shown on the dashboard
# (job and actor details) to anyone holding the cluster token. Credentials reach the workers
# from their node's own environment or ~/.aws: a local Ray inherits the driver's, and on a
# cluster `ray start` inherits them (cluster/cluster.env: STORAGE_ENV_FILE).
STORAGE_LOCATION_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL")


def worker_env(cfg: RunConfig) -> dict:
    """Environment variables the workers get from the driver: where the object store is,
    when checkpoints go to a URI. No secret (keys, session tokens) ever goes here."""
    from .storage import is_uri

    if not is_uri(cfg.storage_path):
        return {}
    return {k: os.environ[k] for k in STORAGE_LOCATION_VARS if os.environ.get(k)}


def build_payload(cfg: RunConfig, data, parts, counts, use_gpu: bool) -> dict:
    """What every worker receives: the config, the class counts, and either object-store
    references to its clients' shards (--data-on driver) or the partition indices."""
    import ray
    import torch

    from .client import ClientShard
    from .data import data_digest

    payload = {"cfg": cfg.to_dict(), "shape": list(data.shape), "num_classes": data.num_classes,
               "augment": data.augment, "use_gpu": use_gpu, "class_counts": counts.tolist()}
    if cfg.data_on == "driver":
        payload["client_refs"] = [
            ray.put(ClientShard(cid, data.x_train[idx], data.y_train[idx], torch.tensor(counts[cid], dtype=torch.float32)))
            for cid, idx in enumerate(map(torch.as_tensor, parts))]
        payload["test_ref"] = ray.put((data.x_test, data.y_test))
        payload["val_ref"] = ray.put((data.x_val, data.y_val))
    else:
        payload["partition"] = [p.astype(np.int64) for p in parts]
        payload["data_digest"] = data_digest(data)
    return payload


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
                      title: str = "", cfg: Optional[RunConfig] = None):
    """Run trainer.fit() in a thread while this (main) thread prints each round, redraws
    curves.png now and then, and listens for Ctrl-C. Returns (result, error, interrupted)."""
    from .recorder import draw_curves, read_metrics

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
            if latest != printed and time.monotonic() - drawn >= CURVES_EVERY_S:
                draw_curves(run_dir, read_metrics(run_dir), title)
                drawn = time.monotonic()
            printed = latest
    except KeyboardInterrupt:
        print_new_rounds(run_dir, printed, total_rounds, started, rounds_before, cfg)
        return None, None, True
    print_new_rounds(run_dir, printed, total_rounds, started, rounds_before, cfg)
    return outcome.get("result"), outcome.get("error"), False


def save_final_model(run_dir: str, result, records: List[dict]) -> Optional[str]:
    """final_model.pt: the global model of the last round, from Ray Train's last checkpoint."""
    import torch

    from .checkpoints import MODEL_FILE, load_model_file

    if result is None or result.checkpoint is None or not records:
        return None
    with result.checkpoint.as_directory() as d:
        state_dict, meta = load_model_file(os.path.join(d, MODEL_FILE))
    if meta["round"] != records[-1]["round"]:
        return None
    torch.save(state_dict, os.path.join(run_dir, "final_model.pt"))
    return "final_model.pt"


def write_summary(run_dir: str, cfg: RunConfig, counts, placement: str, status: str, wall_s: float = 0.0,
                  final_model: Optional[str] = None, error: Optional[str] = None,
                  launched: Optional[float] = None, storage: Optional[str] = None,
                  run_name: Optional[str] = None, val_images: int = 0, final_attack: Optional[dict] = None) -> dict:
    """summary.json: written when the run starts (so an interrupted run can be resumed)
    and again when it ends. `status`: running, attacking (the rounds are done, the final
    attack is under way), then finished (only after the final attack), failed or interrupted."""
    from .byzantine import byzantine_clients
    from .federation import assign_clients
    from .recorder import WORKERS_FILE, atomic_write_text, best_rounds, read_metrics

    records = read_metrics(run_dir)
    workers_path = os.path.join(run_dir, WORKERS_FILE)
    workers = []
    if os.path.exists(workers_path):
        with open(workers_path) as f:
            workers = json.load(f)
    evaluated = [r for r in records if r.get("natural_acc") is not None]
    summary = {
        "status": status,
        "error": error,
        "config": cfg.to_dict(),
        "clients": [{"client": i, "size": int(c.sum()), "class_counts": c.tolist()} for i, c in enumerate(counts)],
        "client_assignment": {str(rank): ids for rank, ids in  # balanced by samples, as the workers place them
                              enumerate(assign_clients(cfg.clients, cfg.workers, [int(c.sum()) for c in counts]))},
        "byzantine": {"clients": byzantine_clients(cfg.clients, cfg.byzantine, cfg.seed),
                      "attack": cfg.byzantine_attack} if cfg.byzantine else None,
        "placement": placement,
        "storage": storage,  # where checkpoints go and who writes them
        "rounds_completed": records[-1]["round"] if records else 0,
        "final": evaluated[-1] if evaluated else None,
        "best": best_rounds(records),
        "selection": selection(cfg, val_images),
        "client_robustness": client_robustness(evaluated[-1] if evaluated else None, counts),
        "final_attack": final_attack,
        "headline": headline_numbers(final_attack),
        "final_model": final_model,
        "wall_s": wall_s,
        "workers": workers,
        "watch": watch_info(run_name or os.path.basename(run_dir)),
    }
    if cfg.time_budget:
        summary["time_budget"] = {
            "budget_s": cfg.time_budget,
            "planned_rounds": records[-1].get("planned_rounds") if records else None,
            "eval_every": records[-1].get("eval_every") if records else None,
            "elapsed_s": (time.time() - launched) if launched else None,  # from CLI start: data and Ray included
        }
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))
    return summary


def headline_numbers(final_attack: Optional[dict]) -> Optional[dict]:
    """The run's headline: the final model's accuracy under the final strong attack."""
    from .final_attack import headline

    text = headline(final_attack)
    if text is None:
        return None
    r = final_attack["models"]["final"]
    return {"natural_acc": r["natural_acc"], "robust_acc": r["robust_acc"], "attack": final_attack["attack"],
            "images": r["images"], "epsilon": final_attack["epsilon"], "text": text}


def selection(cfg: RunConfig, val_images: int) -> dict:
    """Which split chose the best models, and which only reports."""
    if val_images:
        return {"chosen_on": "validation", "validation_images": val_images, "val_fraction": cfg.val_fraction,
                "reported_on": "test", "note": "best_natural.pt and best_robust.pt are chosen on validation "
                "accuracy; the test set is reported, never used to choose"}
    return {"chosen_on": "test", "validation_images": 0, "val_fraction": 0.0, "reported_on": "test",
            "note": "--val-fraction 0: the best models are chosen on the test set, so their test accuracy is "
            "optimistic"}


def client_robustness(record: Optional[dict], counts) -> Optional[dict]:
    """Each client's expected natural and robust accuracy on its own label distribution
    (the global model's per-class test accuracy weighted by the client's class histogram),
    the worst client and the mean of the bottom 20%."""
    from .round_eval import client_expected_accuracy, worst_and_bottom

    if not record or not record.get("per_class"):
        return None
    per_class = record["per_class"]
    natural = client_expected_accuracy(counts.tolist(), per_class["natural"])
    robust = client_expected_accuracy(counts.tolist(), per_class["robust"])
    return {"round": record["round"], "split": "test",
            "clients": [{"client": i, "natural_acc": n, "robust_acc": r} for i, (n, r) in enumerate(zip(natural, robust))],
            "natural": worst_and_bottom(natural), "robust": worst_and_bottom(robust)}


def run_final_attack(cfg: RunConfig, run_dir: str, data, final_model: Optional[str], records: List[dict],
                     use_gpu: bool) -> Optional[dict]:
    """--final-attack on final_model.pt and best_robust.pt (once when they are the same round),
    split over one Ray task per worker, each with a worker's resources, the way per-round
    evaluation is split, on --final-samples fixed class-stratified test images
    (final_attack.stratified_subset). Never fails the run: a problem is reported in the result."""
    import ray

    from .checkpoints import load_model_file
    from .final_attack import (ATTACK_NAMES, attack_shard, combine_shards, images_digest, stratified_subset,
                             weak_yardstick_warning, yardstick_name)
    from .recorder import BEST_FILES

    files = {"final": final_model, "best_robust": BEST_FILES["robust"]}
    loaded = {name: load_model_file(os.path.join(run_dir, f))
              for name, f in files.items() if f and os.path.isfile(os.path.join(run_dir, f))}
    if not loaded:
        return None
    final_round = records[-1]["round"] if records else None
    best_round = loaded["best_robust"][1].get("round") if "best_robust" in loaded else None
    same_model = "final" in loaded and best_round is not None and best_round == final_round
    if same_model:
        del loaded["best_robust"]  # attack it once
    states = {name: state for name, (state, _) in loaded.items()}
    chosen = stratified_subset(data.y_test, cfg.final_samples)
    samples = len(chosen)
    how = "all" if samples == len(data.y_test) else "a fixed class-stratified subset, the same for every run"
    x, y = data.x_test[chosen], data.y_test[chosen]
    yardstick = yardstick_name(cfg.eval_steps)
    print(f"ray_fedat: final attack: {ATTACK_NAMES[cfg.final_attack]} on {' and '.join(states)} model, "
          f"{samples} of {len(data.y_test)} test images ({how}), split over {cfg.workers} worker(s)", flush=True)
    # An explicit scheduling strategy (SPREAD: the shards go to different nodes where they can)
    # also keeps the tasks out of the caller's placement group: inside a Ray Tune trial (ray_fedat.sweep)
    # they would otherwise be captured by the trial's group, which holds no CPU for them.
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0,
                      scheduling_strategy="SPREAD")(attack_shard)
    started = time.time()
    try:
        states_ref, x_ref, y_ref = ray.put(states), ray.put(x), ray.put(y)
        refs = [task.remote(states_ref, cfg.model, data.shape, data.num_classes, x_ref, y_ref, cfg.final_attack,
                            cfg.epsilon, cfg.eval_step_size, cfg.eval_steps,
                            eval_batch_size_for(cfg.eval_batch_size, use_gpu), cfg.seed,
                            rank, cfg.workers, use_gpu, cfg.cpus_per_worker)
                for rank in range(cfg.workers)]
        results = combine_shards(ray.get(refs))
    except Exception as e:  # noqa: BLE001 - the trained models are kept whatever happens here
        return {"attack": ATTACK_NAMES[cfg.final_attack], "error": root_cause(e)}
    if same_model:
        results["best_robust"] = results["final"]
    return {"attack": ATTACK_NAMES[cfg.final_attack], "name": cfg.final_attack, "yardstick": yardstick,
            "images": samples, "test_images": len(data.y_test), "workers": cfg.workers, "samples_chosen": how,
            "images_digest": images_digest(chosen),
            "epsilon": cfg.epsilon,
            "rounds": {"final": final_round, "best_robust": best_round}, "models": results,
            "seconds": time.time() - started, "warning": weak_yardstick_warning(results, cfg.final_attack, yardstick)}


def attempt_final_attack(cfg: RunConfig, run_dir: str, data, final_model: Optional[str], records: List[dict],
                         use_gpu: bool) -> dict:
    """run_final_attack's result, or {"attack", "error"} when it could not attack: it raised, or
    found no model to attack. A final attack that did not run leaves the run without its
    headline number, so the run fails with the reason (run() decides)."""
    from .final_attack import ATTACK_NAMES

    name = ATTACK_NAMES[cfg.final_attack]
    try:
        result = run_final_attack(cfg, run_dir, data, final_model, records, use_gpu)
    except Exception as e:  # noqa: BLE001 - one line in the summary, the models are kept
        return {"attack": name, "error": root_cause(e)}
    if result is None:
        return {"attack": name, "error": "no model to attack (neither final_model.pt nor best_robust.pt was written)"}
    if not result.get("error"):
        result["attack"] = noted_attack_name(result["attack"], cfg.final_attack, data.num_classes)
    return result


def noted_attack_name(name: str, attack: str, num_classes: int) -> str:
    """The final attack's name, saying so when APGD-T ran on the targeted cross-entropy loss
    (final_attack.autoattack: the targeted DLR loss needs at least 4 classes)."""
    if attack in ("apgd", "autoattack") and num_classes < 4:
        return f"{name} (APGD-T CE-targeted, fewer than 4 classes)"
    return name


def final_attack_error(final_attack: dict) -> str:
    """The one-line reason a run failed in its final attack."""
    first_line = (str(final_attack["error"]).strip().splitlines() or [""])[0]
    return f"final attack {final_attack['attack']} failed: {first_line}"


def training_share(cfg: RunConfig) -> float:
    """The share of a --time-budget the rounds may use: the rest is the final attack's."""
    from .final_attack import FINAL_ATTACK_SHARE

    return 1.0 if cfg.final_attack == "none" else 1.0 - FINAL_ATTACK_SHARE


def record_final_attack(run_dir: str, final_attack: dict) -> None:
    """The headline numbers into the last round's line of metrics.jsonl and into TensorBoard
    (tag final_attack/<model>_robust_acc at that round)."""
    from .recorder import METRICS_FILE, atomic_write_text, read_metrics

    records = read_metrics(run_dir)
    if not records:
        return
    last = records[-1]
    last["final_attack"] = {"attack": final_attack["attack"], "images": final_attack["images"],
                            **{f"{name}_{k}": r[k] for name, r in final_attack["models"].items()
                               for k in ("natural_acc", "robust_acc")}}
    atomic_write_text(os.path.join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in records))
    try:
        from tensorboardX import SummaryWriter

        with SummaryWriter(logdir=run_dir) as writer:
            for name, r in final_attack["models"].items():
                writer.add_scalar(f"final_attack/{name}_robust_acc", r["robust_acc"], last["round"])
                writer.add_text("final_attack", f"{final_attack['attack']}, {final_attack['images']} test images, "
                                f"eps {final_attack['epsilon']:.4g}", last["round"])
    except Exception as e:  # noqa: BLE001 - a viewer's file, never worth the results
        print(f"ray_fedat: could not write the final attack to TensorBoard: {e}")


def describe_data(cfg: RunConfig):
    """prepare_data, and the header lines that describe the split: (data, parts, counts, validation images)."""
    from .partition import format_partition_table, label_skew

    data, parts, counts = prepare_data(cfg)
    print(f"ray_fedat: {cfg.dataset} ({len(data.y_train)} train / {len(data.y_test)} test, "
          f"images {'x'.join(map(str, data.shape))}), {cfg.clients} clients, {cfg.partition} partition "
          f"(label skew {label_skew(data.y_train.numpy(), parts, data.num_classes):.2f})")
    print(format_partition_table(counts))
    val_images = 0 if data.y_val is None else len(data.y_val)
    if val_images:
        print(f"ray_fedat: {val_images} training images ({cfg.val_fraction:g}) held out as the validation set: "
              "it chooses the best models, the test set is only reported")
    else:
        print("ray_fedat: --val-fraction 0: no validation set; the best models are chosen on the test set "
              "(their test accuracy is optimistic)")
    return data, parts, counts, val_images


def run(cfg: RunConfig, callbacks: Sequence = ()) -> dict:
    """Run one federated adversarial training job; returns the summary dict.
    `callbacks`: more Ray Train callbacks beside the run's recorder (a sweep adds Tune's).

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
        fail(str(e))
    name = cfg.name or submission_id() or default_name(cfg)  # a submitted job: its run is named like it
    run_dir = cfg.output_dir or default_output_dir(cfg.storage_path, name)
    if cfg.resume:
        print(f"ray_fedat: resuming {run_dir} up to round {cfg.rounds}")
        if cfg.rounds > cfg.schedule_rounds and not cfg.time_budget:
            print(f"ray_fedat: the lr schedule and late attack keep the run's plan of {cfg.schedule_rounds} rounds: "
                  f"rounds after {cfg.schedule_rounds} train with round {cfg.schedule_rounds}'s values")
    elif os.path.exists(run_dir) and os.listdir(run_dir):
        fail(f"run directory {run_dir} already holds a run; choose another --name, or --resume {run_dir}")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", REPORT_POLL_INTERVAL_S)
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        # A private local Ray has no spot nodes to lose: its preemption-watcher actor (a process
        # started with every run) watches nothing.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if cfg.dashboard or cfg.address or os.environ.get("RAY_ADDRESS"):
        # Only a dashboard reads it, and it costs seconds of start-up per run (measured: the
        # first round of a local digits run began 6 s later with it), so a local run
        # without --dashboard leaves it off.
        enable_state_tracking()
    if not cfg.verbose:
        logging.getLogger("ray").setLevel(logging.WARNING)

    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .precision import deterministic_env_vars
    from .recorder import RunRecorder, draw_curves, read_metrics
    from .worker import train_loop_per_worker

    where, owns_ray = connect_ray(cfg, name)
    try:
        use_gpu, strategy, placement = plan_placement(cfg)
        pinned_nodes(cfg)
        data, parts, counts, val_images = describe_data(cfg)
        os.makedirs(run_dir, exist_ok=True)
        storage, selectors, storage_note = plan_storage_and_nodes(cfg, name, use_gpu)
        print(f"ray_fedat: {cfg.method} eps={cfg.epsilon:.4g} step={cfg.step_size:.4g} attack={cfg.attack_steps} "
              f"eval=PGD-{cfg.eval_steps} (CE, then margin) step={cfg.eval_step_size:.4g}, model {cfg.model}, "
              f"{f'time budget {cfg.time_budget:g} s' if cfg.time_budget else f'{cfg.rounds} rounds'}; {where}, {placement}, "
              f"{'GPU/nccl' if use_gpu else 'CPU/gloo'}")
        print(f"ray_fedat: results in {run_dir}; {storage_note}")
        if cfg.time_budget and DATASET_DEFAULTS[cfg.preset or cfg.dataset].unmasked_after_rounds:
            print(f"ray_fedat: the default {cfg.preset or cfg.dataset} recipe was measured free of gradient masking "
                  f"from {DATASET_DEFAULTS[cfg.preset or cfg.dataset].unmasked_after_rounds} rounds on; the rounds "
                  "this budget affords are known after round 1", flush=True)
        elif not cfg.time_budget and recipe_rounds_warning(cfg, cfg.rounds):
            print(f"ray_fedat: {recipe_rounds_warning(cfg, cfg.rounds)}", flush=True)
        for line in watch_lines(name, owns_ray and not (cfg.address or os.environ.get("RAY_ADDRESS"))):
            print(line)
        title = f"{name}: {cfg.method} on {cfg.dataset}, {cfg.clients} clients ({cfg.partition})"
        payload = build_payload(cfg, data, parts, counts, use_gpu)
        payload["storage"] = storage
        if cfg.time_budget:  # the workers plan their rounds to end before this wall-clock time
            payload["deadline"] = launched + training_share(cfg) * cfg.time_budget
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=payload,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu,
                                                   resources_per_worker={"CPU": cfg.cpus_per_worker},
                                                   placement_strategy=strategy, label_selector=selectors),
            run_config=ray.train.RunConfig(
                name=name, storage_path=cfg.storage_path,
                worker_runtime_env={"env_vars": {**worker_env(cfg), **deterministic_env_vars(cfg.deterministic)}},
                failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                callbacks=[RunRecorder(run_dir, title, run_name=name), *callbacks]),
        )
        def summarise(status: str, **outcome) -> dict:
            return write_summary(run_dir, cfg, counts, placement, status, launched=launched, storage=storage_note,
                                 run_name=name, val_images=val_images, **outcome)

        summarise("running")
        started = time.time()
        result, exc, interrupted = fit_with_progress(trainer, run_dir, cfg.rounds, started,
                                                     len(read_metrics(run_dir)), title, cfg)
        status, error = "finished", None
        if interrupted:
            status, error = "interrupted", "interrupted by the user (Ctrl-C)"
        elif exc is not None:  # Ray wraps a worker's error in TrainingFailedError
            status, error = "failed", root_cause(exc)
        records = read_metrics(run_dir)
        if records:  # the recorder redraws at most every few seconds: the final curves come from here
            draw_curves(run_dir, records, title)
        final_model = save_final_model(run_dir, result, records)
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
        summary = summarise(status, wall_s=wall_s, final_model=final_model, error=error, final_attack=final_attack)
    finally:
        if owns_ray:
            ray.shutdown()
    if status == "interrupted":
        fail(f"interrupted after round {summary['rounds_completed']}; what was written is kept in {run_dir} "
             f"(continue with --resume {run_dir})", code=130)
    if error and final_attack and final_attack.get("error"):
        fail(f"{error} (the trained models are kept in {run_dir}; --resume {run_dir} runs the final attack again)",
             code=1)
    if error:
        fail(f"training failed: {error} (what was written is in {run_dir})", code=1)
    print_summary(summary, run_dir)
    return summary


def root_cause(exc: BaseException) -> str:
    """The innermost error's one-line message (Ray nests the worker's exception)."""
    seen = exc
    while True:
        inner = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(inner, dict):  # worker rank -> exception
            inner = next(iter(inner.values()), None)
        if inner is None or inner is seen:
            break
        seen = inner
    worker_errors = getattr(exc, "worker_failures", None) or {}
    if seen is exc and worker_errors:
        seen = next(iter(worker_errors.values()))
    lines = [ln for ln in str(seen).strip().splitlines() if ln.strip()]
    return f"{type(seen).__name__}: {lines[-1] if lines else ''}"


def print_summary(summary: dict, run_dir: str) -> None:
    from .final_attack import yardstick_name
    from .report import check_lines

    final, best = summary["final"], summary["best"]
    print(f"ray_fedat: done, {summary['rounds_completed']} rounds in {summary['wall_s']:.1f} s")
    if summary.get("headline"):
        print(f"  final model: {summary['headline']['text']}")
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
    try:
        cfg = parse_config(argv)
        if cfg.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
            return
        run(cfg)
    except ConfigError as e:
        fail(str(e))
    except KeyboardInterrupt:
        fail("interrupted; everything written so far is kept", code=130)


if __name__ == "__main__":
    main()
