"""A worker process's first client round against its later ones, with torch.optim.SGD and with
ray_fedat's MomentumSGD (issue 32: start-up). torch.optim.Optimizer imports torch._dynamo on its
first use; every Ray Train worker process paid that in its first round, and so did every
restarted worker group.

Each optimizer runs in a fresh Python process (the import happens once per process): one digits
client (650 images, the default CalFAT recipe, LeNet, one thread), three rounds, seconds each.
Prints the first round's extra cost (first minus the mean of the later ones) for both, in one run.

  python benchmarks/first_round.py

Time it alone on the machine (check `uptime`).
"""
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import torch
from ray_fedat.client import ClientShard, train_client
from ray_fedat.config import parse_config
from ray_fedat.data import load_dataset
from ray_fedat.federation import generator_for
from ray_fedat.models import build_model
from ray_fedat.precision import prepare_model
from ray_fedat.worker import local_training_config
import ray_fedat.client as client

if sys.argv[1] == "torch":  # what client.py used before: torch.optim.SGD
    class TorchSGD(torch.optim.SGD):
        def zero_grad(self):
            super().zero_grad(set_to_none=True)
    client.MomentumSGD = TorchSGD
torch.set_num_threads(1)
cfg = parse_config(["--dataset", "digits"])
data = load_dataset(cfg)
x, y = torch.as_tensor(data.x_train[:650]), torch.as_tensor(data.y_train[:650])
shard = ClientShard(0, x, y, torch.bincount(y, minlength=10).float())
torch.manual_seed(0)
model = prepare_model(build_model(cfg.model, list(x.shape[1:]), 10), torch.device("cpu"), "fp32")
local = local_training_config(cfg, False, "fp32")
seconds = []
for round_ in range(1, 4):
    t = time.perf_counter()
    train_client(model, shard, local, generator_for(0, round_, 0), torch.device("cpu"))
    seconds.append(time.perf_counter() - t)
print(json.dumps({"seconds": seconds, "dynamo_imported": "torch._dynamo" in sys.modules}))
"""


def main():
    repo = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    results = {}
    for optimizer in ("torch", "ours"):
        out = subprocess.run([sys.executable, "-c", CHILD, optimizer], capture_output=True, text=True, cwd=repo,
                             check=True)
        results[optimizer] = json.loads(out.stdout.strip().splitlines()[-1])
    for optimizer, label in (("torch", "torch.optim.SGD"), ("ours", "ray_fedat MomentumSGD")):
        s = results[optimizer]["seconds"]
        extra = s[0] - sum(s[1:]) / len(s[1:])
        print(f"{label:24s} rounds {' '.join(f'{x:.2f}' for x in s)} s; first round's extra {extra:.2f} s; "
              f"torch._dynamo imported: {results[optimizer]['dynamo_imported']}")
    saved = results["torch"]["seconds"][0] - results["ours"]["seconds"][0]
    print(f"first round: {saved:.2f} s less per worker process")


if __name__ == "__main__":
    main()
