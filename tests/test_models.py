"""LeNet pools before its tanh (models.py): the same function and gradients as the article's
order (tanh, then pool), up to rounding, on the sizes runs use; and checkpoints keep their keys."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_fedat.models import activation_before_pooling, build_model


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8)])
def test_pooling_before_the_activation_changes_nothing(shape):
    torch.manual_seed(0)
    model = build_model("lenet", shape, 10)
    reference = activation_before_pooling(model)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.features) == 2
    assert [type(m) for m in reference[0]] != [type(m) for m in model.features]
    x = torch.rand(32, *shape)
    x[:4] = 0  # blank images: equal conv outputs in every pooling window (ties)
    y = torch.randint(0, 10, (32,))
    outputs, grads = [], []
    for net in (model, reference):
        net.zero_grad()
        xi = x.clone().requires_grad_()
        out = net(xi)
        F.cross_entropy(out, y).backward()
        outputs.append(out.detach())
        grads.append([xi.grad] + [p.grad.clone() for p in net.parameters()])
    # tanh in floating point: equal up to rounding (benchmarks/activation_order.py trained both
    # orders for an epoch to the same weights bit for bit)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the conv layers keep their indices, so checkpoints written before the swap still load
    assert [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)] == [0, 3]
