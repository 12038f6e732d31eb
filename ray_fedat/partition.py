"""Splitting a training set over K clients: IID, Dirichlet label skew, label-sorted shards.

Pure numpy functions of (labels, K, seed, ...) -> list of index arrays, one per client.
They are disjoint and together cover the whole training set; the same seed gives the
same split on every machine.
"""
from __future__ import annotations

from typing import List

import numpy as np

from .errors import ConfigError


class PartitionError(ConfigError):
    """The split asked for cannot be made (one-line message with what to change)."""


def iid_partition(num_samples: int, num_clients: int, rng: np.random.Generator) -> List[np.ndarray]:
    if num_samples < num_clients:
        raise PartitionError(f"iid: {num_samples} training samples cannot be split over {num_clients} clients")
    return [np.sort(part) for part in np.array_split(rng.permutation(num_samples), num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, beta: float, rng: np.random.Generator,
                        min_size: int = 10, max_tries: int = 1000) -> List[np.ndarray]:
    """The CalFAT/article scheme: for each class, Dirichlet(beta) proportions over clients
    (clients already holding more than N/K samples get no more), redrawn until every client
    holds at least `min_size` samples. Unlike the article's loop, the redraws are bounded."""
    n = len(labels)
    if num_clients * min_size > n:
        raise PartitionError(f"dirichlet: {num_clients} clients x min size {min_size} exceeds {n} training "
                             f"samples; use fewer clients or a smaller --min-client-size")
    classes = np.unique(labels)
    for _ in range(max_tries):
        buckets: List[list] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_clients, beta))
            p = p * np.array([len(b) < n / num_clients for b in buckets])
            if p.sum() == 0:  # every client is full: spread this class uniformly
                p = np.ones(num_clients)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for bucket, part in zip(buckets, np.split(idx, cuts)):
                bucket.extend(part.tolist())
        if min(len(b) for b in buckets) >= min_size:
            return [np.sort(np.asarray(b, dtype=np.int64)) for b in buckets]
    raise PartitionError(f"dirichlet: no split with every client >= {min_size} samples after {max_tries} draws "
                         f"(beta={beta}, {num_clients} clients, {n} samples); use a larger --beta, "
                         f"fewer --clients or a smaller --min-client-size")


def shards_partition(labels: np.ndarray, num_clients: int, shards_per_client: int,
                     rng: np.random.Generator) -> List[np.ndarray]:
    """Pathological non-IID: label-pure shards, `shards_per_client` to each client, so a
    client sees at most that many labels. Shards are cut inside each class (shard counts
    per class proportional to class size, at least one), so none straddles two labels."""
    classes, class_sizes = np.unique(labels, return_counts=True)
    total_shards = num_clients * shards_per_client
    if total_shards < len(classes):
        raise PartitionError(f"shards: {num_clients} clients x {shards_per_client} shards = {total_shards} shards "
                             f"cannot cover {len(classes)} classes; raise --shards-per-client or --clients")
    if total_shards > len(labels):
        raise PartitionError(f"shards: {total_shards} shards from {len(labels)} samples; use fewer shards or clients")
    # Largest-remainder allocation of shards to classes, one at least for each class.
    share = class_sizes / class_sizes.sum() * (total_shards - len(classes))
    per_class = 1 + np.floor(share).astype(int)
    for i in np.argsort(-(share - np.floor(share)))[: total_shards - per_class.sum()]:
        per_class[i] += 1
    per_class = np.minimum(per_class, class_sizes)
    while per_class.sum() < total_shards:  # tiny classes capped above: give the rest to big ones
        per_class[np.argmax(class_sizes - per_class)] += 1
    shards = []
    for c, k in zip(classes, per_class):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == c)), k))
    order = rng.permutation(len(shards))
    return [np.sort(np.concatenate([shards[j] for j in order[i::num_clients]]))
            for i in range(num_clients)]


def make_partition(labels: np.ndarray, num_clients: int, scheme: str, seed: int, beta: float = 0.5,
                   shards_per_client: int = 2, min_size: int = 10) -> List[np.ndarray]:
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5EED])  # own stream: partition does not shift with other seeds
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, rng)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, beta, rng, min_size=min_size)
    if scheme == "shards":
        return shards_partition(labels, num_clients, shards_per_client, rng)
    raise PartitionError(f"--partition {scheme!r} is not one of iid, dirichlet, shards")


def class_counts(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> np.ndarray:
    """K x C matrix: how many samples of each class each client holds."""
    labels = np.asarray(labels)
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])


def label_skew(labels: np.ndarray, parts: List[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label distribution and the
    global one: 0 for a perfectly IID split, towards 1 for clients holding one label."""
    counts = class_counts(labels, parts, num_classes).astype(float)
    client_dist = counts / counts.sum(axis=1, keepdims=True)
    global_dist = counts.sum(axis=0) / counts.sum()
    return float(0.5 * np.abs(client_dist - global_dist).sum(axis=1).mean())


def format_partition_table(counts: np.ndarray) -> str:
    """A compact table: one row per client, its size and per-class counts."""
    k, c = counts.shape
    width = max(5, len(str(int(counts.max()))) + 1)
    head = "client  size | " + "".join(f"{j:>{width}}" for j in range(c))
    rows = [f"{i:>6} {int(counts[i].sum()):>5} | " + "".join(f"{int(v):>{width}}" for v in counts[i])
            for i in range(k)]
    return "\n".join([head, "-" * len(head), *rows])
