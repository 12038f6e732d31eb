"""LeNet's max-pool before its tanh (models.py) against the article's order (tanh, then pool): the
same local training, timed in one run.

    python benchmarks/activation_order.py [--images 512] [--repeats 3] [--steps 10]

For LeNet (the same-job benchmark's model; SmallCNN's ReLUs, moved the same way, measured 0.985x
and stay where TRADES put them): one client's CalFAT epoch (the MNIST threat model, --steps attack steps, batch 64) on real MNIST (or
digits without ../shared), one thread, as a worker on a 2-core machine has; the two orders
alternate, each from the same initial weights, and the best of --repeats is kept. Prints
images/s, the speed-up, and whether the two trained models are equal.
Run it alone on the machine.
"""
import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from local_throughput import load_images  # noqa: E402
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.models import activation_before_pooling, build_model  # noqa: E402


def epoch_seconds(model, shard, cfg) -> float:
    started = time.perf_counter()
    train_client(model, shard, cfg, generator_for(0, 1, 0), torch.device("cpu"))
    return time.perf_counter() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    images, labels, what = load_images(args.images)
    x, y = torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)
    shard = ClientShard(0, x, y, torch.bincount(y, minlength=10).float())
    cfg = LocalTrainingConfig("calfat", 1, 64, 0.01, 0.9, 2e-4, 0.3, 0.01, args.steps, 6.0, 0.1, False)
    print(f"{what}, {len(y)} images, CalFAT with {args.steps} attack steps, batch 64, one thread, "
          f"best of {args.repeats}", flush=True)
    for name in ("lenet",):
        torch.manual_seed(0)
        initial = build_model(name, tuple(x.shape[1:]), 10)
        best = {"pool first (ours)": float("inf"), "activation first (published)": float("inf")}
        trained = {}
        for order in best:  # warm-up: the first epoch of a process pays for allocation and kernel choice
            model = copy.deepcopy(initial)
            epoch_seconds(model if order.startswith("pool") else activation_before_pooling(model), shard, cfg)
        for _ in range(args.repeats):
            for order in best:
                model = copy.deepcopy(initial)
                net = model if order.startswith("pool") else activation_before_pooling(model)
                best[order] = min(best[order], epoch_seconds(net, shard, cfg))
                trained[order] = model.state_dict()
        ours, published = best.values()
        a, b = trained.values()
        same = "bit for bit" if all(torch.equal(a[k], b[k]) for k in a) else \
            f"max difference {max((a[k] - b[k]).abs().max().item() for k in a):.1e}"
        print(f"{name}: pool first {len(y) / ours:.1f} images/s, activation first {len(y) / published:.1f} "
              f"images/s: speed-up {published / ours:.3f}x; trained models equal: {same}", flush=True)


if __name__ == "__main__":
    main()
