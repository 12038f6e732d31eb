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

from .monitoring import GAUGES, RUN_LABEL, gauge_name

METRICS_FILE = "metrics.jsonl"
WORKERS_FILE = "workers.json"
CURVES_FILE = "curves.png"
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
    """metrics.jsonl, workers.json, best models, TensorBoard events and Ray dashboard gauges,
    updated after every report. curves.png is the driver's (train.fit_with_progress): drawing
    here would import matplotlib into Ray Train's controller and cost every run start-up time."""

    def __init__(self, run_dir: str, title: str = "", run_name: Optional[str] = None):
        self.run_dir = run_dir
        self.run_name = run_name or os.path.basename(run_dir)  # the gauges' run label
        self.title = title
        self.records = {r["round"]: r for r in read_metrics(run_dir)}
        self._tensorboard = None
        self._gauges = None

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
        self._publish(record)

    def _publish(self, record: Dict[str, Any]) -> None:
        """TensorBoard and dashboard metrics: helpful views, never worth a failed run."""
        scalars = {k: record[k] for k in ("natural_acc", "robust_acc", "val_natural_acc", "val_robust_acc", "train_loss", "round_s")
                   if record.get(k) is not None}
        if self._tensorboard is None:
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(logdir=self.run_dir, flush_secs=5)
        for key, value in scalars.items():
            self._tensorboard.add_scalar(key, value, record["round"])
        self._tensorboard.flush()
        if self._gauges is None:
            from ray.util.metrics import Gauge

            # Exported to Prometheus as ray_fedat_<key>: Ray adds the "ray_" itself.
            self._gauges = {k: Gauge(gauge_name(k), description=f"ray_fedat global model {k}", tag_keys=(RUN_LABEL,))
                            for k in GAUGES}
        run = {RUN_LABEL: self.run_name}
        for key, value in {**scalars, "round": record["round"]}.items():
            if key in self._gauges:
                self._gauges[key].set(float(value), tags=run)

    def _copy_best_models(self, checkpoint, record: Dict[str, Any]) -> None:
        from .checkpoints import MODEL_FILE

        with checkpoint.as_directory() as d:
            for kind, filename in BEST_FILES.items():
                if record.get(f"best_{kind}"):
                    tmp = os.path.join(self.run_dir, filename + ".tmp")
                    shutil.copyfile(os.path.join(d, MODEL_FILE), tmp)
                    os.replace(tmp, os.path.join(self.run_dir, filename))


def draw_curves(run_dir: str, records: List[Dict[str, Any]], title: str) -> None:
    """curves.png: a helpful view, never worth a failed run."""
    from .plots import plot_curves

    try:
        plot_curves(records, os.path.join(run_dir, CURVES_FILE), title)
    except Exception as e:  # noqa: BLE001 - a plotting problem must not stop training
        print(f"ray_fedat: could not draw {CURVES_FILE}: {e}")


def best_rounds(records: List[Dict[str, Any]]) -> Dict[str, Optional[Dict[str, Any]]]:
    """Best natural and best robust model with their rounds (first round wins ties), chosen
    as the workers chose them: on validation accuracy when the run has a validation set,
    else on test accuracy. natural_acc / robust_acc are always the test numbers (None for a
    round the test set was not scored at)."""
    out: Dict[str, Optional[Dict[str, Any]]] = {}
    for kind in ("natural", "robust"):
        def score(r: Dict[str, Any]) -> Optional[float]:
            return r.get(f"val_{kind}_acc") if r.get("chosen_on") == "val" else r.get(f"{kind}_acc")

        # A round scored on validation only (--test-every) still competes; its test numbers are None.
        scored = [r for r in records if score(r) is not None]

        top = max(scored, key=lambda r: (score(r), -r["round"]), default=None)
        if top is None:
            out[kind] = None
            continue
        on_val = top.get("chosen_on") == "val"
        out[kind] = {"round": top["round"], f"{kind}_acc": top.get(f"{kind}_acc"),
                     "natural_acc": top.get("natural_acc"), "robust_acc": top.get("robust_acc"), "chosen_on": "validation" if on_val else "test",
                     "file": BEST_FILES[kind]}
        if on_val:
            out[kind].update(val_natural_acc=top["val_natural_acc"], val_robust_acc=top["val_robust_acc"])
    return out
