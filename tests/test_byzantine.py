"""Byzantine clients, the robust rules' flags and their preconditions, and one real run."""

import pytest
import torch

from ray_fedat.byzantine import (SCALE_FACTOR, SIGN_FLIP_FACTOR, byzantine_clients, corrupt_update, flip_labels,
                                 trainable_mask)
from ray_fedat.client import ClientShard
from ray_fedat.config import parse_config
from ray_fedat.errors import ConfigError
from ray_fedat.federation import generator_for


def test_malicious_clients_are_seeded_and_distinct():
    a = byzantine_clients(20, 4, seed=3)
    assert a == byzantine_clients(20, 4, seed=3) and a == sorted(a) and len(set(a)) == 4
    assert set(a) <= set(range(20))
    assert len({tuple(byzantine_clients(20, 4, seed=s)) for s in range(10)}) > 1
    assert byzantine_clients(20, 0, seed=3) == []


def test_each_attack_sends_what_byzantine_py_documents():
    g, local = torch.zeros(5), torch.ones(5)
    assert torch.equal(corrupt_update("sign-flip", local, g, generator_for(0)), torch.full((5,), -SIGN_FLIP_FACTOR))
    assert torch.equal(corrupt_update("scale", local, g, generator_for(0)), torch.full((5,), SCALE_FACTOR))
    assert torch.equal(corrupt_update("label-flip", local, g, generator_for(0)), local)
    noise = corrupt_update("gaussian", local, g, generator_for(0, 1))
    assert torch.equal(noise, corrupt_update("gaussian", local, g, generator_for(0, 1)))  # seeded
    assert not torch.equal(noise, corrupt_update("gaussian", local, g, generator_for(0, 2)))
    big = corrupt_update("gaussian", torch.zeros(100_000), torch.zeros(100_000), generator_for(0))
    assert 0.98 < float(big.std()) < 1.02
    with pytest.raises(ValueError):
        corrupt_update("bribery", local, g, generator_for(0))


@pytest.mark.parametrize("attack", ["gaussian", "sign-flip", "scale"])
def test_attacks_corrupt_trainable_parameters_and_leave_batchnorm_statistics_alone(attack):
    from ray_fedat.aggregation import flatten_state, unflatten_state

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 3))
    global_vec, spec = flatten_state(model.state_dict())
    model.train()
    model(torch.randn(16, 1, 8, 8) * 3)  # a local step's worth of BatchNorm statistics
    with torch.no_grad():
        model[0].weight.add_(0.01)  # and of training
    model.state_dict()["1.running_var"].mul_(0.5)  # below the global model's: a reversal would make it negative
    local = flatten_state(model.state_dict())[0]
    mask = trainable_mask(model)
    assert int(mask.sum()) == sum(p.numel() for p in model.parameters()) < mask.numel()
    sent = unflatten_state(corrupt_update(attack, local, global_vec, generator_for(0), mask), spec)
    for key in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(sent[key], model.state_dict()[key]), key  # as trained
    assert not torch.allclose(sent["0.weight"], model.state_dict()["0.weight"])  # the attack is still there
    model.load_state_dict(sent)
    assert torch.isfinite(model.eval()(torch.randn(4, 1, 8, 8))).all()
    unmasked = unflatten_state(corrupt_update(attack, local, global_vec, generator_for(0)), spec)
    assert not torch.equal(unmasked["1.running_var"], sent["1.running_var"])  # what the mask prevents


def test_every_listed_attack_is_implemented():
    """One list of names (defaults.BYZANTINE_ATTACKS): the flag accepts exactly what corrupt_update does."""
    from ray_fedat.defaults import BYZANTINE_ATTACKS

    for attack in BYZANTINE_ATTACKS:
        assert parse_config(["--clients", "3", "--byzantine", "1", "--byzantine-attack", attack]).byzantine_attack == attack
        corrupt_update(attack, torch.ones(3), torch.zeros(3), generator_for(0))


def test_label_flip_poisons_the_labels_and_their_counts():
    shard = ClientShard(3, torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1, 9]),
                        torch.tensor([1.0, 2, 0, 0, 0, 0, 0, 0, 0, 1]))
    flipped = flip_labels(shard, 10)
    assert flipped.y.tolist() == [9, 8, 8, 0]
    assert flipped.class_counts.tolist() == [1.0, 0, 0, 0, 0, 0, 0, 0, 2, 1]
    assert torch.equal(flipped.x, shard.x) and shard.y.tolist() == [0, 1, 1, 9]


def test_new_flags_resolve_and_validate():
    cfg = parse_config(["--dataset", "digits", "--clients", "11", "--byzantine", "2", "--aggregator", "bulyan"])
    assert (cfg.byzantine, cfg.aggregator_f, cfg.byzantine_attack) == (2, 2, "sign-flip")  # f defaults to --byzantine
    cfg = parse_config(["--dataset", "digits", "--clients", "10", "--aggregator", "krum", "--aggregator-f", "3"])
    assert (cfg.byzantine, cfg.aggregator_f) == (0, 3)


@pytest.mark.parametrize("argv, expected", [
    (["--clients", "4", "--aggregator", "krum", "--byzantine", "1"], "krum needs more than 2f + 2 = 4 clients"),
    (["--clients", "10", "--aggregator", "bulyan", "--byzantine", "2"], "bulyan needs at least 4f + 3 = 11 clients"),
    (["--clients", "20", "--client-fraction", "0.5", "--aggregator", "bulyan", "--aggregator-f", "2"],
     "(f = 2, 10 clients take part)"),
    (["--clients", "4", "--byzantine", "4"], "--byzantine must be in [0, --clients)"),
    (["--clients", "4", "--byzantine", "1", "--byzantine-attack", "bribery"], "--byzantine-attack 'bribery' is not one"),
    (["--aggregator", "geomed"], "--aggregator 'geomed' is not one of"),
])
def test_preconditions_are_one_line_errors_before_training(argv, expected):
    with pytest.raises(ConfigError) as e:
        parse_config(["--dataset", "digits", *argv])
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_cli_prints_a_precondition_as_one_line(capsys):
    from ray_fedat.train import main

    with pytest.raises(SystemExit) as e:
        main(["--dataset", "digits", "--clients", "6", "--aggregator", "bulyan", "--byzantine", "1"])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and "4f + 3 = 7" in lines[0], lines


# A multi-Krum run with a Byzantine client, end to end on Ray: test_research_toolkit.py (FGSM-RS run).


@pytest.mark.ray
def test_the_attacked_clients_update_is_the_attacked_one(tmp_path, ray_session):
    """One round in which only the Byzantine client takes part (2 clients, half sampled):
    FedAvg of that one update is the global model plus exactly its seeded N(0, 1) noise."""
    from ray_fedat.aggregation import flatten_state, unflatten_state
    from ray_fedat.byzantine import STREAM
    from ray_fedat.federation import sample_clients
    from ray_fedat.models import build_model
    from ray_fedat.train import run

    seed = next(s for s in range(100) if sample_clients(2, 0.5, s, 1) == byzantine_clients(2, 1, s))
    attacker = byzantine_clients(2, 1, seed)[0]
    cfg = parse_config(["--dataset", "digits", "--storage-path", str(tmp_path), "--name", "noise", "--clients", "2",
                        "--workers", "1", "--client-fraction", "0.5", "--byzantine", "1", "--byzantine-attack", "gaussian",
                        "--rounds", "1", "--model", "mlp", "--eval-samples", "50", "--seed", str(seed),
                        "--final-attack", "none"])
    assert run(cfg)["status"] == "finished"
    torch.manual_seed(seed)  # the workers' initial global model
    initial, spec = flatten_state(build_model("mlp", (1, 8, 8), 10).state_dict())
    noise = torch.randn(initial.shape, generator=generator_for(seed, 1, attacker, STREAM))
    expected = unflatten_state(initial + noise, spec)
    final = torch.load(tmp_path / "noise" / "final_model.pt", weights_only=True)
    assert all(torch.allclose(final[k], expected[k], atol=1e-5) for k in expected)
