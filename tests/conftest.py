import os

import numpy as np
import pytest

SHARED_MNIST = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist-t10k")


def pytest_collection_modifyitems(config, items):
    """Every test that starts a real Ray counts as slow: `pytest -m "not slow"` is the quick
    loop of the pure parts (about 3 minutes on 2 cores); plain `pytest -q` runs everything.
    Tests that start a CLI process, a cluster or an object store are marked slow themselves;
    the CLI's error paths are tested in-process (main([...]) and capsys)."""
    for item in items:
        if item.get_closest_marker("ray") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)


def read_idx(path):
    from ray_fedat.data import read_idx_gz

    return read_idx_gz(path)


@pytest.fixture(scope="session")
def mnist_t10k():
    """(images N x 28 x 28 uint8, labels N) of the real MNIST test set in ../shared.
    A user's clone has no ../shared: skip there; under CI=true it must be present."""
    images = os.path.join(SHARED_MNIST, "t10k-images-idx3-ubyte.gz")
    labels = os.path.join(SHARED_MNIST, "t10k-labels-idx1-ubyte.gz")
    if not (os.path.exists(images) and os.path.exists(labels)):
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the MNIST test set is missing from {SHARED_MNIST}")
        pytest.skip(f"real MNIST test set not found in {SHARED_MNIST} (only in the project's shared/ folder)")
    return read_idx(images), read_idx(labels)


@pytest.fixture(scope="session")
def mnist_npz(mnist_t10k, tmp_path_factory):
    """An .npz with an 8k/2k train/test split of the real MNIST test set (fixed seed)."""
    x, y = mnist_t10k
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:8000], order[8000:]
    path = tmp_path_factory.mktemp("mnist") / "mnist8k.npz"
    np.savez(path, x_train=x[train], y_train=y[train].astype(np.int64), x_test=x[test], y_test=y[test].astype(np.int64))
    return str(path)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test in the session (starting Ray costs seconds)."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    # Test modules define functions that run on Ray workers: let the workers import them.
    here = os.path.dirname(os.path.abspath(__file__))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}})
    yield ray
    ray.shutdown()
