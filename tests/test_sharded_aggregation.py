"""The sharded aggregation paths on 2 real gloo ranks (torch.multiprocessing, no Ray) give
what the single-process rules give on the same vectors, identically on both ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_fedat.aggregation import aggregate

RULES = ("fedavg", "sfat", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
SFAT_TOPK = 2  # the two lowest losses, clients 0 and 1: on different ranks in the interleaved placement
DIM = 1003  # not a multiple of the block sizes: the last block is ragged


def client_vectors(k):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(k, DIM, generator=g) * torch.rand(k, 1, generator=g) * 3
    x[k - 2:] += 40  # two far-away clients, so that Krum's choice is not a near-tie
    weights = torch.randint(10, 500, (k,), generator=g).float()
    return x, weights


def run_rank(rank, world, store_file, out_dir, placements):
    from ray_fedat.federation import ClientUpdates, sharded_aggregate

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name, ids_by_rank in placements.items():
        k = sum(len(ids) for ids in ids_by_rank)
        x, weights = client_vectors(k)
        mine = ids_by_rank[rank]
        for rule in RULES:
            updates = ClientUpdates(rule, DIM, len(mine), torch.device("cpu"))
            for cid in mine:
                updates.add(cid, x[cid], weights[cid], 0.01 * cid)
            ids, w, losses, out = updates.aggregate(ids_by_rank, trim_ratio=0.2, f=1, sfat_topk=SFAT_TOPK)
            results[(name, rule)] = {"ids": ids, "w": w, "losses": losses, "out": out}
        # several blocks with a small budget: the block loop, not only one exchange
        own = x[mine] if mine else torch.empty(0, DIM)
        results[(name, "median-small-blocks")] = {"out": sharded_aggregate("median", own, ids_by_rank, budget=37)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


PLACEMENTS = {
    "uneven, interleaved": [[0, 3, 4, 7], [1, 2, 5, 6, 8]],
    "all on rank 1": [[], [0, 1, 2, 3, 4, 5, 6]],
}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    d = tmp_path_factory.mktemp("sharded")
    mp.spawn(run_rank, args=(2, str(d / "store"), str(d), PLACEMENTS), nprocs=2, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


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
        assert r0["ids"].tolist() == list(range(k))
        assert torch.equal(r0["w"], weights.double()) and torch.allclose(r0["losses"], 0.01 * torch.arange(k).double())
