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

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .attacks import pgd_ce
from .data import to_float
from .federation import generator_for
from .losses import attacking
from .precision import Forward


def count_correct(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, *, epsilon: float,
                  step_size: float, steps: int, batch_size: int, seed: int, round_: int, rank: int = 0,
                  world_size: int = 1, device: Optional[torch.device] = None) -> torch.Tensor:
    """[images, natural correct, robust correct] over this rank's batches (float64 tensor)."""
    device = device or torch.device("cpu")
    forward = Forward.for_model(model, "fp32", device)
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    for b, start in enumerate(range(0, len(y), batch_size)):
        if b % world_size != rank:
            continue
        x = to_float(x_uint8[start:start + batch_size]).to(device)
        t = y[start:start + batch_size].to(device)
        with torch.no_grad():
            natural = (forward(model, x).argmax(1) == t).sum()
        if steps > 0 and epsilon > 0:
            with attacking(model):
                x_adv = pgd_ce(forward.of(model), x, t, epsilon, step_size, steps,
                               generator_for(seed, round_, b, 0xE7A1))
            with torch.no_grad():
                robust = (forward(model, x_adv).argmax(1) == t).sum()
        else:
            robust = natural
        counts[0] += len(t)
        counts[1] += natural
        counts[2] += robust
    model.train(was_training)
    return counts.cpu()


def evaluate_distributed(model, x_uint8, y, **kwargs) -> Dict[str, float]:
    """count_correct on this rank's share, summed over all ranks: accuracies in [0, 1]."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    device = kwargs.get("device") or torch.device("cpu")
    counts = count_correct(model, x_uint8, y, rank=rank, world_size=world, **kwargs).to(device)
    if world > 1:
        dist.all_reduce(counts)
    n, natural, robust = counts.tolist()
    return {"eval_images": int(n), "natural_acc": natural / n, "robust_acc": robust / n}
