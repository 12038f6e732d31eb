"""summary.json, the run's record (written when the run starts, again when its rounds end
and when its final attack ends), and final_model.pt.

The summary holds the config, the clients and their placement, the last evaluated round,
the best models, the final attack's result and its headline, and the workers' identities.
"""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

from .final_attack import headline
from .monitoring import watch_info
from .run_config import RunConfig


FINAL_MODEL_FILE = "final_model.pt"


def save_final_model(run_dir: str, result, records: List[dict]) -> Optional[str]:
    """final_model.pt: the global model of the last round, from Ray Train's last checkpoint."""
    import torch

    from .checkpoints import MODEL_FILE, load_model_file

    if result is None or result.checkpoint is None or not records:
        return None
    with result.checkpoint.as_directory() as d:
        state_dict, meta = load_model_file(os.path.join(d, MODEL_FILE))
    if meta["round"] != records[-1]["round"]:
        return None
    torch.save(state_dict, os.path.join(run_dir, FINAL_MODEL_FILE))
    return FINAL_MODEL_FILE


def write_summary(run_dir: str, *args, write: bool = True, **kwargs) -> dict:
    """summary.json (build_summary's arguments): written when the run starts (so an interrupted run can be resumed)
    and again when it ends. `status`: running, attacking (the rounds are done, the final
    attack is under way), then finished (only after the final attack), failed or interrupted.
    With write=False only built (save_summary writes it later: train.run logs the final
    summary to the trackers first, so a finished summary.json means a finished tracker run)."""
    summary = build_summary(run_dir, *args, **kwargs)
    if write:
        save_summary(run_dir, summary)
    return summary


def save_summary(run_dir: str, summary: dict) -> None:
    from .recorder import atomic_write_text

    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))


def build_summary(run_dir: str, cfg: RunConfig, counts, placement: str, status: str, wall_s: float = 0.0,
                  final_model: Optional[str] = None, error: Optional[str] = None,
                  launched: Optional[float] = None, storage: Optional[str] = None,
                  run_name: Optional[str] = None, val_images: int = 0, final_attack: Optional[dict] = None) -> dict:
    from .byzantine import byzantine_clients
    from .federation import assign_clients
    from .recorder import WORKERS_FILE, best_rounds, read_metrics

    records = read_metrics(run_dir)
    workers_path = os.path.join(run_dir, WORKERS_FILE)
    workers = []
    if os.path.exists(workers_path):
        with open(workers_path) as f:
            workers = json.load(f)
    evaluated = [r for r in records if r.get("natural_acc") is not None]
    summary = {
        "status": status,
        "error": error,
        "config": cfg.to_dict(),
        "clients": [{"client": i, "size": int(c.sum()), "class_counts": c.tolist()} for i, c in enumerate(counts)],
        "client_assignment": {str(rank): ids for rank, ids in  # balanced by samples, as the workers place them
                              enumerate(assign_clients(cfg.clients, cfg.workers, [int(c.sum()) for c in counts]))},
        "byzantine": {"clients": byzantine_clients(cfg.clients, cfg.byzantine, cfg.seed),
                      "attack": cfg.byzantine_attack} if cfg.byzantine else None,
        "placement": placement,
        "storage": storage,  # where checkpoints go and who writes them
        "rounds_completed": records[-1]["round"] if records else 0,
        "final": evaluated[-1] if evaluated else None,
        "best": best_rounds(records),
        "selection": selection(cfg, val_images),
        "client_robustness": client_robustness(evaluated[-1] if evaluated else None, counts),
        "final_attack": final_attack,
        "headline": headline_numbers(final_attack),
        "final_model": final_model,
        "wall_s": wall_s,
        "workers": workers,
        "watch": watch_info(run_name or os.path.basename(run_dir)),
    }
    if cfg.time_budget:
        summary["time_budget"] = {
            "budget_s": cfg.time_budget,
            "planned_rounds": records[-1].get("planned_rounds") if records else None,
            "eval_every": records[-1].get("eval_every") if records else None,
            "elapsed_s": (time.time() - launched) if launched else None,  # from CLI start: data and Ray included
        }
    return summary


def headline_numbers(final_attack: Optional[dict]) -> Optional[dict]:
    """The run's headline: the final model's accuracy under the final strong attack."""
    text = headline(final_attack)
    if text is None:
        return None
    r = final_attack["models"]["final"]
    return {"natural_acc": r["natural_acc"], "robust_acc": r["robust_acc"], "attack": final_attack["attack"],
            "images": r["images"], "epsilon": final_attack["epsilon"], "text": text}


def selection(cfg: RunConfig, val_images: int) -> dict:
    """Which split chose the best models, and which only reports."""
    if val_images:
        return {"chosen_on": "validation", "validation_images": val_images, "val_fraction": cfg.val_fraction,
                "reported_on": "test", "note": "best_natural.pt and best_robust.pt are chosen on validation "
                "accuracy; the test set is reported, never used to choose"}
    return {"chosen_on": "test", "validation_images": 0, "val_fraction": 0.0, "reported_on": "test",
            "note": "--val-fraction 0: the best models are chosen on the test set, so their test accuracy is "
            "optimistic"}


def client_robustness(record: Optional[dict], counts) -> Optional[dict]:
    """Each client's expected natural and robust accuracy on its own label distribution
    (the global model's per-class test accuracy weighted by the client's class histogram),
    the worst client and the mean of the bottom 20%."""
    from .round_eval import client_expected_accuracy, worst_and_bottom

    if not record or not record.get("per_class"):
        return None
    per_class = record["per_class"]
    natural = client_expected_accuracy(counts.tolist(), per_class["natural"])
    robust = client_expected_accuracy(counts.tolist(), per_class["robust"])
    return {"round": record["round"], "split": "test",
            "clients": [{"client": i, "natural_acc": n, "robust_acc": r} for i, (n, r) in enumerate(zip(natural, robust))],
            "natural": worst_and_bottom(natural), "robust": worst_and_bottom(robust)}
