"""--final-attack: the final and best-robust models attacked once more, harder, after training.

Round-by-round PGD (PGD-20 or PGD-40 at a small step) is a cheap yardstick; it can
overstate robustness (on MNIST 95.1% under PGD-20 where PGD-100 gives 85.8%), and a model
that masks its gradients fools every gradient attack of one kind. So at the end:
- pgd-100: PGD with 100 steps at the run's evaluation step size;
- apgd: APGD-CE then APGD-T (100 steps each, AutoAttack's settings), the fast pair of
  AutoAttack's four attacks (Croce and Hein, ICML 2020), from torchattacks;
- autoattack: the standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square), from torchattacks.
Each model is also scored with the run's own yardstick PGD on the same images, and a gap of
more than WEAK_YARDSTICK_GAP is reported as a one-line warning.

The evaluation runs as one Ray task that asks for what a training worker had (a GPU on a
GPU cluster), so a CPU-only head node does not attack 10k CIFAR images by itself.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Optional

import torch

from .data import to_float
from .evaluation import count_correct

WEAK_YARDSTICK_GAP = 0.05
ATTACK_NAMES = {"pgd-100": "PGD-100", "apgd": "APGD-CE + APGD-T", "autoattack": "AutoAttack (standard)"}


def needs_torchattacks(attack: str) -> bool:
    return attack in ("apgd", "autoattack")


def torchattacks_missing(attack: str) -> Optional[str]:
    """A one-line reason when `attack` needs torchattacks and it is not installed here."""
    if needs_torchattacks(attack) and importlib.util.find_spec("torchattacks") is None:
        return (f"--final-attack {attack} needs torchattacks: pip install --no-deps 'torchattacks>=3.5' "
                "(its requests pin would downgrade Ray's; see README)")
    return None


def torchattacks_attack(model: torch.nn.Module, attack: str, eps: float, num_classes: int, seed: int):
    import torchattacks

    if attack == "autoattack":
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=num_classes,
                                       seed=seed)
    # AutoAttack's own settings for its first two attacks: 100 steps, one restart each.
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=seed),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=num_classes, seed=seed),
    ])


def strong_robust_accuracy(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, attack: str, *,
                           epsilon: float, step_size: float, num_classes: int, batch_size: int, seed: int,
                           device: torch.device) -> float:
    """Robust accuracy of `model` (in eval mode) under `attack` on these images."""
    model.eval()
    if attack == "pgd-100":
        n, _, robust = count_correct(model, x_uint8, y, epsilon=epsilon, step_size=step_size, steps=100,
                                     batch_size=batch_size, seed=seed, round_=0, device=device,
                                     num_classes=num_classes).tolist()
        return robust / n
    adversary = torchattacks_attack(model, attack, epsilon, num_classes, seed)
    correct = 0
    for start in range(0, len(y), batch_size):
        x = to_float(x_uint8[start:start + batch_size]).to(device)
        t = y[start:start + batch_size].to(device)
        x_adv = adversary(x, t)
        with torch.no_grad():
            correct += int((model(x_adv).argmax(1) == t).sum())
    return correct / len(y)


def evaluate_models(states: Dict[str, dict], model_name: str, shape, num_classes: int, x_uint8: torch.Tensor,
                    y: torch.Tensor, attack: str, epsilon: float, step_size: float, yardstick_steps: int,
                    batch_size: int, seed: int, use_gpu: bool) -> Dict[str, dict]:
    """For each named state dict: natural accuracy, the run's yardstick PGD and `attack`, all
    on the same images."""
    from .models import build_model
    from .precision import prepare_model

    device = torch.device("cuda" if use_gpu else "cpu")
    out = {}
    for name, state in states.items():
        model = build_model(model_name, shape, num_classes)
        model.load_state_dict(state)
        model = prepare_model(model, device, "fp32").eval()
        n, natural, yardstick = count_correct(model, x_uint8, y, epsilon=epsilon, step_size=step_size,
                                              steps=yardstick_steps, batch_size=batch_size, seed=seed, round_=0,
                                              device=device, num_classes=num_classes).tolist()
        robust = strong_robust_accuracy(model, x_uint8, y, attack, epsilon=epsilon, step_size=step_size,
                                        num_classes=num_classes, batch_size=batch_size, seed=seed, device=device)
        out[name] = {"natural_acc": natural / n, "yardstick_acc": yardstick / n, "robust_acc": robust}
    return out


def weak_yardstick_warning(results: Dict[str, dict], attack: str, yardstick: str) -> Optional[str]:
    """One line when the strong attack's robust accuracy is more than WEAK_YARDSTICK_GAP
    below the yardstick's on any model, else None."""
    gaps = {name: r["yardstick_acc"] - r["robust_acc"] for name, r in results.items()}
    name, gap = max(gaps.items(), key=lambda kv: kv[1], default=(None, 0.0))
    if name is None or gap <= WEAK_YARDSTICK_GAP:
        return None
    r = results[name]
    return (f"warning: {ATTACK_NAMES[attack]} leaves the {name} model {100 * r['robust_acc']:.1f}% robust, "
            f"{100 * gap:.1f} points below {yardstick}'s {100 * r['yardstick_acc']:.1f}%: the round-by-round "
            "yardstick is weak here, or the model masks gradients")
