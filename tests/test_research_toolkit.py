"""The research toolkit on a real Ray: each new method for 2 rounds, the validation split
choosing the best models, the final strong attack, and per-client robustness."""
import os

import pytest
import torch
from test_ray_training import train  # the same digits run helper

from ray_fedat.checkpoints import load_model_file

pytestmark = pytest.mark.ray


# Two runs cover the toolkit: MART with SFAT aggregation on a validation split (which chooses the
# best models, with a late attack and PGD-100 at the end), and FGSM-RS with FedProx without a
# validation split, aggregated by multi-Krum with one Byzantine client (one run fewer than testing
# the robust aggregation apart: a run costs ~20 s of Ray start-up here). CalFAT (s = 10) is the
# default method: every default run trains it.
def test_fgsm_rs_with_fedprox_and_multi_krum_against_a_byzantine_client_without_validation_split(tmp_path,
                                                                                                  ray_session, capsys):
    from ray_fedat.byzantine import byzantine_clients

    summary, records, _ = train(tmp_path, "noval", "--workers", "2", "--clients", "5", "--rounds", "2",
                                "--model", "mlp", "--eval-samples", "200", "--method", "fgsm-rs", "--prox-mu", "0.05",
                                "--aggregator", "multi-krum", "--byzantine", "1", "--byzantine-attack", "gaussian",
                                "--val-fraction", "0")
    assert summary["status"] == "finished" and [r["round"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    cfg = summary["config"]
    assert (cfg["method"], cfg["aggregator"], cfg["prox_mu"]) == ("fgsm-rs", "multi-krum", 0.05)
    assert "--val-fraction 0: no validation set; the best models are chosen on the test set" in capsys.readouterr().out
    assert summary["selection"]["chosen_on"] == "test"
    assert "val_robust_acc" not in records[-1]
    assert summary["best"]["robust"]["robust_acc"] == max(r["robust_acc"] for r in records)
    # The Byzantine client is recorded, every client took part, and Krum left the N(0, 1) update
    # out: the model learns (~50% after 2 rounds; an aggregate with that noise in it sits near
    # chance, 10%).
    assert summary["byzantine"] == {"clients": byzantine_clients(5, 1, 0), "attack": "gaussian"}
    assignment = summary["client_assignment"]
    assert sorted(sum(assignment.values(), [])) == list(range(5)) and len(assignment) == 2
    assert records[-1]["participants"] == list(range(5))
    assert records[-1]["natural_acc"] > 0.3


def test_mart_with_sfat_chooses_the_best_models_on_validation_and_the_test_set_only_reports(tmp_path,
                                                                                          ray_session):
    summary, records, run_dir = train(tmp_path, "val", "--workers", "2", "--clients", "3", "--partition", "dirichlet",
                                      "--method", "mart", "--aggregator", "sfat", "--sfat-topk", "2", "--model", "mlp",
                                      "--rounds", "4", "--val-fraction", "0.2", "--final-attack", "pgd-100",
                                      "--final-samples", "64", "--late-attack-steps", "7", "--late-attack-from", "0.5")
    assert summary["status"] == "finished" and (summary["config"]["method"], summary["config"]["aggregator"]) == \
        ("mart", "sfat")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    assert records[-1]["natural_acc"] > 0.3
    assert [r["attack_steps"] for r in records] == [5, 5, 7, 7]  # digits' 5 steps, then the late attack
    assert summary["selection"]["chosen_on"] == "validation"
    assert summary["selection"]["validation_images"] == round(0.2 * 1438)
    assert sum(c["size"] for c in summary["clients"]) == 1438 - round(0.2 * 1438)  # held out before partitioning
    for kind in ("natural", "robust"):
        by_val = max(records, key=lambda r: (r[f"val_{kind}_acc"], -r["round"]))
        best = summary["best"][kind]
        assert best["round"] == by_val["round"] and best["chosen_on"] == "validation"
        assert best[f"{kind}_acc"] == by_val[f"{kind}_acc"]  # the test number of the round validation chose
        _, meta = load_model_file(os.path.join(run_dir, best["file"]))
        assert meta["round"] == by_val["round"]
    # the per-class test numbers add up, and each client's own-mix accuracy sits between the classes'
    last = records[-1]
    per_class = last["per_class"]
    assert sum(per_class["images"]) == last["eval_images"]
    rob = [a for a in per_class["robust"] if a is not None]
    clients = summary["client_robustness"]
    assert all(min(rob) - 1e-9 <= c["robust_acc"] <= max(rob) + 1e-9 for c in clients["clients"])
    assert clients["robust"]["worst"] == min(c["robust_acc"] for c in clients["clients"])
    # the final strong attack: PGD-100 is no weaker than the run's PGD-10 on the same 64 images
    attack = summary["final_attack"]
    assert attack["attack"] == "PGD-100" and attack["images"] == 64 and attack["yardstick"] == "PGD-10 CE+margin"
    for r in attack["models"].values():
        assert r["robust_acc"] <= r["yardstick_acc"] + 1 / 64 and r["robust_acc"] <= r["natural_acc"]
