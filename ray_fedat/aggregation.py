"""Aggregation rules as pure functions over a stacked K x D tensor of client vectors:
FedAvg (also as a running sum), SFAT's slack-reweighted average, coordinate-wise median
and trimmed mean, Krum, Multi-Krum and Bulyan. federation.py runs the same rules sharded over the workers.

A model's state (parameters and buffers) travels as one flat float32 vector; BatchNorm
running statistics are aggregated like parameters, and integer buffers
(num_batches_tracked) are rounded back when the vector is unpacked.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

StateSpec = List[Tuple[str, torch.Size, torch.dtype]]


def flatten_state(state: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, StateSpec]:
    spec = [(k, v.shape, v.dtype) for k, v in state.items()]
    flat = torch.cat([v.detach().reshape(-1).to(torch.float32) for v in state.values()])
    return flat, spec


def unflatten_state(flat: torch.Tensor, spec: StateSpec) -> Dict[str, torch.Tensor]:
    out, offset = {}, 0
    for key, shape, dtype in spec:
        n = shape.numel()
        chunk = flat[offset: offset + n].reshape(shape)
        if not dtype.is_floating_point:
            chunk = torch.round(chunk)
        out[key] = chunk.to(dtype)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values but the model needs {offset}")
    return out


ROBUST_RULES = ("median", "trimmed-mean", "krum", "multi-krum", "bulyan")
KRUM_RULES = ("krum", "multi-krum", "bulyan")  # they choose whole clients by pairwise distances


def fedavg(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Average of the K rows weighted by `weights` (client sample counts)."""
    w = weights.to(dtype=updates.dtype, device=updates.device)
    return (w @ updates) / w.sum()  # a matrix-vector product: no K x D temporary


def sfat_weights(sizes: torch.Tensor, losses: torch.Tensor, alpha: float, topk: int) -> torch.Tensor:
    """SFAT's alpha-slack client weights (Zhu et al., "Combating Exacerbated Heterogeneity for
    Robust Models in Federated Learning", ICLR 2023):

        w_k = n_k * (1 + alpha) / (1 - alpha)   for the top-k clients with the LOWEST
                                                 adversarial training loss this round
        w_k = n_k                               for the others

    normalised to sum to 1 by the caller's weighted mean. The authors' code (utils.py
    average_weights_alpha*, --pri = (1+alpha)/(1-alpha), default 1.4, i.e. alpha = 1/6;
    --topk, default 1) ranks clients by the negated loss and upweights the largest; ties at
    the threshold are all upweighted, as there. Their code plain-averages the first round
    and leaves BatchNorm entries unweighted; here every round and every entry is reweighted."""
    sizes = sizes.to(torch.float64)
    k = min(max(int(topk), 0), len(losses))
    if k == 0:
        return sizes.clone()
    threshold = torch.sort(losses.to(torch.float64)).values[k - 1]
    upweight = losses.to(torch.float64) <= threshold
    return torch.where(upweight, sizes * (1 + alpha) / (1 - alpha), sizes)


def sfat(updates: torch.Tensor, sizes: torch.Tensor, losses: torch.Tensor, alpha: float, topk: int) -> torch.Tensor:
    return fedavg(updates, sfat_weights(sizes, losses, alpha, topk))


class WeightedSum:
    """FedAvg without holding the clients: a running sum of weight * vector and of the
    weights, one client at a time, in one float64 tensor (the weight is its last entry,
    so that workers exchange it in one collective). float64, so that summing the same
    clients in another grouping (another number of workers) gives the same float32
    average: a float32 value times an integer sample count is exact in float64, and the
    sum's rounding errors stay far below float32's last bit."""

    def __init__(self, dim: int, device: torch.device | str = "cpu"):
        self.values = torch.zeros(dim + 1, dtype=torch.float64, device=device)

    @classmethod
    def from_values(cls, values: torch.Tensor) -> "WeightedSum":
        self = cls.__new__(cls)
        self.values = values
        return self

    @property
    def weight(self) -> float:
        return float(self.values[-1])

    def add(self, vector: torch.Tensor, weight: float) -> None:
        self.values[:-1].add_(vector.to(torch.float64), alpha=float(weight))
        self.values[-1] += float(weight)

    def mean(self) -> torch.Tensor:
        return (self.values[:-1] / self.values[-1]).to(torch.float32)


def coordinate_median(updates: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median (the mean of the two middle values when K is even)."""
    k = updates.shape[0]
    ordered = updates.sort(dim=0).values
    return 0.5 * (ordered[(k - 1) // 2] + ordered[k // 2])


def trimmed_mean(updates: torch.Tensor, trim_ratio: float) -> torch.Tensor:
    """Coordinate-wise mean after dropping the floor(trim_ratio * K) largest and smallest."""
    k = updates.shape[0]
    cut = int(trim_ratio * k)
    if k - 2 * cut < 1:
        cut = (k - 1) // 2
    ordered = updates.sort(dim=0).values
    return ordered[cut: k - cut].mean(dim=0)


def pairwise_sq_distances(updates: torch.Tensor) -> torch.Tensor:
    """K x K squared Euclidean distances, in float64 (the |a|^2 + |b|^2 - 2ab form cancels
    badly in float32 when clients are close). Squared distances add over coordinate
    slices, which is how the sharded path builds this matrix."""
    x = updates.to(torch.float64)
    gram = x @ x.T
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_(min=0.0).fill_diagonal_(0.0)


def krum_scores(dist2: torch.Tensor, f: int) -> torch.Tensor:
    """Krum's score of each client: the sum of its squared distances to its K - f - 2
    nearest other clients (Blanchard et al., NeurIPS 2017)."""
    k = dist2.shape[0]
    neighbours = k - f - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs K > 2f + 2 clients (K={k}, f={f})")
    others = dist2 + torch.diag(torch.full((k,), torch.inf, dtype=dist2.dtype, device=dist2.device))
    return others.sort(dim=1).values[:, :neighbours].sum(dim=1)


def krum_select(dist2: torch.Tensor, f: int, m: int = 1) -> torch.Tensor:
    """Krum (m = 1) and Multi-Krum (m > 1): the row indices of the m clients with the
    lowest Krum scores, ascending. Ties go to the lower row; rows are in client-id order
    everywhere, so the choice does not depend on the placement."""
    order = torch.sort(krum_scores(dist2, f).cpu(), stable=True).indices
    return order[:m].sort().values


def bulyan_select(dist2: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan's selection (El Mhamdi et al., ICML 2018): theta = K - 2f clients, here the
    theta with the lowest Krum scores over all K clients ("Bulyan over Multi-Krum").
    The paper's form re-runs Krum on the shrinking set of clients not chosen yet; near
    the end that set has 2f + 1 clients and Krum's K - f - 2 neighbours drop below one,
    so scoring once on all K keeps the neighbour count well defined."""
    k = dist2.shape[0]
    if k < 4 * f + 3:
        raise ValueError(f"Bulyan needs K >= 4f + 3 clients (K={k}, f={f})")
    return krum_select(dist2, f, k - 2 * f)


def bulyan_coordinates(selected: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan's coordinate rule over the theta selected rows: for each coordinate, the
    mean of the beta = theta - 2f values closest to the coordinate's median."""
    theta = selected.shape[0]
    beta = theta - 2 * f
    median = coordinate_median(selected)
    closest = torch.sort((selected - median).abs(), dim=0, stable=True).indices[:beta]
    return selected.gather(0, closest).mean(dim=0)


def krum(updates: torch.Tensor, f: int) -> torch.Tensor:
    return updates[krum_select(pairwise_sq_distances(updates), f, 1)[0]].clone()


def multi_krum_size(k: int, f: int) -> int:
    """How many clients Multi-Krum averages: K - f (all but the assumed Byzantine ones)."""
    return k - f


def multi_krum(updates: torch.Tensor, f: int) -> torch.Tensor:
    """The plain (unweighted) mean of the K - f clients with the lowest Krum scores."""
    chosen = krum_select(pairwise_sq_distances(updates), f, multi_krum_size(len(updates), f))
    return updates[chosen].mean(dim=0)


def bulyan(updates: torch.Tensor, f: int) -> torch.Tensor:
    return bulyan_coordinates(updates[bulyan_select(pairwise_sq_distances(updates), f)], f)


def check_rule(rule: str, k: int, f: int) -> None:
    """The rules' preconditions on K clients per round and f Byzantine ones (ValueError,
    one line, naming what to change)."""
    if rule in ("krum", "multi-krum") and not k > 2 * f + 2:
        raise ValueError(f"--aggregator {rule} needs more than 2f + 2 = {2 * f + 2} clients per round "
                         f"(f = {f}, {k} clients take part); lower --aggregator-f or add clients")
    if rule == "bulyan" and not k >= 4 * f + 3:
        raise ValueError(f"--aggregator bulyan needs at least 4f + 3 = {4 * f + 3} clients per round "
                         f"(f = {f}, {k} clients take part); lower --aggregator-f or add clients")


def aggregate(rule: str, updates: torch.Tensor, weights: torch.Tensor, trim_ratio: float = 0.1,
              f: int = 0, losses: torch.Tensor | None = None, sfat_alpha: float = 1 / 6,
              sfat_topk: int = 1) -> torch.Tensor:
    """Any rule on a K x D tensor in one process (the reference the sharded path matches)."""
    if rule == "fedavg":
        return fedavg(updates, weights)
    if rule == "sfat":
        return sfat(updates, weights, losses, sfat_alpha, sfat_topk)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_ratio)
    if rule == "krum":
        return krum(updates, f)
    if rule == "multi-krum":
        return multi_krum(updates, f)
    if rule == "bulyan":
        return bulyan(updates, f)
    raise ValueError(f"unknown aggregator {rule!r}")


def server_step(global_vec: torch.Tensor, aggregated: torch.Tensor, server_lr: float) -> torch.Tensor:
    """global + server_lr * (aggregated - global); server_lr = 1 is plain FedAvg."""
    if server_lr == 1.0:
        return aggregated
    return global_vec + server_lr * (aggregated - global_vec)
