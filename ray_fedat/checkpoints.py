"""Model files and Ray Train checkpoints: what they hold and how they load safely.

A model file (best_natural.pt, best_robust.pt, model.pt inside a Ray Train checkpoint)
is a dict {state_dict, round, metrics, model, shape, num_classes}; final_model.pt is a
plain state_dict, described by the summary.json beside it. Everything loads with
torch.load(weights_only=True): no pickle code runs from a file.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import torch

from .config import ConfigError

MODEL_FILE = "model.pt"
STATE_FILE = "trainer_state.json"


class CheckpointError(ConfigError):
    """A model file or checkpoint that is missing, truncated or not ours (one line)."""


def save_model_file(path: str, model: torch.nn.Module, record: dict, model_name: str, shape, num_classes: int) -> None:
    torch.save({"state_dict": model.state_dict(), "round": record["round"], "metrics": record,
                "model": model_name, "shape": list(shape), "num_classes": num_classes}, path)


def save_checkpoint(directory: str, model: torch.nn.Module, record: dict, best: dict, model_name: str, shape,
                    num_classes: int) -> None:
    """What a resume needs: the global model and the round/best-so-far bookkeeping."""
    save_model_file(os.path.join(directory, MODEL_FILE), model, record, model_name, shape, num_classes)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"round": record["round"], "best": best}, f)


def load_model_file(path: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state_dict, description) from a model file or a plain state_dict; for a plain
    state_dict the description comes from the run's summary.json next to it."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code refused by weights_only
        text = str(e).strip()
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        raise CheckpointError(f"{path}: not a readable ray_fedat checkpoint ({first[:160]})") from None
    if isinstance(obj, dict) and "state_dict" in obj and "model" in obj:
        return obj["state_dict"], {k: v for k, v in obj.items() if k != "state_dict"}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        summary_path = os.path.join(os.path.dirname(os.path.abspath(path)), "summary.json")
        if not os.path.isfile(summary_path):
            raise CheckpointError(f"{path}: a bare state_dict needs the run's summary.json beside it to know the model")
        with open(summary_path) as f:
            summary = json.load(f)
        return obj, {"model": summary["config"]["model"], "config": summary["config"],
                     "round": summary.get("rounds_completed")}
    raise CheckpointError(f"{path}: not a ray_fedat checkpoint (expected a model state_dict)")
