"""Model files and Ray Train checkpoints: what they hold and how they load safely.

A model file (best_natural.pt, best_robust.pt, model.pt inside a Ray Train checkpoint)
is a dict {state_dict, round, metrics, model, shape, num_classes}; final_model.pt is a
plain state_dict, described by the summary.json beside it. Everything loads with
torch.load(weights_only=True): no pickle code runs from a file.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import torch

from .errors import ConfigError

MODEL_FILE = "model.pt"
STATE_FILE = "trainer_state.json"


class CheckpointError(ConfigError):
    """A model file or checkpoint that is missing, truncated or not ours (one line)."""


def cpu_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state on the CPU: files written from GPU training load on any machine."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def save_model_file(path: str, model: torch.nn.Module, record: dict, model_name: str, shape, num_classes: int) -> None:
    torch.save({"state_dict": cpu_state_dict(model), "round": record["round"], "metrics": record,
                "model": model_name, "shape": list(shape), "num_classes": num_classes}, path)


def save_checkpoint(directory: str, model: torch.nn.Module, record: dict, best: dict, model_name: str, shape,
                    num_classes: int, plan: Optional[dict] = None) -> None:
    """What a resume needs: the global model, the round/best-so-far bookkeeping and the
    time-budget planner's evaluation interval (`plan`: {"eval_every", "eval_s"})."""
    save_model_file(os.path.join(directory, MODEL_FILE), model, record, model_name, shape, num_classes)
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump({"round": record["round"], "best": best, **({"plan": plan} if plan else {})}, f)


def read_checkpoint(directory: str) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(model state_dict, {"round", "best"}) from a Ray Train checkpoint directory."""
    state_dict, _ = load_model_file(os.path.join(directory, MODEL_FILE))
    try:
        with open(os.path.join(directory, STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory}: no readable {STATE_FILE} ({e})") from None
    return state_dict, state


# The restore broadcast: one float64 tensor, [round, best natural value, its round, best
# robust value, its round, planned eval_every, measured eval_s, model vector...]; NaN marks
# "no best yet" and "no plan". float64 holds every float32 parameter exactly.
RESTORE_HEADER = 7


def pack_restore_state(model_vec: torch.Tensor, state: dict) -> torch.Tensor:
    header = [float(state["round"])]
    for kind in ("natural", "robust"):
        best = state["best"].get(kind)
        header += [float("nan"), float("nan")] if best is None else [float(best["value"]), float(best["round"])]
    plan = state.get("plan")
    header += [float("nan"), float("nan")] if not plan else [float(plan["eval_every"]), float(plan["eval_s"])]
    return torch.cat([torch.tensor(header, dtype=torch.float64), model_vec.detach().cpu().to(torch.float64)])


def unpack_restore_state(packed: torch.Tensor) -> Tuple[torch.Tensor, dict]:
    """(float32 model vector, {"round", "best"[, "plan"]}) from pack_restore_state's tensor."""
    header = packed[:RESTORE_HEADER].tolist()
    best = {}
    for i, kind in enumerate(("natural", "robust")):
        value, round_ = header[1 + 2 * i], header[2 + 2 * i]
        best[kind] = None if value != value else {"value": value, "round": int(round_)}
    state = {"round": int(header[0]), "best": best}
    if header[5] == header[5]:
        state["plan"] = {"eval_every": int(header[5]), "eval_s": header[6]}
    return packed[RESTORE_HEADER:].to(torch.float32), state


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
