"""Local FAT throughput: our client step vs a faithful re-implementation of the article's.

    python benchmarks/local_throughput.py [--images 1024] [--steps 40] [--bf16-images 256]
        [--model lenet|smallcnn] [--compile]

Same model (the article's LeNet unless --model), data (real MNIST when ../shared has it, else digits),
batch size, attack steps, CalFAT loss and thread count (1). The article's recipe: a
DataLoader over a Dataset of single PIL images turned into tensors one by one, and a KL
attack that recomputes the natural logits at every step, with trainable weights. Ours:
uint8 tensors sliced per batch, natural logits once per batch, weights frozen while
attacking, in fp32 (NCHW, what --precision auto gives on a CPU), fp32 channels_last, and
bf16 autocast + channels_last (--precision bf16). Prints adversarial examples per second
for each, interleaved, a per-op profile of one attack step in fp32 and bf16, and the ratio
last. --compile adds the rows of `--compile on` (model.compile(), compiled once on the timed
images first, so the rows are the steady state a worker reaches after its first round; the
compile time is printed). bf16 runs on fewer images (--bf16-images): on a CPU without AVX512-BF16/AMX it is
slow, and examples per second do not depend on how many images are timed.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import to_tensor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.federation import generator_for  # noqa: E402
from ray_fedat.losses import calibrate  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.precision import Forward, prepare_model  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import MNIST_DIR  # noqa: E402


class SingleImages(Dataset):
    """What torchvision's MNIST does per sample: uint8 array -> PIL image -> tensor."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return to_tensor(Image.fromarray(self.images[i], mode="L")), int(self.labels[i])


def article_kl_adv(model, x, counts, eps, step, steps):
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(calibrate(model(x_adv), counts), dim=1),
                               F.softmax(calibrate(model(x), counts), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    return x_adv


def article_epoch(model, images, labels, counts, args) -> float:
    loader = DataLoader(SingleImages(images, labels), batch_size=args.batch_size, shuffle=True, num_workers=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
    model.train()
    started = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        x_adv = article_kl_adv(model, x, counts, args.epsilon, args.step_size, args.steps)
        model.train()
        loss = F.cross_entropy(calibrate(model(x_adv), counts), y)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


COMPILED = {}  # (precision, channels_last) -> the compiled model, built once: compiling is paid once per worker


def our_epoch(model, images, labels, counts, args, precision="fp32", channels_last=False, compiled=False) -> float:
    model = prepare_model(model, torch.device("cpu"), precision, channels_last)
    if compiled:  # what --compile on does on a worker: compile once, then every round reuses it
        key = (precision, channels_last)
        if key not in COMPILED:
            model.compile()
            started = time.perf_counter()
            # Warm-up on the timed images: every shape, grad mode and train/eval variant the epoch
            # meets gets compiled here (a worker pays this once, in its first round).
            our_epoch(model, images, labels, counts, args, precision)
            print(f"  compiling {precision}{' channels_last' if channels_last else ''}: "
                  f"{time.perf_counter() - started:.1f} s (once per worker)", flush=True)
            COMPILED[key] = model
        COMPILED[key].load_state_dict(model.state_dict())
        model = COMPILED[key]
    shard = ClientShard(0, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), counts)
    cfg = LocalTrainingConfig("calfat", 1, args.batch_size, 0.01, 0.9, 2e-4, args.epsilon, args.step_size, args.steps,
                              6.0, 0.1, False, precision=precision)
    started = time.perf_counter()
    train_client(model, shard, cfg, generator_for(0, 1, 0), torch.device("cpu"))
    return time.perf_counter() - started


# (row name, epoch function, precision, channels_last, compiled)
ROWS = [
    ("article", article_epoch, None, None, False),
    ("ours fp32", our_epoch, "fp32", False, False),
    ("ours fp32 channels_last", our_epoch, "fp32", True, False),
    ("ours bf16 channels_last", our_epoch, "bf16", True, False),
]
COMPILED_ROWS = [
    ("ours fp32 compiled", our_epoch, "fp32", False, True),
    ("ours bf16 cl compiled", our_epoch, "bf16", True, True),
]


def breakdown(images, counts, args, repeats=20):
    """Where an attack step's time goes: one forward of the batch, and one backward to the
    input. The article's step is forward(x_adv) + forward(x) + backward; ours drops the
    second forward, which bounds what removing it can gain."""
    model = build_model(args.model, (1, *images.shape[1:]), 10).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.from_numpy(images[: args.batch_size]).unsqueeze(1).float() / 255
    timings = {"forward": 0.0, "backward to input": 0.0}
    for _ in range(repeats):
        x_adv = x.clone().requires_grad_(True)
        t = time.perf_counter()
        out = calibrate(model(x_adv), counts).sum()
        timings["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        torch.autograd.grad(out, x_adv)
        timings["backward to input"] += time.perf_counter() - t
    f, b = (1e3 * v / repeats for v in timings.values())
    print(f"one attack step at batch {args.batch_size}: forward {f:.1f} ms, backward to input {b:.1f} ms -> "
          f"article step (2 forwards + backward) / ours (forward + backward) = {(2 * f + b) / (f + b):.2f}x")


def profile_step(images, counts, args, precision, channels_last, repeats=3, top=6):
    """The ops that dominate one attack step (forward + backward to the input), by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    model = prepare_model(build_model(args.model, (1, *images.shape[1:]), 10), torch.device("cpu"), precision,
                          channels_last).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    forward = Forward.for_model(model, precision, torch.device("cpu"))
    x = torch.from_numpy(images[: args.batch_size]).unsqueeze(1).float() / 255

    def step():
        x_adv = x.clone().requires_grad_(True)
        torch.autograd.grad(calibrate(forward(model, x_adv), counts).sum(), x_adv)

    step()  # warm-up: oneDNN primitive creation
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / repeats / 1e3
    ops = ", ".join(f"{e.key} {e.self_cpu_time_total / repeats / 1e3:.1f}" for e in events[:top])
    print(f"  {precision}{' channels_last' if channels_last else ''}: {total:.1f} ms per step; top ops (ms): {ops}")


def load_images(n):
    images_path = os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")
    if os.path.exists(images_path):
        from ray_fedat.data import read_idx_gz

        images = read_idx_gz(images_path)[:n].copy()
        labels = read_idx_gz(os.path.join(MNIST_DIR, "t10k-labels-idx1-ubyte.gz"))[:n].astype(np.int64)
        return images, labels, "real MNIST 28x28"
    from ray_fedat.data import load_digits

    d = load_digits()
    return d.x_train[:n, 0].numpy(), d.y_train[:n].numpy(), "sklearn digits 8x8 (no MNIST found)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--epsilon", type=float, default=0.3)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bf16-images", type=int, default=256, help="images for the bf16 row")
    parser.add_argument("--bf16-repeats", type=int, default=1, help="repeats of the bf16 row")
    parser.add_argument("--model", default="lenet", help="lenet (the article's) or smallcnn (our MNIST default)")
    parser.add_argument("--compile", action="store_true",
                        help="add rows with the model compiled as --compile on does (torch.compile, once)")
    args = parser.parse_args()
    rows = ROWS + (COMPILED_ROWS if args.compile else [])
    torch.set_num_threads(1)
    images, labels, source = load_images(args.images)
    counts = torch.bincount(torch.from_numpy(labels), minlength=10).float()
    print(f"data: {source}, {len(labels)} images ({min(args.bf16_images, len(labels))} for bf16), batch "
          f"{args.batch_size}, {args.steps} attack steps, eps {args.epsilon}, model {args.model}, 1 thread; "
          f"oneDNN bf16 kernels on this CPU: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    rate = {name: 0.0 for name, *_ in rows}
    for rep in range(args.repeats):  # interleaved, so drift on a shared machine hits all rows
        for name, epoch, precision, channels_last, compiled in rows:
            if precision == "bf16" and rep >= args.bf16_repeats:
                continue
            n = min(args.bf16_images, len(labels)) if precision == "bf16" else len(labels)
            torch.manual_seed(rep)
            model = build_model(args.model, (1, *images.shape[1:]), 10)
            extra = () if precision is None else (precision, channels_last, compiled)
            seconds = epoch(model, images[:n], labels[:n], counts, args, *extra)
            rate[name] = max(rate[name], n / seconds)
            print(f"  repeat {rep + 1}: {name:<24} {n / seconds:7.1f} adversarial examples/s", flush=True)
    breakdown(images, counts, args)
    print("profile of one attack step (forward + backward to the input), self CPU time:")
    for _, _, precision, channels_last, _ in ROWS[1:]:
        profile_step(images, counts, args, precision, channels_last)
    print(f"adversarial examples/s (best of {args.repeats}; bf16 best of {min(args.bf16_repeats, args.repeats)}):")
    for name, *_ in rows:
        print(f"  {name:<24} {rate[name]:7.1f}   {rate[name] / rate['article']:.2f}x the article recipe")
    if args.compile:
        pairs = [("fp32", "ours fp32 compiled", "ours fp32"), ("bf16 channels_last", "ours bf16 cl compiled",
                                                              "ours bf16 channels_last")]
        print("compiled / eager: " + ", ".join(f"{what} {rate[c] / rate[e]:.2f}x" for what, c, e in pairs if rate[e]))
    best_ours = max((name for name, *_ in rows[1:]), key=rate.get)
    print(f"throughput ratio ours ({best_ours}) / article: {rate[best_ours] / rate['article']:.2f}x; "
          f"bf16 / fp32: {rate['ours bf16 channels_last'] / rate['ours fp32']:.2f}x")


if __name__ == "__main__":
    main()
