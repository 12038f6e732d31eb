"""Byzantine (malicious) clients, so that the robust aggregation rules have something to resist.

`--byzantine F` makes F clients, drawn with the run's seed, malicious for the whole run;
`--byzantine-attack` (one of defaults.BYZANTINE_ATTACKS) says what they do. They train like any other client (and cost the
same time), then send something else:

- sign-flip:  the update reversed and amplified, global - 4 * (local - global). With a plain
              reversal, 2 of 10 clients only slow FedAvg down; four times cancels the 8
              honest clients' updates.
- gaussian:   global + N(0, 1) noise in every coordinate, no learning at all.
- scale:      the update boosted ten-fold, global + 10 * (local - global), as a model-
              replacement attack does.
- label-flip: a data-poisoning client: it trains honestly on labels y -> C - 1 - y and
              sends the result unchanged.

The attacks corrupt only the trainable parameters: buffers (BatchNorm running means and
variances, counters) are sent as the client trained them. Noise or a reversed update on a
running variance can make it negative, and the model then computes NaN instead of showing
what the attack does to the aggregate.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from .client import ClientShard
from .federation import derive_seed

SIGN_FLIP_FACTOR = 4.0
SCALE_FACTOR = 10.0
GAUSSIAN_STD = 1.0
STREAM = 0xB12A  # a generator_for() part of its own: the attack's noise draws no client's randomness


def byzantine_clients(num_clients: int, count: int, seed: int) -> List[int]:
    """The `count` malicious client ids (sorted), the same on every worker and every run with this seed."""
    if count <= 0:
        return []
    rng = np.random.default_rng(derive_seed(seed, STREAM))
    return sorted(rng.choice(num_clients, size=count, replace=False).tolist())


def flip_labels(shard: ClientShard, num_classes: int) -> ClientShard:
    """The label-flip client's poisoned shard: every label y becomes C - 1 - y."""
    return ClientShard(shard.client_id, shard.x, (num_classes - 1) - shard.y, shard.class_counts.flip(0))


def trainable_mask(model: torch.nn.Module) -> torch.Tensor:
    """A bool vector over aggregation.flatten_state(model.state_dict()): True on the
    coordinates of trainable parameters, False on buffers."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return torch.cat([torch.full((v.numel(),), key in trainable, dtype=torch.bool)
                      for key, v in model.state_dict().items()])


def corrupt_update(attack: str, local: torch.Tensor, global_vec: torch.Tensor,
                   generator: torch.Generator, trainable: Optional[torch.Tensor] = None) -> torch.Tensor:
    """What a Byzantine client sends instead of its trained vector `local`: corrupted on the
    `trainable` coordinates (trainable_mask; None: all), as trained elsewhere."""
    if attack == "sign-flip":
        sent = global_vec - SIGN_FLIP_FACTOR * (local - global_vec)
    elif attack == "scale":
        sent = global_vec + SCALE_FACTOR * (local - global_vec)
    elif attack == "gaussian":
        noise = torch.randn(local.shape, generator=generator, dtype=local.dtype)
        sent = global_vec + GAUSSIAN_STD * noise.to(local.device)
    elif attack == "label-flip":
        return local  # the poison is in the data it trained on
    else:
        raise ValueError(f"unknown Byzantine attack {attack!r}")
    return sent if trainable is None else torch.where(trainable.to(local.device), sent, local)
