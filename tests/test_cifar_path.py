"""The CIFAR-10 path: 3-channel 32x32 images, ResNet-18, crop-and-flip augmentation, CIFAR-10's
defaults (--preset cifar10), end to end on a local Ray in fp32, and a bf16 client round of the
same network without Ray (a second run through Ray would add ~20 s of start-up and no path the
fp32 run does not take). Tiny data (one batch of 4): bf16 ResNet-18 is emulated, and ~20x slower
than fp32, on CPUs without AVX512-BF16/AMX. RAY_FEDAT_TEST_DEVICE=cuda runs them on a GPU
(benchmarks/gpu_check.sh)."""
import json
import os

import numpy as np
import pytest
import torch

from ray_fedat.config import parse_config
from ray_fedat.train import run

DEVICE = os.environ.get("RAY_FEDAT_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def cifar_like_npz(tmp_path_factory):
    """Random CIFAR-shaped images (N x 32 x 32 x 3 uint8), torchvision's layout: 4 images of
    4 classes, so the model has 4 outputs (enough for the path; 10 would cost 2.5x here)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cifar") / "cifar_like.npz"
    np.savez(path, x_train=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_train=np.arange(4),
             x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_test=np.arange(4))
    return str(path)


@pytest.mark.ray
def test_cifar10_preset_resnet18_with_augmentation_runs_end_to_end(tmp_path, ray_session, cifar_like_npz):
    precision = "fp32"
    cfg = parse_config(["--dataset", "npz", "--data-file", cifar_like_npz, "--preset", "cifar10", "--workers", "1",
                        "--rounds", "1", "--batch-size", "4", "--attack-steps", "1", "--eval-steps", "1",
                        "--precision", precision, "--device", DEVICE, "--storage-path", str(tmp_path),
                        "--name", precision, "--final-attack", "none", "--deterministic"])
    assert (cfg.model, cfg.epsilon) == ("resnet18", pytest.approx(8 / 255))
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["rounds_completed"] == 1
    assert summary["workers"][0]["precision"] == precision and summary["workers"][0]["device"].startswith(DEVICE)
    assert summary["workers"][0]["precision_reason"] == f"--precision {precision}"  # why it ran so
    # --deterministic reaches the worker: torch's deterministic algorithms are on there (and only
    # then: test_ray_training's federated run has them off)
    assert summary["workers"][0]["deterministic"] is True
    run_dir = os.path.join(str(tmp_path), precision)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        record = json.loads(f.readline())
    assert record["eval_images"] == 4 and np.isfinite(record["train_loss"])
    assert 0 <= record["robust_acc"] <= record["natural_acc"] <= 1
    state = torch.load(os.path.join(run_dir, "final_model.pt"), weights_only=True)
    assert state["conv1.weight"].shape == (64, 3, 3, 3) and "layer4.1.bn2.running_var" in state  # CIFAR ResNet-18
    assert list(state.values())[-1].shape == (4,)  # the classifier's bias: the 4 classes of the data
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_a_bf16_resnet18_client_round_with_augmentation(cifar_like_npz):
    """What the CLI's bf16 workers run for CIFAR-10 (worker.set_up's model, the preset's local
    training): every conv under bf16 autocast, the parameters and BatchNorm buffers in fp32."""
    from test_precision import train_recording_dtypes

    from ray_fedat.client import ClientShard
    from ray_fedat.models import build_model
    from ray_fedat.precision import prepare_model
    from ray_fedat.worker import local_training_config

    cfg = parse_config(["--dataset", "npz", "--data-file", cifar_like_npz, "--preset", "cifar10", "--batch-size", "4",
                        "--attack-steps", "1", "--precision", "bf16"])
    with np.load(cifar_like_npz) as data:
        x = torch.from_numpy(data["x_train"]).permute(0, 3, 1, 2).contiguous()
        y = torch.from_numpy(data["y_train"]).long()
    torch.manual_seed(0)
    model = prepare_model(build_model(cfg.model, (3, 32, 32), 4), torch.device(DEVICE), "bf16")
    local = local_training_config(cfg, augment=True, precision="bf16")
    assert local.augment and local.precision == "bf16"
    loss, conv_dtypes = train_recording_dtypes(model, torch.nn.Conv2d, ClientShard(0, x, y, torch.ones(4)), local)
    assert conv_dtypes == {torch.bfloat16} and np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())
