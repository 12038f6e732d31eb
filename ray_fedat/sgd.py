"""Momentum SGD with weight decay, step for step what `torch.optim.SGD` computes on a CPU
(its single-tensor path, no dampening, no Nesterov), written out here because
`torch.optim.Optimizer` imports `torch._dynamo` on its first use: 2-4 s of CPU in every
Ray worker process, paid again by every restarted worker group (benchmarks/README.md).
tests/test_sgd.py pins bitwise equality with torch.optim.SGD."""
from __future__ import annotations

from typing import List, Optional

import torch


class MomentumSGD:
    """`torch.optim.SGD(params, lr, momentum, weight_decay)`: the same update, bit for bit.

    For each parameter p with gradient g: d = g + weight_decay * p; the momentum buffer b is d
    on the first step and momentum * b + d after; then p -= lr * b (p -= lr * d without
    momentum)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        self.params: List[torch.Tensor] = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: List[Optional[torch.Tensor]] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                if self.buffers[i] is None:
                    self.buffers[i] = torch.clone(d).detach()
                else:
                    self.buffers[i].mul_(self.momentum).add_(d)
                d = self.buffers[i]
            p.add_(d, alpha=-self.lr)
