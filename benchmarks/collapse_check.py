"""Does a run's global model train, or fall to chance in its first rounds? The CLI's federation,
replayed in one process (no Ray) with the CLI's own config, data split, partition, initial model,
per-client random streams, lr and epsilon schedules, and its weighting of the clients; natural accuracy
of the global model on the run's validation images (held-out training images, never the test set)
after each of the first ROUNDS rounds. Any ray_fedat.train flags after `--`.

    python benchmarks/common.py runs/mnist8k.npz
    python benchmarks/collapse_check.py --check-rounds 3 -- --dataset npz --data-file runs/mnist8k.npz \
        --preset mnist --clients 4 --partition dirichlet --beta 0.5 --rounds 20 --method pgd --seed 1

Each round's lr, epsilon and attack come from schedule.round_schedule, as worker.plan_round takes them.

A model that predicts one class scores ~11% on MNIST's validation set; the methods table's PGD-AT seed 1
did (benchmarks/README.md). Comparing recipes here over several seeds chooses them on validation data.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ray_fedat.aggregation import flatten_state, unflatten_state  # noqa: E402
from ray_fedat.client import ClientShard, train_client  # noqa: E402
from ray_fedat.config import parse_config  # noqa: E402
from ray_fedat.data import to_float  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.launch import prepare_data  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.schedule import round_schedule  # noqa: E402
from ray_fedat.worker import client_weight, local_training_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-rounds", type=int, default=4)
    ap.add_argument("--lr-warmup-rounds", type=int, default=0,
                    help="what-if, not a train flag: the round's lr times r/(W+1) in rounds r <= W")
    ap.add_argument("train_flags", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    flags = [f for f in args.train_flags if f != "--"]
    cfg = parse_config(flags + ["--device", "cpu"])
    torch.set_num_threads(1)  # one thread, as each run of the table's sweep has on a 2-core machine
    data, parts, counts = prepare_data(cfg)
    shards = [ClientShard(c, data.x_train[torch.as_tensor(p)], data.y_train[torch.as_tensor(p)],
                          torch.tensor(counts[c], dtype=torch.float32)) for c, p in enumerate(parts)]
    torch.manual_seed(cfg.seed)  # the worker's initial global model
    model = build_model(cfg.model, data.shape, data.num_classes)
    global_vec, spec = flatten_state(model.state_dict())
    base = local_training_config(cfg, False, "fp32")
    x_val, y_val = to_float(data.x_val), data.y_val
    t0, line = time.time(), []
    late = False
    for rnd in range(1, args.check_rounds + 1):
        sched = round_schedule(cfg, rnd, cfg.schedule_rounds, late)
        late = sched.late
        lr = sched.lr * min(1.0, rnd / (args.lr_warmup_rounds + 1))
        local = base.__class__(**{**base.__dict__, "lr": lr, "epsilon": sched.epsilon,
                                  "attack_steps": sched.attack_steps, "step_size": sched.step_size})
        total, weight_sum, loss_sum = torch.zeros_like(global_vec), 0.0, 0.0
        for shard in shards:
            model.load_state_dict(unflatten_state(global_vec, spec))
            loss = train_client(model, shard, local, generator_for(cfg.seed, rnd, shard.client_id), torch.device("cpu"))
            w = client_weight(cfg.client_weighting, len(shard))
            total += w * flatten_state(model.state_dict())[0]
            weight_sum += w
            loss_sum += w * loss  # the round's training loss as the CLI records it
        global_vec = total / weight_sum
        model.load_state_dict(unflatten_state(global_vec, spec))
        model.eval()
        with torch.no_grad():
            acc = sum((model(x_val[i:i + 500]).argmax(1) == y_val[i:i + 500]).sum().item()
                      for i in range(0, len(y_val), 500)) / len(y_val)
        line.append(f"r{rnd} {100 * acc:.1f}% (loss {loss_sum / weight_sum:.4f})")
        warmup = f" (lr warm-up {args.lr_warmup_rounds} rounds)" if args.lr_warmup_rounds else ""
        print(f"  {' '.join(flags)}{warmup}: {', '.join(line)} [{time.time() - t0:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
