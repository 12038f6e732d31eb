"""The final strong attack (final_attack.py) with the AutoAttack authors' code (pyautoattack): on a
small adversarially trained model it is at least as strong as PGD-100; an image counts as robust
only if every attack failed on it; on a model whose cross-entropy gradients vanish the margin
yardstick exposes it; its shards add up to the whole; every run attacks the same images."""
import pytest
import torch
from torch import nn

from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
from ray_fedat.data import load_digits
import ray_fedat.final_attack as final_attack
from ray_fedat.round_eval import count_correct
from ray_fedat.final_attack import (attack_counts, attack_shard, combine_shards, models_to_attack,
                                  stratified_subset, weak_yardstick_warning)
from ray_fedat.models import build_model

EPS, STEP = 0.1, 0.025
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained():
    """LeNet on digits, PGD-AT (3 steps) for 3 epochs (a few seconds): robust enough that attacks differ."""
    data = load_digits()
    torch.manual_seed(0)
    model = build_model("lenet", data.shape, 10)
    shard = ClientShard(0, data.x_train, data.y_train, torch.bincount(data.y_train, minlength=10).float())
    cfg = LocalTrainingConfig("pgd", 3, 32, 0.05, 0.9, 2e-4, EPS, STEP, 3, 6.0, 0.1, False)
    train_client(model, shard, cfg, torch.Generator().manual_seed(0), CPU)
    return model.state_dict(), data


def scores(state, data, attack, images=50, world=1):
    shards = [attack_shard({"m": state}, "lenet", data.shape, 10, data.x_test[:images], data.y_test[:images],
                           attack, EPS, STEP, 10, 50, 0, rank, world, False) for rank in range(world)]
    return combine_shards(shards)["m"]


@pytest.fixture(scope="module")
def apgd_on_50(trained):
    """APGD-CE + APGD-T on the first 50 test images, one worker (shared by the tests below)."""
    state, data = trained
    return scores(state, data, "apgd")


def test_apgd_pair_is_at_least_as_strong_as_pgd_100_and_the_yardstick(trained, apgd_on_50):
    state, data = trained
    apgd, pgd100 = apgd_on_50, scores(state, data, "pgd-100")
    assert apgd["images"] == pgd100["images"] == 50
    assert apgd["natural_acc"] > 0.8 and apgd["yardstick_acc"] > 0.3  # a model worth attacking
    # Same images, same natural and yardstick numbers (PGD-100 from another random start may keep
    # an image or two that PGD-10 broke: it is not compared with the yardstick).
    assert apgd["natural_acc"] == pgd100["natural_acc"] and apgd["yardstick_acc"] == pgd100["yardstick_acc"]
    assert apgd["robust_acc"] <= pgd100["robust_acc"]  # APGD-CE + APGD-T no weaker than PGD-100
    assert apgd["robust_acc"] <= apgd["yardstick_acc"]  # nor than the yardstick
    assert apgd["robust_acc"] < apgd["natural_acc"]  # it really attacked


def test_shards_add_up_to_the_single_worker_numbers(trained, apgd_on_50):
    """Split over 3 workers as the driver splits it, the counts are the single worker's exactly."""
    state, data = trained
    one, three = apgd_on_50, scores(state, data, "apgd", world=3)
    for key in ("images", "natural_acc", "yardstick_acc", "robust_acc"):
        assert one[key] == three[key], key


class SaturatedLogits(nn.Module):
    """A model that masks its gradients: logits scaled by 10^6, so its softmax is exactly one-hot
    in float32 and cross-entropy gradients are exactly zero (no PGD step can move)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 1e6 * self.inner(x)


def test_saturated_softmax_fools_a_ce_yardstick_but_not_the_margin_one(trained):
    state, data = trained
    inner = build_model("lenet", data.shape, 10)
    inner.load_state_dict(state)
    model = SaturatedLogits(inner).eval()
    x, y = data.x_test[:100], data.y_test[:100]
    kwargs = dict(epsilon=EPS, step_size=STEP, steps=10, batch_size=50, seed=0, round_=1)
    n, natural, ce_only = count_correct(model, x, y, losses=("ce",), **kwargs).tolist()
    _, _, start_only = count_correct(model, x, y, losses=("ce",), **{**kwargs, "step_size": 0.0}).tolist()
    _, _, ce_margin = count_correct(model, x, y, **kwargs).tolist()
    # CE-PGD cannot move from its random start (which alone flips an image or two of this small
    # model): a CE yardstick sees a (nearly) perfectly robust model.
    assert ce_only == start_only >= natural - 3
    assert ce_margin < natural - 10  # the CW margin does not saturate: the per-round yardstick sees it
    # The warning, for a yardstick that overstates by more than 5 points (its threshold is
    # test_methods.py's pure test).
    results = {"final": {"natural_acc": natural / n, "yardstick_acc": ce_only / n, "robust_acc": ce_margin / n}}
    warning = weak_yardstick_warning(results, "apgd", "PGD-10")
    assert warning and "masks gradients" in warning and "\n" not in warning


def test_an_image_is_robust_only_if_every_attack_failed_on_it(trained, monkeypatch):
    """Worst case per image: with a strong attack that never succeeds, the headline is the
    yardstick's count (the images the yardstick broke stay broken), not the natural count."""
    state, data = trained
    monkeypatch.setattr(final_attack, "strong_examples", lambda model, forward, x, t, attack, **kw: x.clone())
    result = scores(state, data, "apgd")
    assert result["yardstick_acc"] < result["natural_acc"]  # the yardstick broke some images
    assert result["robust_acc"] == result["yardstick_acc"]


def test_autoattack_check_warnings_are_captured(monkeypatch):
    """AutoAttack's own checks (here: a model whose output is already a probability vector)
    reach the result's `checks`, once each."""
    class Softmaxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return torch.softmax(self.inner(x.flatten(1)), dim=1)

    torch.manual_seed(0)
    x = (torch.rand(16, 1, 2, 2) * 255).to(torch.uint8)
    y = torch.randint(0, 4, (16,))
    out = attack_counts(Softmaxed().eval(), x, y, "apgd", epsilon=0.1, step_size=0.025, yardstick_steps=2,
                        num_classes=4, batch_size=16, seed=0)
    assert out["checks"], "AutoAttack's checks said nothing"
    assert len(out["checks"]) == len(set(out["checks"]))


def test_the_attacked_images_depend_on_the_data_and_n_only():
    """Class-stratified, seeded by a constant: the same indices for every run (there is no
    seed argument), each class in proportion, every class present even in a class-sorted file."""
    labels = torch.arange(10).repeat_interleave(torch.tensor([100, 80, 120, 90, 110, 100, 95, 105, 100, 100]))
    chosen = stratified_subset(labels, 100)
    assert len(chosen) == 100 and len(set(chosen.tolist())) == 100
    assert torch.equal(chosen, stratified_subset(labels.clone(), 100))  # deterministic
    assert torch.equal(chosen, chosen.sort().values)
    per_class = torch.bincount(labels[chosen], minlength=10).tolist()
    assert per_class == [10, 8, 12, 9, 11, 10, 10, 10, 10, 10]  # 9.5 and 10.5 round by remainder, class order
    assert sum(per_class) == 100
    assert torch.equal(stratified_subset(labels, 5000), torch.arange(len(labels)))  # all when fewer
    assert chosen.tolist() != list(range(100))  # not "the first N" (here: classes 0 and 1 only)


def test_final_attack_models_names_what_is_attacked():
    """both: the final and best-robust models, once when they are the same round; final: the
    final model only; a run without a final model still gets its best-robust one attacked."""
    assert models_to_attack({"final": 20, "best_robust": 18}, "both") == ["final", "best_robust"]
    assert models_to_attack({"final": 20, "best_robust": 20}, "both") == ["final"]
    assert models_to_attack({"final": 20, "best_robust": 18}, "final") == ["final"]
    assert models_to_attack({"best_robust": 18}, "final") == ["best_robust"]
    assert models_to_attack({}, "both") == []


@pytest.mark.parametrize("classes", [2, 3])
def test_the_default_final_attack_works_with_fewer_than_4_classes(classes):
    """APGD-T's targeted DLR loss reads the 3rd and 4th largest logits (an IndexError with 2 or
    3 classes): there it runs on the targeted cross-entropy loss against the num_classes - 1
    other classes, and the checks say so in place of AutoAttack's class-count warning."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, classes)).eval()
    x = (torch.rand(32, 1, 2, 2) * 255).to(torch.uint8)
    y = model(x.float() / 255).argmax(1)  # every image naturally correct: the attacks have work to do
    out = attack_counts(model, x, y, "apgd", epsilon=0.3, step_size=0.1, yardstick_steps=2, num_classes=classes,
                        batch_size=16, seed=0)
    n, natural, yardstick, strong = out["counts"].tolist()
    assert n == natural == 32 and strong <= yardstick
    assert strong < natural  # eps 0.3 on a linear model: the attacks really ran and broke images
    assert out["checks"] == [f"APGD-T used the targeted cross-entropy loss: with {classes} classes the targeted "
                             "DLR loss is not possible"]
