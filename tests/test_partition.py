import numpy as np
import pytest

from ray_fedat.partition import PartitionError, class_counts, label_skew, make_partition


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(1).integers(0, 10, size=3000)


def assert_disjoint_and_covering(parts, n):
    joined = np.concatenate(parts)
    assert len(joined) == n
    assert len(np.unique(joined)) == n


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "shards"])
@pytest.mark.parametrize("clients", [2, 7, 20])
def test_partitions_are_disjoint_covering_and_deterministic(labels, scheme, clients):
    kwargs = dict(beta=0.5, shards_per_client=5)
    parts = make_partition(labels, clients, scheme, seed=3, **kwargs)
    assert len(parts) == clients
    assert_disjoint_and_covering(parts, len(labels))
    again = make_partition(labels, clients, scheme, seed=3, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = make_partition(labels, clients, scheme, seed=4, **kwargs)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_are_as_equal_as_possible(labels):
    sizes = [len(p) for p in make_partition(labels, 7, "iid", seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_skew_falls_as_beta_grows(labels):
    skew = {beta: label_skew(labels, make_partition(labels, 10, "dirichlet", seed=0, beta=beta), 10)
            for beta in (0.1, 1.0, 100.0)}
    iid = label_skew(labels, make_partition(labels, 10, "iid", seed=0), 10)
    assert skew[0.1] > 0.5 > skew[1.0] > skew[100.0]
    assert skew[100.0] < 0.1 and iid < 0.1


def test_dirichlet_respects_min_size_and_fails_in_bounded_time(labels):
    parts = make_partition(labels, 10, "dirichlet", seed=0, beta=0.1, min_size=50)
    assert min(len(p) for p in parts) >= 50
    with pytest.raises(PartitionError, match="larger --beta"):
        make_partition(labels, 50, "dirichlet", seed=0, beta=0.01, min_size=55)
    with pytest.raises(PartitionError, match="exceeds"):
        make_partition(labels, 100, "dirichlet", seed=0, min_size=31)


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_give_each_client_at_most_the_asked_number_of_labels(labels, per_client):
    parts = make_partition(labels, 10, "shards", seed=0, shards_per_client=per_client)
    counts = class_counts(labels, parts, 10)
    assert ((counts > 0).sum(axis=1) <= per_client).all()
    assert_disjoint_and_covering(parts, len(labels))


def test_shards_refuse_too_few_shards_for_the_classes(labels):
    with pytest.raises(PartitionError, match="cannot cover 10 classes"):
        make_partition(labels, 3, "shards", seed=0, shards_per_client=2)
