"""The research toolkit's formulas, each against a hand computation on a tiny tensor: MART,
FGSM-RS, FedProx's proximal term, CalFAT's logit scale, SFAT's weights, per-class and
per-client accuracy, and the weak-yardstick warning."""
import math

import pytest
import torch
import torch.nn as nn

from ray_fedat.aggregation import aggregate, sfat, sfat_weights
from ray_fedat.evaluation import client_expected_accuracy, count_correct, count_correct_by_class, worst_and_bottom
from ray_fedat.federation import ClientUpdates
from ray_fedat.final_eval import weak_yardstick_warning
from ray_fedat.losses import LocalContext, calfat_loss, fgsm_rs_loss, mart_objective, proximal_term


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_mart_objective_matches_the_papers_formula_by_hand():
    logits_nat = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])
    logits_adv = torch.tensor([[0.5, 1.5, -0.5], [0.0, 1.0, -1.0]])
    y = torch.tensor([0, 1])
    beta = 6.0
    total = 0.0
    for zn, za, t in zip(logits_nat.tolist(), logits_adv.tolist(), y.tolist()):
        pn, pa = softmax(zn), softmax(za)
        wrong = max((p, k) for k, p in enumerate(pa) if k != t)[1]  # the most likely wrong class
        bce = -math.log(pa[t]) - math.log(1.0001 - pa[wrong] + 1e-12)
        kl = sum(pn[k] * (math.log(pn[k]) - math.log(pa[k] + 1e-12)) for k in range(3))
        total += bce + beta * kl * (1.0000001 - pn[t])
    assert mart_objective(logits_nat, logits_adv, y, beta).item() == pytest.approx(total / 2, rel=1e-5)


class SumModel(nn.Module):
    """logits = [s, -s] with s the sum of the pixels: the CE gradient's sign is known."""

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, -s], dim=1)


def test_fgsm_rs_takes_one_step_of_1_25_eps_from_a_uniform_start():
    eps = 0.1
    x = torch.full((1, 1, 2, 2), 0.5)
    y = torch.tensor([1])  # CE for class 1 grows with s: the step goes +1.25 eps on every pixel
    ctx = LocalContext(eps, 0.01, 7, torch.ones(2), torch.Generator().manual_seed(3))
    loss = fgsm_rs_loss(SumModel(), x, y, ctx)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 * eps - eps
    x_adv = (x + torch.clamp(u + 1.25 * eps, max=eps)).clamp(0, 1)  # step, then back into the ball
    s = x_adv.sum().item()
    assert loss.item() == pytest.approx(s + math.log(math.exp(s) + math.exp(-s)), rel=1e-6)


def test_proximal_term_is_half_mu_times_the_squared_distance():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.fill_(0.5)
    anchor = [torch.tensor([[0.0, 1.0]]), torch.tensor([1.5])]
    # ||w - w0||^2 = 1 + 1 + 1 = 3
    assert proximal_term(model, anchor, 0.2).item() == pytest.approx(0.5 * 0.2 * 3)


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_calfat_scale_multiplies_the_calibrated_logits(scale):
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    x = torch.tensor([[0.2, 0.6]])
    counts = torch.tensor([10.0, 1.0, 100.0])
    ctx = LocalContext(0.0, 0.0, 0, counts, attack_start="none", calfat_scale=scale)  # no attack: x_adv = x
    z = [0.2 + 0.1 * math.log(10), 0.6 + 0.1 * math.log(1), 0.4 + 0.1 * math.log(100)]
    expected = -math.log(softmax([scale * v for v in z])[1])
    assert calfat_loss(model, x, torch.tensor([1]), ctx).item() == pytest.approx(expected, rel=1e-6)


def test_sfat_upweights_the_top_k_lowest_loss_clients():
    sizes = torch.tensor([10.0, 20.0, 30.0])
    losses = torch.tensor([0.5, 0.2, 0.9])
    alpha = 1 / 6  # (1 + a) / (1 - a) = 1.4
    assert sfat_weights(sizes, losses, alpha, 1).tolist() == pytest.approx([10, 28, 30])
    assert sfat_weights(sizes, losses, alpha, 2).tolist() == pytest.approx([14, 28, 30])
    assert sfat_weights(sizes, losses, alpha, 0).tolist() == pytest.approx([10, 20, 30])
    updates = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = torch.tensor([(10 + 30) / 68, (28 + 30) / 68])
    assert torch.allclose(sfat(updates, sizes, losses, alpha, 1), expected)


def test_sfat_through_client_updates_equals_the_pure_rule():
    torch.manual_seed(0)
    updates = torch.randn(4, 6)
    sizes, losses = [5, 7, 9, 11], [0.3, 0.1, 0.4, 0.2]
    held = ClientUpdates("sfat", 6, 4, torch.device("cpu"))
    for cid in range(4):
        held.add(cid, updates[cid], sizes[cid], losses[cid])
    _, _, _, aggregated = held.aggregate([[0, 1, 2, 3]], sfat_alpha=0.2, sfat_topk=2)
    reference = aggregate("sfat", updates, torch.tensor(sizes, dtype=torch.float64), losses=torch.tensor(losses),
                          sfat_alpha=0.2, sfat_topk=2)
    assert torch.allclose(aggregated, reference, atol=1e-6)


def test_per_class_counts_add_up_and_client_accuracy_follows_its_label_mix():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    torch.manual_seed(1)
    x = torch.randint(0, 256, (20, 1, 2, 2), dtype=torch.uint8)
    y = torch.randint(0, 3, (20,))
    kw = dict(epsilon=0.1, step_size=0.05, steps=2, batch_size=8, seed=0, round_=1)
    by_class = count_correct_by_class(model, x, y, num_classes=3, **kw)
    assert by_class[0].tolist() == torch.bincount(y, minlength=3).double().tolist()
    assert torch.equal(by_class.sum(1), count_correct(model, x, y, num_classes=3, **kw))
    # client 0 holds classes 0 and 1 as 3:1; class 2 unevaluated (None) drops out for client 1
    acc = client_expected_accuracy([[30, 10, 0], [0, 5, 5]], [0.8, 0.4, None])
    assert acc == pytest.approx([(30 * 0.8 + 10 * 0.4) / 40, 0.4])
    summary = worst_and_bottom([0.9, 0.5, 0.7, 0.6, 0.95, 0.8], fraction=0.2)  # ceil(1.2) = 2 clients
    assert summary == {"worst": 0.5, "worst_client": 1, "bottom_mean": pytest.approx(0.55), "bottom_clients": 2}


def test_weak_yardstick_warning_only_beyond_five_points():
    close = {"final": {"natural_acc": 0.99, "yardstick_acc": 0.90, "robust_acc": 0.86}}
    far = {"final": {"natural_acc": 0.99, "yardstick_acc": 0.95, "robust_acc": 0.86}}
    assert weak_yardstick_warning(close, "pgd-100", "PGD-20") is None
    line = weak_yardstick_warning(far, "pgd-100", "PGD-20")
    assert "9.0 points below PGD-20" in line and "\n" not in line


def identical_shard(n):
    """n copies of one digits image: every batch is the same, whatever the shuffling."""
    from ray_fedat.client import ClientShard
    from ray_fedat.data import load_digits

    data = load_digits()
    return ClientShard(0, data.x_train[:1].repeat(n, 1, 1, 1), data.y_train[:1].repeat(n),
                       torch.ones(10))


def trained(shard, prox_mu, method="natural"):
    from ray_fedat.client import train_client
    from ray_fedat.federation import generator_for
    from ray_fedat.models import build_model
    from ray_fedat.run_config import RunConfig
    from ray_fedat.worker import local_training_config

    cfg = RunConfig(method=method, momentum=0.0, weight_decay=0.0, prox_mu=prox_mu).resolved()
    local = local_training_config(cfg, augment=False, precision="fp32")
    local = type(local)(**{**local.__dict__, "batch_size": 32, "lr": 0.1})
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    train_client(model, shard, local, generator_for(0, 1, 0), torch.device("cpu"))
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_prox_mu_pulls_the_local_weights_back_by_lr_mu_times_their_drift():
    """Two plain SGD steps (lr 0.1) on identical batches: the proximal term's gradient is
    mu (w - w_global), zero in step 1 and mu (w1 - w0) in step 2, so FedProx's weights end
    exactly lr * mu * (w1 - w0) behind plain training's."""
    from ray_fedat.models import build_model

    torch.manual_seed(0)
    w0 = torch.cat([p.detach().reshape(-1) for p in build_model("mlp", (1, 8, 8), 10).parameters()])
    w1 = trained(identical_shard(32), 0.0)  # one step
    plain, prox = trained(identical_shard(64), 0.0), trained(identical_shard(64), 0.5)  # two steps
    assert not torch.allclose(w1, w0)
    assert torch.allclose(plain - prox, 0.1 * 0.5 * (w1 - w0), atol=1e-6)


def test_each_method_flag_changes_what_a_client_learns():
    from ray_fedat.data import load_digits
    from ray_fedat.client import ClientShard

    data = load_digits()
    shard = ClientShard(0, data.x_train[:64], data.y_train[:64], torch.bincount(data.y_train[:64], minlength=10).float())
    models = {m: trained(shard, 0.0, m) for m in ("mart", "trades", "pgd", "calfat")}
    assert all(not torch.allclose(models["mart"], models[m]) for m in ("trades", "pgd", "calfat"))
    assert trained(shard, 0.0, "mart").equal(models["mart"])  # and it is deterministic


def test_default_eval_batches_share_a_small_set_evenly_between_two_workers():
    """Batch b goes to rank b mod N; with 256-image batches 300 images split 256 / 44, and
    the round waits for the busier worker. The CPU default (64) splits them within one batch."""
    from ray_fedat.evaluation import shard_batches
    from ray_fedat.run_config import eval_batch_size_for

    x, y = torch.zeros(300, 1, 4, 4, dtype=torch.uint8), torch.zeros(300, dtype=torch.long)

    def shares(batch_size):
        return [sum(len(t) for _, _, t in shard_batches(x, y, batch_size, rank, 2, torch.device("cpu")))
                for rank in range(2)]

    assert shares(256) == [256, 44]
    cpu = eval_batch_size_for(None, on_gpu=False)
    assert sum(shares(cpu)) == 300 and max(shares(cpu)) - min(shares(cpu)) <= cpu
    assert max(shares(cpu)) <= 0.65 * 300
    assert eval_batch_size_for(None, on_gpu=True) == 256 and eval_batch_size_for(32, on_gpu=True) == 32
