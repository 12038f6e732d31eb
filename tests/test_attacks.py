import pytest
import torch
import torch.nn.functional as F

from ray_fedat.attacks import kl_attack, pgd_ce
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
from ray_fedat.data import load_digits, to_float
from ray_fedat.round_eval import count_correct
from ray_fedat.federation import generator_for
from ray_fedat.losses import METHOD_LOSSES, LocalContext, calibrate
from ray_fedat.models import build_model

EPS, STEP = 0.1, 0.025


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def trained_model(digits):
    """A LeNet naturally trained on digits for 3 epochs: good natural, weak robust accuracy."""
    torch.manual_seed(0)
    model = build_model("lenet", digits.shape, 10)
    shard = ClientShard(0, digits.x_train, digits.y_train, torch.bincount(digits.y_train, minlength=10).float())
    cfg = LocalTrainingConfig("natural", 3, 32, 0.05, 0.9, 0.0, EPS, STEP, 0, 6.0, 0.1, False)
    train_client(model, shard, cfg, generator_for(0, 1, 0), torch.device("cpu"))
    return model.eval()


def test_pgd_and_kl_attacks_stay_in_the_eps_ball_and_pixel_range(digits, trained_model):
    x, y = to_float(digits.x_test[:128]), digits.y_test[:128]
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(trained_model(x), 1).detach()
    for x_adv in (pgd_ce(trained_model, x, y, EPS, STEP, 10, g),
                  kl_attack(trained_model, x, probs, EPS, STEP, 10, g),
                  pgd_ce(trained_model, x, y, 0.5, 0.2, 5, g)):
        assert (x_adv - x).abs().max() <= max(EPS, 0.5) + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    tight = pgd_ce(trained_model, x, y, EPS, STEP, 10, g)
    assert (tight - x).abs().max() <= EPS + 1e-6
    assert (tight - x).abs().max() > EPS / 2  # the attack really moved


def test_kl_attack_starts_near_the_image_or_anywhere_in_the_ball(digits, trained_model):
    x = to_float(digits.x_test[:128])
    probs = F.softmax(trained_model(x), 1).detach()
    near = kl_attack(trained_model, x, probs, EPS, STEP, 0, torch.Generator().manual_seed(0), start="gaussian")
    anywhere = kl_attack(trained_model, x, probs, EPS, STEP, 0, torch.Generator().manual_seed(0), start="uniform")
    assert (near - x).abs().max() < 0.01  # 0.001 N(0, 1): the article's start
    delta = (anywhere - x)[(x > EPS) & (x < 1 - EPS)]  # pixels the [0, 1] clamp leaves alone
    assert delta.abs().max() <= EPS + 1e-6 and delta.abs().mean() == pytest.approx(EPS / 2, rel=0.1)
    assert (kl_attack(trained_model, x, probs, EPS, STEP, 5, torch.Generator().manual_seed(0), start="uniform")
            - x).abs().max() <= EPS + 1e-6


def test_more_pgd_steps_never_raise_robust_accuracy_and_robust_is_at_most_natural(digits, trained_model):
    accs = []
    for steps in (0, 1, 5, 20):
        n, natural, robust = count_correct(trained_model, digits.x_test, digits.y_test, epsilon=EPS, step_size=STEP,
                                           steps=steps, batch_size=128, seed=0, round_=1).tolist()
        assert robust <= natural
        accs.append(robust / n)
    assert natural / n > 0.85
    assert all(later <= earlier + 0.01 for earlier, later in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0] - 0.2, accs  # PGD-20 really hurts a naturally trained model


def test_calibration_adds_exactly_tau_log_counts():
    logits = torch.randn(4, 3)
    counts = torch.tensor([100.0, 10.0, 0.0])
    out = calibrate(logits, counts, tau=0.1)
    expected = logits + 0.1 * torch.log(torch.tensor([100.0, 10.0, 1.0]))
    assert torch.allclose(out, expected)
    assert torch.isfinite(out).all()  # a class the client never saw: no log(0)


class CountingModel(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.no_grad_forwards = 0
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        if not torch.is_grad_enabled():
            self.no_grad_forwards += 1
        return self.inner(x)


@pytest.mark.parametrize("method", ["calfat", "trades"])
def test_kl_methods_compute_natural_logits_once_per_batch(digits, method):
    torch.manual_seed(0)
    model = CountingModel(build_model("mlp", digits.shape, 10))
    x, y = to_float(digits.x_train[:32]), digits.y_train[:32]
    steps = 7
    ctx = LocalContext(EPS, STEP, steps, torch.ones(10), torch.Generator().manual_seed(0))
    model.train()
    METHOD_LOSSES[method](model, x, y, ctx)
    assert model.no_grad_forwards == 1  # the attack's natural target, once, without a graph
    # forwards: 1 natural target + `steps` attack steps + the training forward(s)
    assert model.forwards == 1 + steps + (2 if method == "trades" else 1)
    assert model.training  # back in train mode for the update


def test_attacking_methods_attack_in_eval_mode(digits):
    model = build_model("mlp", digits.shape, 10)
    modes = []
    model.register_forward_pre_hook(lambda m, inp: modes.append(m.training))
    ctx = LocalContext(EPS, STEP, 3, torch.ones(10), torch.Generator().manual_seed(0))
    model.train()
    METHOD_LOSSES["pgd"](model, to_float(digits.x_train[:8]), digits.y_train[:8], ctx)
    assert modes == [False, False, False, True]


def test_pgd_training_is_more_robust_than_natural_training_at_the_same_budget(digits):
    shard = ClientShard(0, digits.x_train, digits.y_train, torch.bincount(digits.y_train, minlength=10).float())
    robust = {}
    for method in ("natural", "pgd"):
        torch.manual_seed(0)
        model = build_model("lenet", digits.shape, 10)
        cfg = LocalTrainingConfig(method, 4, 32, 0.05, 0.9, 0.0, EPS, STEP, 5, 6.0, 0.1, False)
        train_client(model, shard, cfg, generator_for(0, 1, 0), torch.device("cpu"))
        n, natural, rob = count_correct(model, digits.x_test, digits.y_test, epsilon=EPS, step_size=STEP, steps=10,
                                        batch_size=256, seed=0, round_=1).tolist()
        assert natural / n > 0.8, method
        robust[method] = rob / n
    assert robust["pgd"] > robust["natural"] + 0.15, robust
