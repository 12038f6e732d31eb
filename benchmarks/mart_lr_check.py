"""Rounds 1-2 of the methods grid's Dirichlet(0.5) federation of 4 clients, in one process (no Ray): does the
global model of METHOD at learning rate LR train, or fall to chance? Natural accuracy on 800 validation images
(training images held out, never the test set), after FedAvg by sample count; eps 0.1 then 0.2 as the MNIST
recipe's warm-up; SmallCNN, batch 64, 5 attack steps of 0.075 from a uniform start, as the MNIST preset.

    python benchmarks/common.py runs/mnist8k.npz
    python benchmarks/mart_lr_check.py mart:0.04 mart:0.01      # METHOD:LR ...
"""
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client  # noqa: E402
from ray_fedat.data import load_npz  # noqa: E402
from ray_fedat.models import build_model  # noqa: E402
from ray_fedat.partition import make_partition  # noqa: E402

torch.set_num_threads(1)  # one thread, as a worker on a 2-core machine has
d = load_npz(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runs", "mnist8k.npz"))
g = torch.Generator().manual_seed(0)
perm = torch.randperm(len(d.y_train), generator=g)
tr, va = perm[:7200], perm[7200:]
x, y = d.x_train[tr], d.y_train[tr]
xv, yv = d.x_train[va].float() / 255, d.y_train[va]
parts = make_partition(y.numpy(), 4, "dirichlet", 0, beta=0.5)
shards = [ClientShard(i, x[p], y[p], torch.bincount(y[p], minlength=10).float()) for i, p in enumerate(parts)]
for method, lr in [(a, float(b)) for a, b in (s.split(":") for s in sys.argv[1:])]:
    torch.manual_seed(0)
    glob = build_model("smallcnn", d.shape, 10)
    t, out = time.time(), []
    for rnd, eps in ((1, 0.1), (2, 0.2)):
        states, sizes, losses = [], [], []
        for s in shards:
            m = copy.deepcopy(glob)
            cfg = LocalTrainingConfig(method, 1, 64, lr, 0.9, 2e-4, eps, 0.075, 5, 6.0, 0.1, False, attack_start="uniform")
            losses.append(train_client(m, s, cfg, torch.Generator().manual_seed(rnd * 10 + s.client_id), torch.device("cpu")))
            states.append(m.state_dict())
            sizes.append(len(s))
        w = torch.tensor(sizes, dtype=torch.float); w /= w.sum()
        glob.load_state_dict({k: sum(wi * st[k] for wi, st in zip(w, states)) for k in states[0]})
        with torch.no_grad():
            acc = (glob.eval()(xv).argmax(1) == yv).float().mean().item()
        glob.train()
        out.append((rnd, round(acc, 3), [round(l, 3) for l in losses]))
    print(f"{method} lr {lr}: {out} ({time.time()-t:.0f} s)", flush=True)
