"""GPU throughput of one client's adversarial training: the reference recipe vs ours, fp32 vs bf16.

    python benchmarks/gpu.py                       # on a CUDA machine
    python benchmarks/gpu.py --device cpu --images 16 --batch-size 8 --steps 1   # a quick check of the script

CIFAR-10-shaped generated data (uint8 3 x 32 x 32, 10 classes), ResNet-18 (CIFAR stem),
batch 128, CalFAT with a PGD-10 KL attack at eps 8/255, step 2/255, one worker, one process.
Rows, interleaved over --repeats:
- reference: the article's step: float images copied to the GPU batch by batch, the natural
  logits recomputed at every attack step, trainable weights while attacking, fp32, NCHW;
- ours fp32: our client step (data resident on the GPU, natural logits once per batch,
  frozen weights while attacking), fp32, NCHW;
- ours fp32 channels_last: what `--precision fp32` runs on CUDA;
- ours bf16 channels_last: what `--precision auto` runs on a bf16-capable GPU.
Prints images/s and peak GPU memory per row, the ratios, then a CLI smoke run: --device
cuda, 1 worker (NCCL), 2 rounds on a CIFAR-shaped npz with --preset cifar10.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.losses import calibrate  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.precision import configure_backends, prepare_model  # noqa: E402

EPS, STEP = 8 / 255, 2 / 255


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reference_epoch(model, x_uint8, y, counts, args, device) -> None:
    """The article's recipe: host batches, KL attack recomputing natural logits, fp32."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    counts = counts.to(device)
    order = torch.randperm(len(y))
    model.train()
    for s in range(0, len(y), args.batch_size):
        idx = order[s:s + args.batch_size]
        x = (x_uint8[idx].float() / 255).to(device)  # a DataLoader's float batch, copied each time
        t = y[idx].to(device)
        model.eval()
        x_adv = x.detach() + 0.001 * torch.randn_like(x)
        for _ in range(args.steps):
            x_adv.requires_grad_()
            loss_kl = F.kl_div(F.log_softmax(calibrate(model(x_adv), counts), dim=1),
                               F.softmax(calibrate(model(x), counts), dim=1), reduction="sum")
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + STEP * torch.sign(grad.detach())
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - EPS), x + EPS), 0.0, 1.0)
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(calibrate(model(x_adv), counts), t).backward()
        optimizer.step()


def our_epoch(model, shard, args, device, precision) -> None:
    cfg = LocalTrainingConfig("calfat", 1, args.batch_size, 0.01, 0.9, 2e-4, EPS, STEP, args.steps, 6.0, 0.1, True,
                              precision=precision)
    train_client(model, shard, cfg, generator_for(0, 1, 0), device)


# (row, precision, channels_last); precision None = the reference recipe
ROWS = [("reference (article) fp32", None, False), ("ours fp32", "fp32", False),
        ("ours fp32 channels_last", "fp32", True), ("ours bf16 channels_last", "bf16", True)]


def throughput(args, device):
    rng = np.random.default_rng(0)
    x_host = torch.from_numpy(rng.integers(0, 256, (args.images, 3, 32, 32), dtype=np.uint8))
    y_host = torch.from_numpy(rng.integers(0, 10, args.images)).long()
    counts = torch.bincount(y_host, minlength=10).float()
    shard_on_device = ClientShard(0, x_host, y_host, counts).to(device)  # moved once, as the worker does
    rate = {name: 0.0 for name, *_ in ROWS}
    peak = {}
    for rep in range(args.repeats + 1):  # repeat 0 warms up (cuDNN autotuning, allocator)
        for name, precision, channels_last in ROWS:
            torch.manual_seed(0)
            model = prepare_model(build_model("resnet18", (3, 32, 32), 10), device, precision or "fp32", channels_last)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            started = time.perf_counter()
            if precision is None:
                reference_epoch(model, x_host, y_host, counts, args, device)
            else:
                our_epoch(model, shard_on_device, args, device, precision)
            sync(device)
            seconds = time.perf_counter() - started
            if rep == 0:
                continue
            rate[name] = max(rate[name], args.images / seconds)
            if device.type == "cuda":
                peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"  repeat {rep}: {name:<26} {args.images / seconds:8.1f} images/s", flush=True)
    print(f"ResNet-18, {args.images} CIFAR-shaped images, batch {args.batch_size}, CalFAT PGD-{args.steps} "
          f"eps 8/255 step 2/255, {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"best of {args.repeats}:")
    print(f"  {'row':<26} {'images/s':>9} {'vs reference':>13} {'peak GPU memory':>16}")
    for name, *_ in ROWS:
        mem = f"{peak[name]:.2f} GiB" if name in peak else "-"
        print(f"  {name:<26} {rate[name]:9.1f} {rate[name] / rate[ROWS[0][0]]:12.2f}x {mem:>16}")
    print(f"ratio ours bf16 channels_last / reference: {rate[ROWS[3][0]] / rate[ROWS[0][0]]:.2f}x; "
          f"bf16 channels_last / fp32: {rate[ROWS[3][0]] / rate[ROWS[1][0]]:.2f}x")


def cli_smoke(args, device):
    """The real CLI on the GPU: 1 worker (so NCCL with one rank), 2 rounds."""
    out = tempfile.mkdtemp(prefix="gpu_smoke_")
    rng = np.random.default_rng(1)
    path = os.path.join(out, "cifar_shaped.npz")
    n_test, classes = args.cli_test_images, min(10, args.cli_images)
    np.savez(path, x_train=rng.integers(0, 256, (args.cli_images, 32, 32, 3), dtype=np.uint8),
             y_train=np.arange(args.cli_images) % classes,
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8), y_test=np.arange(n_test) % classes)
    argv = ["--dataset", "npz", "--data-file", path, "--preset", "cifar10", "--device", device.type,
            "--workers", "1", "--rounds", str(args.cli_rounds), "--attack-steps", str(args.steps),
            "--eval-steps", str(min(args.steps, 10)), "--storage-path", out, "--name", "smoke"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "ray_fedat.train", *argv], capture_output=True, text=True, env=env)
    print(proc.stdout.strip())
    if proc.returncode != 0:
        print(proc.stderr.strip()[-3000:])
        raise SystemExit(f"CLI smoke run failed (exit {proc.returncode})")
    with open(os.path.join(out, "smoke", "summary.json")) as f:
        summary = json.load(f)
    worker = summary["workers"][0]
    print(f"CLI smoke run: {summary['status']}, {summary['rounds_completed']} rounds, device {worker['device']}, "
          f"precision {worker['precision']}, {summary['placement']}, {time.time() - started:.1f} s in all")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cli-images", type=int, default=5000)
    parser.add_argument("--cli-test-images", type=int, default=512)
    parser.add_argument("--cli-rounds", type=int, default=2)
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI smoke run")
    parser.add_argument("--cli-only", action="store_true", help="only the CLI smoke run")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run on a GPU machine, or pass --device cpu to check the script")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    configure_backends(device, deterministic=False)  # cudnn.benchmark, as the workers do
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, bf16 on this GPU: "
          f"{torch.cuda.is_bf16_supported() if device.type == 'cuda' else 'n/a'}")
    if not args.cli_only:
        throughput(args, device)
    if not args.no_cli:
        cli_smoke(args, device)


if __name__ == "__main__":
    main()
