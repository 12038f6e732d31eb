"""The sharded aggregation paths on 2 real gloo ranks (torch.multiprocessing, no Ray) give
what the single-process rules give on the same vectors, identically on both ranks.

RAY_FEDAT_TEST_DEVICE=cuda (benchmarks/gpu_check.sh) puts the vectors on the GPU: gloo's 2
ranks then exchange CUDA tensors, and the one-rank test runs through NCCL. One GPU allows one
NCCL rank only (NCCL refuses two ranks on the same GPU); with one rank the rules skip their
collectives, so that test calls each collective they use directly."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_fedat.aggregation import aggregate

RULES = ("fedavg", "sfat", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
SFAT_TOPK = 2  # the two lowest losses, clients 0 and 1: on different ranks in the interleaved placement
DIM = 1003  # not a multiple of the block sizes: the last block is ragged
DEVICE = os.environ.get("RAY_FEDAT_TEST_DEVICE", "cpu")


def client_vectors(k):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(k, DIM, generator=g) * torch.rand(k, 1, generator=g) * 3
    x[k - 2:] += 40  # two far-away clients, so that Krum's choice is not a near-tie
    weights = torch.randint(10, 500, (k,), generator=g).float()
    return x, weights


def run_rank(rank, world, store_file, out_dir, placements, backend="gloo", device="cpu"):
    from ray_fedat.federation import ClientUpdates, sharded_aggregate

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)  # one GPU: every rank on it (gloo only; NCCL needs one GPU per rank)
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, ids_by_rank in placements.items():
        k = sum(len(ids) for ids in ids_by_rank)
        x, weights = client_vectors(k)
        x = x.to(dev)
        mine = ids_by_rank[rank]
        for rule in RULES:
            updates = ClientUpdates(rule, DIM, len(mine), dev)
            for cid in mine:
                updates.add(cid, x[cid], weights[cid], 0.01 * cid)
            ids, w, losses, out = updates.aggregate(ids_by_rank, trim_ratio=0.2, f=1, sfat_topk=SFAT_TOPK)
            results[(name, rule)] = {"ids": ids.cpu(), "w": w.cpu(), "losses": losses.cpu(), "out": out.cpu(),
                                     "device": out.device.type}
        # several blocks with a small budget: the block loop, not only one exchange
        own = x[mine] if mine else torch.empty(0, DIM, device=dev)
        results[(name, "median-small-blocks")] = {
            "out": sharded_aggregate("median", own, ids_by_rank, budget=37).cpu()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


PLACEMENTS = {
    "uneven, interleaved": [[0, 3, 4, 7], [1, 2, 5, 6, 8]],
    "all on rank 1": [[], [0, 1, 2, 3, 4, 5, 6]],
}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    mp.spawn(run_rank, args=(2, str(d / "store"), str(d), PLACEMENTS, "gloo", DEVICE), nprocs=2, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow  # two real gloo processes
@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("rule", RULES + ("median-small-blocks",))
def test_two_gloo_ranks_match_the_single_process_rule(two_rank_results, placement, rule):
    r0, r1 = (res[(placement, rule)] for res in two_rank_results)
    assert torch.equal(r0["out"], r1["out"])  # every rank holds the same global model
    k = sum(len(ids) for ids in PLACEMENTS[placement])
    x, weights = client_vectors(k)
    losses = 0.01 * torch.arange(k).double()
    expected = aggregate(rule.replace("-small-blocks", ""), x, weights, trim_ratio=0.2, f=1, losses=losses,
                         sfat_topk=SFAT_TOPK)
    if rule == "sfat":  # its upweighting is visible: not FedAvg's result
        assert not torch.allclose(expected, aggregate("fedavg", x, weights), atol=1e-3)
    assert torch.allclose(r0["out"], expected, atol=1e-5, rtol=1e-6)
    if "ids" in r0:
        assert r0["device"] == DEVICE
        assert r0["ids"].tolist() == list(range(k))
        assert torch.equal(r0["w"], weights.double()) and torch.allclose(r0["losses"], 0.01 * torch.arange(k).double())


def run_one_rank_collectives(rank, store_file, out_dir, backend, device):
    """Each collective the sharded rules use, on one rank (what one GPU allows NCCL)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f"file://{store_file}", rank=0, world_size=1)
    x = torch.arange(12, dtype=torch.float32, device=dev)
    gathered = torch.empty(12, device=dev)
    dist.all_gather(list(gathered.chunk(1)), x)
    received = torch.empty(12, device=dev)
    dist.all_to_all_single(received, x, output_split_sizes=[12], input_split_sizes=[12])
    summed = x.double().clone()
    dist.all_reduce(summed)
    chosen = torch.tensor([3, 1], device=dev)
    dist.broadcast(chosen, src=0)
    results = {"gathered": gathered.cpu(), "received": received.cpu(), "summed": summed.cpu(), "chosen": chosen.cpu(),
               "backend": dist.get_backend()}
    # and the rules at world size 1 through that process group, on the device
    from ray_fedat.federation import ClientUpdates

    vectors, weights = client_vectors(7)  # Bulyan needs 4f + 3
    for rule in RULES:
        updates = ClientUpdates(rule, DIM, 7, dev)
        for cid in range(7):
            updates.add(cid, vectors[cid].to(dev), weights[cid], 0.01 * cid)
        results[rule] = updates.aggregate([list(range(7))], trim_ratio=0.2, f=1)[3].cpu()
    torch.save(results, os.path.join(out_dir, "one_rank.pt"))
    dist.destroy_process_group()


def test_one_rank_runs_every_collective_the_rules_use(tmp_path):
    """NCCL with one rank on CUDA (gpu_check.sh), gloo with one rank on CPU."""
    backend = "nccl" if DEVICE == "cuda" else "gloo"
    if backend == "nccl" and not (torch.cuda.is_available() and dist.is_nccl_available()):
        pytest.fail("RAY_FEDAT_TEST_DEVICE=cuda but CUDA or NCCL is not available")
    mp.spawn(run_one_rank_collectives, args=(str(tmp_path / "store"), str(tmp_path), backend, DEVICE), nprocs=1,
             join=True)
    r = torch.load(tmp_path / "one_rank.pt", weights_only=False)
    x = torch.arange(12, dtype=torch.float32)
    assert r["backend"] == backend
    assert torch.equal(r["gathered"], x) and torch.equal(r["received"], x) and torch.equal(r["summed"], x.double())
    assert r["chosen"].tolist() == [3, 1]
    vectors, weights = client_vectors(7)  # Bulyan needs 4f + 3
    for rule in RULES:
        expected = aggregate(rule, vectors, weights, trim_ratio=0.2, f=1, losses=0.01 * torch.arange(7.0))
        assert torch.allclose(r[rule], expected, atol=1e-5, rtol=1e-6), rule
