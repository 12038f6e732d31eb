import torch

import itertools

import pytest

from ray_fedat.aggregation import (WeightedSum, aggregate, bulyan, bulyan_select, check_rule, coordinate_median,
                                   fedavg, flatten_state, krum, krum_select, multi_krum, pairwise_sq_distances,
                                   server_step, trimmed_mean, unflatten_state)
from ray_fedat.federation import (ClientUpdates, assign_clients, coordinate_blocks,
                                  rank_bounds, sample_clients)


def test_fedavg_is_the_hand_computed_weighted_mean():
    updates = torch.tensor([[1.0, 2.0], [3.0, 6.0], [10.0, 0.0]])
    weights = torch.tensor([1.0, 3.0, 0.0])
    assert torch.allclose(fedavg(updates, weights), torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))


def test_median_and_trimmed_mean_resist_one_huge_client():
    honest = torch.randn(6, 50)
    attacked = torch.cat([honest, torch.full((1, 50), 1e9)])
    lo, hi = honest.min(0).values, honest.max(0).values
    for robust in (coordinate_median(attacked), trimmed_mean(attacked, 0.15)):
        assert ((robust >= lo) & (robust <= hi)).all()
    assert fedavg(attacked, torch.ones(7)).abs().min() > 1e7  # the plain mean is dragged away


def test_median_of_even_count_averages_the_middle_pair():
    assert torch.equal(coordinate_median(torch.tensor([[1.0], [2.0], [4.0], [100.0]])), torch.tensor([3.0]))


def test_batchnorm_buffers_are_averaged_and_int_buffers_survive():
    bns = [torch.nn.BatchNorm1d(3) for _ in range(2)]
    bns[0].running_mean.fill_(1.0)
    bns[1].running_mean.fill_(3.0)
    bns[0].num_batches_tracked.fill_(4)
    bns[1].num_batches_tracked.fill_(6)
    flats = [flatten_state(b.state_dict()) for b in bns]
    spec = flats[0][1]
    merged = unflatten_state(aggregate("fedavg", torch.stack([f for f, _ in flats]), torch.ones(2)), spec)
    assert torch.allclose(merged["running_mean"], torch.full((3,), 2.0))
    assert merged["num_batches_tracked"].dtype == torch.int64 and int(merged["num_batches_tracked"]) == 5


def test_flatten_unflatten_round_trip():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    flat, spec = flatten_state(model.state_dict())
    back = unflatten_state(flat, spec)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype


def test_server_step_interpolates_towards_the_aggregate():
    g, a = torch.zeros(3), torch.ones(3)
    assert torch.equal(server_step(g, a, 1.0), a)
    assert torch.allclose(server_step(g, a, 0.5), torch.full((3,), 0.5))


def test_clients_are_placed_largest_first_onto_the_least_loaded_worker():
    sizes = [20, 900, 10, 800, 40, 30]
    groups = assign_clients(6, 2, sizes)
    # 900 -> a, 800 -> b, then 40, 30, 20 onto b (840, 870, 890), 10 onto b (890 < 900)
    assert groups == [[0, 2, 3, 4, 5], [1]]  # numbered by their first client
    assert [sum(sizes[c] for c in g) for g in groups] == [900, 900]
    assert max(sum(sizes[:3]), sum(sizes[3:])) == 930  # contiguous blocks: 930 vs 870
    assert assign_clients(4, 4, [5, 9, 1, 7]) == [[0], [1], [2], [3]]  # one each: client r on rank r
    assert assign_clients(2, 3, [5, 9]) == [[0], [1], []]  # more workers than clients
    assert sorted(sum(assign_clients(10, 4), [])) == list(range(10))
    assert [len(g) for g in assign_clients(10, 4)] == [3, 3, 2, 2]


def test_client_sampling_is_seeded_per_round_and_sized_by_fraction():
    a = sample_clients(6, 0.5, seed=1, round_=3)
    assert len(a) == 3 and a == sorted(a) and a == sample_clients(6, 0.5, seed=1, round_=3)
    rounds = {tuple(sample_clients(6, 0.5, seed=1, round_=r)) for r in range(1, 10)}
    assert len(rounds) > 1
    assert sample_clients(6, 1.0, 0, 1) == list(range(6))
    assert len(sample_clients(7, 0.3, 0, 1)) == 3  # ceil(0.3 * 7)


def brute_krum_scores(x, f):
    k = len(x)
    scores = []
    for i in range(k):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(k) if j != i)
        scores.append(sum(d[: k - f - 2]))
    return scores


def test_krum_and_multi_krum_match_a_direct_computation():
    x = torch.randn(9, 20, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 10).float()[:, None]
    scores = brute_krum_scores(x, 2)
    best = min(range(9), key=lambda i: scores[i])
    assert torch.equal(krum(x, 2), x[best])
    m = 9 - 2
    chosen = sorted(sorted(range(9), key=lambda i: scores[i])[:m])
    assert torch.allclose(multi_krum(x, 2), x[chosen].mean(0), atol=1e-6)
    assert torch.allclose(pairwise_sq_distances(x), torch.cdist(x.double(), x.double()) ** 2, atol=1e-9)


def test_bulyan_matches_a_direct_computation():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(11, 7, generator=g) * torch.rand(11, 1, generator=g) * 5
    f = 2
    scores = brute_krum_scores(x, f)
    chosen = sorted(sorted(range(11), key=lambda i: scores[i])[: 11 - 2 * f])
    beta = len(chosen) - 2 * f
    expected = torch.empty(7)
    for j in range(7):
        values = sorted(float(x[i, j]) for i in chosen)
        mid = 0.5 * (values[(len(values) - 1) // 2] + values[len(values) // 2])
        closest = sorted(values, key=lambda v: abs(v - mid))[:beta]
        expected[j] = sum(closest) / beta
    assert torch.allclose(bulyan(x, f), expected, atol=1e-6)


def test_median_and_trimmed_mean_match_a_direct_computation():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    for j in range(5):
        values = sorted(x[:, j].tolist())
        assert coordinate_median(x)[j].item() == pytest.approx(values[3])
        assert trimmed_mean(x, 0.3)[j].item() == pytest.approx(sum(values[2:5]) / 3)


def test_running_weighted_sum_is_fedavg_in_any_grouping():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(10, 1000, generator=g)
    w = torch.randint(20, 700, (10,), generator=g).float()
    expected = fedavg(x, w)
    results = []
    for groups in ([range(10)], [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]], [[9, 8, 7, 6, 5], [0, 1, 2, 3, 4]]):
        total = WeightedSum(1000)
        for group in groups:  # each group is one worker's partial sum
            partial = WeightedSum(1000)
            for i in group:
                partial.add(x[i], w[i])
            total.values.add_(partial.values)
        results.append(total.mean())
    assert torch.allclose(results[0], expected, atol=1e-6)
    assert all(torch.equal(r, results[0]) for r in results)  # no dependence on the grouping


def far_away_third(k, dim=30, seed=5):
    g = torch.Generator().manual_seed(seed)
    honest = torch.randn(k - k // 3, dim, generator=g) * 0.1
    far = 50 + torch.randn(k // 3, dim, generator=g)
    x = torch.cat([honest, far])
    perm = torch.randperm(k, generator=g)  # the bad clients are not simply the last ids
    return x[perm], set(torch.nonzero(perm >= k - k // 3).flatten().tolist()), honest


def test_krum_and_bulyan_choose_the_honest_clients_when_a_third_is_far_away():
    x, bad, honest = far_away_third(9)
    dist2 = pairwise_sq_distances(x)
    assert int(krum_select(dist2, 3)[0]) not in bad
    assert not set(krum_select(dist2, 3, 9 - 3).tolist()) & bad
    x15, bad15, honest15 = far_away_third(15)
    chosen = set(bulyan_select(pairwise_sq_distances(x15), 3).tolist())  # 15 >= 4 * 3 + 3
    assert len(chosen) == 9 and not chosen & bad15
    for rule, rows, f, ok in (("krum", x, 3, honest), ("multi-krum", x, 3, honest), ("bulyan", x15, 3, honest15)):
        out = aggregate(rule, rows, torch.ones(len(rows)), f=f)
        assert ((out >= ok.min(0).values - 1e-6) & (out <= ok.max(0).values + 1e-6)).all(), rule
    assert fedavg(x, torch.ones(9)).mean() > 10  # the plain mean is dragged away


@pytest.mark.parametrize("rule,k,f,ok", [("krum", 5, 1, True), ("krum", 4, 1, False), ("multi-krum", 2, 0, False),
                                         ("bulyan", 7, 1, True), ("bulyan", 6, 1, False), ("median", 2, 5, True)])
def test_rule_preconditions(rule, k, f, ok):
    if ok:
        check_rule(rule, k, f)
    else:
        with pytest.raises(ValueError, match="clients per round") as e:
            check_rule(rule, k, f)
        assert "\n" not in str(e.value)


def test_client_updates_keep_fedavg_as_a_sum_and_robust_rules_as_rows():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 40, generator=g)
    for rule in ("fedavg", "median", "trimmed-mean", "krum", "multi-krum", "bulyan"):
        updates = ClientUpdates(rule, 40, 5, torch.device("cpu"))
        assert (updates.rows is None) == (rule == "fedavg")
        for cid in range(5):
            updates.add(cid, x[cid], 10 + cid, 0.1 * cid)
        ids, w, losses, out = updates.aggregate([list(range(5))], 0.2, 0)
        assert ids.tolist() == list(range(5)) and w.tolist() == [10, 11, 12, 13, 14]
        assert torch.allclose(out, aggregate(rule, x, w, 0.2, 0), atol=1e-6), rule


def test_coordinate_blocks_cover_every_coordinate_once():
    for dim, k, world, budget in itertools.product((1, 7, 100), (1, 3, 50), (1, 2, 3), (1, 10, 1000)):
        covered = []
        for lo, hi in coordinate_blocks(dim, k, world, budget):
            bounds = rank_bounds(lo, hi, world)
            assert bounds[0][0] == lo and bounds[-1][1] == hi
            for a, b in bounds:
                covered.extend(range(a, b))
        assert covered == list(range(dim))
