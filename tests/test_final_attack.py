"""The strong attacks of --final-attack on a small adversarially trained model: AutoAttack's
fast pair (APGD-CE + APGD-T, from torchattacks) and PGD-100 against the PGD-10 yardstick."""
import importlib.util
import os

import pytest
import torch

from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
from ray_fedat.data import load_digits
from ray_fedat.final_eval import evaluate_models, torchattacks_missing
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


def test_apgd_pair_on_100_images_is_at_least_as_strong_as_the_yardstick(trained):
    if importlib.util.find_spec("torchattacks") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but torchattacks is not installed (.ci/run installs it)")
        pytest.skip("torchattacks is not installed: pip install --no-deps 'torchattacks>=3.5'")
    state, data = trained
    x, y = data.x_test[:100], data.y_test[:100]
    results = evaluate_models({"m": state}, "lenet", data.shape, 10, x, y, "apgd", EPS, STEP, 10, 100, 0, False)
    pair = evaluate_models({"m": state}, "lenet", data.shape, 10, x, y, "pgd-100", EPS, STEP, 10, 100, 0, False)
    r, p = results["m"], pair["m"]
    assert r["natural_acc"] > 0.8 and r["yardstick_acc"] > 0.3  # a model worth attacking
    assert r["robust_acc"] <= r["yardstick_acc"] + 0.01  # APGD-CE + APGD-T finds at least what PGD-10 finds
    assert r["robust_acc"] <= p["robust_acc"] + 0.01  # and at least what PGD-100 finds
    assert p["robust_acc"] <= p["yardstick_acc"] + 0.01


def test_a_missing_torchattacks_is_named_in_one_line(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    message = torchattacks_missing("autoattack")
    assert message and "pip install --no-deps 'torchattacks>=3.5'" in message and "\n" not in message
    assert torchattacks_missing("pgd-100") is None
