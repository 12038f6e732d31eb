"""Aggregation rules as pure functions over a stacked K x D tensor of client vectors.

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


def fedavg(updates: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Average of the K rows weighted by `weights` (client sample counts)."""
    w = weights.to(dtype=updates.dtype, device=updates.device)
    return (w @ updates) / w.sum()  # a matrix-vector product: no K x D temporary


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


def aggregate(rule: str, updates: torch.Tensor, weights: torch.Tensor, trim_ratio: float = 0.1) -> torch.Tensor:
    if rule == "fedavg":
        return fedavg(updates, weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed-mean":
        return trimmed_mean(updates, trim_ratio)
    raise ValueError(f"unknown aggregator {rule!r}")


def server_step(global_vec: torch.Tensor, aggregated: torch.Tensor, server_lr: float) -> torch.Tensor:
    """global + server_lr * (aggregated - global); server_lr = 1 is plain FedAvg."""
    if server_lr == 1.0:
        return aggregated
    return global_vec + server_lr * (aggregated - global_vec)
