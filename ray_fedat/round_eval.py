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

from .attacks import pgd
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


YARDSTICK_LOSSES = ("ce", "margin")
_STREAMS = {"ce": 0xE7A1, "margin": 0xE7A2}  # each loss's random starts, per (seed, round, batch)


def yardstick_robust(model, forward: Forward, x: torch.Tensor, t: torch.Tensor, natural: torch.Tensor, *,
                     epsilon: float, step_size: float, steps: int, seed: int, round_: int, batch_index: int,
                     losses: Sequence[str] = YARDSTICK_LOSSES) -> torch.Tensor:
    """Which images of a batch survive the yardstick: PGD on each loss in turn (cross-entropy,
    then the CW margin), each run on the images every earlier attack failed on; an image is
    robust only if it is classified correctly under all of them. The margin attack catches
    models that flatten cross-entropy's gradient (saturated softmax), which a CE-only
    yardstick reports as robust."""
    robust = natural.clone()
    for loss in losses:
        keep = robust.nonzero().squeeze(1)
        if len(keep) == 0:
            break
        with attacking(model):
            x_adv = pgd(forward.of(model), x[keep], t[keep], epsilon, step_size, steps,
                        generator_for(seed, round_, batch_index, _STREAMS[loss]), loss=loss)
        with torch.no_grad():
            robust[keep] = forward(model, x_adv).argmax(1) == t[keep]
    return robust


def count_correct(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """[images, natural correct, robust correct] over this rank's batches (float64 tensor)."""
    return count_correct_by_class(model, x_uint8, y, **kwargs).sum(dim=1)


def count_correct_by_class(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                           step_size: float, steps: int, batch_size: int, seed: int, round_: int, rank: int = 0,
                           world_size: int = 1, device: Optional[torch.device] = None,
                           num_classes: Optional[int] = None, losses: Sequence[str] = YARDSTICK_LOSSES) -> torch.Tensor:
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
            robust = yardstick_robust(model, forward, x, t, natural, epsilon=epsilon, step_size=step_size, steps=steps,
                                      seed=seed, round_=round_, batch_index=b, losses=losses)
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
