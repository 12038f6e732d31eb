"""sgd.MomentumSGD is torch.optim.SGD, bit for bit (client.py uses it to keep torch.optim's
import of torch._dynamo out of every worker process)."""
import pytest
import torch

from ray_fedat.models import build_model
from ray_fedat.sgd import MomentumSGD


@pytest.mark.parametrize("momentum, weight_decay", [(0.9, 5e-4), (0.0, 0.0), (0.5, 0.0), (0.0, 1e-3)])
def test_momentum_sgd_is_torch_sgd_bit_for_bit(momentum, weight_decay):
    torch.manual_seed(0)
    ours, theirs = build_model("lenet", (1, 8, 8), 10), build_model("lenet", (1, 8, 8), 10)
    theirs.load_state_dict(ours.state_dict())
    theirs_opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ours_opt = MomentumSGD(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(5):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        for model, opt in ((ours, ours_opt), (theirs, theirs_opt)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), (step, name)
    assert all(p.grad is not None for p in ours.parameters())
    ours_opt.zero_grad()
    assert all(p.grad is None for p in ours.parameters())


def test_a_parameter_without_a_gradient_is_left_alone():
    frozen, trained = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MomentumSGD([frozen, trained], lr=0.1, momentum=0.9, weight_decay=0.1)
    trained.grad = torch.full((3,), 2.0)
    opt.step()
    assert torch.equal(frozen, torch.ones(3)) and torch.allclose(trained, torch.ones(3) - 0.1 * (2.0 + 0.1))
