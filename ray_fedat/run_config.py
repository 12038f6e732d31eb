"""The run configuration: one flat, JSON-serialisable `RunConfig` and its validation.

The driver builds it from argv (config.py), validates it before Ray starts (bad input is
a one-line error, never a traceback), and ships it to every worker as a plain dict.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

from .defaults import (AGGREGATORS, ATTACK_STARTS, BYZANTINE_ATTACKS, CLIENT_WEIGHTINGS, COMPILE_MODES, DATA_ON,
                       DATASET_DEFAULTS, DATASETS, DEVICES, FINAL_ATTACK_MODELS, FINAL_ATTACKS, METHODS, PARTITIONS,
                       PRECISIONS, TRACK_ARTIFACTS, TRACKERS)
from .errors import ConfigError
from .schedule import LR_SCHEDULES


@dataclass
class RunConfig:
    # data
    dataset: str = "digits"
    data_file: Optional[str] = None
    data_dir: str = "./data"
    download: bool = False
    data_on: str = "driver"
    preset: Optional[str] = None
    # federation
    clients: Optional[int] = None
    partition: str = "iid"
    beta: float = 0.5
    shards_per_client: int = 2
    min_client_size: int = 10
    client_fraction: float = 1.0
    rounds: int = 10
    # Not a flag: the rounds the lr schedule and the late attack were planned for, the run's
    # first --rounds; an extension (--resume --rounds N) keeps it (schedule.schedule_round).
    schedule_rounds: Optional[int] = None
    local_epochs: int = 1
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    lr_schedule: Optional[str] = None
    time_budget: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 2e-4
    aggregator: str = "fedavg"
    client_weighting: str = "samples"  # "uniform": every client counts the same, as the CalFAT authors average
    trim_ratio: float = 0.1
    server_lr: float = 1.0
    aggregator_f: Optional[int] = None  # None: --byzantine
    sfat_alpha: float = 1 / 6  # (1 + a) / (1 - a) = 1.4, the SFAT code's --pri
    sfat_topk: int = 1
    prox_mu: float = 0.0
    byzantine: int = 0
    byzantine_attack: str = "sign-flip"
    # adversary
    method: str = "calfat"
    epsilon: Optional[float] = None
    step_size: Optional[float] = None
    attack_steps: Optional[int] = None
    eval_steps: Optional[int] = None
    eval_step_size: Optional[float] = None
    attack_start: Optional[str] = None
    eps_warmup_rounds: Optional[int] = None
    late_attack_steps: Optional[int] = None  # None: the same training attack all run long
    late_step_size: Optional[float] = None  # None: --step-size
    late_attack_from: float = 0.5
    trades_beta: float = 6.0
    calfat_tau: float = 0.1
    calfat_scale: float = 10.0  # CalFAT's s, the authors' 10 (see losses.calfat_loss)
    mart_beta: float = 6.0
    val_fraction: float = 0.1
    final_attack: str = "apgd"
    final_attack_models: str = "both"  # "final": skip best_robust.pt (half the attack when they differ)
    final_samples: int = 1000  # final_attack.DEFAULT_FINAL_IMAGES: the same stratified test images for every run
    eval_every: Optional[int] = None  # None: every round, or chosen by the planner under --time-budget
    test_every: int = 5  # the test set every N-th evaluated round (and at the last); validation every one
    eval_samples: Optional[int] = None
    eval_batch_size: Optional[int] = None  # None: eval_batch_size_for(device), 64 on a CPU, 256 on a GPU
    # model
    model: Optional[str] = None
    # cluster and outputs
    workers: int = 2
    cpus_per_worker: int = 1
    device: str = "auto"
    precision: str = "auto"
    compile: str = "auto"
    deterministic: bool = False
    address: Optional[str] = None
    storage_path: str = "./runs"
    output_dir: Optional[str] = None  # None: <storage-path>/<name>, or runs/<name> for a storage URI
    worker_nodes: Optional[str] = None  # comma-separated node IPs, one per worker in rank order
    name: Optional[str] = None
    seed: int = 0
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    max_failures: int = 0
    resume: Optional[str] = None
    config: Optional[str] = None
    print_config: bool = False
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    dry_run: bool = False
    verbose: bool = False
    # experiment tracking (tracking.py; only the driver logs)
    track: str = "none"  # "none", or trackers from TRACKERS, comma-separated: "mlflow", "wandb", "mlflow,wandb"
    track_uri: Optional[str] = None  # MLflow: a tracking URI, or a local directory (None: ./mlruns)
    track_artifacts: str = "all"

    def resolved(self) -> "RunConfig":
        """A copy with every per-dataset default filled in (from --preset when given)."""
        if self.dataset not in DATASET_DEFAULTS:
            raise ConfigError(f"--dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.preset is not None and self.preset not in DATASET_DEFAULTS:
            raise ConfigError(f"--preset {self.preset!r} is not one of {', '.join(DATASETS)}")
        d = DATASET_DEFAULTS[self.preset or self.dataset]
        return dataclasses.replace(
            self,
            clients=self.clients if self.clients is not None else self.workers,
            epsilon=self.epsilon if self.epsilon is not None else d.epsilon,
            step_size=self.step_size if self.step_size is not None else d.step_size,
            attack_steps=self.attack_steps if self.attack_steps is not None else d.attack_steps,
            eval_steps=self.eval_steps if self.eval_steps is not None else d.eval_steps,
            attack_start=self.attack_start if self.attack_start is not None else d.attack_start,
            eval_step_size=self.eval_step_size if self.eval_step_size is not None else d.eval_step_size or d.step_size,
            model=self.model if self.model is not None else d.model,
            lr=self.lr if self.lr is not None else d.lr_for(self.method),
            batch_size=self.batch_size if self.batch_size is not None else d.batch_size,
            lr_schedule=self.lr_schedule if self.lr_schedule is not None else d.lr_schedule,
            eps_warmup_rounds=self.eps_warmup_rounds if self.eps_warmup_rounds is not None else d.eps_warmup_rounds,
            aggregator_f=self.aggregator_f if self.aggregator_f is not None else self.byzantine,
            schedule_rounds=self.schedule_rounds if self.schedule_rounds is not None else self.rounds,
        )

    def validate(self) -> "RunConfig":
        """Raise ConfigError naming the first bad value; return self when all is well."""
        from .models import MODELS  # local import: models pulls in torch

        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        from .storage import credentials_message, has_credentials

        if has_credentials(self.storage_path):  # first: refused before anything could echo or record it
            raise ConfigError(credentials_message(self.storage_path))
        need(self.dataset in DATASETS, f"--dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.dataset == "npz":
            need(bool(self.data_file), "--dataset npz needs --data-file PATH (an .npz with x_train, y_train, x_test, y_test)")
            need(os.path.isfile(self.data_file), f"--data-file {self.data_file}: no such file")
        need(self.data_on in DATA_ON, f"--data-on {self.data_on!r} is not one of {', '.join(DATA_ON)}")
        need(self.partition in PARTITIONS, f"--partition {self.partition!r} is not one of {', '.join(PARTITIONS)}")
        need(self.method in METHODS, f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        need(self.client_weighting in CLIENT_WEIGHTINGS,
             f"--client-weighting {self.client_weighting!r} is not one of {', '.join(CLIENT_WEIGHTINGS)}")
        need(self.aggregator in AGGREGATORS, f"--aggregator {self.aggregator!r} is not one of {', '.join(AGGREGATORS)}")
        need(self.device in DEVICES, f"--device {self.device!r} is not one of {', '.join(DEVICES)}")
        need(self.precision in PRECISIONS, f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        need(self.compile in COMPILE_MODES, f"--compile {self.compile!r} is not one of {', '.join(COMPILE_MODES)}")
        need(self.model in MODELS, f"--model {self.model!r} is not one of {', '.join(sorted(MODELS))}")
        need(self.workers >= 1, f"--workers must be >= 1 (got {self.workers})")
        need(self.cpus_per_worker >= 1, f"--cpus-per-worker must be >= 1 (got {self.cpus_per_worker})")
        need(self.clients >= 1, f"--clients must be >= 1 (got {self.clients})")
        need(self.rounds >= 1, f"--rounds must be >= 1 (got {self.rounds})")
        need(self.schedule_rounds >= 1, f"schedule_rounds must be >= 1 (got {self.schedule_rounds})")
        need(self.local_epochs >= 1, f"--local-epochs must be >= 1 (got {self.local_epochs})")
        need(self.batch_size >= 1, f"--batch-size must be >= 1 (got {self.batch_size})")
        need(self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"--eval-batch-size must be >= 1 (got {self.eval_batch_size})")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0 (got {self.lr})")
        need(0 <= self.momentum < 1, f"--momentum must be in [0, 1) (got {self.momentum})")
        need(self.lr_schedule in LR_SCHEDULES, f"--lr-schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        need(self.eps_warmup_rounds >= 0, f"--eps-warmup-rounds must be >= 0 (got {self.eps_warmup_rounds})")
        need(self.time_budget is None or (math.isfinite(self.time_budget) and self.time_budget > 0),
             f"--time-budget must be a positive number of seconds (got {self.time_budget})")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0 (got {self.weight_decay})")
        need(self.beta > 0, f"--beta must be > 0 (got {self.beta})")
        need(self.shards_per_client >= 1, f"--shards-per-client must be >= 1 (got {self.shards_per_client})")
        need(self.min_client_size >= 1, f"--min-client-size must be >= 1 (got {self.min_client_size})")
        need(0 < self.client_fraction <= 1, f"--client-fraction must be in (0, 1] (got {self.client_fraction})")
        need(0 <= self.trim_ratio < 0.5, f"--trim-ratio must be in [0, 0.5) (got {self.trim_ratio})")
        need(self.server_lr > 0, f"--server-lr must be > 0 (got {self.server_lr})")
        need(0 <= self.byzantine < self.clients,
             f"--byzantine must be in [0, --clients) (got {self.byzantine} with {self.clients} clients)")
        need(self.byzantine_attack in BYZANTINE_ATTACKS,
             f"--byzantine-attack {self.byzantine_attack!r} is not one of {', '.join(BYZANTINE_ATTACKS)}")
        need(self.aggregator_f >= 0, f"--aggregator-f must be >= 0 (got {self.aggregator_f})")
        from .aggregation import check_rule  # Krum needs K > 2f + 2, Bulyan K >= 4f + 3
        per_round = self.clients if self.client_fraction >= 1 else max(1, math.ceil(self.client_fraction * self.clients))
        try:
            check_rule(self.aggregator, per_round, self.aggregator_f)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        need(0 <= self.epsilon <= 1, f"--epsilon must be in [0, 1] in pixel units (got {self.epsilon})")
        need(self.step_size >= 0, f"--step-size must be >= 0 (got {self.step_size})")
        need(self.attack_steps >= 0, f"--attack-steps must be >= 0 (got {self.attack_steps})")
        need(self.eval_steps >= 0, f"--eval-steps must be >= 0 (got {self.eval_steps})")
        need(self.attack_start in ATTACK_STARTS,
             f"--attack-start {self.attack_start!r} is not one of {', '.join(ATTACK_STARTS)}")
        need(self.eval_step_size >= 0, f"--eval-step-size must be >= 0 (got {self.eval_step_size})")
        need(self.trades_beta >= 0, f"--trades-beta must be >= 0 (got {self.trades_beta})")
        need(self.late_attack_steps is None or self.late_attack_steps >= 1,
             f"--late-attack-steps must be >= 1 (got {self.late_attack_steps})")
        need(self.late_step_size is None or self.late_step_size > 0,
             f"--late-step-size must be > 0 (got {self.late_step_size})")
        need(0 <= self.late_attack_from < 1, f"--late-attack-from must be in [0, 1) (got {self.late_attack_from})")
        need(self.mart_beta >= 0, f"--mart-beta must be >= 0 (got {self.mart_beta})")
        need(math.isfinite(self.calfat_scale) and self.calfat_scale > 0,
             f"--calfat-scale must be > 0 (got {self.calfat_scale})")
        need(math.isfinite(self.prox_mu) and self.prox_mu >= 0, f"--prox-mu must be >= 0 (got {self.prox_mu})")
        need(0 <= self.sfat_alpha < 1, f"--sfat-alpha must be in [0, 1) (got {self.sfat_alpha})")
        need(self.sfat_topk >= 0, f"--sfat-topk must be >= 0 (got {self.sfat_topk})")
        need(0 <= self.val_fraction < 1, f"--val-fraction must be in [0, 1) (got {self.val_fraction})")
        need(self.final_attack in FINAL_ATTACKS,
             f"--final-attack {self.final_attack!r} is not one of {', '.join(FINAL_ATTACKS)}")
        need(self.final_attack_models in FINAL_ATTACK_MODELS,
             f"--final-attack-models {self.final_attack_models!r} is not one of {', '.join(FINAL_ATTACK_MODELS)}")
        need(self.final_samples >= 1,
             f"--final-samples must be >= 1 (got {self.final_samples})")
        need(self.eval_every is None or self.eval_every >= 1, f"--eval-every must be >= 1 (got {self.eval_every})")
        need(self.test_every >= 1, f"--test-every must be >= 1 (got {self.test_every})")
        need(self.eval_samples is None or self.eval_samples >= 1, f"--eval-samples must be >= 1 (got {self.eval_samples})")
        need(self.checkpoint_every >= 1, f"--checkpoint-every must be >= 1 (got {self.checkpoint_every})")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1 (got {self.keep_checkpoints})")
        need(self.max_failures >= -1, f"--max-failures must be >= -1 (-1 = retry forever) (got {self.max_failures})")
        if self.name is not None:
            need(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
                 f"--name {self.name!r} must be a plain directory name")
        if self.worker_nodes is not None:
            need(len(self.worker_node_list()) == self.workers,
                 f"--worker-nodes names {len(self.worker_node_list())} node(s) for {self.workers} worker(s); "
                 "give one node IP per worker, in rank order")
        self.validate_tracking()
        from .storage import is_uri

        need(not is_uri(self.output_dir), f"--output-dir {self.output_dir} must be a local directory "
             "(the run's metrics and models are written on the driver's machine)")
        return self

    def trackers(self) -> list:
        """The trackers --track names, in order ([] for none)."""
        names = [t.strip().lower() for t in str(self.track or "none").split(",") if t.strip()]
        return [] if names == ["none"] else names

    def validate_tracking(self) -> None:
        """--track, --track-uri and --track-artifacts: known trackers whose libraries are
        installed, and a URI without credentials (it is recorded in summary.json and logged)."""
        import importlib.util

        from .errors import redact_secrets

        names = self.trackers()
        for name in names:
            if name not in TRACKERS:
                raise ConfigError(f"--track {self.track!r}: {name!r} is not one of none, {', '.join(TRACKERS)} "
                                  "(or both, comma-separated)")
        if len(set(names)) != len(names):
            raise ConfigError(f"--track {self.track!r} names a tracker twice")
        for name in names:
            if importlib.util.find_spec(name) is None:
                raise ConfigError(f"--track {name}: the {name} library is not installed; pip install -e \".[track]\"")
        if self.track_artifacts not in TRACK_ARTIFACTS:
            raise ConfigError(f"--track-artifacts {self.track_artifacts!r} is not one of {', '.join(TRACK_ARTIFACTS)}")
        if self.track_uri is not None:
            if "mlflow" not in names:
                raise ConfigError(f"--track-uri is MLflow's tracking URI: it needs --track mlflow (got --track {self.track})")
            if redact_secrets(self.track_uri) != self.track_uri:
                raise ConfigError(f"--track-uri {redact_secrets(self.track_uri)}: credentials in the tracking URI are "
                                  "refused (it is recorded in summary.json and logged); give them to MLflow in "
                                  "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")

    def worker_node_list(self) -> Optional[list]:
        return None if self.worker_nodes is None else [n.strip() for n in self.worker_nodes.split(",") if n.strip()]

    def with_absolute_paths(self) -> "RunConfig":
        """Every local path made absolute here, on the driver, before the config is shipped:
        Ray Train workers run in their own working directory. Storage URIs stay as given."""
        from .storage import absolute

        track_uri = self.track_uri
        if "mlflow" in self.trackers():  # a local directory (./mlruns when not given) is absolute too
            track_uri = track_uri if track_uri is not None and is_tracking_uri(track_uri) else \
                absolute(track_uri or DEFAULT_MLFLOW_DIR)
        return dataclasses.replace(self, data_dir=absolute(self.data_dir), data_file=absolute(self.data_file),
                                   storage_path=absolute(self.storage_path), output_dir=absolute(self.output_dir),
                                   resume=absolute(self.resume), track_uri=track_uri)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


DEFAULT_MLFLOW_DIR = "mlruns"  # --track mlflow without --track-uri: a local store in ./mlruns (mlflow.db and artifacts)


def is_tracking_uri(uri: str) -> bool:
    """An MLflow tracking URI (http://..., sqlite:///..., databricks, file:...) rather than a
    local directory to keep a store in."""
    return "://" in uri or uri.split(":", 1)[0] in ("databricks", "file", "sqlite", "postgresql", "mysql", "uc")


def recipe_rounds_warning(cfg: "RunConfig", planned_rounds: int) -> Optional[str]:
    """One line when a run of the dataset's default recipe is planned for fewer rounds than
    that recipe needs before its robustness is real (DatasetDefaults.unmasked_after_rounds),
    else None. Only the default recipe's number is known: a changed recipe gets no warning."""
    d = DATASET_DEFAULTS.get(cfg.preset or cfg.dataset)
    if d is None or not d.unmasked_after_rounds or planned_rounds >= d.unmasked_after_rounds:
        return None
    recipe = (cfg.method, cfg.attack_steps, cfg.step_size, cfg.attack_start, cfg.lr, cfg.batch_size, cfg.epsilon)
    if recipe != ("calfat", d.attack_steps, d.step_size, d.attack_start, d.lr, d.batch_size, d.epsilon):
        return None
    return (f"warning: {planned_rounds} rounds are fewer than the {d.unmasked_after_rounds} at which the default "
            f"{cfg.preset or cfg.dataset} recipe was measured free of gradient masking: its robust numbers may be "
            "masked (the final attack far below the yardstick); give it more rounds or time")


def eval_batch_size_for(requested: Optional[int], on_gpu: bool) -> int:
    """The evaluation batch size: what the user asked, else 256 on a GPU (large batches keep
    it busy) and 64 on a CPU. Evaluation hands out whole batches to the workers (batch b to
    rank b mod N, so the numbers do not depend on N), and on a CPU the per-image cost hardly
    depends on the batch size, so small batches share small sets evenly: 800 validation images
    in batches of 256 gave one of 2 workers 512 and the other 288, and 300 images gave 256
    and 44, with the round waiting for the busier one."""
    if requested is not None:
        return requested
    return 256 if on_gpu else 64
