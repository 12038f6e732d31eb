"""Where a run's files live, and who may write them on a cluster that shares no disk.

Two places:
- the *output directory* (metrics.jsonl, summary.json, best_*.pt, final_model.pt,
  curves, TensorBoard): always a local directory on the driver's machine, written by the
  Ray Train callback that runs there;
- the *storage path*: where Ray Train persists checkpoints (worker failures, --resume).
  A local path, a path mounted at the same place on every node (NFS), or a pyarrow
  filesystem URI (s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http, gs://...).

In Ray Train v2 the rank that reports a checkpoint copies it to the storage path itself.
A local storage path on a multi-node cluster exists only on the driver's disk, so only a
rank on the driver's node may report checkpoints there, and only that rank can read them
back: it restores and broadcasts the state to the others (see worker.restore_state).
The driver finds out whether a local path is shared by writing a marker file that every
node then looks for.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .errors import redact_secrets

MARKER_FILE = ".ray_fedat_storage_marker"


class StorageError(ValueError):
    """A storage set-up that cannot work on this cluster (the CLI prints one line, with any
    credential in a URI it quotes redacted)."""

    def __init__(self, *args):
        super().__init__(*(redact_secrets(a) if isinstance(a, str) else a for a in args))


def is_uri(path: Optional[str]) -> bool:
    """A store every node reaches by URI: s3://..., gs://..., hdfs://... (anything pyarrow
    opens by scheme). Not file://: that is a path on each node's own disk, shared or not,
    so it gets the same shared-disk check as a plain path."""
    return bool(path) and "://" in path.split("?", 1)[0] and not is_file_uri(path)


def is_file_uri(path: Optional[str]) -> bool:
    return bool(path) and path.lower().startswith("file://")


def has_credentials(path: Optional[str]) -> bool:
    """Does a storage URI carry credentials (s3://KEY:SECRET@bucket, which pyarrow accepts, or a
    secret-like query parameter)? The storage path is copied into summary.json, the console and
    Ray Train's state export, so such a URI is refused, never used (see credentials_message)."""
    return is_uri(path) and redact_secrets(path) != path


def credentials_message(path: str) -> str:
    """The one-line refusal of a storage URI with credentials; it never repeats them."""
    return (f"--storage-path {redact_secrets(path.split('?', 1)[0])}: credentials in a storage URI are refused "
            "(the URI is recorded in summary.json, the console and Ray's state); give every node "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in its environment or ~/.aws/credentials, and drop the "
            "user:secret@ part (an '@' in the path itself: write it as %40)")


STORE_PROBE_TIMEOUT_S = 3.0


def check_store_answers(storage_path: str, timeout_s: float = STORE_PROBE_TIMEOUT_S) -> None:
    """Raise StorageError, in one line, when an s3:// storage path's endpoint does not answer
    (or refuses us), before Ray or any worker starts and before anything is written: one
    request for the bucket, with a short timeout and no retries. Other schemes are left to
    Ray Train."""
    if has_credentials(storage_path):  # RunConfig.validate refuses it first; a RunConfig built in code too
        raise StorageError(credentials_message(storage_path))
    if not is_uri(storage_path) or not storage_path.lower().startswith("s3://"):
        return
    from urllib.parse import parse_qs, urlparse

    import pyarrow.fs

    url = urlparse(storage_path)
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    endpoint = query.get("endpoint_override")
    where = endpoint or "AWS S3"
    options = {k: query[k] for k in ("endpoint_override", "scheme", "region") if k in query}
    try:
        fs = pyarrow.fs.S3FileSystem(**options, connect_timeout=timeout_s, request_timeout=timeout_s,
                                     retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=1))
        fs.get_file_info(url.netloc)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())
        reason = reason.split("Details: ", 1)[-1] if "Details: " in reason else reason
        raise StorageError(f"--storage-path {storage_path.split('?', 1)[0]}: the object store at {where} did not "
                           f"answer or let us in ({reason[:200]}); is it running, and are its address and "
                           "credentials right?") from None


def absolute(path: Optional[str]) -> Optional[str]:
    """A local path made absolute on the driver (Ray Train v2 runs workers in their own
    working directory, so a relative path would resolve elsewhere there); a file:// URI
    becomes its plain path; other URIs unchanged."""
    if path is None or is_uri(path):
        return path
    if is_file_uri(path):
        from urllib.parse import unquote, urlparse

        path = unquote(urlparse(path).path)
    return os.path.abspath(os.path.expanduser(path))


def default_output_dir(storage_path: str, name: str) -> str:
    """Local storage: the run's files sit beside Ray's checkpoints in <storage>/<name>.
    A storage URI: runs/<name> in the current directory."""
    if is_uri(storage_path):
        return os.path.abspath(os.path.join("runs", name))
    return os.path.join(absolute(storage_path), name)


def local_run_storage(storage_path: str, name: str) -> Optional[str]:
    """The local directory Ray Train checkpoints into, None for a URI."""
    return None if is_uri(storage_path) else os.path.join(absolute(storage_path), name)


def write_marker(directory: str) -> str:
    """Write a fresh random marker into `directory`; returns the token it holds."""
    token = secrets.token_hex(16)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MARKER_FILE)
    with open(path + ".tmp", "w") as f:
        f.write(token)
    os.replace(path + ".tmp", path)
    return token


def sees_marker(directory: Optional[str], token: Optional[str]) -> bool:
    """Does this machine see the driver's marker (the same file, not a stale copy)?"""
    if directory is None:  # a URI: every node reaches the same store
        return True
    try:
        with open(os.path.join(directory, MARKER_FILE)) as f:
            return f.read().strip() == token
    except OSError:
        return False


@dataclass(frozen=True)
class RankStorage:
    """What one rank found at start-up."""
    rank: int
    on_driver_node: bool
    sees_storage: bool


def storage_rank(ranks: Sequence[RankStorage], storage_path: str) -> int:
    """The rank that reports checkpoints and restores from them: rank 0 when every rank
    sees the storage (a URI or a shared mount), else the lowest rank on the driver's node
    (the only machine whose disk holds a local storage path)."""
    ordered = sorted(ranks, key=lambda r: r.rank)
    if all(r.sees_storage for r in ordered):
        return ordered[0].rank
    for r in ordered:
        if r.on_driver_node and r.sees_storage:
            return r.rank
    raise StorageError(no_shared_storage_message(storage_path))


def no_shared_storage_message(storage_path: str, why: str = "no worker runs on the driver's node") -> str:
    return (f"--storage-path {storage_path} is on the driver's disk only and {why}, so no worker can write "
            f"checkpoints there; use a path mounted at the same place on every node (e.g. NFS) or a storage "
            f"URI (e.g. s3://bucket/runs)")


@dataclass(frozen=True)
class StoragePlan:
    """The driver's decision before training starts."""
    shared: bool  # every node sees the storage (URI, shared mount, or a single node)
    pin_driver_node: bool  # one worker must run on the driver's node
    note: str  # one sentence for the console


def plan_storage(storage_path: str, node_sees: Dict[str, bool], driver_node: str, driver_can_host: bool,
                 pinned_nodes: Optional[List[str]] = None) -> StoragePlan:
    """Decide from which nodes see the marker (node id -> bool) whether the storage is
    shared; if it is not, a worker must run on the driver's node: refuse when none can
    (say a CPU-only head with GPU workers), or when --worker-nodes leaves it out."""
    if is_uri(storage_path):
        return StoragePlan(True, False, f"checkpoints go to {redact_secrets(storage_path.split('?', 1)[0])}")
    if all(node_sees.values()):
        return StoragePlan(True, False, f"checkpoints go to {storage_path}"
                           + (" (seen by every node)" if len(node_sees) > 1 else ""))
    blind = sum(not seen for seen in node_sees.values())
    if pinned_nodes is not None and driver_node not in pinned_nodes:
        raise StorageError(no_shared_storage_message(storage_path, "--worker-nodes places no worker on the driver's node"))
    if not driver_can_host:
        raise StorageError(no_shared_storage_message(storage_path, "the driver's node cannot host a worker "
                                                                   "(it lacks the GPU or CPUs a worker needs)"))
    return StoragePlan(False, pinned_nodes is None,
                       f"checkpoints go to {storage_path} on this node only ({blind} node(s) do not see it): "
                       "the worker on this node writes them and restores the others")


def probe_nodes(directory: Optional[str], token: Optional[str], node_ids: Sequence[str],
                timeout_s: float = 120.0) -> Dict[str, bool]:
    """Ask each node (a zero-CPU task pinned to it) whether it sees the driver's marker."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if directory is None or len(node_ids) <= 1:
        return {n: True for n in node_ids}
    check = ray.remote(num_cpus=0, max_retries=0)(sees_marker)
    refs = {n: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(directory, token)
            for n in node_ids}
    try:
        return dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    except ray.exceptions.GetTimeoutError:
        raise StorageError(f"could not check --storage-path on every node within {timeout_s:.0f} s "
                           "(is a node unresponsive?)") from None
