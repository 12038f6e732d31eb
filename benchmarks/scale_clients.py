"""Aggregation memory and time per worker as the number of clients K grows.

    python benchmarks/scale_clients.py            # the full table (~10 min, up to ~14 GB RAM at peak)
    python benchmarks/scale_clients.py --quick    # small K only (~1 min)

Two worker processes (gloo on CPU, torch.multiprocessing; the same collectives Ray Train's
workers use) aggregate one round of K clients with a ResNet-18-sized state vector
(P = 11.18 M floats, 44.7 MB). Each worker makes its K/2 clients' vectors (the global
vector plus seeded noise: no training, the point is aggregation) one at a time, as the
round loop hands them over, then aggregates:

- new:    ray_fedat.federation.ClientUpdates (FedAvg as a running float64 sum, all_gather
          of W partial sums; robust rules keep K/W rows and exchange coordinate blocks by
          all_to_all);
- legacy: the gather-everything path (main before issue 16): a list of the worker's
          client vectors, `gather_client_vectors` (benchmarks/legacy_gather.py: all_gather of every client's vector onto
          every worker), then the rule on the K x P matrix.

Per configuration, both workers are fresh processes; the numbers are per worker, the
larger of the two: peak RSS (VmHWM, reset after setup) above the RSS before the round,
in MB and in units of P (4 P bytes), and the time of the aggregation step alone. The
goals (issue 16): FedAvg's peak grows by at most 3 P from K = 20 to K = 1000; the robust
rules stay within K P / W plus a few P. Configurations the machine cannot hold are left
out: legacy FedAvg beyond K = 50 (K x P x 1.5: 6.7 GB per worker at K = 100, killed for
memory here; 67 GB at K = 1000), legacy robust rules at
K = 100 (the gathered 4.5 GB plus a K x P sort or float64 copy), and the new robust rules
at K = 1000 with the full model (K P / W = 22 GB per worker): those run with a tenth of it.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESNET18_PARAMS = 11_181_642  # len(flatten_state(build_model("resnet18", (3, 32, 32), 10).state_dict()))
WORLD = 2


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def client_vector(base: torch.Tensor, bank: torch.Tensor, cid: int) -> torch.Tensor:
    """A distinct vector per client, cheaply: the base plus a client-specific mix of two noise vectors."""
    return base + (0.01 * ((cid % 7) + 1)) * bank[cid % 2] + 1e-3 * cid


def measure(rank, path, rule, k, dim, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    from ray_fedat.aggregation import aggregate
    from legacy_gather import gather_client_vectors
    from ray_fedat.federation import ClientUpdates, assign_clients

    g = torch.Generator().manual_seed(0)
    base = torch.randn(dim, generator=g)
    bank = torch.randn(2, dim, generator=g)
    ids_by_rank = assign_clients(k, WORLD)
    mine = ids_by_rank[rank]
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    before_kb = status_kb("VmRSS")
    if path == "new":
        updates = ClientUpdates(rule, dim, len(mine), torch.device("cpu"))
        for cid in mine:
            updates.add(cid, client_vector(base, bank, cid), 100 + cid, 0.0)
        dist.barrier()
        t = time.perf_counter()
        _, _, _, result = updates.aggregate(ids_by_rank, 0.1, 1)
    else:
        vectors = [client_vector(base, bank, cid) for cid in mine]
        dist.barrier()
        t = time.perf_counter()
        _, rows, w, _ = gather_client_vectors(mine, vectors, [100 + c for c in mine], [0.0] * len(mine),
                                              max(len(b) for b in ids_by_rank), dim, torch.device("cpu"))
        result = aggregate(rule, rows, w, 0.1, 1)
    agg_s = time.perf_counter() - t
    peak_kb = status_kb("VmHWM")
    checksum = float(result[:1000].double().sum())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"peak_mb": (peak_kb - before_kb) / 1024, "agg_s": agg_s, "checksum": checksum}, f)
    dist.destroy_process_group()


def run_config(path, rule, k, dim):
    d = tempfile.mkdtemp(prefix="scale_clients_")
    mp.spawn(measure, args=(path, rule, k, dim, os.path.join(d, "store"), d), nprocs=WORLD, join=True)
    ranks = []
    for r in range(WORLD):
        with open(os.path.join(d, f"rank{r}.json")) as f:
            ranks.append(json.load(f))
    assert ranks[0]["checksum"] == ranks[1]["checksum"], "the workers disagree on the aggregate"
    return {"peak_mb": max(r["peak_mb"] for r in ranks), "agg_s": max(r["agg_s"] for r in ranks),
            "checksum": ranks[0]["checksum"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 10 and 20 only")
    parser.add_argument("--legacy-max-k", type=int, default=50,
                        help="largest K for the legacy path (it needs about 1.5 K x 45 MB per worker; K = 100, "
                        "6.7 GB per worker, was killed for memory on the 24 GB machine)")
    args = parser.parse_args()
    big, tenth = RESNET18_PARAMS, RESNET18_PARAMS // 10
    plan = []  # (path, rule, K, P)
    ks = (10, 20) if args.quick else (10, 20, 50, 100, 1000)
    for k in ks:
        plan.append(("new", "fedavg", k, big))
        if k <= args.legacy_max_k:
            plan.append(("legacy", "fedavg", k, big))
    for rule in ("median", "trimmed-mean", "krum", "multi-krum", "bulyan"):
        for k in (10,) if args.quick else (10, 100):
            plan.append(("new", rule, k, big))
            # legacy robust rules at K = 100: the K x P sort (values + int64 indices) or float64
            # distance copy on top of the gathered 4.5 GB does not fit here (~18 GB per worker)
            if k == 10 and rule in ("median", "krum"):
                plan.append(("legacy", rule, k, big))
    if not args.quick:  # K = 1000 rows of ResNet-18 are 22 GB per worker: a tenth of the model instead
        for rule in ("median", "trimmed-mean"):
            plan.append(("new", rule, 1000, tenth))
    print(f"{'path':<7} {'rule':<13} {'K':>5} {'P (M)':>6} {'peak/worker MB':>15} {'= x P':>7} "
          f"{'bound KP/W':>10} {'aggregation s':>14}", flush=True)
    results = {}
    for path, rule, k, dim in plan:
        r = run_config(path, rule, k, dim)
        results[(path, rule, k, dim)] = r
        p_mb = dim * 4 / 2 ** 20
        bound = "" if rule == "fedavg" else f"{k / WORLD:.0f} P"
        print(f"{path:<7} {rule:<13} {k:>5} {dim / 1e6:6.2f} {r['peak_mb']:15.0f} {r['peak_mb'] / p_mb:7.1f} "
              f"{bound:>10} {r['agg_s']:14.2f}", flush=True)
        if path == "legacy" and (("new", rule, k, dim) in results):
            new = results[("new", rule, k, dim)]
            if abs(new["checksum"] - r["checksum"]) > 1e-3 * max(1.0, abs(r["checksum"])):
                print(f"  ! new and legacy aggregates differ: {new['checksum']} vs {r['checksum']}")
    p_mb = big * 4 / 2 ** 20
    fed = {k: results[("new", "fedavg", k, big)]["peak_mb"] for k in ks}
    if 20 in fed and 1000 in fed:
        print(f"FedAvg peak growth K=20 -> K=1000 (new): {(fed[1000] - fed[20]) / p_mb:+.2f} P (goal <= 3 P)")
    for rule in ("fedavg", "median", "krum"):
        k = max((k for (p, r_, k, d) in results if p == "legacy" and r_ == rule and d == big), default=None)
        if k is not None and ("new", rule, k, big) in results:
            old, new = results[("legacy", rule, k, big)], results[("new", rule, k, big)]
            print(f"{rule} at K={k}: legacy / new peak memory per worker = {old['peak_mb']:.0f} / "
                  f"{new['peak_mb']:.0f} MB = {old['peak_mb'] / max(new['peak_mb'], 1):.1f}x; aggregation time "
                  f"{old['agg_s']:.2f} / {new['agg_s']:.2f} s")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
