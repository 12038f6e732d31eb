"""The run directory's files, written on the driver's node as results arrive.

`RunRecorder` is a Ray Train callback: Ray runs it inside the Train controller, which
Ray places on the driver's node, right after every `ray.train.report`. So metrics.jsonl,
workers.json and the best models land next to the user whichever node rank 0 runs on.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, List, Optional

from ray.train.v2.api.callback import UserCallback

METRICS_FILE = "metrics.jsonl"
WORKERS_FILE = "workers.json"
BEST_FILES = {"natural": "best_natural.pt", "robust": "best_robust.pt"}


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class RunRecorder(UserCallback):
    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.records = {r["round"]: r for r in read_metrics(run_dir)}

    def after_report(self, run_context, metrics: List[Dict[str, Any]], checkpoint) -> None:
        record = {k: v for k, v in metrics[0].items() if k != "worker"}
        round_ = record["round"]
        # After a worker-group restart the loop replays rounds after its last checkpoint:
        # the replayed round replaces the old one, and anything recorded later is dropped.
        self.records = {r: rec for r, rec in self.records.items() if r < round_}
        self.records[round_] = record
        atomic_write_text(os.path.join(self.run_dir, METRICS_FILE),
                          "".join(json.dumps(self.records[r]) + "\n" for r in sorted(self.records)))
        atomic_write_text(os.path.join(self.run_dir, WORKERS_FILE),
                          json.dumps([m["worker"] for m in metrics], indent=1))
        if checkpoint is not None and (record.get("best_natural") or record.get("best_robust")):
            self._copy_best_models(checkpoint, record)

    def _copy_best_models(self, checkpoint, record: Dict[str, Any]) -> None:
        from .checkpoints import MODEL_FILE

        with checkpoint.as_directory() as d:
            for kind, filename in BEST_FILES.items():
                if record.get(f"best_{kind}"):
                    tmp = os.path.join(self.run_dir, filename + ".tmp")
                    shutil.copyfile(os.path.join(d, MODEL_FILE), tmp)
                    os.replace(tmp, os.path.join(self.run_dir, filename))


def best_rounds(records: List[Dict[str, Any]]) -> Dict[str, Optional[Dict[str, Any]]]:
    """Best natural and best robust accuracy with their rounds (first round wins ties)."""
    out: Dict[str, Optional[Dict[str, Any]]] = {}
    for kind in ("natural", "robust"):
        scored = [r for r in records if r.get(f"{kind}_acc") is not None]
        top = max(scored, key=lambda r: (r[f"{kind}_acc"], -r["round"]), default=None)
        out[kind] = None if top is None else {"round": top["round"], f"{kind}_acc": top[f"{kind}_acc"],
                                              "natural_acc": top["natural_acc"], "robust_acc": top["robust_acc"],
                                              "file": BEST_FILES[kind]}
    return out
