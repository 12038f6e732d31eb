"""The research toolkit's formulas, each against a hand computation on a tiny tensor: MART,
FGSM-RS, FedProx's proximal term, CalFAT's logit scale, SFAT's weights, per-class and
per-client accuracy, and the weak-yardstick warning."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ray_fedat.aggregation import aggregate, sfat, sfat_weights
from ray_fedat.round_eval import client_expected_accuracy, count_correct, count_correct_by_class, worst_and_bottom
from ray_fedat.federation import ClientUpdates
from ray_fedat.final_attack import weak_yardstick_warning
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


def _authors_calfat(model_z, x, y, counts, start_noise, eps, step, steps, s=10.0, tau=0.1):
    """A direct transcription of the CalFAT authors' formulas (cc233/CalFAT utils.py: kl_adv,
    maxMarginLoss_kl, maxMarginLoss), on a network z: (x_adv, training loss, attack objective
    at x_adv)."""
    def calibrated(out):  # maxMarginLoss_kl.forward
        return out + tau * torch.log(counts + 1e-7)

    model_z.eval()
    x_adv = x.detach() + 0.001 * start_noise
    for _ in range(steps):
        x_adv.requires_grad_()
        loss_kl = nn.KLDivLoss(reduction="sum")(F.log_softmax(calibrated(model_z(x_adv)), dim=1),
                                                F.softmax(calibrated(model_z(x)), dim=1))
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    objective = nn.KLDivLoss(reduction="sum")(F.log_softmax(calibrated(model_z(x_adv)), dim=1),
                                              F.softmax(calibrated(model_z(x)), dim=1))
    model_z.train()
    loss = F.cross_entropy(s * calibrated(model_z(x_adv)), y)  # maxMarginLoss.forward
    return x_adv.detach(), loss, objective


def _scaled_copy(model_z, s):
    """The same network with its last layer multiplied by s: it outputs t = s * z."""
    model_t = nn.Sequential(*[copy.deepcopy(m) for m in model_z])
    with torch.no_grad():
        model_t[-1].weight.mul_(s)
        model_t[-1].bias.mul_(s)
    return model_t


@pytest.mark.parametrize("dirichlet_counts", [False, True])
def test_calfat_is_the_authors_objective_on_a_network_that_outputs_s_times_z(dirichlet_counts):
    """Our calfat_loss on t = s * z equals the authors' loss on z, its attack maximises the
    authors' KL objective (the same adversarial examples, step for step), and it attacks in
    eval mode: dropout would otherwise make the two differ."""
    torch.manual_seed(0)
    model_z = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    model_t = _scaled_copy(model_z, 10.0)
    x = 0.3 + 0.4 * torch.rand(5, 6, dtype=torch.float64)  # inside [0, 1] with room for the start noise
    y = torch.tensor([0, 1, 2, 3, 1])
    counts = torch.tensor([500.0, 3.0, 1.0, 40.0] if dirichlet_counts else [100.0, 100.0, 100.0, 100.0],
                          dtype=torch.float64)
    eps, step, steps = 0.1, 0.01, 7
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).double()  # drawn as the attack draws it
    x_adv_ref, loss_ref, objective_ref = _authors_calfat(model_z, x, y, counts, noise, eps, step, steps)

    # Ours, with the same start (the test's noise through the generator the attack draws from).
    ctx = LocalContext(eps, step, steps, counts, torch.Generator().manual_seed(3), attack_start="gaussian")
    assert ctx.calfat_scale == 10.0 and ctx.calfat_tau == 0.1  # the authors' s and tau are the defaults
    model_t.train()
    captured = {}
    import ray_fedat.losses as losses
    real_kl_attack = losses.kl_attack

    def capture(*args, **kwargs):
        captured["x_adv"] = real_kl_attack(*args, **kwargs)
        captured["training"] = model_t.training
        return captured["x_adv"]

    losses.kl_attack = capture
    try:
        with torch.random.fork_rng():
            torch.manual_seed(1)  # dropout's draw in the update, the same in both
            ours = calfat_loss(model_t, x, y, ctx)
        with torch.random.fork_rng():
            torch.manual_seed(1)
            model_z.train()
            loss_ref = F.cross_entropy(10.0 * (model_z(x_adv_ref) + 0.1 * torch.log(counts + 1e-7)), y)
    finally:
        losses.kl_attack = real_kl_attack
    assert captured["training"] is False  # the attack ran in eval mode
    assert model_t.training  # and the update in train mode
    assert torch.allclose(captured["x_adv"], x_adv_ref, atol=1e-12)
    assert ours.item() == pytest.approx(loss_ref.item(), rel=1e-6)  # theirs adds 1e-7 inside the log
    # The attack objective: KL of the calibrated logits at temperature s, equal to theirs.
    model_t.eval()
    prior = 10.0 * 0.1 * torch.log(counts)
    ours_objective = F.kl_div(F.log_softmax((model_t(x_adv_ref) + prior) / 10.0, dim=1),
                              F.softmax((model_t(x) + prior) / 10.0, dim=1), reduction="sum")
    assert ours_objective.item() == pytest.approx(objective_ref.item(), rel=1e-6)


def test_calfat_prior_has_full_weight_relative_to_the_trained_logits():
    """Relative to what the network outputs, the authors' prior weighs s * tau = 1: the loss
    is cross_entropy(t + log n_c). With s = 1 it is the plain calibrated cross-entropy."""
    model = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]))
    x = torch.tensor([[0.2, 0.6]])
    counts = torch.tensor([10.0, 1.0, 100.0])
    for scale, weight in ((10.0, 1.0), (1.0, 0.1)):
        ctx = LocalContext(0.0, 0.0, 0, counts, attack_start="none", calfat_scale=scale)  # no attack: x_adv = x
        t = [0.2 + weight * math.log(10), 0.6 + weight * math.log(1), 0.4 + weight * math.log(100)]
        expected = -math.log(softmax(t)[1])
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
    from ray_fedat.round_eval import shard_batches
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
