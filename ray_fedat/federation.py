"""Who trains what, with which randomness, and how the workers combine their clients.

Clients are spread over workers so that every worker holds about as many samples (the
largest client first, onto the least-loaded worker); each round a seeded subset of
clients takes part (the same subset on every worker); every random draw of a client in a
round comes from a generator seeded by (seed, round, client), so results do not depend on
how many workers host the clients.

Aggregation never holds all K client models on one worker:
- FedAvg: each worker adds its clients into one running weighted sum; an all_gather of
  the W per-worker (sum, weight) pairs, summed in rank order on every rank, gives the
  average. Memory does not grow with K.
- SFAT: each worker keeps its own clients' vectors; once every client's loss is known
  (the metadata all_gather), each worker sums its clients with SFAT's weights and the
  W partial sums are all_gathered as for FedAvg.
- Robust rules (median, trimmed mean, Krum, Multi-Krum, Bulyan): each worker keeps its
  own clients' vectors (K/W x P); an all_to_all hands every rank all K clients' values
  for 1/W of the coordinates, which it aggregates, and an all_gather assembles the
  result. The exchange runs over blocks of coordinates, so what is received at once is
  about one model's size, not K x P / W. Krum's K x K distances are sums of per-slice
  partial sums (an all_reduce).
Every rule sees the clients in client-id order, whatever the placement.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from .aggregation import (KRUM_RULES, WeightedSum, sfat_weights, bulyan_coordinates, bulyan_select, check_rule, coordinate_median,
                          krum_select, multi_krum_size, pairwise_sq_distances, trimmed_mean)


def assign_clients(num_clients: int, num_workers: int, sizes: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Client ids hosted by each worker rank (each list ascending), balancing the number of
    samples per worker: largest client first onto the least-loaded worker (ties: the
    smaller client id, the lower worker). Without `sizes` every client counts the same.
    The groups are then numbered by their smallest client id, so rank 0 holds client 0
    and one client per worker puts client r on rank r."""
    sizes = [1] * num_clients if sizes is None else [int(s) for s in sizes]
    if len(sizes) != num_clients:
        raise ValueError(f"{len(sizes)} client sizes for {num_clients} clients")
    groups: List[List[int]] = [[] for _ in range(num_workers)]
    loads = [0] * num_workers
    for cid in sorted(range(num_clients), key=lambda c: (-sizes[c], c)):
        worker = min(range(num_workers), key=lambda w: (loads[w], w))
        groups[worker].append(cid)
        loads[worker] += sizes[cid]
    groups = [sorted(g) for g in groups]
    return sorted(groups, key=lambda g: (not g, g[0] if g else 0))


def derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def generator_for(*parts: int) -> torch.Generator:
    """A CPU generator seeded by e.g. (seed, round, client)."""
    return torch.Generator().manual_seed(derive_seed(*parts))


def sample_clients(num_clients: int, fraction: float, seed: int, round_: int) -> List[int]:
    """The ceil(fraction * K) clients that take part in this round, sorted."""
    if fraction >= 1.0:
        return list(range(num_clients))
    m = max(1, math.ceil(fraction * num_clients))
    rng = np.random.default_rng(derive_seed(seed, round_, 0xC11E))
    return sorted(rng.choice(num_clients, size=m, replace=False).tolist())


def world_and_rank() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_client_meta(client_ids: Sequence[int], weights: Sequence[float], losses: Sequence[float],
                       max_per_worker: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, weights, losses) of every participating client, sorted by id: three numbers per
    client (padded to `max_per_worker` rows per worker, id -1 for padding), all_gathered."""
    meta = torch.full((max(max_per_worker, 1), 3), -1.0, dtype=torch.float64, device=device)
    for i, row in enumerate(zip(client_ids, weights, losses)):
        meta[i] = torch.tensor([float(v) for v in row], dtype=torch.float64)
    world, _ = world_and_rank()
    if world > 1:
        everyone = torch.empty((world * meta.shape[0], 3), dtype=meta.dtype, device=device)
        dist.all_gather(list(everyone.chunk(world)), meta)
        meta = everyone
    meta = meta[meta[:, 0] >= 0]
    meta = meta[torch.argsort(meta[:, 0])]
    return meta[:, 0].long(), meta[:, 1], meta[:, 2]


def all_gather_weighted_sums(partial: WeightedSum) -> WeightedSum:
    """Every worker's (weighted sum, weight), added in rank order on every rank: W x P
    received, whatever the number of clients. The float64 sums make the result (to
    float32) the same for any grouping of the clients over workers."""
    world, _ = world_and_rank()
    if world == 1:
        return partial
    gathered = torch.empty((world, partial.values.numel()), dtype=partial.values.dtype, device=partial.values.device)
    dist.all_gather(list(gathered.unbind(0)), partial.values)
    total = WeightedSum.from_values(gathered[0])
    for r in range(1, world):
        total.values.add_(gathered[r])
    return total


def coordinate_blocks(dim: int, num_clients: int, world: int, budget: int) -> List[Tuple[int, int]]:
    """[lo, hi) coordinate blocks for the sharded exchange: each rank receives
    num_clients x (hi - lo) / world values per block, about `budget` values."""
    per_rank = max(1, budget // max(num_clients, 1))
    step = per_rank * world
    return [(lo, min(lo + step, dim)) for lo in range(0, dim, step)]


def rank_bounds(lo: int, hi: int, world: int) -> List[Tuple[int, int]]:
    """Each rank's contiguous share of [lo, hi): equal widths, the last ones shorter or empty."""
    width = -(-(hi - lo) // world)
    return [(min(lo + r * width, hi), min(lo + (r + 1) * width, hi)) for r in range(world)]


def exchange_block(own_rows: torch.Tensor, counts: Sequence[int], lo: int, hi: int) -> torch.Tensor:
    """all_to_all: this rank's clients' values of [lo, hi) go out in W slices, one per
    rank; back comes K x (this rank's slice) for every client, rows in rank order.
    gloo in torch 2.14 has all_to_all_single (checked), as NCCL has."""
    world, rank = world_and_rank()
    if world == 1:
        return own_rows[:, lo:hi]
    bounds = rank_bounds(lo, hi, world)
    mine = own_rows.shape[0]
    send = torch.empty(mine * (hi - lo), dtype=own_rows.dtype, device=own_rows.device)
    offset = 0
    for a, b in bounds:  # destination-major: rank d's slice of every own client, contiguous
        send[offset: offset + mine * (b - a)].view(mine, b - a).copy_(own_rows[:, a:b])
        offset += mine * (b - a)
    width = bounds[rank][1] - bounds[rank][0]
    received = torch.empty(sum(counts) * width, dtype=own_rows.dtype, device=own_rows.device)
    dist.all_to_all_single(received, send, output_split_sizes=[c * width for c in counts],
                           input_split_sizes=[mine * (b - a) for a, b in bounds])
    return received.view(sum(counts), width)


def assemble_block(out: torch.Tensor, piece: torch.Tensor, lo: int, hi: int) -> None:
    """all_gather every rank's aggregated slice of [lo, hi) into out[lo:hi]."""
    world, _ = world_and_rank()
    if world == 1:
        out[lo:hi] = piece
        return
    width = -(-(hi - lo) // world)
    padded = torch.zeros(width, dtype=out.dtype, device=out.device)
    padded[: piece.numel()] = piece
    gathered = torch.empty(world * width, dtype=out.dtype, device=out.device)
    dist.all_gather(list(gathered.chunk(world)), padded)
    out[lo:hi] = gathered[: hi - lo]


def coordinate_rule(rule: str, rows: torch.Tensor, trim_ratio: float, f: int) -> torch.Tensor:
    """The per-coordinate part of a robust rule, on all clients' values of a few coordinates."""
    if rule == "median":
        return coordinate_median(rows)
    if rule == "trimmed-mean":
        return trimmed_mean(rows, trim_ratio)
    if rule in ("krum", "multi-krum"):  # rows: the chosen clients only
        return rows.mean(dim=0)
    if rule == "bulyan":
        return bulyan_coordinates(rows, f)
    raise ValueError(f"unknown robust aggregator {rule!r}")


def sharded_aggregate(rule: str, own_rows: torch.Tensor, ids_by_rank: Sequence[Sequence[int]],
                      trim_ratio: float = 0.1, f: int = 0, budget: Optional[int] = None) -> torch.Tensor:
    """A robust rule over all participating clients, each rank holding only its own
    clients' rows (in the order of ids_by_rank[rank]); every rank returns the same vector,
    equal to aggregation.aggregate(rule, all rows in client-id order). `budget`: values
    received per block (default: one model's size)."""
    world, rank = world_and_rank()
    counts = [len(ids) for ids in ids_by_rank]
    if own_rows.shape[0] != counts[rank]:
        raise ValueError(f"rank {rank} holds {own_rows.shape[0]} client rows, ids_by_rank says {counts[rank]}")
    ids = torch.tensor([c for block in ids_by_rank for c in block])
    by_id = torch.argsort(ids).to(own_rows.device)  # rows arrive in rank order; rules see client-id order
    in_order = bool(torch.equal(by_id.cpu(), torch.arange(len(ids))))
    k, dim = len(ids), own_rows.shape[1]
    blocks = coordinate_blocks(dim, k, world, budget or dim)

    def clients_of(lo: int, hi: int) -> torch.Tensor:
        block = exchange_block(own_rows, counts, lo, hi)
        return block if in_order else block[by_id]

    chosen = None
    if rule in KRUM_RULES:
        check_rule(rule, k, f)
        dist2 = torch.zeros(k, k, dtype=torch.float64, device=own_rows.device)
        for lo, hi in blocks:
            dist2 += pairwise_sq_distances(clients_of(lo, hi))
        if world > 1:
            dist.all_reduce(dist2)
        if rule == "bulyan":
            chosen = bulyan_select(dist2, f)
        else:
            chosen = krum_select(dist2, f, 1 if rule == "krum" else multi_krum_size(k, f))
        chosen = chosen.to(own_rows.device)
        if world > 1:  # one choice for all, even should a reduction differ in the last bit between ranks
            dist.broadcast(chosen, src=0)
    out = torch.empty(dim, dtype=own_rows.dtype, device=own_rows.device)
    for lo, hi in blocks:
        rows = clients_of(lo, hi)
        assemble_block(out, coordinate_rule(rule, rows if chosen is None else rows[chosen], trim_ratio, f), lo, hi)
    return out


class ClientUpdates:
    """This worker's client models of one round, kept as the rule needs them: FedAvg adds
    each into a running weighted sum (memory independent of K); the robust rules keep one
    row per own client (K/W x P) for the sharded exchange. Ids, weights and losses stay
    small per-client numbers."""

    def __init__(self, rule: str, dim: int, num_own: int, device: torch.device):
        self.rule, self.device = rule, device
        self.sum = WeightedSum(dim, device) if rule == "fedavg" else None
        self.rows = None if rule == "fedavg" else torch.empty(num_own, dim, dtype=torch.float32, device=device)
        self.ids: List[int] = []
        self.weights: List[float] = []
        self.losses: List[float] = []

    def add(self, client_id: int, vector: torch.Tensor, weight: float, loss: float) -> None:
        if self.sum is not None:
            self.sum.add(vector, weight)
        else:
            self.rows[len(self.ids)] = vector
        self.ids.append(client_id)
        self.weights.append(weight)
        self.losses.append(loss)

    def aggregate(self, ids_by_rank: Sequence[Sequence[int]], trim_ratio: float = 0.1, f: int = 0,
                  sfat_alpha: float = 1 / 6, sfat_topk: int = 1
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, weights, losses) of all participating clients sorted by id, and the
        aggregated vector, the same on every rank. `ids_by_rank`: the participants each
        rank hosts, in the order they were added."""
        ids, weights, losses = gather_client_meta(self.ids, self.weights, self.losses,
                                                  max(len(block) for block in ids_by_rank), self.device)
        if self.sum is not None:
            aggregated = all_gather_weighted_sums(self.sum).mean()
        elif self.rule == "sfat":  # weights need every client's loss: known only now
            slack = dict(zip(ids.tolist(), sfat_weights(weights, losses, sfat_alpha, sfat_topk).tolist()))
            partial = WeightedSum(self.rows.shape[1], self.device)
            for row, cid in zip(self.rows, self.ids):
                partial.add(row, slack[cid])
            aggregated = all_gather_weighted_sums(partial).mean()
        else:
            aggregated = sharded_aggregate(self.rule, self.rows, ids_by_rank, trim_ratio, f)
        self.sum = self.rows = None  # free K/W x P before the next round allocates it again
        return ids, weights, losses, aggregated
