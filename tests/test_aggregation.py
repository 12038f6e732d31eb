import torch

from ray_fedat.aggregation import (aggregate, coordinate_median, fedavg, flatten_state, server_step, trimmed_mean,
                                   unflatten_state)
from ray_fedat.federation import assign_clients, gather_client_vectors, sample_clients


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


def test_clients_are_assigned_to_workers_in_balanced_blocks():
    assert assign_clients(5, 2) == [[0, 1, 2], [3, 4]]
    assert assign_clients(2, 2) == [[0], [1]]
    assert sum(assign_clients(10, 4), []) == list(range(10))


def test_client_sampling_is_seeded_per_round_and_sized_by_fraction():
    a = sample_clients(6, 0.5, seed=1, round_=3)
    assert len(a) == 3 and a == sorted(a) and a == sample_clients(6, 0.5, seed=1, round_=3)
    rounds = {tuple(sample_clients(6, 0.5, seed=1, round_=r)) for r in range(1, 10)}
    assert len(rounds) > 1
    assert sample_clients(6, 1.0, 0, 1) == list(range(6))
    assert len(sample_clients(7, 0.3, 0, 1)) == 3  # ceil(0.3 * 7)


def test_single_process_gather_sorts_clients_and_drops_padding():
    ids, rows, w, losses = gather_client_vectors([5, 2], [torch.ones(3), torch.zeros(3)], [10, 20], [0.5, 0.25],
                                                 max_per_worker=3, dim=3, device=torch.device("cpu"))
    assert ids.tolist() == [2, 5] and w.tolist() == [20.0, 10.0] and losses.tolist() == [0.25, 0.5]
    assert torch.equal(rows, torch.stack([torch.zeros(3), torch.ones(3)]))
