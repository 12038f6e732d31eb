"""The final attack's pace against its batch size (issue 32, item 5).

The yardstick, then APGD-CE + APGD-T on the images it left (final_attack.attack_counts, what a
worker runs), on the same N class-stratified test images of one saved model, in one process
with one thread (a worker's share on a 2-worker, 2-core run), once per batch size. Prints
images/s per batch size and the robust counts: the batch size changes each batch's seeded
starts, not the attack, so the counts may differ by a few images and no more.

  python benchmarks/common.py runs/mnist8k.npz                  # the 8k/2k split of ../shared's MNIST
  python -m ray_fedat.train --dataset npz --data-file runs/mnist8k.npz --preset mnist --name pace
  python benchmarks/final_attack_pace.py --checkpoint runs/pace/best_robust.pt \
      --data-file runs/mnist8k.npz --images 200 --batch-sizes 64 200

Time it alone on the machine (check `uptime`).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ray_fedat.config import parse_config  # noqa: E402
from ray_fedat.data import load_npz  # noqa: E402
from ray_fedat.final_attack import attack_counts, stratified_subset  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a run's best_robust.pt or best_natural.pt")
    p.add_argument("--data-file", required=True, help="the run's npz (its test split is attacked)")
    p.add_argument("--preset", default="mnist", help="the recipe whose epsilon and yardstick the run used")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 200])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    cfg = parse_config(["--dataset", "npz", "--data-file", args.data_file, "--preset", args.preset])
    saved = torch.load(args.checkpoint, weights_only=True)
    model = build_model(saved["model"], tuple(saved["shape"]), saved["num_classes"])
    model.load_state_dict(saved["state_dict"])
    data = load_npz(args.data_file)
    chosen = stratified_subset(data.y_test, args.images)
    x, y = data.x_test[chosen], data.y_test[chosen]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{args.checkpoint} (round {saved.get('round')}), {len(y)} images, {args.threads} thread(s), {cpu}")
    print("| batch | seconds | images/s | natural | yardstick | APGD-CE + APGD-T |")
    print("|---|---|---|---|---|---|")
    paces = {}
    for batch in args.batch_sizes:
        start = time.perf_counter()
        out = attack_counts(model, x, y, "apgd", epsilon=cfg.epsilon, step_size=cfg.eval_step_size,
                            yardstick_steps=cfg.eval_steps, num_classes=saved["num_classes"], batch_size=batch,
                            seed=cfg.seed)
        seconds = time.perf_counter() - start
        n, natural, yardstick, strong = (int(v) for v in out["counts"].tolist())
        paces[batch] = n / seconds
        print(f"| {batch} | {seconds:.1f} | {n / seconds:.2f} | {natural} | {yardstick} | {strong} |", flush=True)
    first, last = args.batch_sizes[0], args.batch_sizes[-1]
    print(f"batch {last} over batch {first}: {paces[last] / paces[first]:.2f}x images/s")


if __name__ == "__main__":
    main()
