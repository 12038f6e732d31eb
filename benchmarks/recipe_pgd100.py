"""The MNIST default recipe judged by strong attacks: PGD-100 on all 2k test images, and
AutoAttack's APGD-CE + APGD-T on a subset (so that a gain is not gradient masking).

    python benchmarks/recipe_pgd100.py [--budget 540] [--only 0 1] [--apgd-samples 100]

Real MNIST 8k/2k (../shared/data/mnist-t10k), 2 workers x 1 IID client, --time-budget
BUDGET, our MNIST defaults (10% of the training images held out for choosing the best
models) with the variants below. Each run's final model is scored by --final-attack pgd-100
(natural, PGD-20 and PGD-100 at step 0.01 on the same 2k images), then by
`python -m ray_fedat.evaluate --attack apgd` on --apgd-samples fixed class-stratified test images.
Takes about len(variants) x (BUDGET + 420) seconds on this 2-core machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mnist_8k_2k_npz, run_cli  # noqa: E402

VARIANTS = [
    ("defaults (CalFAT, 3 x 0.1 all run)", []),
    ("late attack 10 x 0.04 after half the rounds", ["--late-attack-steps", "10", "--late-step-size", "0.04"]),
    ("late attack 10 x 0.04 after 30% of the rounds", ["--late-attack-steps", "10", "--late-step-size", "0.04",
                                                       "--late-attack-from", "0.3"]),
    ("TRADES, late attack 10 x 0.04 after half", ["--method", "trades", "--late-attack-steps", "10",
                                                  "--late-step-size", "0.04"]),
]


def apgd_accuracy(model_file: str, samples: int) -> float:
    out = model_file + ".apgd.json"
    proc = subprocess.run([sys.executable, "-m", "ray_fedat.evaluate", "--checkpoint", model_file, "--attack", "apgd",
                           "--samples", str(samples), "--output", out], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed: {proc.stderr.strip().splitlines()[-1:]}")
    with open(out) as f:
        return json.load(f)["robust_acc"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=540.0, help="seconds per run")
    parser.add_argument("--only", type=int, nargs="*", help="run only these variants (default: all)")
    parser.add_argument("--apgd-samples", type=int, default=100)
    parser.add_argument("--out", default=None, help="where runs go (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="recipe_")
    os.makedirs(out, exist_ok=True)
    data = mnist_8k_2k_npz(os.path.join(out, "mnist8k.npz"))
    common = ["--dataset", "npz", "--data-file", data, "--preset", "mnist", "--workers", "2", "--clients", "2",
              "--time-budget", str(args.budget), "--eval-step-size", "0.01", "--eval-steps", "20",
              "--final-attack", "pgd-100"]
    print(f"| variant | rounds | natural | PGD-20 | PGD-100 | APGD-CE + APGD-T ({args.apgd_samples} images) |")
    print("|---|---|---|---|---|---|")
    with open(os.path.join(out, "log.txt"), "a") as log:
        for i, (label, extra) in enumerate(VARIANTS):
            if args.only is not None and i not in args.only:
                continue
            s = run_cli(common + extra, out, f"r{i}", log)
            final = s["final_attack"]["models"]["final"]
            apgd = apgd_accuracy(os.path.join(out, f"r{i}", "final_model.pt"), args.apgd_samples)
            print(f"| {label} | {s['rounds_completed']} | {100 * final['natural_acc']:.1f}% | "
                  f"{100 * final['yardstick_acc']:.1f}% | {100 * final['robust_acc']:.1f}% | {100 * apgd:.1f}% |",
                  flush=True)
    print(f"runs in {out}")


if __name__ == "__main__":
    main()
