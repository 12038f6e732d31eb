"""The per-worker loop that Ray Train runs on every worker: one federated round at a time.

    set_up: device, this worker's clients' data, the global model (restored after a restart)
    for each round:
        plan_round: the schedules' lr, epsilon and attack, the participants, what to score
        train_my_clients: each of this worker's clients that take part starts from the
            global model and trains adversarially (no gradient sync)
        aggregate: the client models into the new global model (federation.py: a running
            FedAvg sum all_gathered per worker, or a robust rule sharded by coordinate)
        score_round: the global model (natural + PGD) on validation and/or test, sharded
        report: ray.train.report(metrics, checkpoint from the storage rank)

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
from dataclasses import dataclass
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from .aggregation import flatten_state, server_step, unflatten_state
from .byzantine import STREAM as BYZANTINE_STREAM
from .byzantine import byzantine_clients, corrupt_update, flip_labels, trainable_mask
from .checkpoints import RESTORE_HEADER, pack_restore_state, read_checkpoint, save_checkpoint, unpack_restore_state
from .client import ClientShard, LocalTrainingConfig, train_client
from .handoff import StorageCheck, WorkerPlan
from .round_eval import evaluate_distributed
from .run_config import RunConfig, eval_batch_size_for
from .federation import ClientUpdates, assign_clients, generator_for, sample_clients, world_and_rank
from .models import build_model
from .monitoring import worker_round_line
from .precision import choose_compile, configure_backends, device_name, prepare_model, run_precision
from .schedule import eval_interval, plan_rounds, round_schedule
from .storage import RankStorage, sees_marker, storage_rank


def load_shards(plan: WorkerPlan, my_clients: List[int]):
    """This worker's client shards, the test set and the validation set ((None, None) without
    one), from the object store or from local disk."""
    import ray

    cfg, counts = plan.cfg, plan.class_counts
    if cfg.data_on == "driver":
        shards = {cid: ray.get(plan.client_refs[cid]) for cid in my_clients}
        x_test, y_test = ray.get(plan.test_ref)
        x_val, y_val = ray.get(plan.val_ref)
        return shards, (x_test, y_test), (x_val, y_val)
    from .data import data_digest, hold_out_validation, load_dataset

    data = hold_out_validation(load_dataset(cfg), cfg.val_fraction, cfg.seed)  # this node's own copy, split alike
    if data_digest(data) != plan.data_digest:
        raise RuntimeError(f"node {socket.gethostname()}: its copy of {cfg.dataset} differs from the driver's "
                           "(images or labels); every node needs the same files with --data-on nodes")
    shards = {}
    for cid in my_clients:
        idx = torch.as_tensor(plan.partition[cid])
        shards[cid] = ClientShard(cid, data.x_train[idx], data.y_train[idx], torch.tensor(counts[cid], dtype=torch.float32))
    return shards, (data.x_test, data.y_test), (data.x_val, data.y_val)


def worker_identity(device: torch.device) -> Dict:
    import ray

    ctx = ray.get_runtime_context()
    return {"rank": world_and_rank()[1], "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid(),
            "device": str(device), "device_name": device_name(device)}


def agree_on_storage_rank(storage: StorageCheck, storage_path: str, device: torch.device) -> int:
    """Every rank says whether it sees the driver's storage marker and runs on the driver's
    node (one all_gather); all then pick the same storage rank."""
    import ray

    world, rank = world_and_rank()
    on_driver_node = ray.get_runtime_context().get_node_id() == storage.driver_node
    mine = torch.tensor([float(sees_marker(storage.marker_dir, storage.marker_token)), float(on_driver_node)],
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


@dataclass
class Worker:
    """One worker's run, set up once (set_up): its clients' data, the model, and what changes
    from round to round (the global model, the best rounds so far, the round planner)."""
    plan: WorkerPlan
    cfg: RunConfig
    rank: int
    device: torch.device
    model: torch.nn.Module
    spec: list  # how a flat vector maps back to the model's state dict (aggregation.flatten_state)
    clients_by_rank: List[List[int]]
    shards: Dict[int, ClientShard]  # this worker's clients, on the device
    test_set: Optional[Tuple[torch.Tensor, torch.Tensor]]
    val_set: Optional[Tuple[torch.Tensor, torch.Tensor]]
    byzantine: Set[int]
    trainable: Optional[torch.Tensor]  # what a Byzantine client corrupts
    local_cfg: LocalTrainingConfig
    writer_rank: int  # the rank that writes checkpoints
    identity: dict  # into every report: summary.json's workers
    first_round: int  # 1, or the round this worker group restarted at
    global_vec: torch.Tensor
    best: dict  # kind -> {"value", "round"} of the best round so far, or None
    planner: "RoundPlanner"

    @property
    def my_clients(self) -> List[int]:
        return self.clients_by_rank[self.rank]

    @property
    def chooses(self) -> str:
        """The split the best models are chosen on: validation when there is one."""
        return "val" if self.val_set is not None else "test"


@dataclass
class RoundPlan:
    """What a round does, decided before it starts: its schedules' values, who trains, and
    which splits it scores (a re-plan after training may still make it the last round,
    which is then scored in full: score_round)."""
    round: int
    local_cfg: LocalTrainingConfig  # this round's lr, epsilon and attack
    late: bool  # the late attack has started (it stays)
    participants: Set[int]
    eval_every: int  # the evaluation interval this round was planned with
    score_val: bool
    score_test: bool


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point on every worker: config["plan"] is the driver's WorkerPlan."""
    loop_started_at = time.time()  # start-up breakdown (benchmarks/startup.py): worker group vs data
    w = set_up(config["plan"], loop_started_at)
    round_, late, last_report_s = w.first_round, False, 0.0
    while round_ <= w.planner.total_rounds:
        started_at, t0 = time.time(), time.perf_counter()
        plan = plan_round(w, round_, late)
        late = plan.late
        updates = train_my_clients(w, plan)
        t_train = time.perf_counter()
        ids, weights, losses = aggregate(w, plan, updates)
        t_agg = time.perf_counter()
        scored, val_s, test_s = score_round(w, round_, plan.score_val, plan.score_test)
        scores = {**unscored(w), **scored}
        t_eval = time.perf_counter()
        # Re-plan before reporting, so that a round the new plan makes the last one is still
        # closed with a full evaluation and a checkpoint.
        w.planner.round_finished(round_, t_agg - t0 + last_report_s, val_s, test_s)
        closing = round_ == w.planner.total_rounds
        if closing and not plan.score_test:
            scores.update(score_round(w, round_, w.val_set is not None and not plan.score_val, True)[0])
            t_eval = time.perf_counter()
        record = {
            "round": round_,
            **scores,
            "train_loss": float((losses * weights).sum() / weights.sum()),
            "participants": ids.tolist(),
            "planned_rounds": w.planner.known,
            "eval_every": plan.eval_every,
            "lr": plan.local_cfg.lr,
            "epsilon": plan.local_cfg.epsilon,
            "attack_steps": plan.local_cfg.attack_steps,
            "resumed_from": w.first_round,  # 1, or the round this worker group restarted at
            "round_s": t_eval - t0,
            "started_at": started_at,  # wall clock: the gaps between rounds are the framework's overhead
            "ended_at": started_at + (t_eval - t0),
            "train_s": t_train - t0,
            "aggregate_s": t_agg - t_train,
            "eval_s": t_eval - t_agg,
        }
        last_report_s = report(w, record, closing)  # counted in the next round's pace
        round_ += 1


def set_up(plan: WorkerPlan, loop_started_at: float) -> Worker:
    """Device and precision, this worker's clients' data, the initial (or restored) global
    model, the storage rank and the round planner."""
    import ray.train
    import ray.train.torch

    cfg = plan.cfg
    rank = ray.train.get_context().get_world_rank()
    world = ray.train.get_context().get_world_size()
    torch.set_num_threads(cfg.cpus_per_worker)
    device = ray.train.torch.get_device() if plan.use_gpu else torch.device("cpu")
    # The precision of the training forwards (evaluation stays fp32), one for the whole run: `auto`
    # is bf16 only where every worker has native bf16. The reason goes into summary.json's workers.
    precision, precision_reason = run_precision(cfg.precision, device)
    configure_backends(device, cfg.deterministic)

    clients_by_rank = assign_clients(cfg.clients, world, plan.client_sizes())
    shards, test_set, val_set = load_shards(plan, clients_by_rank[rank])
    byzantine = set(byzantine_clients(cfg.clients, cfg.byzantine, cfg.seed))
    if cfg.byzantine_attack == "label-flip":
        shards = {cid: flip_labels(s, plan.num_classes) if cid in byzantine else s for cid, s in shards.items()}
    # Once, to the device: batches are then indexed and converted there (no per-batch copies).
    shards = {cid: shard.to(device) for cid, shard in shards.items()}
    test_set = on_device(*test_set, cfg.eval_samples, device)
    val_set = on_device(*val_set, cfg.eval_samples, device)
    data_ready_at = time.time()

    torch.manual_seed(cfg.seed)  # same initial global model on every rank
    model = prepare_model(build_model(cfg.model, plan.shape, plan.num_classes), device, precision)
    check_device(model, device, plan.use_gpu)
    compiled, compile_reason = choose_compile(cfg.compile, device)
    if compiled:  # in place: the state_dict keys, parameters and train/eval switches stay the model's
        model.compile()
    writer_rank = agree_on_storage_rank(plan.storage, cfg.storage_path, device)
    first_round, best, planned = restore_state(model, writer_rank, device)
    global_vec, spec = flatten_state(model.state_dict())
    identity = {**worker_identity(device), "writes_checkpoints": rank == writer_rank, "precision": precision,
                "deterministic": torch.are_deterministic_algorithms_enabled(), "precision_reason": precision_reason,
                "compiled": compiled, "compile_reason": compile_reason, "loop_started_at": loop_started_at,
                "data_ready_at": data_ready_at}
    planner = RoundPlanner(cfg, plan.deadline, device)
    planner.restore(planned)
    return Worker(plan=plan, cfg=cfg, rank=rank, device=device, model=model, spec=spec,
                  clients_by_rank=clients_by_rank, shards=shards, test_set=test_set, val_set=val_set,
                  byzantine=byzantine, trainable=trainable_mask(model).to(device) if byzantine else None,
                  local_cfg=local_training_config(cfg, plan.augment, precision), writer_rank=writer_rank,
                  identity=identity, first_round=first_round, global_vec=global_vec.to(device), best=best,
                  planner=planner)


def plan_round(w: Worker, round_: int, late: bool) -> RoundPlan:
    """The round's lr, epsilon and attack from the schedules, its participants, and which
    splits it scores (what_to_score)."""
    cfg, total_rounds = w.cfg, w.planner.total_rounds
    # With --time-budget the schedules follow the current plan; else the run's first --rounds.
    planned = total_rounds if w.planner.deadline is not None else cfg.schedule_rounds
    sched = round_schedule(cfg, round_, planned, late)
    local_cfg = dataclasses.replace(w.local_cfg, lr=sched.lr, epsilon=sched.epsilon, attack_steps=sched.attack_steps,
                                    step_size=sched.step_size)
    score_val, score_test = what_to_score(round_, total_rounds, w.planner.eval_every, cfg.test_every,
                                          w.val_set is not None, w.planner.deadline is not None)
    return RoundPlan(round_, local_cfg, sched.late, set(sample_clients(cfg.clients, cfg.client_fraction, cfg.seed, round_)),
                     w.planner.eval_every, score_val, score_test)


def what_to_score(round_: int, last_round: int, eval_every: int, test_every: int, has_val: bool,
                  budgeted: bool) -> Tuple[bool, bool]:
    """(score the validation set, score the test set) in a round. Validation (it chooses the
    best models) at every evaluated round; the test set, which only reports, every
    test_every of them and at the last round, always scored in full. Round 1 is evaluated
    (it times evaluation for the planner; a budget's plan needs the test's time too), but
    not the first round after a restart: an uninterrupted run would not have evaluated it,
    and its score could pick another best model."""
    if round_ == last_round:
        return has_val, True
    if not (round_ == 1 or round_ % eval_every == 0):
        return False, False
    return has_val, (not has_val or round_ % (eval_every * test_every) == 0 or (round_ == 1 and budgeted))


def train_my_clients(w: Worker, plan: RoundPlan) -> ClientUpdates:
    """Local adversarial training of this worker's clients that take part, each from the
    global model; a Byzantine client's update is corrupted here."""
    cfg = w.cfg
    mine = [c for c in w.my_clients if c in plan.participants]
    updates = ClientUpdates(cfg.aggregator, w.global_vec.numel(), len(mine), w.device)
    for cid in mine:
        w.model.load_state_dict(unflatten_state(w.global_vec, w.spec))
        loss = train_client(w.model, w.shards[cid], plan.local_cfg, generator_for(cfg.seed, plan.round, cid), w.device)
        update = flatten_state(w.model.state_dict())[0]
        if cid in w.byzantine:
            update = corrupt_update(cfg.byzantine_attack, update, w.global_vec,
                                    generator_for(cfg.seed, plan.round, cid, BYZANTINE_STREAM), w.trainable)
        updates.add(cid, update, client_weight(cfg.client_weighting, len(w.shards[cid])), loss)
    return updates


def aggregate(w: Worker, plan: RoundPlan, updates: ClientUpdates):
    """All workers' client models into the new global model (loaded into w.model); returns
    (client ids, their weights, their losses)."""
    cfg = w.cfg
    taking_part = [[c for c in block if c in plan.participants] for block in w.clients_by_rank]
    ids, weights, losses, aggregated = updates.aggregate(taking_part, cfg.trim_ratio, cfg.aggregator_f,
                                                         cfg.sfat_alpha, cfg.sfat_topk)
    w.global_vec = server_step(w.global_vec, aggregated, cfg.server_lr)
    if not torch.isfinite(w.global_vec).all():
        raise FloatingPointError(f"round {plan.round}: the aggregated model has NaN/inf parameters "
                                 "(try a smaller --lr); the last good checkpoint is kept")
    w.model.load_state_dict(unflatten_state(w.global_vec, w.spec))
    return ids, weights, losses


def unscored(w: Worker) -> dict:
    """A round's scores before any split is scored (a round that scores none reports these)."""
    return {"natural_acc": None, "robust_acc": None, "eval_images": 0,
            **({"val_natural_acc": None, "val_robust_acc": None} if w.val_set is not None else {})}


def score_round(w: Worker, round_: int, val: bool, test: bool) -> Tuple[dict, Optional[float], Optional[float]]:
    """(scores, validation seconds, test seconds) of the global model on the splits asked
    for (sharded over the workers; None: not scored). Validation scores are val_*: they
    choose the best models; test scores only report (they choose only without a validation
    set)."""
    cfg = w.cfg
    batch_size = eval_batch_size_for(cfg.eval_batch_size, w.device.type == "cuda")

    def score_set(x, y) -> dict:
        return evaluate_distributed(w.model, x, y, epsilon=cfg.epsilon, step_size=cfg.eval_step_size,
                                    steps=cfg.eval_steps, batch_size=batch_size, seed=cfg.seed,
                                    round_=round_, device=w.device, num_classes=w.plan.num_classes)

    scores, val_s, test_s = {}, None, None
    if val and w.val_set is not None:
        t = time.perf_counter()
        v = score_set(*w.val_set)
        scores.update({"val_natural_acc": v["natural_acc"], "val_robust_acc": v["robust_acc"],
                       "val_images": v["eval_images"]})
        val_s = time.perf_counter() - t
    if test:
        t = time.perf_counter()
        scores.update(score_set(*w.test_set))
        test_s = time.perf_counter() - t
    return scores, val_s, test_s


def report(w: Worker, record: dict, closing: bool) -> float:
    """Mark the round's new best models, print the worker's line, and report the round to Ray
    Train, with a checkpoint from the storage rank when one is due; returns the seconds the
    report took."""
    import ray.train

    cfg, round_ = w.cfg, record["round"]
    record["chosen_on"] = w.chooses
    prefix = "val_" if w.chooses == "val" else ""  # the test set never chooses when there is a validation set
    new_best = {kind: improves(w.best[kind], record[f"{prefix}{kind}_acc"]) for kind in ("natural", "robust")}
    for kind in ("natural", "robust"):
        if new_best[kind]:
            w.best[kind] = {"value": record[f"{prefix}{kind}_acc"], "round": round_}
    record["best_natural"], record["best_robust"] = new_best["natural"], new_best["robust"]

    wants_checkpoint = round_ % cfg.checkpoint_every == 0 or closing or new_best["natural"] or new_best["robust"]
    metrics = {**record, "worker": w.identity}
    # The dashboard's Logs page shows each worker's stdout: one readable line per round.
    print(worker_round_line(w.rank, w.identity["node_ip"], record, w.planner.known), flush=True)
    t_report = time.perf_counter()
    if w.rank == w.writer_rank and wants_checkpoint:
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, w.model, record, w.best, cfg.model, w.plan.shape, w.plan.num_classes,
                            w.planner.plan())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
    return time.perf_counter() - t_report


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
