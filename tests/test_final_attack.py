"""The final strong attack (final_eval.py) with the AutoAttack authors' code (pyautoattack): on a
small adversarially trained model it is at least as strong as PGD-100; on a model whose
cross-entropy gradients vanish it exposes the yardstick; its shards add up to the whole."""
import pytest
import torch
from torch import nn

from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
from ray_fedat.data import load_digits
from ray_fedat.final_eval import (attack_counts, attack_shard, combine_shards, default_samples,
                                  weak_yardstick_warning)
from ray_fedat.models import build_model

EPS, STEP = 0.1, 0.025
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained():
    """LeNet on digits, PGD-AT for 6 epochs (a few seconds): robust enough that attacks differ."""
    data = load_digits()
    torch.manual_seed(0)
    model = build_model("lenet", data.shape, 10)
    shard = ClientShard(0, data.x_train, data.y_train, torch.bincount(data.y_train, minlength=10).float())
    cfg = LocalTrainingConfig("pgd", 6, 32, 0.05, 0.9, 2e-4, EPS, STEP, 5, 6.0, 0.1, False)
    train_client(model, shard, cfg, torch.Generator().manual_seed(0), CPU)
    return model.state_dict(), data


def scores(state, data, attack, images=100, world=1):
    shards = [attack_shard({"m": state}, "lenet", data.shape, 10, data.x_test[:images], data.y_test[:images],
                           attack, EPS, STEP, 10, 50, 0, rank, world, False) for rank in range(world)]
    return combine_shards(shards)["m"]


@pytest.fixture(scope="module")
def apgd_on_100(trained):
    """APGD-CE + APGD-T on the first 100 test images, one worker (shared by the tests below)."""
    state, data = trained
    return scores(state, data, "apgd")


def test_apgd_pair_is_at_least_as_strong_as_pgd_100_and_the_yardstick(trained, apgd_on_100):
    state, data = trained
    apgd, pgd100 = apgd_on_100, scores(state, data, "pgd-100")
    assert apgd["images"] == pgd100["images"] == 100
    assert apgd["natural_acc"] > 0.8 and apgd["yardstick_acc"] > 0.3  # a model worth attacking
    # Same images, same natural and yardstick numbers (PGD-100 from another random start may keep
    # an image or two that PGD-10 broke: it is not compared with the yardstick).
    assert apgd["natural_acc"] == pgd100["natural_acc"] and apgd["yardstick_acc"] == pgd100["yardstick_acc"]
    assert apgd["robust_acc"] <= pgd100["robust_acc"]  # APGD-CE + APGD-T no weaker than PGD-100
    assert apgd["robust_acc"] <= apgd["yardstick_acc"]  # nor than the yardstick
    assert apgd["robust_acc"] < apgd["natural_acc"]  # it really attacked


def test_shards_add_up_to_the_single_worker_numbers(trained, apgd_on_100):
    """Split over 3 workers as the driver splits it, the counts are the single worker's exactly."""
    state, data = trained
    one, three = apgd_on_100, scores(state, data, "apgd", world=3)
    for key in ("images", "natural_acc", "yardstick_acc", "robust_acc"):
        assert one[key] == three[key], key


class SaturatedLogits(nn.Module):
    """A model that masks its gradients: logits scaled by 10^4, so its softmax is exactly one-hot
    in float32 and cross-entropy gradients are exactly zero (no PGD step can move)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e4 * self.inner(x)


def test_masked_gradients_fool_the_yardstick_and_the_warning_fires(trained):
    state, data = trained
    inner = build_model("lenet", data.shape, 10)
    inner.load_state_dict(state)
    model = SaturatedLogits(inner).eval()
    x, y = data.x_test[:100], data.y_test[:100]
    counts = attack_counts(model, x, y, "apgd", epsilon=EPS, step_size=STEP, yardstick_steps=10, num_classes=10,
                           batch_size=50, seed=0)
    n, natural, yardstick, strong = counts["counts"].tolist()
    assert yardstick == natural  # CE-PGD cannot move: the yardstick sees a perfectly robust model
    assert strong < yardstick - 10  # APGD-T's DLR loss is scale-free and breaks it
    results = {"final": {"natural_acc": natural / n, "yardstick_acc": yardstick / n, "robust_acc": strong / n}}
    warning = weak_yardstick_warning(results, "apgd", "PGD-10")
    assert warning and "masks gradients" in warning and "\n" not in warning
    # (That the warning stays quiet within 5 points is test_methods.py's pure test.)


def test_default_samples_fit_the_time_and_take_all_small_test_sets():
    # 1 ms per image pass, one model, 98% natural, 90% robust, PGD-20: 0.929 s per image.
    def samples(test_images, seconds, workers=1, models=1):
        return default_samples(test_images, seconds, workers, 1e-3, 0.98, 0.9, "apgd", models, 20)

    assert samples(2000, 465.0) == 500  # int(465 / 0.929)
    assert samples(2000, 465.0, workers=2) == 1001  # the workers share the images
    assert samples(2000, 465.0, models=2) == 250  # two models to attack
    assert samples(2000, 5000.0) == 2000  # all of them fit
    assert samples(2000, 10.0) == 100  # never fewer than 100
    assert samples(60, 0.0) == 60  # nor fewer than a small test set
