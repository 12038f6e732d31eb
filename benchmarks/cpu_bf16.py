"""One attack step on this CPU in bf16 vs fp32, for SmallCNN and LeNet: what `--precision auto` decides.

    python benchmarks/cpu_bf16.py [--batch-size 64] [--steps 20] [--repeats 3] [--threads 1]

An attack step is what adversarial training repeats most: a forward of the batch and a
backward to the input (weights frozen), on MNIST-shaped 1 x 28 x 28 images, the same Forward
the workers use. Rows, interleaved over --repeats (the best repeat counts, as drift on a
shared machine then hits every row): fp32 NCHW (what fp32 runs on a CPU), fp32 channels_last,
bf16 autocast + channels_last (what bf16 runs on a CPU). Prints ms per step and bf16 / fp32,
and what --precision auto picks here and why. The table is in CPU time of this process
(time.process_time; one thread by default): on a machine shared with other jobs, wall time
mostly measures how long the process waited for a core.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ray_fedat.precision import Forward, choose_precision, prepare_model  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402

CPU = torch.device("cpu")
ROWS = [("fp32", False), ("fp32", True), ("bf16", True)]  # (precision, channels_last)


def ms_per_step(model_name, precision, channels_last, x, steps):
    torch.manual_seed(0)
    model = prepare_model(build_model(model_name, (1, 28, 28), 10), CPU, precision, channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forward = Forward.for_model(model, precision, CPU)

    def step():
        x_adv = x.clone().requires_grad_(True)
        torch.autograd.grad(forward(model, x_adv).logsumexp(1).sum(), x_adv)

    step()  # warm-up: oneDNN primitive creation
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return 1e3 * (time.perf_counter() - wall) / steps, 1e3 * (time.process_time() - cpu) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["smallcnn", "lenet"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown CPU") if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"{cpu}, torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size} x 1 x 28 x 28, "
          f"{args.steps} steps per timing, best of {args.repeats}; --precision auto here: {choose_precision('auto', CPU)}")
    x = torch.rand(args.batch_size, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    best = {(m, p, c): float("inf") for m in args.models for p, c in ROWS}
    for rep in range(args.repeats):
        for m in args.models:
            for p, c in ROWS:
                wall, cpu = ms_per_step(m, p, c, x, args.steps)
                best[(m, p, c)] = min(best[(m, p, c)], cpu)
                print(f"  repeat {rep + 1}: {m:<9} {p} {'channels_last' if c else 'NCHW':<13} {cpu:7.2f} ms/step CPU "
                      f"time ({wall:7.2f} ms wall)", flush=True)
    print(f"CPU time per attack step, best of {args.repeats}:")
    print(f"{'model':<9} {'fp32 NCHW':>10} {'fp32 CL':>10} {'bf16 CL':>10} {'bf16 / fp32 speed-up':>22}")
    for m in args.models:
        f, fc, b = (best[(m, p, c)] for p, c in ROWS)
        print(f"{m:<9} {f:8.2f}ms {fc:8.2f}ms {b:8.2f}ms {f / b:21.2f}x")


if __name__ == "__main__":
    main()
