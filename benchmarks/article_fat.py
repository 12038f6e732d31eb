"""The article's federated CalFAT recipe as a plain torchrun job: the baseline that
`same_job.py` times our CLI against.

    torchrun --standalone --nproc_per_node 2 benchmarks/article_fat.py --data-file mnist8k.npz [--rounds 3]

What the article's code does, one process per client, gloo: each round every rank trains
its client for one local epoch from the global model (a DataLoader over single PIL images
turned into tensors one by one, batch 128, SGD lr 0.01 momentum 0.9 weight decay 2e-4, the
calibrated cross-entropy on KL-PGD examples whose loop recomputes the natural logits at
every step: `local_throughput.py`'s `article_epoch`), then the ranks average their
parameters with all_reduce and score the global model on the test set: natural accuracy
and PGD-20 (cross-entropy, random start, eps 0.3, step 0.01, as the article's white-box
evaluation). The test set is split over the ranks, which is kinder to the baseline than
the article's one evaluating server. It trains on the same images as our CLI with its
default 10% validation hold-out (`hold_out_validation`, same seed), so both jobs train on
the same 7200 images; the article has no validation set and scores the 2000 test images
every round.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_throughput import SingleImages, article_epoch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ray_fedat.models import build_model  # noqa: E402


def article_pgd(model, x, y, eps, step, steps):
    """The article's white-box PGD: uniform random start, signed gradient of the cross-entropy."""
    x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    return x_adv


def evaluate(model, images, labels, args):
    """Natural and PGD-20 correct counts on this rank's share of the test set."""
    model.eval()
    natural = robust = 0
    for x, y in DataLoader(SingleImages(images, labels), batch_size=200):
        with torch.no_grad():
            natural += (model(x).argmax(1) == y).sum().item()
        x_adv = article_pgd(model, x, y, args.epsilon, args.eval_step_size, args.eval_steps)
        with torch.no_grad():
            robust += (model(x_adv).argmax(1) == y).sum().item()
    model.train()
    return natural, robust


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-file", required=True, help="an npz with x_train, y_train, x_test, y_test (uint8 28x28)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held out like our CLI, to train on the same images")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training attack steps (KL-PGD)")
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-step-size", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core per process, as our workers get
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    started = time.perf_counter()

    raw = np.load(args.data_file)
    x_train, y_train = raw["x_train"], raw["y_train"].astype(np.int64)
    n = len(y_train)
    n_val = int(round(args.val_fraction * n)) if args.val_fraction > 0 else 0
    keep = np.sort(np.random.default_rng([args.seed, 0x7A1]).permutation(n)[n_val:])  # = hold_out_validation
    x_train, y_train = x_train[keep], y_train[keep]
    mine = np.random.default_rng(args.seed).permutation(len(y_train))[rank::world]  # IID: one client per rank
    images, labels = x_train[mine], y_train[mine]
    counts = torch.bincount(torch.from_numpy(labels), minlength=10).float()
    test_x, test_y = raw["x_test"][rank::world], raw["y_test"].astype(np.int64)[rank::world]

    torch.manual_seed(args.seed)  # the same initial global model on every rank
    model = build_model("lenet", (1, *x_train.shape[1:]), 10)
    for r in range(1, args.rounds + 1):
        t0 = time.perf_counter()
        article_epoch(model, images, labels, counts, args)
        t1 = time.perf_counter()
        with torch.no_grad():  # FedAvg of equal-sized clients
            for p in model.state_dict().values():
                if p.is_floating_point():
                    dist.all_reduce(p)
                    p /= world
        t2 = time.perf_counter()
        scores = torch.tensor(evaluate(model, test_x, test_y, args) + (len(test_y),), dtype=torch.float64)
        dist.all_reduce(scores)
        t3 = time.perf_counter()
        if rank == 0:
            natural, robust, total = scores.tolist()
            print(f"round {r}: train {t1 - t0:.1f} s, average {t2 - t1:.2f} s, eval {t3 - t2:.1f} s; "
                  f"natural {100 * natural / total:.1f}%, PGD-{args.eval_steps} {100 * robust / total:.1f}%", flush=True)
    if rank == 0:
        print(f"article recipe: {args.rounds} rounds in {time.perf_counter() - started:.1f} s after start-up", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
