"""One client's local round: a fresh momentum SGD (sgd.py), E epochs of adversarial training on its
own shard, starting from the global model the caller loaded into `model`.

The shard normally lives on the worker's device already (the worker moves it there once):
batches are indexed and converted to float there, while the shuffling and augmentation
draws come from the client's CPU generator, so results do not depend on the device. The
loss is summed on the device and read once, when the client's round ends (no per-batch
host sync)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import augment_batch, to_float
from .losses import METHOD_LOSSES, LocalContext, proximal_term
from .precision import Forward
from .sgd import MomentumSGD


@dataclass
class ClientShard:
    client_id: int
    x: torch.Tensor  # uint8 N x C x H x W
    y: torch.Tensor  # int64 N
    class_counts: torch.Tensor  # float, samples per class

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device) -> "ClientShard":
        """The same shard with its images, labels and class counts on `device`."""
        return ClientShard(self.client_id, self.x.to(device), self.y.to(device), self.class_counts.to(device))


@dataclass
class LocalTrainingConfig:
    method: str
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    epsilon: float
    step_size: float
    attack_steps: int
    trades_beta: float
    calfat_tau: float
    augment: bool
    attack_start: str = "gaussian"
    precision: str = "fp32"  # "fp32" or "bf16" forwards (resolved; see precision.py)
    mart_beta: float = 6.0
    calfat_scale: float = 10.0  # CalFAT's s, the authors' 10 (see losses.calfat_loss)
    prox_mu: float = 0.0  # FedProx's mu; 0: plain local training


def batches(order: torch.Tensor, batch_size: int):
    """Index batches; a trailing batch of one sample joins the previous one (BatchNorm
    cannot normalise a single sample)."""
    n = len(order)
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] == 1:
        starts.pop()
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else n
        yield order[s:end]


def train_client(model: torch.nn.Module, shard: ClientShard, cfg: LocalTrainingConfig,
                 generator: torch.Generator, device: torch.device) -> float:
    """Train `model` in place on the shard; returns the mean training loss of the method
    (without FedProx's proximal term: SFAT ranks clients by it)."""
    loss_fn = METHOD_LOSSES[cfg.method]
    ctx = LocalContext(cfg.epsilon, cfg.step_size, cfg.attack_steps, shard.class_counts.to(device),
                       generator, cfg.trades_beta, cfg.calfat_tau, cfg.attack_start,
                       Forward.for_model(model, cfg.precision, device), cfg.mart_beta, cfg.calfat_scale)
    # FedProx's anchor: the global model this round started from (the caller loaded it).
    anchor = [p.detach().clone() for p in model.parameters() if p.requires_grad] if cfg.prox_mu > 0 else None
    optimizer = MomentumSGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    model.train()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for _ in range(cfg.local_epochs):
        order = torch.randperm(len(shard), generator=generator)  # CPU generator: the same order on any device
        for idx in batches(order, cfg.batch_size):
            idx_on_data = idx.to(shard.x.device, non_blocking=True)
            x = to_float(shard.x[idx_on_data]).to(device, non_blocking=True)
            y = shard.y[idx_on_data].to(device, non_blocking=True)
            if cfg.augment:
                x = augment_batch(x, generator)
            loss = loss_fn(model, x, y, ctx)
            objective = loss if anchor is None else loss + proximal_term(model, anchor, cfg.prox_mu)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            total += loss.detach().double() * len(idx)  # stays on the device: no sync per batch
            count += len(idx)
    mean = total.item() / max(count, 1)
    if not math.isfinite(mean):
        raise FloatingPointError(f"client {shard.client_id}: training loss became {mean} (try a smaller --lr)")
    return mean
