"""Evaluate a saved model: `python -m ray_fedat.evaluate --checkpoint RUN_DIR/best_robust.pt`.

Natural accuracy plus a white-box attack: PGD-k (CE loss, random start), APGD-CE + APGD-T
with AutoAttack's settings, or the standard AutoAttack (both from the AutoAttack authors' code,
see final_attack.py). The dataset and epsilon default to the run's own settings (from the
checkpoint or the summary.json beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import torch

from .checkpoints import load_model_file
from .config import OneLineParser, parse_fraction
from .data import load_dataset
from .defaults import DATASET_DEFAULTS
from .errors import ConfigError
from .final_attack import ATTACK_NAMES, attack_counts, stratified_subset, yardstick_name
from .models import build_model
from .precision import prepare_model
from .round_eval import count_correct
from .run_config import RunConfig, eval_batch_size_for


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m ray_fedat.evaluate", description=__doc__.splitlines()[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="best_natural.pt, best_robust.pt or final_model.pt of a run")
    p.add_argument("--attack", choices=("pgd", *ATTACK_NAMES), default="pgd",
                   help="white-box attack: pgd (--steps), pgd-100, apgd (APGD-CE + APGD-T) or autoattack (standard)")
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default: the run's --eval-steps)")
    p.add_argument("--epsilon", type=parse_fraction, default=None, help="L-inf budget (default: the run's)")
    p.add_argument("--step-size", type=parse_fraction, default=None, help="PGD step size (default: the run's --eval-step-size)")
    p.add_argument("--dataset", default=None, help="override the run's dataset")
    p.add_argument("--data-file", default=None, help="override the run's --data-file (npz)")
    p.add_argument("--data-dir", default=None, help="override the run's --data-dir")
    p.add_argument("--samples", type=int, default=None,
                   help="evaluate N test images: the fixed class-stratified subset a run's final attack uses")
    p.add_argument("--batch-size", type=int, default=None,
                   help="default: the run's --eval-batch-size, else 64 on a CPU and 256 on a GPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--output", default=None, help="JSON results path (default: <checkpoint>.eval.json)")
    return p


def run_config_for(meta: dict, checkpoint: str, args) -> RunConfig:
    """The run's configuration (from the model file or summary.json), with overrides."""
    saved = meta.get("config")
    if saved is None:
        summary = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                saved = json.load(f)["config"]
    cfg = RunConfig.from_dict(saved) if saved else RunConfig(model=meta.get("model"))
    for key in ("dataset", "data_file", "data_dir", "epsilon"):
        if getattr(args, key) is not None:
            setattr(cfg, key, getattr(args, key))
    if args.step_size is not None:
        cfg.eval_step_size = args.step_size
    if not saved and args.dataset is None:
        raise ConfigError(f"{checkpoint}: no summary.json beside it; pass --dataset (and --data-file for npz)")
    defaults = DATASET_DEFAULTS[cfg.dataset] if cfg.dataset in DATASET_DEFAULTS else None
    if defaults is None:
        raise ConfigError(f"--dataset {cfg.dataset!r} is not known")
    cfg.epsilon = cfg.epsilon if cfg.epsilon is not None else defaults.epsilon
    # Runs saved before --eval-step-size existed evaluated with their training step size.
    cfg.eval_step_size = next(v for v in (cfg.eval_step_size, cfg.step_size, defaults.eval_step_size,
                                          defaults.step_size) if v is not None)
    cfg.eval_steps = args.steps if args.steps is not None else (cfg.eval_steps or defaults.eval_steps)
    return cfg


def evaluate(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    state_dict, meta = load_model_file(args.checkpoint)
    cfg = run_config_for(meta, args.checkpoint, args)
    data = load_dataset(cfg)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = build_model(meta.get("model") or cfg.model, data.shape, data.num_classes)
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ConfigError(f"{args.checkpoint}: weights do not fit model {cfg.model} on {cfg.dataset} "
                          f"({str(e).splitlines()[0]})") from None
    prepare_model(model, device).eval()  # the layout the workers evaluate with (channels_last on CUDA)
    x, y = data.x_test, data.y_test
    if args.samples:  # the same fixed, class-stratified images as a run's final attack
        chosen = stratified_subset(y, args.samples)
        x, y = x[chosen], y[chosen]
    batch_size = eval_batch_size_for(args.batch_size or cfg.eval_batch_size, device.type == "cuda")
    started = time.time()
    steps = cfg.eval_steps if args.attack == "pgd" else 0
    n, natural, robust = count_correct(model, x, y, epsilon=cfg.epsilon, step_size=cfg.eval_step_size, steps=steps,
                                       batch_size=batch_size, seed=args.seed, round_=0, device=device).tolist()
    result = {"checkpoint": os.path.abspath(args.checkpoint), "round": meta.get("round"), "dataset": cfg.dataset,
              "model": meta.get("model") or cfg.model, "images": int(n), "epsilon": cfg.epsilon,
              "natural_acc": natural / n}
    if args.attack == "pgd":
        result.update(attack=yardstick_name(cfg.eval_steps), step_size=cfg.eval_step_size, robust_acc=robust / n)
    else:
        shard = attack_counts(model, x, y, args.attack, epsilon=cfg.epsilon, step_size=cfg.eval_step_size,
                              yardstick_steps=cfg.eval_steps, num_classes=data.num_classes,
                              batch_size=batch_size, seed=args.seed, device=device)
        _, _, yardstick, strong = shard["counts"].tolist()
        result.update(attack=ATTACK_NAMES[args.attack], robust_acc=strong / n,
                      yardstick=yardstick_name(cfg.eval_steps), yardstick_acc=yardstick / n, checks=shard["checks"])
    result["seconds"] = time.time() - started
    output = args.output or args.checkpoint + ".eval.json"
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'checkpoint':<20}{result['checkpoint']}")
    print(f"{'data':<20}{cfg.dataset}, {result['images']} test images, eps={cfg.epsilon:.4g}")
    print(f"{'natural':<20}{100 * result['natural_acc']:6.2f}%")
    print(f"{result['attack']:<20}{100 * result['robust_acc']:6.2f}%")
    if "yardstick" in result:
        print(f"{result['yardstick'] + ' (yardstick)':<20}{100 * result['yardstick_acc']:6.2f}%")
    print(f"{'written':<20}{output}")
    return result


def main(argv: Optional[Sequence[str]] = None) -> None:
    try:
        evaluate(argv)
    except ConfigError as e:
        print(f"ray_fedat.evaluate: error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
