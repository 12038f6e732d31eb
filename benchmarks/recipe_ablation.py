"""One MNIST training recipe in one process, without Ray: the quick loop behind the MNIST
defaults (the numbers quoted in ray_fedat/config.py and benchmarks/README.md).

    python benchmarks/recipe_ablation.py --method calfat --attack-steps 3 --step-size 0.1 \
        --attack-start uniform --batch-size 64 --epochs 14

Real MNIST 8k/2k split (as mnist_real.py), K IID clients (default 2) trained one after the
other on one CPU thread from the global model and averaged (FedAvg) after every local
epoch: the same arithmetic as a ray_fedat round, at the cost of one core, so two recipes
can be compared side by side on a 2-core machine. The eps warm-up (2 epochs) and the cosine
lr decay follow the CLI. Natural and PGD-20 (eps 0.3, step 0.01) accuracy on the first
--eval-images test images every 3 epochs and at the end, with the training seconds so far
(evaluation not counted).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz  # noqa: E402

from ray_fedat.aggregation import fedavg, flatten_state, unflatten_state  # noqa: E402
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.evaluation import count_correct  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.schedule import epsilon_at, lr_at  # noqa: E402

EPSILON = 0.3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="calfat", choices=("calfat", "trades", "pgd", "natural"))
    p.add_argument("--attack-steps", type=int, default=3)
    p.add_argument("--step-size", type=float, default=0.1)
    p.add_argument("--attack-start", default="uniform", choices=("gaussian", "uniform"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--epochs", type=int, default=14)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--eval-images", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = np.load(mnist_8k_2k_npz(os.path.join(tempfile.mkdtemp(prefix="ablation_"), "mnist8k.npz")))
    x, y = torch.from_numpy(data["x_train"]).unsqueeze(1), torch.from_numpy(data["y_train"])
    x_test = torch.from_numpy(data["x_test"][: args.eval_images]).unsqueeze(1)
    y_test = torch.from_numpy(data["y_test"][: args.eval_images])
    shards = []
    for cid, idx in enumerate(np.array_split(np.arange(len(y)), args.clients)):  # the split is already shuffled
        ys = y[idx]
        shards.append(ClientShard(cid, x[idx], ys, torch.bincount(ys, minlength=10).float()))

    torch.manual_seed(0)
    model = build_model(args.model, (1, 28, 28), 10)
    global_vec, spec = flatten_state(model.state_dict())
    print(f"{vars(args)}", flush=True)
    train_s = 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        eps = epsilon_at(epoch, EPSILON, 2)
        cfg = LocalTrainingConfig(args.method, 1, args.batch_size, lr_at(epoch, args.epochs, args.lr, "cosine"), 0.9,
                                  2e-4, eps, args.step_size * eps / EPSILON, args.attack_steps, 6.0, 0.1, False,
                                  args.attack_start)
        vectors = []
        for shard in shards:
            model.load_state_dict(unflatten_state(global_vec, spec))
            loss = train_client(model, shard, cfg, generator_for(0, epoch, shard.client_id), torch.device("cpu"))
            vectors.append(flatten_state(model.state_dict())[0])
        global_vec = fedavg(torch.stack(vectors), torch.tensor([float(len(s)) for s in shards]))
        model.load_state_dict(unflatten_state(global_vec, spec))
        train_s += time.perf_counter() - started
        line = f"epoch {epoch:>2}  train {train_s:6.1f} s  loss {loss:.3f}"
        if epoch % 3 == 0 or epoch == args.epochs:
            n, natural, robust = count_correct(model, x_test, y_test, epsilon=EPSILON, step_size=0.01, steps=20,
                                               batch_size=250, seed=0, round_=epoch).tolist()
            line += f"  natural {100 * natural / n:5.1f}%  PGD-20 {100 * robust / n:5.1f}%"
        print(line, flush=True)


if __name__ == "__main__":
    main()
