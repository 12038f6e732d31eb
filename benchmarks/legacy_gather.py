"""The gather-everything aggregation path of main before issue 16, kept only as the baseline
that benchmarks/scale_clients.py measures the sharded path against: every worker receives
every client's whole vector (K x P), then runs the rule on the matrix."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist


def gather_client_vectors(client_ids: Sequence[int], vectors: Sequence[torch.Tensor], weights: Sequence[float],
                          losses: Sequence[float], max_per_worker: int, dim: int, device: torch.device
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """all_gather every worker's client vectors (padded to `max_per_worker` rows, id -1 for
    padding) and return (ids, K x D vectors, weights, losses) of all participating clients,
    sorted by client id so that aggregation sums in the same order on any number of workers."""
    rows = torch.zeros(max(max_per_worker, 1), dim, dtype=torch.float32, device=device)
    meta = torch.full((max(max_per_worker, 1), 3), -1.0, dtype=torch.float64, device=device)  # id, weight, loss
    for i, (cid, vec, w, loss) in enumerate(zip(client_ids, vectors, weights, losses)):
        rows[i] = vec
        meta[i] = torch.tensor([float(cid), float(w), float(loss)], dtype=torch.float64)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        # Gather straight into one (world * rows) x D tensor: its chunks are the receive
        # buffers, so there is no concatenation copy afterwards.
        all_rows = torch.empty((world * rows.shape[0], dim), dtype=rows.dtype, device=device)
        all_meta = torch.empty((world * meta.shape[0], 3), dtype=meta.dtype, device=device)
        dist.all_gather(list(all_rows.chunk(world)), rows)
        dist.all_gather(list(all_meta.chunk(world)), meta)
        rows, meta = all_rows, all_meta
    valid = meta[:, 0] >= 0
    order = torch.argsort(torch.where(valid, meta[:, 0], torch.inf))[: int(valid.sum())]
    if not torch.equal(order, torch.arange(rows.shape[0], device=order.device)):
        rows = rows[order]  # only copy when padding or out-of-order ranks require it
    meta = meta[order]
    return meta[:, 0].long(), rows, meta[:, 1], meta[:, 2]

