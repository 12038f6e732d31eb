"""The per-worker loop that Ray Train runs on every worker: one federated round at a time.

    for each round:
        for each of this worker's clients that take part:
            start from the global model, adversarially train locally (no gradient sync)
        aggregate the client models into the new global model (federation.py: a running
            FedAvg sum all_gathered per worker, or a robust rule sharded by coordinate)
        evaluate the global model (natural + PGD), sharded over the workers
        ray.train.report(metrics, checkpoint from the storage rank)

The model is never wrapped in DistributedDataParallel: clients only meet at aggregation.
The storage rank is rank 0 when every node sees the storage path, else the rank on the
driver's node (see storage.py): it alone writes checkpoints, and after a restart it reads
the latest one and broadcasts it to the others.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from .aggregation import flatten_state, server_step, unflatten_state
from .byzantine import STREAM as BYZANTINE_STREAM
from .byzantine import byzantine_clients, corrupt_update, flip_labels, trainable_mask
from .checkpoints import RESTORE_HEADER, pack_restore_state, read_checkpoint, save_checkpoint, unpack_restore_state
from .client import ClientShard, LocalTrainingConfig, train_client
from .run_config import RunConfig, eval_batch_size_for
from .round_eval import evaluate_distributed
from .federation import ClientUpdates, assign_clients, generator_for, sample_clients, world_and_rank
from .models import build_model
from .monitoring import worker_round_line
from .precision import configure_backends, prepare_model, run_precision
from .schedule import epsilon_at, eval_interval, late_phase, lr_at, plan_rounds, schedule_round
from .storage import RankStorage, sees_marker, storage_rank

def load_shards(payload: dict, my_clients: List[int]):
    """This worker's client shards, the test set and the validation set ((None, None) without
    one), from the object store or from local disk."""
    import ray

    cfg = RunConfig.from_dict(payload["cfg"])
    counts = payload["class_counts"]
    if cfg.data_on == "driver":
        shards = {cid: ray.get(payload["client_refs"][cid]) for cid in my_clients}
        x_test, y_test = ray.get(payload["test_ref"])
        x_val, y_val = ray.get(payload["val_ref"])
        return shards, (x_test, y_test), (x_val, y_val)
    from .data import data_digest, hold_out_validation, load_dataset

    data = hold_out_validation(load_dataset(cfg), cfg.val_fraction, cfg.seed)  # this node's own copy, split alike
    if data_digest(data) != payload["data_digest"]:
        raise RuntimeError(f"node {socket.gethostname()}: its copy of {cfg.dataset} differs from the driver's "
                           "(images or labels); every node needs the same files with --data-on nodes")
    shards = {}
    for cid in my_clients:
        idx = torch.as_tensor(payload["partition"][cid])
        shards[cid] = ClientShard(cid, data.x_train[idx], data.y_train[idx], torch.tensor(counts[cid], dtype=torch.float32))
    return shards, (data.x_test, data.y_test), (data.x_val, data.y_val)


def worker_identity(device: torch.device) -> Dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"rank": world_and_rank()[1], "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "device": str(device)}


def agree_on_storage_rank(storage: dict, storage_path: str, device: torch.device) -> int:
    """Every rank says whether it sees the driver's storage marker and runs on the driver's
    node (one all_gather); all then pick the same storage rank."""
    import ray

    world, rank = world_and_rank()
    on_driver_node = ray.get_runtime_context().get_node_id() == storage["driver_node"]
    mine = torch.tensor([float(sees_marker(storage["marker_dir"], storage["marker_token"])), float(on_driver_node)],
                        dtype=torch.float64, device=device)
    everyone = [mine]
    if world > 1:
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
    return storage_rank([RankStorage(r, bool(t[1]), bool(t[0])) for r, t in enumerate(everyone)], storage_path)


def restore_state(model: torch.nn.Module, source_rank: int, device: torch.device) -> tuple:
    """(first round to run, best-so-far metrics, the time-budget planner's evaluation plan or
    None) from Ray Train's latest checkpoint (after a worker failure, or of the run being
    resumed); loads the model state in place.

    Only `source_rank` reads the checkpoint: with a storage path on the driver's disk no
    other machine can. It broadcasts model, round and best-so-far in one collective."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()  # the same on every rank
    if checkpoint is None:
        return 1, {"natural": None, "robust": None}, None
    world, rank = world_and_rank()
    vec, spec = flatten_state(model.state_dict())
    if rank == source_rank:
        with checkpoint.as_directory() as d:
            state_dict, state = read_checkpoint(d)
        model.load_state_dict(state_dict)
        packed = pack_restore_state(flatten_state(model.state_dict())[0], state).to(device)
    else:
        packed = torch.empty(vec.numel() + RESTORE_HEADER, dtype=torch.float64, device=device)
    if world > 1:
        dist.broadcast(packed, src=source_rank)
    vec, state = unpack_restore_state(packed.cpu())
    model.load_state_dict(unflatten_state(vec, spec))
    return state["round"] + 1, state["best"], state.get("plan")


def check_device(model: torch.nn.Module, device: torch.device, use_gpu: bool) -> None:
    """A worker that was given a GPU must really train on it (a CPU-only torch build or a
    hidden device would otherwise train on the CPU, silently and slowly)."""
    if not use_gpu:
        return
    where = next(model.parameters()).device
    if device.type != "cuda" or not torch.cuda.is_available() or where.type != "cuda":
        raise RuntimeError(f"worker on {socket.gethostname()} was given a GPU but trains on {where} "
                           f"(torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}); "
                           "install a CUDA build of torch on that node, or use --device cpu")


def improves(best: Optional[dict], value: Optional[float]) -> bool:
    return value is not None and (best is None or value > best["value"])


def on_device(x: Optional[torch.Tensor], y: Optional[torch.Tensor], limit: Optional[int], device: torch.device):
    """An evaluation set cut to --eval-samples and moved to the device once (None stays None)."""
    if x is None:
        return None
    if limit:
        x, y = x[:limit], y[:limit]
    return x.to(device), y.to(device)


def local_training_config(cfg: RunConfig, augment: bool, precision: str) -> LocalTrainingConfig:
    """What every client's local round gets from the run's flags (lr, epsilon and the attack
    steps are then set per round from the schedules)."""
    return LocalTrainingConfig(cfg.method, cfg.local_epochs, cfg.batch_size, cfg.lr, cfg.momentum,
                               cfg.weight_decay, cfg.epsilon, cfg.step_size, cfg.attack_steps,
                               cfg.trades_beta, cfg.calfat_tau, augment, cfg.attack_start, precision,
                               cfg.mart_beta, cfg.calfat_scale, cfg.prox_mu)


def client_weight(weighting: str, samples: int) -> float:
    """A client's weight in the average: its sample count (FedAvg) or 1 (uniform)."""
    return float(samples) if weighting == "samples" else 1.0


def train_loop_per_worker(payload: dict) -> None:
    import ray.train
    import ray.train.torch

    loop_started_at = time.time()  # start-up breakdown (benchmarks/startup.py): worker group vs data
    cfg = RunConfig.from_dict(payload["cfg"])
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device() if payload["use_gpu"] else torch.device("cpu")
    # The precision of the training forwards (evaluation stays fp32), one for the whole run: `auto`
    # is bf16 only where every worker has native bf16. The reason goes into summary.json's workers.
    precision, precision_reason = run_precision(cfg.precision, device)
    configure_backends(device, cfg.deterministic)

    clients_by_rank = assign_clients(cfg.clients, world, [sum(c) for c in payload["class_counts"]])
    my_clients = clients_by_rank[rank]
    shards, test_set, val_set = load_shards(payload, my_clients)
    byzantine = set(byzantine_clients(cfg.clients, cfg.byzantine, cfg.seed))
    if cfg.byzantine_attack == "label-flip":
        shards = {cid: flip_labels(s, payload["num_classes"]) if cid in byzantine else s for cid, s in shards.items()}
    # Once, to the device: batches are then indexed and converted there (no per-batch copies).
    shards = {cid: shard.to(device) for cid, shard in shards.items()}
    test_set = on_device(*test_set, cfg.eval_samples, device)
    val_set = on_device(*val_set, cfg.eval_samples, device)
    chooses = "val" if val_set is not None else "test"  # the split the best models are chosen on
    data_ready_at = time.time()

    torch.manual_seed(cfg.seed)  # same initial global model on every rank
    model = prepare_model(build_model(cfg.model, payload["shape"], payload["num_classes"]), device, precision)
    check_device(model, device, payload["use_gpu"])
    writer_rank = agree_on_storage_rank(payload["storage"], cfg.storage_path, device)
    first_round, best, plan = restore_state(model, writer_rank, device)
    global_vec, spec = flatten_state(model.state_dict())
    global_vec = global_vec.to(device)
    trainable = trainable_mask(model).to(device) if byzantine else None  # what a Byzantine client corrupts
    local_cfg = local_training_config(cfg, payload["augment"], precision)
    identity = {**worker_identity(device), "writes_checkpoints": rank == writer_rank, "precision": precision,
                "deterministic": torch.are_deterministic_algorithms_enabled(), "precision_reason": precision_reason,
                "loop_started_at": loop_started_at, "data_ready_at": data_ready_at}
    planner = RoundPlanner(cfg, payload.get("deadline"), device)
    planner.restore(plan)

    eval_batch = eval_batch_size_for(cfg.eval_batch_size, device.type == "cuda")

    def score_set(x, y, round_: int) -> dict:
        return evaluate_distributed(model, x, y, epsilon=cfg.epsilon, step_size=cfg.eval_step_size,
                                    steps=cfg.eval_steps, batch_size=eval_batch, seed=cfg.seed,
                                    round_=round_, device=device, num_classes=payload["num_classes"])

    def evaluate_validation(round_: int) -> dict:
        """Validation scores as val_* : they choose the best models, at every evaluated round."""
        val = score_set(*val_set, round_)
        return {"val_natural_acc": val["natural_acc"], "val_robust_acc": val["robust_acc"],
                "val_images": val["eval_images"]}

    def evaluate_test(round_: int) -> dict:
        """Test scores: reported only (they choose only without a validation set)."""
        return score_set(*test_set, round_)

    not_evaluated = {"natural_acc": None, "robust_acc": None, "eval_images": 0,
                     **({"val_natural_acc": None, "val_robust_acc": None} if val_set is not None else {})}

    round_, last_report_s, late = first_round, 0.0, False
    while round_ <= planner.total_rounds:
        started_at = time.time()
        t0 = time.perf_counter()
        total_rounds = planner.total_rounds
        # With --time-budget the schedules follow the current plan; else the run's first --rounds.
        planned = total_rounds if planner.deadline is not None else cfg.schedule_rounds
        at = schedule_round(round_, planned)
        epsilon = epsilon_at(round_, cfg.epsilon, cfg.eps_warmup_rounds)
        # The stronger late attack, once it starts, stays (a re-plan never takes it back).
        late = late or (cfg.late_attack_steps is not None and late_phase(at, planned, cfg.late_attack_from))
        steps, step_size = ((cfg.late_attack_steps, cfg.late_step_size or cfg.step_size) if late
                            else (cfg.attack_steps, cfg.step_size))
        round_cfg = dataclasses.replace(local_cfg, lr=lr_at(at, planned, cfg.lr, cfg.lr_schedule),
                                        epsilon=epsilon, attack_steps=steps,
                                        step_size=step_size * epsilon / max(cfg.epsilon, 1e-12))
        participants = set(sample_clients(cfg.clients, cfg.client_fraction, cfg.seed, round_))
        mine = [c for c in my_clients if c in participants]
        updates = ClientUpdates(cfg.aggregator, global_vec.numel(), len(mine), device)
        for cid in mine:
            model.load_state_dict(unflatten_state(global_vec, spec))
            loss = train_client(model, shards[cid], round_cfg, generator_for(cfg.seed, round_, cid), device)
            update = flatten_state(model.state_dict())[0]
            if cid in byzantine:
                update = corrupt_update(cfg.byzantine_attack, update, global_vec,
                                        generator_for(cfg.seed, round_, cid, BYZANTINE_STREAM), trainable)
            updates.add(cid, update, client_weight(cfg.client_weighting, len(shards[cid])), loss)
        t_train = time.perf_counter()

        taking_part = [[c for c in block if c in participants] for block in clients_by_rank]
        ids, w, client_losses, aggregated = updates.aggregate(taking_part, cfg.trim_ratio, cfg.aggregator_f,
                                                              cfg.sfat_alpha, cfg.sfat_topk)
        global_vec = server_step(global_vec, aggregated, cfg.server_lr)
        if not torch.isfinite(global_vec).all():
            raise FloatingPointError(f"round {round_}: the aggregated model has NaN/inf parameters "
                                     "(try a smaller --lr); the last good checkpoint is kept")
        model.load_state_dict(unflatten_state(global_vec, spec))
        t_agg = time.perf_counter()

        # Validation (it chooses the best models) at every evaluated round; the test set, which
        # only reports, every --test-every of them and at the last round (in full).
        eval_every = planner.eval_every  # the interval this round was planned with
        # Round 1 always (it times evaluation for the planner), but not the first round after a
        # restart: an uninterrupted run would not have evaluated it, and its score could pick
        # another best model.
        evaluated = round_ == total_rounds or round_ == 1 or round_ % eval_every == 0
        with_test = (val_set is None or round_ == total_rounds or round_ % (eval_every * cfg.test_every) == 0
                     or (round_ == 1 and planner.deadline is not None))  # a budget's plan needs the test's time
        scores = dict(not_evaluated)
        val_s = test_s = None
        if evaluated and val_set is not None:
            scores.update(evaluate_validation(round_))
            val_s = time.perf_counter() - t_agg
        if evaluated and with_test:
            t_test = time.perf_counter()
            scores.update(evaluate_test(round_))
            test_s = time.perf_counter() - t_test
        t_eval = time.perf_counter()
        # Re-plan before reporting, so that a round the new plan makes the last one is still
        # closed with a full evaluation and a checkpoint.
        planner.round_finished(round_, t_agg - t0 + last_report_s, val_s, test_s)
        closing = round_ == planner.total_rounds
        if closing and not (evaluated and with_test):
            if val_set is not None and not evaluated:
                scores.update(evaluate_validation(round_))
            scores.update(evaluate_test(round_))
            evaluated = True
            t_eval = time.perf_counter()

        record = {
            "round": round_,
            **scores,
            "train_loss": float((client_losses * w).sum() / w.sum()),
            "participants": ids.tolist(),
            "planned_rounds": planner.known,
            "eval_every": eval_every,
            "lr": round_cfg.lr,
            "epsilon": epsilon,
            "attack_steps": steps,
            "resumed_from": first_round,  # 1, or the round this worker group restarted at
            "round_s": t_eval - t0,
            "started_at": started_at,  # wall clock: the gaps between rounds are the framework's overhead
            "ended_at": started_at + (t_eval - t0),
            "train_s": t_train - t0,
            "aggregate_s": t_agg - t_train,
            "eval_s": t_eval - t_agg,
        }
        record["chosen_on"] = chooses
        prefix = "val_" if chooses == "val" else ""  # the test set never chooses when there is a validation set
        new_best = {kind: improves(best[kind], record[f"{prefix}{kind}_acc"]) for kind in ("natural", "robust")}
        for kind, key in (("natural", f"{prefix}natural_acc"), ("robust", f"{prefix}robust_acc")):
            if new_best[kind]:
                best[kind] = {"value": record[key], "round": round_}
        record["best_natural"], record["best_robust"] = new_best["natural"], new_best["robust"]

        wants_checkpoint = (round_ % cfg.checkpoint_every == 0 or closing
                            or new_best["natural"] or new_best["robust"])
        metrics = {**record, "worker": identity}
        # The dashboard's Logs page shows each worker's stdout: one readable line per round.
        print(worker_round_line(rank, identity["node_ip"], record, planner.known), flush=True)
        t_report = time.perf_counter()
        if rank == writer_rank and wants_checkpoint:
            with tempfile.TemporaryDirectory() as d:
                save_checkpoint(d, model, record, best, cfg.model, payload["shape"], payload["num_classes"],
                                planner.plan())
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)
        last_report_s = time.perf_counter() - t_report  # counted in the next round's pace
        round_ += 1


class RoundPlanner:
    """The number of rounds and how often to evaluate: --rounds and --eval-every, or with
    --time-budget what fits before the deadline.

    After every round the plan is redone from that round's pace (the slowest rank's time)
    and the time left, so a slow first round (warm-up, caches) does not shrink the run for
    good; the lr and eps schedules follow the current plan. Time for one last full
    evaluation is always kept. Without --eval-every, a budgeted run evaluates as often as
    keeps evaluation under EVAL_SHARE of the time: every round costs training time that
    an evaluation does not give back."""

    MAX_ROUNDS = 100_000
    EVAL_SHARE = 0.2

    def __init__(self, cfg: RunConfig, deadline: Optional[float], device: torch.device):
        self.deadline = deadline if cfg.time_budget else None
        self.total_rounds = cfg.rounds if self.deadline is None else self.MAX_ROUNDS
        self.eval_every = cfg.eval_every or 1
        self.auto_eval_every = cfg.eval_every is None and self.deadline is not None
        # Kept free at the end for the final summary, the model copy and Ray's shutdown.
        self.reserve_s = min(10.0, 2.0 + 0.05 * cfg.time_budget) if cfg.time_budget else 0.0
        self.eval_s = 0.0  # the validation pass of an evaluated round (the slowest rank's)
        self.test_s = 0.0  # the test pass
        self.test_every = 1 if cfg.val_fraction == 0 else cfg.test_every
        self.device = device

    def plan(self) -> Optional[dict]:
        """What a restart needs to keep evaluating on the same rounds: the chosen interval and
        the evaluation time it came from (None unless the planner chooses the interval)."""
        return {"eval_every": self.eval_every, "eval_s": self.eval_s} if self.auto_eval_every else None

    def restore(self, plan: Optional[dict]) -> None:
        """Continue with the interval of the checkpointed run rather than evaluating every round
        until an evaluation has been timed again."""
        if plan and self.auto_eval_every:
            self.eval_every, self.eval_s = int(plan["eval_every"]), float(plan["eval_s"])

    @property
    def known(self) -> Optional[int]:
        """The planned number of rounds, or None before the first round has been timed."""
        return None if self.total_rounds >= self.MAX_ROUNDS else self.total_rounds

    def round_finished(self, round_: int, train_s: float, val_s: Optional[float], test_s: Optional[float]) -> None:
        """`train_s`: the round without evaluation (the previous report included); `val_s`,
        `test_s`: its validation and test evaluation, None when it had none (the same on every rank)."""
        if self.deadline is None or round_ >= self.total_rounds:
            return
        # Every rank must reach the same plan: agree on the slowest pace and the least time left.
        times = torch.tensor([train_s, val_s or 0.0, test_s or 0.0, -(self.deadline - time.time())],
                             dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(times, op=dist.ReduceOp.MAX)
        train_s, seconds_left = float(times[0]), -float(times[3])
        if val_s is not None:
            self.eval_s = float(times[1])
        if test_s is not None:
            self.test_s = float(times[2])
        # An evaluated round costs its validation pass, and a test pass every test_every of them.
        per_evaluation = self.eval_s + self.test_s / self.test_every
        if self.auto_eval_every:
            self.eval_every = eval_interval(train_s, per_evaluation, self.EVAL_SHARE)
        pace = train_s + per_evaluation / self.eval_every
        last_evaluation = self.eval_s + self.test_s  # the last round is always scored in full
        self.total_rounds = plan_rounds(round_, seconds_left - last_evaluation, pace, self.reserve_s,
                                        self.MAX_ROUNDS - 1)
