"""Local training objectives: CalFAT, TRADES, PGD-AT and natural training.

Each method is `loss(model, x, y, ctx) -> scalar tensor`, called with the model in train
mode. Every model call goes through `ctx.forward` (bf16 autocast and channels_last when the
worker computes that way, float32 logits always; see precision.py). Methods that attack switch the model to eval mode for the attack (so BatchNorm
statistics are not polluted by adversarial batches) and back to train mode for the update.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from .attacks import kl_attack, pgd_ce
from .precision import Forward


@dataclass
class LocalContext:
    epsilon: float
    step_size: float
    attack_steps: int
    class_counts: torch.Tensor  # this client's samples per class (CalFAT's prior)
    generator: Optional[torch.Generator] = None
    trades_beta: float = 6.0
    calfat_tau: float = 0.1
    attack_start: str = "gaussian"  # where the KL attack begins (see attacks.kl_attack)
    forward: Forward = Forward()  # how to call the model: fp32 or bf16, channels_last or not


def calibrate(logits: torch.Tensor, class_counts: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """CalFAT's calibrated logits z + tau * log(n_c). A class the client never saw counts
    as one sample: no log(0), and it still gets the smallest prior of all."""
    prior = torch.log(class_counts.to(device=logits.device, dtype=logits.dtype).clamp_min(1.0))
    return logits + tau * prior


@contextmanager
def attacking(model: torch.nn.Module):
    """Eval mode and frozen parameters while the attack runs: the attack needs gradients
    with respect to the input only, and frozen weights spare the weight-gradient kernels
    in every backward pass. Train mode and trainable weights come back for the update."""
    params = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        model.train(was_training)


def natural_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    return F.cross_entropy(ctx.forward(model, x), y)


def pgd_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    with attacking(model):
        x_adv = pgd_ce(ctx.forward.of(model), x, y, ctx.epsilon, ctx.step_size, ctx.attack_steps, ctx.generator)
    return F.cross_entropy(ctx.forward(model, x_adv), y)


def trades_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    with attacking(model):
        with torch.no_grad():  # the attack's target needs no graph
            natural_probs = F.softmax(ctx.forward(model, x), dim=1)
        x_adv = kl_attack(ctx.forward.of(model), x, natural_probs, ctx.epsilon, ctx.step_size, ctx.attack_steps, ctx.generator,
                          ctx.attack_start)
    logits_nat, logits_adv = ctx.forward(model, x), ctx.forward(model, x_adv)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    return F.cross_entropy(logits_nat, y) + ctx.trades_beta * robust


def calfat_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    def calibrated(inputs):
        return calibrate(ctx.forward(model, inputs), ctx.class_counts, ctx.calfat_tau)

    with attacking(model):
        with torch.no_grad():  # natural logits: once per batch, no graph
            natural_probs = F.softmax(calibrated(x), dim=1)
        x_adv = kl_attack(calibrated, x, natural_probs, ctx.epsilon, ctx.step_size, ctx.attack_steps, ctx.generator,
                          ctx.attack_start)
    return F.cross_entropy(calibrated(x_adv), y)


METHOD_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "calfat": calfat_loss,
    "trades": trades_loss,
    "pgd": pgd_loss,
    "natural": natural_loss,
}
