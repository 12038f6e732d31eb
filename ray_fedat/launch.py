"""Getting a run onto Ray, on the driver: the data loaded and split, Ray joined or started,
the workers placed, the storage path checked from every node, and the `WorkerPlan` every
worker receives (handoff.py).

Everything here raises (ConfigError for what the user can fix) and prints only the
header lines that describe the data; the CLI (train.py) and the sweep call it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import List, Optional

import numpy as np

from .errors import ConfigError, RunFailed
from .handoff import StorageCheck, WorkerPlan
from .monitoring import job_config
from .run_config import RunConfig

# Ray Train's report() waits for the controller's next poll of the workers, which happens
# every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): seconds of dead time per round.
# Polling a handful of workers is cheap, so poll faster unless the user chose a value.
REPORT_POLL_INTERVAL_S = "0.2"
RAY_TOKEN_SETUP_LOGGER = "ray._private.authentication.authentication_token_setup"

# Where the object store is, never how to get in: a runtime_env is shown on the dashboard
# (job and actor details) to anyone holding the cluster token. Credentials reach the workers
# from their node's own environment or ~/.aws: a local Ray inherits the driver's, and on a
# cluster `ray start` inherits them (cluster/cluster.env: STORAGE_ENV_FILE).
STORAGE_LOCATION_VARS = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL")


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


def default_name(cfg: RunConfig) -> str:
    return f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"


def joins_cluster(cfg: RunConfig) -> bool:
    """Whether the run joins a running cluster (--address or $RAY_ADDRESS) rather than a private local Ray."""
    return bool(cfg.address or os.environ.get("RAY_ADDRESS"))


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
            raise ConfigError(problem)
        try:
            info = ray.init(address=address, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"cannot join the Ray cluster at {address} ({str(e).splitlines()[0]}); start one with "
                              "`ray start --head` on the head node, or omit --address/RAY_ADDRESS to run on a "
                              "local Ray") from None
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
    except Exception as e:  # Ray raises a bare Exception when its raylet or GCS does not come up
        if "timed out during startup" not in str(e):
            raise
        # Seen on a 2-core machine busy with other runs: the raylet waits 20 s for its agents'
        # ports and gives up. Nothing has started, so nothing is lost: say so in one line.
        raise RunFailed(f"the local Ray node did not start in time ({str(e).splitlines()[0]}); the machine may "
                        "be too busy: nothing has started, run the same command again") from None
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
        raise ConfigError(f"--device cuda needs {cfg.workers} GPUs in the cluster (one per worker), found {gpus}")
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
    live node has is a ConfigError."""
    import ray

    if cfg.worker_nodes is None:
        return None
    by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    unknown = [ip for ip in cfg.worker_node_list() if ip not in by_ip]
    if unknown:
        raise ConfigError(f"--worker-nodes: no live Ray node has IP {', '.join(unknown)} "
                          f"(nodes: {', '.join(sorted(by_ip))})")
    return [by_ip[ip] for ip in cfg.worker_node_list()]


def plan_storage_and_nodes(cfg: RunConfig, name: str, use_gpu: bool, pinned: Optional[List[str]]):
    """Check who sees the storage path, pin workers to nodes where needed. `pinned`: the
    node ids of --worker-nodes (pinned_nodes), or None.
    Returns (StorageCheck for the workers, per-worker label selectors or None, a sentence for the log)."""
    import ray

    from .storage import StorageError, local_run_storage, plan_storage, probe_nodes, write_marker

    driver_node = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n.get("Alive")]
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
        raise ConfigError(str(e)) from None
    if plan.pin_driver_node:  # one worker on this node, whatever order Ray creates them in
        pinned = [driver_node] + [None] * (cfg.workers - 1)
    selectors = None if pinned is None else [{} if n is None else {"ray.io/node-id": n} for n in pinned]
    storage = StorageCheck(uri=marker_dir is None, marker_dir=marker_dir, marker_token=token,
                           driver_node=driver_node, shared=plan.shared)
    return storage, selectors, plan.note


def worker_env(cfg: RunConfig) -> dict:
    """Environment variables the workers get from the driver: where the object store is,
    when checkpoints go to a URI. No secret (keys, session tokens) ever goes here."""
    from .storage import is_uri

    if not is_uri(cfg.storage_path):
        return {}
    return {k: os.environ[k] for k in STORAGE_LOCATION_VARS if os.environ.get(k)}


def training_share(cfg: RunConfig) -> float:
    """The share of a --time-budget the rounds may use: the rest is the final attack's."""
    from .final_attack import FINAL_ATTACK_SHARE

    return 1.0 if cfg.final_attack == "none" else 1.0 - FINAL_ATTACK_SHARE


def build_worker_plan(cfg: RunConfig, data, parts, counts, use_gpu: bool, storage: StorageCheck,
                      deadline: Optional[float] = None) -> WorkerPlan:
    """What every worker receives: the config, the class counts, the storage check, the
    --time-budget deadline, and either object-store references to the clients' shards
    (--data-on driver) or the partition indices (--data-on nodes)."""
    import ray
    import torch

    from .client import ClientShard
    from .data import data_digest

    common = dict(cfg=cfg, shape=list(data.shape), num_classes=data.num_classes, augment=data.augment,
                  use_gpu=use_gpu, class_counts=counts.tolist(), storage=storage, deadline=deadline)
    if cfg.data_on == "driver":
        client_refs = [
            ray.put(ClientShard(cid, data.x_train[idx], data.y_train[idx], torch.tensor(counts[cid], dtype=torch.float32)))
            for cid, idx in enumerate(map(torch.as_tensor, parts))]
        return WorkerPlan(**common, client_refs=client_refs, test_ref=ray.put((data.x_test, data.y_test)),
                          val_ref=ray.put((data.x_val, data.y_val)))
    return WorkerPlan(**common, partition=[p.astype(np.int64) for p in parts], data_digest=data_digest(data))


# Ray Train's default callbacks that start an actor (a Python process importing Ray Train, on
# this project's 2-core machine about 1.5 s of CPU each, beside the workers' own start-up) that
# a run here does not use:
# - DatasetsCallback starts a DatasetManager for Ray Datasets; the workers fetch their clients'
#   shards themselves and the trainer gets no datasets.
# - PlacementGroupCleanerCallback starts a detached cleaner that removes the placement group
#   if the controller dies ungracefully. A local Ray's placement groups go with it (the CLI's
#   own Ray) or with the process that started it; a cluster keeps the cleaner.
UNUSED_WITHOUT_DATASETS = "DatasetsCallback"
UNUSED_ON_LOCAL_RAY = "PlacementGroupCleanerCallback"


def unused_callbacks(has_datasets: bool, local_ray: bool) -> set:
    """The names of Ray Train's default callbacks a run can do without (see above)."""
    return ({UNUSED_WITHOUT_DATASETS} if not has_datasets else set()) | ({UNUSED_ON_LOCAL_RAY} if local_ray else set())


def local_scaling_policy(scaling_config):
    """Ray Train's fixed scaling policy without its autoscaler requests. Its controller asks an
    AutoscalingCoordinator actor (a detached process importing Ray Data) for the workers'
    resources when it starts, and waits up to 5 s for the answer: on a fresh local Ray that
    actor is still starting, so every CLI run waited the full 5 s (the controller's log:
    "Failed to send resource request"). A local Ray has no autoscaler to tell; a cluster,
    which may have one, keeps Ray Train's policy."""
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context):
            pass  # no coordinator client: its cancel at shutdown is a no-op then

        def _maybe_send_resource_request(self):
            pass

    return LocalFixedScalingPolicy(scaling_config=scaling_config)


def lean_trainer(local_ray: bool, **kwargs):
    """A TorchTrainer that starts none of the actors `unused_callbacks` names and, on a local
    Ray, sends no autoscaler request (`local_scaling_policy`). Ray Train builds both in private
    methods; where those are missing (another Ray version), the plain TorchTrainer runs, with
    its actors."""
    from ray.train.torch import TorchTrainer

    class FederatedTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            unused = unused_callbacks(bool(self.datasets), local_ray)
            return [cb for cb in callbacks if type(cb).__name__ not in unused]

        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if local_ray and not self.scaling_config.elasticity_enabled:
                controller_init_kwargs["scaling_policy"] = local_scaling_policy(self.scaling_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    if not all(hasattr(TorchTrainer, m) for m in ("_create_default_callbacks", "_initialize_and_run_controller")):
        return TorchTrainer(**kwargs)
    return FederatedTrainer(**kwargs)
