"""Local training objectives: CalFAT, TRADES, MART, PGD-AT, FGSM-RS and natural training,
and FedProx's proximal term (added to any of them by client.py).

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
    mart_beta: float = 6.0  # MART's lambda
    calfat_scale: float = 10.0  # CalFAT's s (the authors' 10): see calfat_loss


def calibrate(logits: torch.Tensor, class_counts: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """CalFAT's calibrated logits z + tau * log(n_c). A class the client never saw counts
    as one sample, as in the authors' code (log 1 = 0): no log(0), and it still gets the
    smallest prior of all."""
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


def fgsm_rs_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    """"Fast" adversarial training (Wong, Rice and Kolter, "Fast is better than free", ICLR
    2020): one FGSM step of size 1.25 eps from a uniform random point of the eps-ball, then
    cross-entropy on it. The step follows the current eps (warm-up included), not --step-size."""
    with attacking(model):
        x_adv = pgd_ce(ctx.forward.of(model), x, y, ctx.epsilon, 1.25 * ctx.epsilon, 1, ctx.generator, start="uniform")
    return F.cross_entropy(ctx.forward(model, x_adv), y)


def mart_objective(logits_nat: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    """MART (Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
    Examples", ICLR 2020, eq. 7), with the authors' constants:

        BCE(p(x'), y) + beta * KL(p(x) || p(x')) * (1 - p_y(x)), averaged over the batch,
        BCE(p(x'), y) = -log p_y(x') - log(1 - max_{k != y} p_k(x'))

    The KL is summed over classes per example; the boosted BCE's second term pushes down the
    most likely wrong class of the adversarial example."""
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    strongest_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), strongest_wrong)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl_per_example = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
    return boosted_ce + beta * (kl_per_example * (1.0000001 - true_probs)).mean()


def mart_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    """MART: a cross-entropy PGD attack (from the start --attack-start names), then mart_objective."""
    with attacking(model):
        x_adv = pgd_ce(ctx.forward.of(model), x, y, ctx.epsilon, ctx.step_size, ctx.attack_steps, ctx.generator,
                       start=ctx.attack_start)
    return mart_objective(ctx.forward(model, x), ctx.forward(model, x_adv), y, ctx.mart_beta)


def calfat_loss(model, x, y, ctx: LocalContext) -> torch.Tensor:
    """CalFAT (Chen et al., NeurIPS 2022) as its authors' code trains it, in a form that trains
    at our learning rates.

    The authors (cc233/CalFAT, `maxMarginLoss`, `maxMarginLoss_kl`, `kl_adv`) train a network
    whose output z enters the loss only as s * z:

        loss   = cross_entropy(s * (z(x_adv) + tau * log n_c), y),          s = 10, tau = 0.1
        attack = max KL(softmax(z(x) + tau log n_c) || softmax(z(x_adv) + tau log n_c)),
                 in eval mode, sign steps from x + 0.001 N(0, 1)

    Our network outputs the trained logits t = s * z directly (fold s into the last layer).
    The same loss and attack then read

        loss   = cross_entropy(t + s * tau * log n_c, y)     the prior at full weight, s * tau = 1
        attack = KL of softmax((t + s * tau * log n_c) / s)  the calibrated logits at temperature s

    Every model z of theirs is a model t = s * z of ours with the same loss value, the same
    attack objective and the same predictions (tests/test_methods.py checks it against a
    transcription of their formulas). The only difference is the parametrisation SGD sees:
    training s * z directly multiplies the last layer's gradients by s and diverged at lr 0.04
    (NaN) in our runs, while t trains like any classifier. With s = 1 this is the plain
    calibrated cross-entropy (the same as training z)."""
    prior_weight = ctx.calfat_scale * ctx.calfat_tau

    def calibrated(inputs):  # t + s * tau * log n_c: the trained logits plus the full prior
        return calibrate(ctx.forward(model, inputs), ctx.class_counts, prior_weight)

    def attacked(inputs):  # the authors' z + tau * log n_c
        return calibrated(inputs) / ctx.calfat_scale

    with attacking(model):
        with torch.no_grad():  # natural logits: once per batch, no graph (eval mode: what they recompute)
            natural_probs = F.softmax(attacked(x), dim=1)
        x_adv = kl_attack(attacked, x, natural_probs, ctx.epsilon, ctx.step_size, ctx.attack_steps, ctx.generator,
                          ctx.attack_start)
    return F.cross_entropy(calibrated(x_adv), y)


def proximal_term(model: torch.nn.Module, global_params, mu: float) -> torch.Tensor:
    """FedProx (Li et al., MLSys 2020): mu/2 * ||w - w_global||^2 over the trainable
    parameters, keeping each client near the global model it started from."""
    squared = sum(((p - g) ** 2).sum() for p, g in zip((p for p in model.parameters() if p.requires_grad),
                                                        global_params))
    return 0.5 * mu * squared


METHOD_LOSSES: Dict[str, Callable[..., torch.Tensor]] = {
    "calfat": calfat_loss,
    "trades": trades_loss,
    "mart": mart_loss,
    "pgd": pgd_loss,
    "fgsm-rs": fgsm_rs_loss,
    "natural": natural_loss,
}
