"""Experiment tracking: a run's parameters, rounds, headline and files in MLflow and/or
Weights & Biases (`--track mlflow,wandb`), with the trackers' own libraries.

Only the driver logs. Ray's own integrations do not fit here: `setup_mlflow`/`setup_wandb`
log from the Train workers (and Ray's guide hands them the API key through a runtime_env),
and the Tune logger callbacks are not Train V2 callbacks. The driver already reads
metrics.jsonl every half second to print each round (train.fit_with_progress): it logs the
round from there too, outside the training thread, so a tracker never slows a round; at the
end train.run logs the headline, the per-client worst case, the best rounds and the files.
No credential travels anywhere: the trackers read theirs (MLFLOW_TRACKING_TOKEN,
WANDB_API_KEY, ~/.netrc) in the driver's process, and a --track-uri with credentials in it
is refused (run_config.validate_tracking).

A tracker never fails a run: one that cannot be reached at the start, or fails later, is one
console line (`ray_fedat: tracking: ...; the run continues without it`) and is dropped.

tracking.json in the run directory keeps the tracker run ids, so a resumed run (`--resume`,
or a sweep resuming a cut-short run) continues its tracker run instead of starting another.
A sweep (sweep.py) is one MLflow experiment (one W&B group) named after it, with a parent
run that gets the sweep's table; each of its runs is named `<cell>_s<seed>` and tagged with
the cell's varying values (`TrackContext`).

The functions down to `wandb_mode` are pure: what is logged, under which names.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional

from .errors import redact_secrets

TRACKING_FILE = "tracking.json"
DEFAULT_EXPERIMENT = "ray_fedat"  # the MLflow experiment and W&B project of a run outside a sweep
MLFLOW_DB = "mlflow.db"  # a local --track-uri directory holds this sqlite store and artifacts/
PROBE_TIMEOUT_S = 15  # the first request to an MLflow server: no retries, this timeout
# Afterwards (unless the user set them): a few retries, and no request waits for minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
WANDB_INIT_TIMEOUT_S = 30.0  # wandb's own default is 90 s; WANDB_INIT_TIMEOUT overrides both

# metrics.jsonl's per-round numbers -> the trackers' names: the split first (val/, test/), and
# the per-round PGD yardstick called so, apart from the final attack's headline.
ROUND_METRICS = {
    "val_natural_acc": "val/natural_acc",
    "val_robust_acc": "val/yardstick_acc",
    "natural_acc": "test/natural_acc",
    "robust_acc": "test/yardstick_acc",
    "train_loss": "train/loss",
    "lr": "train/lr",
    "epsilon": "train/epsilon",
    "attack_steps": "train/attack_steps",
    "round_s": "time/round_s",
    "train_s": "time/train_s",
    "aggregate_s": "time/aggregate_s",
    "eval_s": "time/eval_s",
}
SMALL_FILES = ("curves.png", "metrics.jsonl")  # with summary.json, logged from the summary itself
MODEL_FILES = ("final_model.pt", "best_natural.pt", "best_robust.pt")
TABLE_FILES = ("table.md", "table.csv", "table.png")  # a sweep's, on its parent run
MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


@dataclass
class TrackContext:
    """What a sweep adds to each of its runs: the experiment (W&B group) they share, the
    parent run, and the cell's varying values as tags. Plain data: it travels to a Tune trial."""
    experiment: Optional[str] = None
    parent: Dict[str, str] = field(default_factory=dict)  # tracker name -> parent run id
    tags: Dict[str, str] = field(default_factory=dict)


# ---- what is logged (pure) ----

def flat_params(values: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested mapping flattened to `a.b` keys (lists and scalars kept as they are)."""
    out: Dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_params(config: Dict[str, Any], version: str, commit: Optional[str]) -> Dict[str, Any]:
    """The params known before training: the resolved RunConfig, flat, and what code ran it."""
    params = flat_params(config)
    params.update(ray_fedat_version=version, git_commit=commit or "unknown",
                  yardstick=f"PGD-{config.get('eval_steps')} CE+margin")
    return params


def worker_params(workers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The params known after round 1, from workers.json: the precision the run actually
    used, and what computed (the GPUs' names, or the CPUs' models)."""
    def one(key: str) -> Optional[str]:
        values = sorted({str(w[key]) for w in workers if w.get(key) is not None})
        return "; ".join(values) if values else None

    devices = sorted({str(w["device"]).split(":")[0] for w in workers if w.get("device")})
    params = {"precision_used": one("precision"), "device_name": one("device_name"),
              "device_type": "; ".join(devices) or None,
              "nodes_used": len({w.get("node_ip") for w in workers}) if workers else None}
    return {k: v for k, v in params.items() if v is not None}


def round_metrics(record: Dict[str, Any]) -> Dict[str, float]:
    """One round's numbers under the trackers' names; a split not scored that round is left out."""
    return {name: float(record[key]) for key, name in ROUND_METRICS.items()
            if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)}


def attack_slug(attack: str) -> str:
    """`APGD-CE + APGD-T` -> `apgd_ce_t`, `PGD-100` -> `pgd_100`, `AutoAttack (standard)` ->
    `autoattack`: the attack's name in a metric name (notes in parentheses dropped, words once)."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"\(.*?\)", "", attack.lower()))
    return "_".join(dict.fromkeys(words)) or "attack"


def final_metrics(summary: Dict[str, Any]) -> Dict[str, float]:
    """The end of a run: the headline named with its attack (`robust_apgd_ce_t`, with
    `final_attack_images` beside it), the per-client worst case, the best rounds."""
    m: Dict[str, float] = {}
    head = summary.get("headline")
    models = (summary.get("final_attack") or {}).get("models") or {}
    if head:
        slug = attack_slug(head["attack"])
        m[f"robust_{slug}"] = head["robust_acc"]
        m["final_attack_images"] = head["images"]
        m["final_natural_acc"] = head["natural_acc"]
        if models.get("final", {}).get("yardstick_acc") is not None:
            m["final_yardstick_acc"] = models["final"]["yardstick_acc"]
        best = models.get("best_robust")
        if best:
            m[f"best_robust_model_robust_{slug}"] = best["robust_acc"]
            m["best_robust_model_natural_acc"] = best["natural_acc"]
    clients = summary.get("client_robustness")
    if clients:
        m["worst_client_natural_acc"] = clients["natural"]["worst"]
        m["worst_client_yardstick_acc"] = clients["robust"]["worst"]
        m["bottom_clients_yardstick_acc"] = clients["robust"]["bottom_mean"]
    for kind in ("natural", "robust"):
        best = (summary.get("best") or {}).get(kind)
        if not best:
            continue
        score = "natural" if kind == "natural" else "yardstick"
        m[f"best_{kind}_round"] = best["round"]
        if best.get(f"val_{kind}_acc") is not None:
            m[f"best_{kind}_val_{score}_acc"] = best[f"val_{kind}_acc"]
        if best.get(f"{kind}_acc") is not None:
            m[f"best_{kind}_test_{score}_acc"] = best[f"{kind}_acc"]
    if summary.get("rounds_completed") is not None:
        m["rounds_completed"] = summary["rounds_completed"]
    if summary.get("wall_s"):
        m["wall_s"] = summary["wall_s"]
    return {k: float(v) for k, v in m.items() if v is not None}


def final_tags(summary: Dict[str, Any]) -> Dict[str, str]:
    """Words beside the numbers: the status, the headline's sentence, which attack and yardstick."""
    tags = {"status": summary.get("status") or "unknown"}
    if summary.get("headline"):
        tags["headline"] = summary["headline"]["text"]
        tags["final_attack"] = summary["headline"]["attack"]
    if summary.get("error"):
        tags["error"] = str(summary["error"])[:500]
    clients = summary.get("client_robustness")
    if clients:
        tags["worst_client"] = str(clients["robust"]["worst_client"])
    return tags


def artifact_files(run_dir: str, mode: str) -> List[str]:
    """The run's files to log (those that exist): none; small = curves.png and metrics.jsonl
    (summary.json is logged from the summary itself); all = also the final and best models."""
    if mode == "none":
        return []
    names = SMALL_FILES + (MODEL_FILES if mode == "all" else ())
    return [os.path.join(run_dir, n) for n in names if os.path.isfile(os.path.join(run_dir, n))]


def mlflow_store(track_uri: str) -> tuple:
    """(tracking URI, artifact location for a new experiment or None): a local directory
    becomes an sqlite store in it with its artifacts beside (MLflow no longer writes plain
    ./mlruns file stores by default); a URI is MLflow's own business."""
    from .run_config import is_tracking_uri

    if is_tracking_uri(track_uri):
        return track_uri, None
    directory = os.path.abspath(track_uri)
    return f"sqlite:///{os.path.join(directory, MLFLOW_DB)}", f"file://{os.path.join(directory, 'artifacts')}"


def wandb_mode(env: Dict[str, str], netrc_has_key: bool) -> Optional[str]:
    """None (wandb decides: online) when WANDB_MODE says so or a key is known (WANDB_API_KEY,
    or `wandb login`'s ~/.netrc entry), else offline."""
    if env.get("WANDB_MODE"):
        return None
    if env.get("WANDB_API_KEY") or netrc_has_key:
        return None
    return "offline"


def one_line(error: BaseException) -> str:
    """An error in one short line: for an HTTP failure, urllib3's innermost reason
    (`NewConnectionError: [Errno 111] Connection refused`), not the whole request."""
    text = (str(error).strip().splitlines() or [""])[0].strip()
    cause = re.search(r"Caused by (\w+)\((.*)$", text)
    if cause:
        reason = cause.group(2).rsplit(": ", 1)[-1].rstrip(")\"'")
        reason += ")" * (reason.count("(") - reason.count(")"))
        return redact_secrets(f"{cause.group(1)}: {reason}")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return redact_secrets(text if len(text) <= 240 else text[:237] + "...")


# ---- the environment ----

def package_version() -> str:
    from . import __version__

    return __version__


def git_commit(path: Optional[str] = None) -> Optional[str]:
    """The commit of the checkout ray_fedat runs from (`+dirty` with uncommitted changes),
    or None outside a git checkout."""
    path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def netrc_has_wandb_key(env: Dict[str, str]) -> bool:
    """Whether `wandb login` left a key for the W&B host in ~/.netrc (or $NETRC)."""
    import netrc
    from urllib.parse import urlparse

    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = env.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


@contextlib.contextmanager
def environ(**values: str):
    """os.environ with `values` set for the duration (MLflow reads its HTTP settings per request)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_tracking_file(directory: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(directory, TRACKING_FILE)) as f:
            saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def write_tracking_file(directory: str, saved: Dict[str, Any]) -> None:
    from .recorder import atomic_write_text

    atomic_write_text(os.path.join(directory, TRACKING_FILE), json.dumps(saved, indent=1))


# ---- the trackers ----

class MlflowTracker:
    """One MLflow run, through MlflowClient (no global active run: a sweep's trials and the
    tests keep their runs apart)."""
    name = "mlflow"

    def __init__(self, track_uri: str):
        self.uri, self.artifact_location = mlflow_store(track_uri)
        self.where = f"mlflow at {redact_secrets(self.uri)}"
        self.client = None
        self.run_id: Optional[str] = None
        self.experiment_id: Optional[str] = None
        self.known_params: Dict[str, str] = {}

    def start(self, experiment: str, run_name: str, tags: Dict[str, str], parent: Optional[str],
              saved: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        from mlflow.tracking import MlflowClient

        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if self.uri.startswith("sqlite:///"):
            os.makedirs(os.path.dirname(self.uri[len("sqlite:///"):]), exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        with environ(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT=str(PROBE_TIMEOUT_S)):
            found = self.client.get_experiment_by_name(experiment)  # the probe: an unreachable server fails here
        self.experiment_id = found.experiment_id if found else self._create_experiment(experiment)
        if saved and saved.get("uri") == self.uri and saved.get("run_id"):
            try:
                run = self.client.get_run(saved["run_id"])
            except Exception:  # noqa: BLE001 - deleted from the tracker: start a new run
                run = None
            if run is not None:
                self.run_id = run.info.run_id
                self.experiment_id = run.info.experiment_id
                self.known_params = dict(run.data.params)
                self.client.update_run(self.run_id, status="RUNNING")
                return self.ids()
        tags = {**self._context_tags(), **tags, "mlflow.runName": run_name}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        return self.ids()

    def _create_experiment(self, experiment: str) -> str:
        try:
            return self.client.create_experiment(experiment, artifact_location=self.artifact_location)
        except Exception:  # noqa: BLE001 - created meanwhile by a sibling run of a sweep
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                raise
            return found.experiment_id

    @staticmethod
    def _context_tags() -> Dict[str, str]:
        """MLflow's own source tags (user, entry point), as mlflow.start_run would add them."""
        try:
            from mlflow.tracking.context.registry import resolve_tags

            return {k: v for k, v in resolve_tags({}).items() if v is not None}
        except Exception:  # noqa: BLE001 - nice to have
            return {}

    def ids(self) -> Dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    def describe(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"mlflow run {self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"mlflow run {self.run_id} in {redact_secrets(self.uri)} (see it: mlflow ui --backend-store-uri {self.uri})"

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        fresh, changed = [], []
        for key, value in params.items():
            text = "None" if value is None else str(value)
            if key not in self.known_params:
                fresh.append(Param(key, text))
            elif self.known_params[key] != text:  # a resumed run changed it (--rounds): MLflow params are fixed
                changed.append(RunTag(f"resumed.{key}", text))
        for i in range(0, len(fresh), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=fresh[i:i + 100])
        if changed:
            self.client.log_batch(self.run_id, tags=changed)
        self.known_params.update({p.key: p.value for p in fresh})

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def set_tags(self, tags: Dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_files(self, paths: Iterable[str], documents: Dict[str, Any]) -> None:
        for name, document in documents.items():
            self.client.log_dict(self.run_id, document, name)
        for path in paths:
            self.client.log_artifact(self.run_id, path)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=MLFLOW_STATUS.get(status, "FAILED"))


class WandbTracker:
    """One W&B run (its own object: `reinit="create_new"`, so several may live in one process)."""
    name = "wandb"

    def __init__(self):
        self.run = None
        self.where = "wandb"
        self.mode: Optional[str] = None

    def start(self, experiment: str, run_name: str, tags: Dict[str, str], parent: Optional[str],
              saved: Optional[Dict[str, Any]], group: Optional[str] = None, job_type: str = "train") -> Dict[str, Any]:
        import wandb

        self.mode = wandb_mode(dict(os.environ), netrc_has_wandb_key(dict(os.environ)))
        resume_id = saved.get("id") if saved else None
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True,
                                  init_timeout=float(os.environ.get("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S)))
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT, name=run_name,
                              group=group, job_type=job_type, tags=[f"{k}={v}" for k, v in tags.items()][:64],
                              id=resume_id, resume="allow" if resume_id else None, mode=self.mode,
                              dir=os.environ.get("WANDB_DIR"),  # read now: wandb's settings keep the first run's
                              settings=settings, reinit="create_new")
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")  # a replayed round is logged again, not dropped
        if tags:
            self.run.config.update({"tags": dict(tags)}, allow_val_change=True)
        return {"id": self.run.id, "project": self.run.project, "dir": os.path.dirname(self.run.dir)}

    def describe(self) -> str:
        if self.run.settings.mode == "offline" or self.mode == "offline":
            directory = os.path.dirname(self.run.dir)
            return f"wandb offline run {self.run.id} in {directory} (upload it: wandb sync {directory})"
        return f"wandb run {self.run.url}"

    def log_params(self, params: Dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log({"round": step, **metrics})

    def set_tags(self, tags: Dict[str, str]) -> None:
        self.run.summary.update(dict(tags))

    def log_files(self, paths: Iterable[str], documents: Dict[str, Any]) -> None:
        """Copies in the run's files directory: wandb uploads them (at once online, with
        `wandb sync` offline), and the run directory may move meanwhile."""
        import shutil

        for name, document in documents.items():
            with open(os.path.join(self.run.dir, name), "w") as f:
                json.dump(document, f, indent=1)
        for path in paths:
            shutil.copyfile(path, os.path.join(self.run.dir, os.path.basename(path)))

    def end(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def make_tracker(name: str, track_uri: Optional[str]):
    from .run_config import DEFAULT_MLFLOW_DIR

    return MlflowTracker(track_uri or os.path.abspath(DEFAULT_MLFLOW_DIR)) if name == "mlflow" else WandbTracker()


class Trackers:
    """The trackers of one run (or of a sweep's parent run). Every call goes to each tracker
    in turn; a tracker whose call fails is dropped with one console line, and nothing here
    ever raises."""

    def __init__(self, trackers: List[Any], directory: str):
        self.trackers = trackers
        self.directory = directory  # where tracking.json is kept
        self.logged: Dict[int, Any] = {}  # round -> its started_at, as train.print_new_rounds keeps it
        self.workers_logged = False
        self.ended = False
        self.continued: List[str] = []  # the trackers whose run this one continues (tracking.json)

    def _each(self, what: str, call: Callable[[Any], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as e:  # noqa: BLE001 - a tracker never fails the run
                self.drop(tracker, what, e)

    def drop(self, tracker, what: str, error: BaseException) -> None:
        self.trackers.remove(tracker)
        print(f"ray_fedat: tracking: {tracker.where}: {what} failed ({one_line(error)}); "
              "the run continues without it", flush=True)

    def start(self, experiment: str, run_name: str, tags: Dict[str, str], parent: Dict[str, str],
              job_type: str = "train", group: Optional[str] = None) -> None:
        saved = read_tracking_file(self.directory)
        for tracker in list(self.trackers):
            try:
                if tracker.name == "wandb":
                    ids = tracker.start(experiment, run_name, tags, parent.get("wandb"), saved.get("wandb"),
                                        group=group, job_type=job_type)
                else:
                    ids = tracker.start(experiment, run_name, tags, parent.get(tracker.name), saved.get(tracker.name))
            except Exception as e:  # noqa: BLE001 - unreachable, refused, misconfigured: the run goes on
                self.trackers.remove(tracker)
                print(f"ray_fedat: tracking: {tracker.where} unreachable ({one_line(e)}); "
                      "the run continues without it", flush=True)
                continue
            before = saved.get(tracker.name) or {}
            resumed = bool(before) and (before.get("run_id"), before.get("id")) == (ids.get("run_id"), ids.get("id"))
            saved[tracker.name] = ids
            if resumed:
                self.continued.append(tracker.name)
            print(f"ray_fedat: tracking: {'continuing' if resumed else 'logging to'} {tracker.describe()}", flush=True)
        if self.trackers:
            try:
                write_tracking_file(self.directory, saved)
            except OSError as e:
                print(f"ray_fedat: tracking: cannot write {TRACKING_FILE} ({one_line(e)}): a resumed run "
                      "will start new tracker runs", flush=True)

    def ids(self) -> Dict[str, str]:
        """{tracker name: its run id}: a sweep's parent for its runs."""
        return {t.name: (t.run_id if t.name == "mlflow" else t.run.id) for t in self.trackers}

    def log_params(self, params: Dict[str, Any]) -> None:
        self._each("logging the parameters", lambda t: t.log_params(params))

    def set_tags(self, tags: Dict[str, str]) -> None:
        self._each("setting tags", lambda t: t.set_tags(tags))

    def log_rounds(self, records: List[Dict[str, Any]], workers_file: Optional[str] = None) -> None:
        """The rounds of metrics.jsonl not logged yet: new ones, and rounds replayed after a
        restart (logged again at their step). The first time workers.json is there, the
        precision and devices the run used become params."""
        if not self.trackers:
            return
        for record in records:
            if self.logged.get(record["round"], object()) == record.get("started_at"):
                continue
            metrics = round_metrics(record)
            self._each(f"logging round {record['round']}", lambda t: t.log_metrics(metrics, record["round"]))
            self.logged[record["round"]] = record.get("started_at")
        if not self.workers_logged and workers_file and os.path.isfile(workers_file):
            try:
                with open(workers_file) as f:
                    workers = json.load(f)
            except (OSError, ValueError):
                return  # caught mid-replace: next time
            self.workers_logged = True
            self.log_params(worker_params(workers))

    def finish(self, summary: Dict[str, Any], files: List[str], status: str) -> None:
        """The end of the run: its final numbers, tags, summary.json and files, and its status."""
        if self.ended:
            return
        metrics, tags = final_metrics(summary), final_tags(summary)
        step = summary.get("rounds_completed") or 0
        self._each("logging the final numbers", lambda t: t.log_metrics(metrics, step) if metrics else None)
        self._each("setting the final tags", lambda t: t.set_tags(tags))
        self._each("logging the files", lambda t: t.log_files(files, {"summary.json": summary}))
        self.end(status)

    def end(self, status: str) -> None:
        if not self.ended:
            self.ended = True
            self._each("ending the run", lambda t: t.end(status))


def start_run_tracking(cfg, name: str, run_dir: str, context: Optional[Dict[str, Any]] = None) -> Trackers:
    """The run's trackers, started (or resumed from tracking.json), with the params known
    before training logged; an empty Trackers without --track. Never raises."""
    ctx = TrackContext(**(context or {}))
    tracking = Trackers([make_tracker(n, cfg.track_uri) for n in cfg.trackers()], run_dir)
    if not tracking.trackers:
        return tracking
    experiment = ctx.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    tracking.start(experiment, name, {k: str(v) for k, v in ctx.tags.items()}, ctx.parent, group=ctx.experiment)
    if tracking.trackers:
        tracking.log_params(run_params(cfg.to_dict(), package_version(), git_commit()))
    if tracking.trackers and len(tracking.continued) == len(tracking.trackers):
        # A resumed run whose tracker runs go on: the rounds already in metrics.jsonl are
        # there (a tracker new to the run gets them all).
        from .recorder import read_metrics

        tracking.logged = {r["round"]: r.get("started_at") for r in read_metrics(run_dir)}
    return tracking


def start_sweep_tracking(cfg, sweep_dir: str, sweep_name: str) -> Trackers:
    """A sweep's parent run (experiment and W&B group = the sweep's name), resumed from the
    sweep directory's tracking.json when the sweep is run again. Never raises."""
    tracking = Trackers([make_tracker(n, cfg.track_uri) for n in cfg.trackers()], sweep_dir)
    if tracking.trackers:
        tracking.start(sweep_name, sweep_name, {"ray_fedat.sweep": sweep_name}, {}, job_type="sweep",
                       group=sweep_name)
    return tracking


def run_context(sweep_name: str, parent: Dict[str, str], cell: str, seed: int,
                values: Dict[str, Any]) -> Dict[str, Any]:
    """The TrackContext (as a plain dict) of one run of a sweep: its cell's varying values as tags."""
    tags = {"sweep": sweep_name, "cell": cell, "seed": str(seed), **{k: str(v) for k, v in values.items()}}
    return {"experiment": sweep_name, "parent": dict(parent), "tags": tags}


def finish_sweep_tracking(tracking: Trackers, sweep_dir: str, status: str) -> None:
    """The sweep's table (table.md, table.csv, table.png) on its parent run, which then ends."""
    files = [os.path.join(sweep_dir, n) for n in TABLE_FILES if os.path.isfile(os.path.join(sweep_dir, n))]
    tracking._each("logging the sweep's table", lambda t: t.log_files(files, {}))
    tracking.end(status)
