"""What the driver hands every Ray Train worker: one `WorkerPlan`, built whole by
launch.build_worker_plan and read by worker.train_loop_per_worker.

Plain dataclasses of picklable values (the config, numbers, lists, numpy arrays and Ray
object references), so Ray ships them to the workers as they are; no torch or Ray import
here, so the driver and the workers share the definition cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from .run_config import RunConfig


@dataclass(frozen=True)
class StorageCheck:
    """How the workers agree on the storage rank (worker.agree_on_storage_rank): the marker the
    driver wrote (marker_dir None: the storage path is a URI, nothing to check) and its node."""
    uri: bool  # checkpoints go to an object store URI
    marker_dir: Optional[str]
    marker_token: Optional[str]
    driver_node: str
    shared: bool  # every node that may host a worker sees the storage path


@dataclass(frozen=True)
class WorkerPlan:
    """The run as every worker receives it.

    The data comes one of two ways: with --data-on driver, object-store references to each
    client's shard and to the test and validation sets; with --data-on nodes, the partition
    indices and the digest of the driver's copy (each node loads its own and checks it)."""
    cfg: RunConfig
    shape: List[int]
    num_classes: int
    augment: bool
    use_gpu: bool
    class_counts: List[List[int]]  # per client, per class
    storage: StorageCheck
    deadline: Optional[float] = None  # --time-budget: wall-clock time the rounds must end by
    client_refs: Optional[List[Any]] = None  # --data-on driver: ObjectRef of each client's ClientShard
    test_ref: Any = None  # --data-on driver: ObjectRef of (x_test, y_test)
    val_ref: Any = None  # --data-on driver: ObjectRef of (x_val, y_val), (None, None) without a validation set
    partition: Optional[List[Any]] = None  # --data-on nodes: each client's int64 index array
    data_digest: Optional[str] = None  # --data-on nodes: data.data_digest of the driver's copy

    def client_sizes(self) -> List[int]:
        return [sum(c) for c in self.class_counts]
