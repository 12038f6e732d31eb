"""One MNIST training recipe in one process, without Ray: the quick loop that chooses the MNIST
defaults, on validation images only.

    python benchmarks/recipe_ablation.py --method calfat --attack-steps 5 --step-size 0.075 \
        --attack-start uniform --batch-size 128 --epochs 10

Real MNIST 8k/2k split (as mnist_real.py); the 8k are split as the CLI splits them
(`--val-fraction 0.1`, seed 0): 7.2k to train, 800 for validation. K IID clients (default 2)
trained one after the other on one CPU thread from the global model and averaged after every
local epoch: the same arithmetic as a ray_fedat round, at the cost of one core, so two
recipes can be compared side by side on a 2-core machine. The eps warm-up and the cosine lr
decay follow the CLI. Every --eval-every epochs and at the end: natural accuracy and the
per-round yardstick (PGD-20 on cross-entropy, then on the CW margin, step --eval-step-size)
on the validation images, with the training seconds so far. Then the final model under
the product's final attack (APGD-CE + APGD-T, counted per image over every attack) on
--final-images validation images, as one markdown row. No test image is touched: the
recipe is chosen on validation, and the test set gives the headline through the CLI.
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

from ray_fedat.data import hold_out_validation, load_npz  # noqa: E402
from ray_fedat.aggregation import fedavg, flatten_state, unflatten_state  # noqa: E402
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.round_eval import count_correct  # noqa: E402
from ray_fedat.final_attack import attack_counts  # noqa: E402
from ray_fedat.precision import prepare_model  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.schedule import epsilon_at, lr_at  # noqa: E402

EPSILON = 0.3


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="calfat", choices=("calfat", "trades", "pgd", "mart", "fgsm-rs", "natural"))
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
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="training forwards")
    p.add_argument("--eval-step-size", type=float, default=0.0375)
    p.add_argument("--trades-beta", type=float, default=6.0)
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (averaging interval)")
    p.add_argument("--warmup", type=int, default=2, help="eps warm-up rounds")
    p.add_argument("--final-attack", default="apgd", choices=("apgd", "pgd-100", "autoattack"))
    p.add_argument("--final-images", type=int, default=500, help="validation images for the final attack")
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--calfat-scale", type=float, default=10.0, help="CalFAT's s (the authors' 10)")
    p.add_argument("--label", default="", help="the row's name")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = hold_out_validation(load_npz(mnist_8k_2k_npz(os.path.join(tempfile.mkdtemp(prefix="ablation_"),
                                                                         "mnist8k.npz"))), 0.1, 0)
    x, y = data.x_train, data.y_train
    x_val, y_val = data.x_val[: args.eval_images], data.y_val[: args.eval_images]
    shards = []
    for cid, idx in enumerate(np.array_split(np.arange(len(y)), args.clients)):  # the split is already shuffled
        ys = y[idx]
        shards.append(ClientShard(cid, x[idx], ys, torch.bincount(ys, minlength=10).float()))

    torch.manual_seed(0)
    model = prepare_model(build_model(args.model, (1, 28, 28), 10), torch.device("cpu"), args.precision)
    global_vec, spec = flatten_state(model.state_dict())
    print(f"{vars(args)}", flush=True)
    train_s = 0.0
    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        eps = epsilon_at(epoch, EPSILON, args.warmup)
        cfg = LocalTrainingConfig(args.method, args.local_epochs, args.batch_size,
                                  lr_at(epoch, args.epochs, args.lr, "cosine"), 0.9, 2e-4, eps,
                                  args.step_size * eps / EPSILON, args.attack_steps, args.trades_beta, 0.1, False,
                                  args.attack_start, args.precision, calfat_scale=args.calfat_scale)
        vectors = []
        for shard in shards:
            model.load_state_dict(unflatten_state(global_vec, spec))
            loss = train_client(model, shard, cfg, generator_for(0, epoch, shard.client_id), torch.device("cpu"))
            vectors.append(flatten_state(model.state_dict())[0])
        global_vec = fedavg(torch.stack(vectors), torch.tensor([float(len(s)) for s in shards]))
        model.load_state_dict(unflatten_state(global_vec, spec))
        train_s += time.perf_counter() - started
        line = f"epoch {epoch:>2}  train {train_s:6.1f} s  loss {loss:.3f}"
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            n, natural, ce = count_correct(model, x_val, y_val, epsilon=EPSILON, step_size=args.eval_step_size,
                                           steps=20, batch_size=200, seed=0, round_=epoch, losses=("ce",)).tolist()
            _, _, both = count_correct(model, x_val, y_val, epsilon=EPSILON, step_size=args.eval_step_size, steps=20,
                                       batch_size=200, seed=0, round_=epoch).tolist()
            line += (f"  val natural {100 * natural / n:5.1f}%  PGD-20 CE {100 * ce / n:5.1f}%"
                     f"  CE+margin {100 * both / n:5.1f}%")
        print(line, flush=True)
    started = time.perf_counter()
    final = attack_counts(model, data.x_val[: args.final_images], data.y_val[: args.final_images], args.final_attack,
                          epsilon=EPSILON, step_size=args.eval_step_size, yardstick_steps=20, num_classes=10,
                          batch_size=250, seed=0)
    n, natural, yardstick, strong = final["counts"].tolist()
    print(f"final attack {time.perf_counter() - started:.0f} s; checks: {final['checks']}")
    print(f"| {args.label or vars(args)} | {args.epochs} | {train_s:.0f} | {100 * natural / n:.1f}% | "
          f"{100 * yardstick / n:.1f}% | {100 * strong / n:.1f}% ({args.final_attack}, {int(n)} validation images) |", flush=True)


if __name__ == "__main__":
    main()
