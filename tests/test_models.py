"""The model zoo's networks pool before their activation (models.py): the same function and the
same gradients as the published order (activation, then pool), bit for bit for ReLU, on the
layouts and sizes the runs use; and the checkpoints' keys are those of the published order."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_fedat.models import activation_before_pooling, build_model


@pytest.mark.parametrize("name, shape, exact", [("smallcnn", (1, 28, 28), True), ("smallcnn", (1, 8, 8), True),
                                                ("lenet", (1, 28, 28), False)])
def test_pooling_before_the_activation_changes_nothing(name, shape, exact):
    torch.manual_seed(0)
    model = build_model(name, shape, 10)
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
    if exact:  # ReLU: bit for bit, ties included
        assert torch.equal(outputs[0], outputs[1])
        assert all(torch.equal(a, b) for a, b in zip(*grads))
    else:  # tanh in floating point: equal up to rounding
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-6, atol=1e-6)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the conv layers keep their indices, so checkpoints written before the swap still load
    convs = [i for i, m in enumerate(model.features) if isinstance(m, nn.Conv2d)]
    assert convs == {"smallcnn": [0, 2, 5, 7], "lenet": [0, 3]}[name]
