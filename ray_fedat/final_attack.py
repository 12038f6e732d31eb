"""The final strong attack: the final and best-robust models attacked once more, harder, after
training. Its robust accuracy is the run's headline number.

Round-by-round PGD is a cheap yardstick; it can overstate robustness (a default MNIST model
once scored 93.25% under PGD-20 at step 0.01, 82.25% under PGD-100 and 72.6% under APGD-CE +
APGD-T), and a model that masks its gradients fools every gradient attack of one kind. So at
the end, with the AutoAttack authors' own code (Croce and Hein, ICML 2020; `pyautoattack`
packages fra31/auto-attack):
- apgd (the default): APGD-CE then APGD-T, the first two attacks of standard AutoAttack with
  its settings (100 iterations, 1 restart, 9 target classes);
- autoattack: standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square);
- pgd-100: PGD with 100 steps at the run's evaluation step size.
Each model is also scored with the run's own yardstick PGD on the same images, and a gap of
more than WEAK_YARDSTICK_GAP is reported as a one-line warning. AutoAttack's own checks
(zero gradients, randomised or dynamic models, ...) are kept in the result.

The driver's part (run_final_attack, attempt_final_attack, record_final_attack) loads the
models the run wrote, attacks them and records the result; the rest is the attack itself.

The images are cut into fixed batches and batch b belongs to shard b % world, as in
per-round evaluation: the driver runs one task per worker (with a worker's resources: a GPU
on a GPU cluster) and adds up their counts. Each batch's attack is seeded by (seed, b), so the
numbers do not depend on the number of workers. Evaluation always runs in fp32.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Dict, List, Optional, Sequence

import torch

from .attacks import pgd_ce
from .errors import root_cause
from .round_eval import shard_batches, yardstick_robust
from .federation import generator_for
from .losses import attacking
from .precision import Forward
from .run_config import RunConfig, eval_batch_size_for

WEAK_YARDSTICK_GAP = 0.05
ATTACK_NAMES = {"pgd-100": "PGD-100", "apgd": "APGD-CE + APGD-T", "autoattack": "AutoAttack (standard)"}
# Share of a --time-budget kept for the final attack.
FINAL_ATTACK_SHARE = 0.15
DEFAULT_FINAL_IMAGES = 1000  # the fewest test images a robustness claim may rest on
_SUBSET_SEED = 20260  # the final attack's images: fixed, so every run is scored on the same ones
_YARDSTICK_STREAM = 0xE7A1  # the same random starts as per-round evaluation (round_eval.py)


def autoattack(model: torch.nn.Module, attack: str, eps: float, num_classes: int, seed: int, device: torch.device):
    """pyautoattack's AutoAttack for `attack` ("apgd" or "autoattack"), with standard AutoAttack's
    settings; `attacks_run` lists the checks it warned about.

    With fewer than 4 classes APGD-T's targeted DLR loss cannot be computed (it reads the 3rd
    and 4th largest logits: an IndexError mid-attack), so APGD-T runs on the targeted
    cross-entropy loss that pyautoattack's APGDAttack_targeted also has, against all
    num_classes - 1 other classes; the checks' line about the class count says so."""
    from pyautoattack import AutoAttack

    if attack == "autoattack":
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed, device=device)
    else:  # what version="standard" sets for its first two attacks
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce", "apgd-t"],
                               seed=seed, device=device)
        adversary.apgd.n_restarts = 1
        adversary.apgd_targeted.n_restarts = 1
    targets = min(9, num_classes - 1)  # 9 of 10 classes; fewer when the data has fewer
    adversary.apgd_targeted.n_target_classes = targets
    adversary.fab.n_target_classes = targets
    adversary.verbose = False
    if num_classes < 4:
        # Its perturb() accepts only loss='dlr-targeted', so the DLR method itself is pointed at
        # the CE one (attack_single_run looks it up on the instance).
        adversary.apgd_targeted.dlr_loss_targeted = adversary.apgd_targeted.ce_loss_targeted
        note = (f"APGD-T used the targeted cross-entropy loss: with {num_classes} classes the targeted DLR "
                "loss is not possible")

        def reword(record: logging.LogRecord) -> bool:  # AutoAttack's class-count check, about what ran
            if "classes it is not possible to use the" in record.getMessage():
                record.msg, record.args = note, ()
            return True

        logger = logging.getLogger(f"auto-attack.classes{num_classes}")  # its records reach auto-attack's handlers
        logger.filters = [reword]  # set, not added: one filter however many batches
        adversary.logger = logger
    return adversary


class _CheckWarnings(logging.Handler):
    """Collects the warnings AutoAttack's checks log (zero gradients, randomness, ...)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = " ".join(record.getMessage().split())
        if text not in self.messages:
            self.messages.append(text)


def attack_counts(model: torch.nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, attack: str, *, epsilon: float,
                  step_size: float, yardstick_steps: int, num_classes: int, batch_size: int, seed: int,
                  rank: int = 0, world: int = 1, device: Optional[torch.device] = None) -> Dict:
    """Counts over this shard's batches (b % world == rank): images, natural correct, correct
    under the yardstick PGD, correct under `attack`; and AutoAttack's check warnings."""
    import warnings

    device = device or torch.device("cpu")
    model.eval()
    forward = Forward.for_model(model, "fp32", device)
    counts = torch.zeros(4, dtype=torch.float64)
    checks = _CheckWarnings()
    logger = logging.getLogger("auto-attack")
    logger.addHandler(checks)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the checks also warn through `warnings`: kept once, via the logger
            for b, x, t in shard_batches(x_uint8, y, batch_size, rank, world, device):
                with torch.no_grad():
                    natural = forward(model, x).argmax(1) == t
                yardstick = yardstick_robust(model, forward, x, t, natural, epsilon=epsilon, step_size=step_size,
                                             steps=yardstick_steps, seed=seed, round_=0, batch_index=b)
                # Per image, AutoAttack's own accounting: robust only if every attack that ran
                # failed on it. The strong attack runs on the images the yardstick left (the
                # others are already counted as broken), so its count is never above it.
                strong = yardstick.clone()
                keep = yardstick.nonzero().squeeze(1)
                if len(keep):
                    with attacking(model):
                        x_strong = strong_examples(model, forward, x[keep], t[keep], attack, epsilon=epsilon,
                                                   step_size=step_size, num_classes=num_classes, seed=seed,
                                                   batch_index=b, device=device)
                    with torch.no_grad():
                        strong[keep] = forward(model, x_strong).argmax(1) == t[keep]
                counts += torch.tensor([len(t), natural.sum().item(), yardstick.sum().item(), strong.sum().item()],
                                       dtype=torch.float64)
    finally:
        logger.removeHandler(checks)
    return {"counts": counts, "checks": checks.messages}


def strong_examples(model, forward: Forward, x: torch.Tensor, t: torch.Tensor, attack: str, *, epsilon: float,
                    step_size: float, num_classes: int, seed: int, batch_index: int,
                    device: torch.device) -> torch.Tensor:
    """Adversarial examples of one batch under `attack`, seeded by (seed, batch_index)."""
    if attack == "pgd-100":
        return pgd_ce(forward.of(model), x, t, epsilon, step_size, 100, generator_for(seed, 0, batch_index, 0x100))
    # AutoAttack reseeds torch's global generator from its seed at every attack: one per batch.
    adversary = autoattack(lambda z: forward(model, z), attack, epsilon, num_classes,
                           seed * 1_000_003 + batch_index, device)
    x_adv, _ = adversary.run_standard_evaluation(x, t, batch_size=len(t))
    return x_adv.detach()


def attack_shard(states: Dict[str, dict], model_name: str, shape, num_classes: int, x_uint8: torch.Tensor,
                 y: torch.Tensor, attack: str, epsilon: float, step_size: float, yardstick_steps: int,
                 batch_size: int, seed: int, rank: int, world: int, use_gpu: bool, threads: int = 1) -> Dict[str, dict]:
    """One worker's share of the final attack, for each named state dict (a Ray task body)."""
    from .models import build_model
    from .precision import prepare_model

    torch.set_num_threads(threads)
    device = torch.device("cuda" if use_gpu else "cpu")
    out = {}
    for name, state in states.items():
        model = build_model(model_name, shape, num_classes)
        model.load_state_dict(state)
        model = prepare_model(model, device, "fp32").eval()
        out[name] = attack_counts(model, x_uint8, y, attack, epsilon=epsilon, step_size=step_size,
                                  yardstick_steps=yardstick_steps, num_classes=num_classes, batch_size=batch_size,
                                  seed=seed, rank=rank, world=world, device=device)
    return out


def combine_shards(shards: Sequence[Dict[str, dict]]) -> Dict[str, dict]:
    """The workers' counts added up, per model: natural, yardstick and strong-attack accuracy."""
    out = {}
    for name in shards[0]:
        counts = sum(s[name]["counts"] for s in shards)
        n, natural, yardstick, strong = counts.tolist()
        checks = []
        for s in shards:
            checks += [c for c in s[name]["checks"] if c not in checks]
        out[name] = {"natural_acc": natural / n, "yardstick_acc": yardstick / n, "robust_acc": strong / n,
                     "images": int(n), "checks": checks}
    return out


def stratified_subset(labels: torch.Tensor, n: int) -> torch.Tensor:
    """The sorted indices of the n images the final attack scores: a seeded draw from every
    class in proportion to its share of `labels` (largest remainders take the leftover
    places). It depends on the labels and n only, never on the run's seed, method or
    machine, so every run on the same data is scored on the same images; and it covers
    every class even when the file is sorted by class."""
    labels = labels.cpu().long()
    total = len(labels)
    if n >= total:
        return torch.arange(total)
    classes, sizes = torch.unique(labels, return_counts=True)
    exact = sizes.double() * n / total
    take = exact.floor().long()
    leftover = n - int(take.sum())
    # The largest remainders first; ties by class order, so the choice is deterministic.
    order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - take[i]).item(), i))
    for i in order[:leftover]:
        take[i] += 1
    generator = torch.Generator().manual_seed(_SUBSET_SEED)
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        members = (labels == c).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def images_digest(indices: torch.Tensor) -> str:
    """A short fingerprint of the attacked test images' indices: two runs with the same one
    were scored on the same images."""
    import hashlib

    return hashlib.sha1(indices.cpu().long().numpy().tobytes()).hexdigest()[:12]


def yardstick_name(steps: int) -> str:
    """The per-round yardstick's name: PGD with `steps` steps on cross-entropy, then on the CW
    margin (round_eval.yardstick_robust)."""
    return f"PGD-{steps} CE+margin"


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


def headline(final_attack: Optional[dict]) -> Optional[str]:
    """`robust 85.0% under APGD-CE + APGD-T (eps 0.3, 1000 test images), natural 98.9%`, of the
    final model; None without a final attack result."""
    if not final_attack or final_attack.get("error") or "final" not in final_attack.get("models", {}):
        return None
    r = final_attack["models"]["final"]
    return (f"robust {100 * r['robust_acc']:.1f}% under {final_attack['attack']} (eps {final_attack['epsilon']:.4g}, "
            f"{r['images']} test images), natural {100 * r['natural_acc']:.1f}%")


# ---- the driver's part: after training ----

def models_to_attack(rounds: Dict[str, Optional[int]], which: str) -> List[str]:
    """The saved models (name -> the round it is from) that --final-attack-models names: the
    final model and, with "both", the best-robust one, unless it is the final model's round
    (attacked once). With "final" and no final model (a run cut before it wrote one), the
    best-robust model stands in: a run should not end without a headline it could have had."""
    names = [n for n in ("final", "best_robust") if n in rounds]
    if "final" in names and "best_robust" in names:
        if which == "final" or (rounds["best_robust"] is not None and rounds["best_robust"] == rounds["final"]):
            names.remove("best_robust")
    return names


def run_final_attack(cfg: RunConfig, run_dir: str, data, final_model: Optional[str], records: List[dict],
                     use_gpu: bool) -> Optional[dict]:
    """--final-attack on the models --final-attack-models names (models_to_attack), split over
    one Ray task per worker, each with a worker's resources, the way per-round evaluation is
    split, on --final-samples fixed class-stratified test images (stratified_subset). Never
    fails the run: a problem is reported in the result."""
    import ray

    from .checkpoints import load_model_file
    from .recorder import BEST_FILES

    files = {"final": final_model, "best_robust": BEST_FILES["robust"]}
    loaded = {name: load_model_file(os.path.join(run_dir, f))
              for name, f in files.items() if f and os.path.isfile(os.path.join(run_dir, f))}
    final_round = records[-1]["round"] if records else None
    rounds = {name: meta.get("round") if name == "best_robust" else final_round for name, (_, meta) in loaded.items()}
    chosen_models = models_to_attack(rounds, cfg.final_attack_models)
    if not chosen_models:
        return None
    best_round = rounds.get("best_robust")
    # the best-robust model left out because it is the final one gets the final model's numbers
    same_model = "best_robust" not in chosen_models and best_round is not None and best_round == final_round
    states = {name: loaded[name][0] for name in chosen_models}
    chosen = stratified_subset(data.y_test, cfg.final_samples)
    samples = len(chosen)
    how = "all" if samples == len(data.y_test) else "a fixed class-stratified subset, the same for every run"
    x, y = data.x_test[chosen], data.y_test[chosen]
    yardstick = yardstick_name(cfg.eval_steps)
    print(f"ray_fedat: final attack: {ATTACK_NAMES[cfg.final_attack]} on {' and '.join(states)} model, "
          f"{samples} of {len(data.y_test)} test images ({how}), split over {cfg.workers} worker(s)", flush=True)
    # An explicit scheduling strategy (SPREAD: the shards go to different nodes where they can)
    # also keeps the tasks out of the caller's placement group: inside a Ray Tune trial (ray_fedat.sweep)
    # they would otherwise be captured by the trial's group, which holds no CPU for them.
    task = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=1 if use_gpu else 0, max_retries=0,
                      scheduling_strategy="SPREAD")(attack_shard)
    started = time.time()
    try:
        states_ref, x_ref, y_ref = ray.put(states), ray.put(x), ray.put(y)
        refs = [task.remote(states_ref, cfg.model, data.shape, data.num_classes, x_ref, y_ref, cfg.final_attack,
                            cfg.epsilon, cfg.eval_step_size, cfg.eval_steps,
                            eval_batch_size_for(cfg.eval_batch_size, use_gpu), cfg.seed,
                            rank, cfg.workers, use_gpu, cfg.cpus_per_worker)
                for rank in range(cfg.workers)]
        results = combine_shards(ray.get(refs))
    except Exception as e:  # noqa: BLE001 - the trained models are kept whatever happens here
        return {"attack": ATTACK_NAMES[cfg.final_attack], "error": root_cause(e)}
    if same_model:
        results["best_robust"] = results["final"]
    return {"attack": ATTACK_NAMES[cfg.final_attack], "name": cfg.final_attack, "yardstick": yardstick,
            "images": samples, "test_images": len(data.y_test), "workers": cfg.workers, "samples_chosen": how,
            "images_digest": images_digest(chosen),
            "epsilon": cfg.epsilon,
            "rounds": {"final": final_round, "best_robust": best_round}, "models": results,
            "models_attacked": len(states),
            "seconds": time.time() - started, "warning": weak_yardstick_warning(results, cfg.final_attack, yardstick)}


def attempt_final_attack(cfg: RunConfig, run_dir: str, data, final_model: Optional[str], records: List[dict],
                         use_gpu: bool) -> dict:
    """run_final_attack's result, or {"attack", "error"} when it could not attack: it raised, or
    found no model to attack. A final attack that did not run leaves the run without its
    headline number, so the run fails with the reason (run() decides)."""
    name = ATTACK_NAMES[cfg.final_attack]
    try:
        result = run_final_attack(cfg, run_dir, data, final_model, records, use_gpu)
    except Exception as e:  # noqa: BLE001 - one line in the summary, the models are kept
        return {"attack": name, "error": root_cause(e)}
    if result is None:
        return {"attack": name, "error": "no model to attack (neither final_model.pt nor best_robust.pt was written)"}
    if not result.get("error"):
        result["attack"] = noted_attack_name(result["attack"], cfg.final_attack, data.num_classes)
    return result


def noted_attack_name(name: str, attack: str, num_classes: int) -> str:
    """The final attack's name, saying so when APGD-T ran on the targeted cross-entropy loss
    (autoattack: the targeted DLR loss needs at least 4 classes)."""
    if attack in ("apgd", "autoattack") and num_classes < 4:
        return f"{name} (APGD-T CE-targeted, fewer than 4 classes)"
    return name


def final_attack_error(final_attack: dict) -> str:
    """The one-line reason a run failed in its final attack."""
    first_line = (str(final_attack["error"]).strip().splitlines() or [""])[0]
    return f"final attack {final_attack['attack']} failed: {first_line}"


def record_final_attack(run_dir: str, final_attack: dict) -> None:
    """The headline numbers into the last round's line of metrics.jsonl and into TensorBoard
    (tag final_attack/<model>_robust_acc at that round)."""
    from .recorder import METRICS_FILE, atomic_write_text, read_metrics

    records = read_metrics(run_dir)
    if not records:
        return
    last = records[-1]
    last["final_attack"] = {"attack": final_attack["attack"], "images": final_attack["images"],
                            **{f"{name}_{k}": r[k] for name, r in final_attack["models"].items()
                               for k in ("natural_acc", "robust_acc")}}
    atomic_write_text(os.path.join(run_dir, METRICS_FILE), "".join(json.dumps(r) + "\n" for r in records))
    try:
        from tensorboardX import SummaryWriter

        with SummaryWriter(logdir=run_dir) as writer:
            for name, r in final_attack["models"].items():
                writer.add_scalar(f"final_attack/{name}_robust_acc", r["robust_acc"], last["round"])
                writer.add_text("final_attack", f"{final_attack['attack']}, {final_attack['images']} test images, "
                                f"eps {final_attack['epsilon']:.4g}", last["round"])
    except Exception as e:  # noqa: BLE001 - a viewer's file, never worth the results
        print(f"ray_fedat: could not write the final attack to TensorBoard: {e}")
