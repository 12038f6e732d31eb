"""The command line: the train flags, config files (--config) and resumed runs (--resume).

Each flag is defined once, here, with its default taken from `RunConfig` and its choices
from defaults.py; `parse_config` turns argv into a validated, resolved `RunConfig`.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Optional, Sequence

from .defaults import (AGGREGATORS, BYZANTINE_ATTACKS, CALFAT_PAPER_SCALE, CLIENT_WEIGHTINGS, COMPILE_MODES, DATASETS,
                       FINAL_ATTACK_MODELS, FINAL_ATTACKS, METHODS, PARTITIONS, PRECISIONS, TRACK_ARTIFACTS,
                       TRACKERS)
from .errors import ConfigError
from .run_config import RunConfig
from .schedule import LR_SCHEDULES


def parse_scale(text: str) -> float:
    """--calfat-scale: a number, or 'paper' for the CalFAT authors' s = 10."""
    if isinstance(text, str) and text.strip().lower() == "paper":
        return CALFAT_PAPER_SCALE
    return parse_fraction(text)


def parse_fraction(text: str) -> float:
    """Parse '0.3', '8/255' or '2 / 255' (or a number from a config file) into a float."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction like 8/255") from None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default only where it has one (not 'None' for per-dataset defaults)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2, with any credential
    in a URI it quotes (a mistyped flag's value) redacted."""

    def error(self, message: str):  # noqa: D401 - argparse API
        from .errors import redact_secrets

        self.exit(2, f"{self.prog}: error: {redact_secrets(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = OneLineParser(
        prog="python -m ray_fedat.train",
        description="Federated adversarial training on a Ray cluster (Ray Train TorchTrainer, "
        "one worker per node). Defaults marked 'per dataset' are the README's recipe: the CalFAT "
        "article's threat model and evaluation, with a sturdier training setup.",
        formatter_class=_HelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=d.dataset, help=f"one of {', '.join(DATASETS)}")
    g.add_argument("--data-file", default=None, help="for --dataset npz: .npz with x_train, y_train, x_test, y_test")
    g.add_argument("--data-dir", default=d.data_dir, help="where torchvision datasets live (or are downloaded to)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=d.download,
                   help="download mnist/fmnist/cifar10 into --data-dir if missing")
    g.add_argument("--data-on", default=d.data_on,
                   help="driver: the driver loads the data once and ships each worker its clients' shards "
                   "through the Ray object store (works on a fresh cluster); nodes: every node reads its own copy")
    g.add_argument("--preset", default=None,
                   help="use another dataset's defaults, e.g. --dataset npz --preset mnist for an npz copy of MNIST")
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, default=None, help="number of clients K (default: --workers)")
    g.add_argument("--partition", default=d.partition, help=f"one of {', '.join(PARTITIONS)}")
    g.add_argument("--beta", type=float, default=d.beta, help="Dirichlet concentration (smaller = more label skew)")
    g.add_argument("--shards-per-client", type=int, default=d.shards_per_client, help="label-sorted shards per client")
    g.add_argument("--min-client-size", type=int, default=d.min_client_size, help="Dirichlet: smallest client allowed")
    g.add_argument("--client-fraction", type=float, default=d.client_fraction,
                   help="fraction of clients sampled each round (same subset on every worker)")
    g.add_argument("--rounds", type=int, default=d.rounds, help="communication rounds R (ignored with --time-budget)")
    g.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="train as well as possible in this wall time: after every round, re-plan the number of "
                   "rounds (and the lr/late-attack schedules) from the slowest worker's pace to finish inside it")
    g.add_argument("--local-epochs", type=int, default=d.local_epochs, help="local epochs E per round")
    g.add_argument("--batch-size", type=int, default=None, help="local batch size B (per dataset)")
    g.add_argument("--lr", type=float, default=None, help="client SGD learning rate (per dataset; on MNIST/FMNIST PGD-AT 0.02, MART 0.01)")
    g.add_argument("--lr-schedule", default=None, help=f"lr across rounds: {', '.join(LR_SCHEDULES)} (per dataset)")
    g.add_argument("--momentum", type=float, default=d.momentum, help="client SGD momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="client SGD weight decay")
    g.add_argument("--aggregator", default=d.aggregator, help=f"one of {', '.join(AGGREGATORS)}")
    g.add_argument("--client-weighting", default=d.client_weighting,
                   help=f"one of {', '.join(CLIENT_WEIGHTINGS)}: each client's weight in the average is its sample count "
                   "(FedAvg) or 1 (uniform, the CalFAT authors' average_weights)")
    g.add_argument("--trim-ratio", type=float, default=d.trim_ratio, help="trimmed-mean: share cut at each end")
    g.add_argument("--server-lr", type=float, default=d.server_lr, help="server step on the aggregated update (1 = FedAvg)")
    g.add_argument("--aggregator-f", type=int, default=None,
                   help="krum, multi-krum, bulyan: the number f of Byzantine clients per round to tolerate "
                   "(default: --byzantine); Krum needs more than 2f + 2 clients per round, Bulyan 4f + 3")
    g.add_argument("--sfat-alpha", type=parse_fraction, default=d.sfat_alpha,
                   help="--aggregator sfat: the top-k clients with the lowest adversarial loss get weight "
                   "(1 + alpha) / (1 - alpha) times their size (SFAT, ICLR 2023; 1/6 gives the authors' 1.4)")
    g.add_argument("--sfat-topk", type=int, default=d.sfat_topk, help="--aggregator sfat: clients upweighted per round")
    g.add_argument("--prox-mu", type=float, default=d.prox_mu,
                   help="FedProx: add mu/2 * ||w - w_global||^2 to every client's loss (any --method); 0 = off")
    g.add_argument("--byzantine", type=int, default=d.byzantine,
                   help="make this many clients (drawn with --seed) malicious, to test the robust aggregators")
    g.add_argument("--byzantine-attack", default=d.byzantine_attack,
                   help=f"what the malicious clients send: {', '.join(BYZANTINE_ATTACKS)} (see ray_fedat/byzantine.py)")
    g = p.add_argument_group("adversary")
    g.add_argument("--method", default=d.method, help=f"local training method, one of {', '.join(METHODS)}")
    g.add_argument("--epsilon", type=parse_fraction, default=None, help="L-inf budget in pixel units, e.g. 0.3 or 8/255 (per dataset)")
    g.add_argument("--step-size", type=parse_fraction, default=None, help="attack step size (per dataset)")
    g.add_argument("--attack-steps", type=int, default=None, help="attack steps while training (per dataset)")
    g.add_argument("--attack-start", default=None,
                   help="where the calfat/trades KL attack starts: gaussian (x + 0.001 N(0,1), the article's) or "
                   "uniform (a random point of the eps-ball, as PGD does) (per dataset)")
    g.add_argument("--eval-steps", type=int, default=None, help="PGD steps for robust evaluation (per dataset)")
    g.add_argument("--eval-step-size", type=parse_fraction, default=None,
                   help="PGD step size for robust evaluation; a fixed yardstick, independent of --step-size (per dataset)")
    g.add_argument("--eps-warmup-rounds", type=int, default=None,
                   help="ramp epsilon up linearly over the first N rounds; 0 = full epsilon from round 1 (per dataset)")
    g.add_argument("--late-attack-steps", type=int, default=None,
                   help="train against a stronger attack late in the run: this many steps (of --late-step-size) "
                   "in the rounds after --late-attack-from of the planned rounds (default: off)")
    g.add_argument("--late-step-size", type=parse_fraction, default=None, help="step of the late attack (default: --step-size)")
    g.add_argument("--late-attack-from", type=float, default=d.late_attack_from,
                   help="share of the planned rounds after which the late attack takes over")
    g.add_argument("--trades-beta", type=float, default=d.trades_beta, help="TRADES KL weight")
    g.add_argument("--calfat-tau", type=float, default=d.calfat_tau,
                   help="CalFAT's tau in the authors' cross_entropy(s * (z + tau * log n_c)): the prior's weight is s * tau")
    g.add_argument("--calfat-scale", type=parse_scale, default=d.calfat_scale,
                   help="CalFAT's s in the authors' cross_entropy(s * (z + tau * log n_c)); the network outputs s * z, "
                   f"and the KL attack runs at temperature s ('paper' = {CALFAT_PAPER_SCALE:g}, the authors' value)")
    g.add_argument("--mart-beta", type=float, default=d.mart_beta, help="MART's lambda: weight of the weighted KL term")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold out this share of the training data (before partitioning) to choose the best "
                   "models; the test set is only reported. 0: choose on the test set, as the CalFAT code does")
    g.add_argument("--final-attack", default=d.final_attack,
                   help=f"after training, attack the final and best-robust models once more: {', '.join(FINAL_ATTACKS)} "
                   "(apgd = APGD-CE + APGD-T with AutoAttack's settings, the default and the run's headline robust "
                   "number; autoattack = standard AutoAttack; both from the AutoAttack authors' code)")
    g.add_argument("--final-attack-models", default=d.final_attack_models,
                   help=f"which models --final-attack attacks, one of {', '.join(FINAL_ATTACK_MODELS)}: both = the "
                   "final and the best-robust model (once when they are the same round); final = the final model "
                   "only, the headline's (half the attack's time when they differ)")
    g.add_argument("--final-samples", type=int, default=d.final_samples,
                   help="--final-attack on N test images, a fixed class-stratified subset that depends on the data and N "
                   "only, so every run is scored on the same images (all of them when the test set is smaller); "
                   "with --time-budget, 15%% of the budget is kept for it")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate the global model every N rounds and at the last (default: every round; with "
                   "--time-budget, as often as keeps evaluation under a fifth of the time)")
    g.add_argument("--test-every", type=int, default=d.test_every,
                   help="score the test set (which only reports) every N-th evaluated round and at the last; the "
                   "validation set, which chooses the best models, is scored at every evaluated round")
    g.add_argument("--eval-samples", type=int, default=None,
                   help="evaluate on the first N test images and the first N validation images (default: all)")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size,
                   help="evaluation and final-attack batch size (default: 64 on a CPU, 256 on a GPU)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="smallcnn, lenet, resnet18, mlp (per dataset)")
    g = p.add_argument_group("cluster and outputs")
    g.add_argument("--workers", type=int, default=d.workers, help="Ray Train workers (one per node on a cluster)")
    g.add_argument("--cpus-per-worker", type=int, default=d.cpus_per_worker, help="CPUs reserved per worker (torch threads)")
    g.add_argument("--device", default=d.device, help="auto: CUDA when every worker can get a GPU, else CPU")
    g.add_argument("--precision", default=d.precision,
                   help=f"model forwards while training, one of {', '.join(PRECISIONS)}: bf16 autocast (examples, "
                   "weights, optimizer and evaluation stay fp32); auto = bf16 where the GPU or CPU computes bf16 natively "
                   "(Ampere+ GPUs; CPUs with AMX-BF16/AVX512-BF16), else fp32")
    g.add_argument("--compile", default=d.compile,
                   help=f"torch.compile the model on every worker, one of {', '.join(COMPILE_MODES)}: fused C++ "
                   "kernels on a CPU, Triton on a GPU, compiled in each worker's first round (20-50 s on a 2-core CPU); "
                   "auto = where it measured faster: nowhere yet (0.87x on this project's CPU, no GPU measured); on "
                   "falls back to eager, with one line, without a C++ compiler or Triton")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels (cuDNN, cuBLAS workspace, torch.use_deterministic_algorithms): "
                   "the same model on any number of GPU workers and after a restart, at some speed cost")
    g.add_argument("--address", default=None,
                   help="Ray cluster address (else $RAY_ADDRESS, else a fresh local Ray just for this run)")
    g.add_argument("--storage-path", default=d.storage_path,
                   help="where Ray Train keeps checkpoints, in <storage-path>/<name>/: a local path (on a multi-node "
                   "cluster without a shared mount only the worker on this node writes it), a path mounted at the same "
                   "place on every node, or a URI such as s3://bucket/runs?endpoint_override=HOST:PORT&scheme=http")
    g.add_argument("--output-dir", default=None, metavar="DIR",
                   help="local directory for the run's metrics, summary, best and final models, curves (default: "
                   "<storage-path>/<name>, or runs/<name> when --storage-path is a URI)")
    g.add_argument("--worker-nodes", default=None, metavar="IP,IP,...",
                   help="pin worker rank i to the node with the i-th IP (default: Ray places them)")
    g.add_argument("--name", default=None, help="run name (default: <dataset>-<method>-<timestamp>)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed for partition, init, data order and attacks")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="Ray Train checkpoint every N rounds")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="Ray Train checkpoints kept on disk")
    g.add_argument("--max-failures", type=int, default=d.max_failures, help="worker-group restarts allowed (-1: unlimited)")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue a finished or interrupted run from its latest checkpoint, with its own settings; "
                   f"only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)} may change")
    g.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or TOML file of flags (keys as flag names); flags on the command line win")
    g.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    g.add_argument("--dashboard", action="store_true",
                   help="also start the Ray dashboard with the local Ray (a cluster's head runs its own)")
    g.add_argument("--dashboard-host", default=d.dashboard_host,
                   help="address the local Ray's dashboard listens on (default 127.0.0.1: this machine only)")
    g.add_argument("--dry-run", action="store_true", help="print the resolved config and partition table, then exit")
    g.add_argument("--verbose", action="store_true", help="show Ray's own logs on the console")
    g = p.add_argument_group("experiment tracking (pip install -e \".[track]\"; only the driver logs)")
    g.add_argument("--track", default=d.track, metavar="TRACKER",
                   help=f"log the run's parameters, rounds, headline and files to {' and/or '.join(TRACKERS)} "
                   "(comma-separated, e.g. mlflow,wandb); wandb is offline unless WANDB_API_KEY or `wandb login` "
                   "says otherwise; the experiment (W&B project) is $MLFLOW_EXPERIMENT_NAME ($WANDB_PROJECT), else "
                   "ray_fedat; a tracker that cannot be reached is one line and the run goes on")
    g.add_argument("--track-uri", default=None, metavar="URI",
                   help="MLflow: a tracking server's URL (http://host:5000), any MLflow tracking URI, or a local "
                   "directory for an sqlite store and its artifacts (default: ./mlruns)")
    g.add_argument("--track-artifacts", default=d.track_artifacts,
                   help=f"files logged at the end, one of {', '.join(TRACK_ARTIFACTS)}: all = curves.png, summary.json "
                   "and the final and best models; small = without the models")
    return p


# What a resumed run may change: how long and where it runs, not what it learns.
RESUMABLE = ("rounds", "workers", "worker_nodes", "cpus_per_worker", "device", "address", "max_failures", "eval_every",
             "checkpoint_every", "keep_checkpoints", "dashboard", "dashboard_host", "verbose", "print_config",
             "final_attack", "final_attack_models", "final_samples", "test_every", "track", "track_uri", "track_artifacts")


def explicit_flags(argv: Optional[Sequence[str]]) -> dict:
    """Only the flags actually given on the command line (defaults suppressed)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def resume_config(run_dir: str, given: dict) -> RunConfig:
    """The saved configuration of the run in `run_dir`, with the allowed overrides."""
    summary = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(summary):
        raise ConfigError(f"--resume {run_dir}: no summary.json there; is it a ray_fedat run directory?")
    try:
        with open(summary) as f:
            saved = json.load(f)["config"]
    except (ValueError, KeyError) as e:
        raise ConfigError(f"--resume {run_dir}: summary.json is unreadable ({e})") from None
    changed = sorted(k for k in given if k not in RESUMABLE and k != "resume" and given[k] != saved.get(k))
    if changed:
        raise ConfigError(f"--resume keeps the run's own settings; cannot change "
                          f"{', '.join('--' + k.replace('_', '-') for k in changed)} "
                          f"(allowed: {', '.join('--' + k.replace('_', '-') for k in RESUMABLE)})")
    from .storage import is_uri

    saved.setdefault("val_fraction", 0.0)  # saved before the validation split existed: it trained on all
    cfg = RunConfig.from_dict({**saved, **given})
    # The schedules keep the run's first plan (an older summary has no schedule_rounds: its rounds were the plan).
    cfg.schedule_rounds = saved.get("schedule_rounds") or saved.get("rounds")
    cfg.resume = os.path.abspath(run_dir)
    if saved.get("output_dir") is None and not is_uri(saved.get("storage_path")):
        # outputs and checkpoints share <storage>/<name>: follow the directory if it moved
        cfg.storage_path, cfg.name = os.path.split(cfg.resume)
    else:  # checkpoints live elsewhere (a URI, or a separate --output-dir): keep them
        cfg.output_dir = cfg.resume
    return cfg


def read_mapping_file(path: str, label: str, missing: str, expected: str) -> dict:
    """The top-level mapping of a YAML or TOML file; every problem is one ConfigError line
    starting with `label` (`missing` when there is no file, `expected` when it is no mapping)."""
    if not os.path.isfile(path):
        raise ConfigError(f"{label}: {missing}")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                raw = tomllib.load(f)
        else:
            import yaml

            with open(path) as f:
                raw = yaml.safe_load(f) or {}
    except Exception as e:  # noqa: BLE001 - any parse error becomes one line
        raise ConfigError(f"{label}: cannot parse it ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{label}: expected {expected}")
    return raw


def load_config_file(path: str, parser: argparse.ArgumentParser) -> dict:
    """Flag values from a YAML or TOML file, checked and typed like the command line."""
    raw = read_mapping_file(path, f"--config {path}", "no such file", "a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in raw.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise ConfigError(f"--config {path}: unknown key {key!r} (keys are the train flags, e.g. dataset, rounds, lr)")
        action = actions[dest]
        if value is not None and action.type is not None and not isinstance(value, bool):
            try:
                if action.type is int and not isinstance(value, int):
                    raise ValueError
                value = action.type(value) if isinstance(value, (str, int, float)) else value
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                raise ConfigError(f"--config {path}: {key} = {value!r} is not a valid value") from None
        values[dest] = value
    return values


def parse_config(argv: Optional[Sequence[str]] = None) -> RunConfig:
    """argv -> validated, fully resolved RunConfig (raises ConfigError on bad values).

    Precedence: command-line flags, then the --config file, then the defaults."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.resume:
        return resume_config(ns.resume, explicit_flags(argv)).resolved().validate().with_absolute_paths()
    if ns.config:
        merged = {**vars(ns), **load_config_file(ns.config, parser), **explicit_flags(argv)}
        return RunConfig(**merged).resolved().validate().with_absolute_paths()
    return RunConfig(**vars(ns)).resolved().validate().with_absolute_paths()
