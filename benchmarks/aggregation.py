"""Aggregation cost: all_gather + FedAvg of client models vs a plain all_reduce, by model size.

    python benchmarks/aggregation.py [--repeats 10]

Two Ray Train workers (gloo, CPU) each hold one client's flattened model (the TRADES
small CNN for MNIST, a CIFAR ResNet-18) and aggregate it the way rounds did before issue 16:
all_gather of every vector, then `aggregate('fedavg')`. For comparison, the same
tensor goes through one `all_reduce` (what plain averaging would need, but which cannot do
median/trimmed-mean or per-client weights after the fact). Reports time per aggregation,
bytes each rank receives, GB/s, and the ratio last.
"""
import argparse
import json
import os
import tempfile
import time

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train.torch import TorchTrainer

MODELS = {"smallcnn (MNIST)": ("smallcnn", (1, 28, 28)), "resnet18 (CIFAR-10)": ("resnet18", (3, 32, 32))}


def measure(config):
    from ray_fedat.aggregation import aggregate
    from ray_fedat.models import build_model

    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    torch.set_num_threads(1)
    results = {}
    for label, (name, shape) in MODELS.items():
        dim = sum(p.numel() for p in build_model(name, shape, 10).state_dict().values())
        vec = torch.randn(dim)
        timings = {"gather": [], "allreduce": []}
        for rep in range(config["repeats"] + 1):  # the first repetition warms up
            dist.barrier()
            t = time.perf_counter()
            rows = torch.empty(world, dim)  # the gather-everything path: every vector to every worker
            dist.all_gather(list(rows.unbind(0)), vec)
            aggregate("fedavg", rows, torch.ones(world))
            gathered = time.perf_counter() - t
            dist.barrier()
            t = time.perf_counter()
            reduced = vec.clone()
            dist.all_reduce(reduced)
            reduced /= world
            if rep:
                timings["gather"].append(gathered)
                timings["allreduce"].append(time.perf_counter() - t)
        results[label] = {"params": dim, "world": world,
                          "gather_s": sorted(timings["gather"])[len(timings["gather"]) // 2],
                          "allreduce_s": sorted(timings["allreduce"])[len(timings["allreduce"]) // 2]}
    if rank == 0:  # one host: the driver reads rank 0's file
        with open(config["out"], "w") as f:
            json.dump(results, f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out = os.path.join(tempfile.mkdtemp(prefix="aggbench_"), "results.json")
    TorchTrainer(measure, train_loop_config={"repeats": args.repeats, "out": out},
                 scaling_config=ray.train.ScalingConfig(num_workers=2),
                 run_config=ray.train.RunConfig(name=f"aggbench-{int(time.time())}",
                                                storage_path=os.path.dirname(out))).fit()
    ray.shutdown()
    with open(out) as f:
        results = json.load(f)
    ratios = []
    for label, r in results.items():
        world, mbytes = r["world"], r["params"] * 4 / 1e6
        gather_bytes = (world - 1) * r["params"] * 4  # each rank receives the other ranks' vectors
        reduce_bytes = 2 * (world - 1) / world * r["params"] * 4  # ring all_reduce, per rank
        print(f"{label:<20} {r['params'] / 1e6:6.2f} M params ({mbytes:6.1f} MB): "
              f"all_gather+FedAvg {1e3 * r['gather_s']:7.1f} ms ({gather_bytes / r['gather_s'] / 1e9:5.2f} GB/s), "
              f"all_reduce {1e3 * r['allreduce_s']:7.1f} ms ({reduce_bytes / r['allreduce_s'] / 1e9:5.2f} GB/s)")
        ratios.append((label, r["gather_s"] / r["allreduce_s"]))
    print("time ratio all_gather+FedAvg / all_reduce: " + ", ".join(f"{lbl} {x:.2f}x" for lbl, x in ratios))


if __name__ == "__main__":
    main()
