"""Natural and white-box PGD accuracy of a model, on this worker's share of the test set.

The test set is cut into fixed batches and batch b belongs to rank b % world_size, so
each image is evaluated once across the cluster and the counts are summed with
all_reduce. Each batch's random start is seeded by (seed, round, batch index), so the
numbers do not depend on the number of workers.

Evaluation is the yardstick, so it always runs in fp32, whatever precision training used
(channels_last only changes the memory layout). The test images may live on the device
(the worker puts them there once); the counts stay on the device until the end.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .attacks import pgd_ce
from .data import to_float
from .federation import generator_for
from .losses import attacking
from .precision import Forward


def shard_batches(x_uint8: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int,
                  device: torch.device):
    """(batch index b, float images, labels) of this rank's batches: batch b belongs to rank
    b % world_size, so every image is evaluated once across the workers."""
    for b, start in enumerate(range(0, len(y), batch_size)):
        if b % world_size == rank:
            yield b, to_float(x_uint8[start:start + batch_size]).to(device), y[start:start + batch_size].to(device)


def count_correct(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """[images, natural correct, robust correct] over this rank's batches (float64 tensor)."""
    return count_correct_by_class(model, x_uint8, y, **kwargs).sum(dim=1)


def count_correct_by_class(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                           step_size: float, steps: int, batch_size: int, seed: int, round_: int, rank: int = 0,
                           world_size: int = 1, device: Optional[torch.device] = None,
                           num_classes: Optional[int] = None) -> torch.Tensor:
    """3 x C float64 counts per class over this rank's batches: images, natural correct,
    robust correct (C: num_classes, default max(y) + 1)."""
    device = device or torch.device("cpu")
    forward = Forward.for_model(model, "fp32", device)
    num_classes = num_classes or int(y.max()) + 1
    counts = torch.zeros(3, num_classes, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for b, x, t in shard_batches(x_uint8, y, batch_size, rank, world_size, device):
        with torch.no_grad():
            natural = forward(model, x).argmax(1) == t
        if steps > 0 and epsilon > 0:
            with attacking(model):
                x_adv = pgd_ce(forward.of(model), x, t, epsilon, step_size, steps,
                               generator_for(seed, round_, b, 0xE7A1))
            with torch.no_grad():
                robust = forward(model, x_adv).argmax(1) == t
        else:
            robust = natural
        # (3 x B) hits times (B x C) one-hot labels: per-class sums with a matmul, which is
        # deterministic on CUDA (a weighted bincount is not).
        hits = torch.stack((torch.ones_like(natural), natural, robust)).double()
        counts += hits @ F.one_hot(t, num_classes).double()
    model.train(was_training)
    return counts.cpu()


def evaluate_distributed(model, x_uint8, y, **kwargs) -> Dict:
    """count_correct_by_class on this rank's share, summed over all ranks: accuracies in
    [0, 1], overall and per class ({"images": [...], "natural": [...], "robust": [...]},
    None for a class with no image)."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    device = kwargs.get("device") or torch.device("cpu")
    counts = count_correct_by_class(model, x_uint8, y, rank=rank, world_size=world, **kwargs).to(device)
    if world > 1:
        dist.all_reduce(counts)
    images, natural, robust = counts.cpu().tolist()
    n = sum(images)
    per_class = {"images": [int(i) for i in images],
                 "natural": [c / i if i else None for c, i in zip(natural, images)],
                 "robust": [c / i if i else None for c, i in zip(robust, images)]}
    return {"eval_images": int(n), "natural_acc": sum(natural) / n, "robust_acc": sum(robust) / n,
            "per_class": per_class}


def client_expected_accuracy(class_counts: Sequence[Sequence[float]], per_class_acc: Sequence[Optional[float]]
                             ) -> List[Optional[float]]:
    """Each client's accuracy on its own label distribution: sum_c (n_kc / n_k) * acc_c,
    over the classes the evaluation has images of (renormalised over those). None for a
    client none of whose classes were evaluated."""
    out = []
    for counts in class_counts:
        seen = [(n, a) for n, a in zip(counts, per_class_acc) if n > 0 and a is not None]
        total = sum(n for n, _ in seen)
        out.append(sum(n * a for n, a in seen) / total if total else None)
    return out


def worst_and_bottom(values: Sequence[Optional[float]], fraction: float = 0.2) -> Dict:
    """The worst value (and its index) and the mean of the lowest ceil(fraction * K) values."""
    scored = sorted((v, i) for i, v in enumerate(values) if v is not None)
    if not scored:
        return {"worst": None, "worst_client": None, "bottom_mean": None, "bottom_clients": 0}
    m = max(1, math.ceil(fraction * len(scored)))
    return {"worst": scored[0][0], "worst_client": scored[0][1], "bottom_mean": sum(v for v, _ in scored[:m]) / m,
            "bottom_clients": m}
