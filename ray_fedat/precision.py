"""How a worker computes: bf16 autocast or fp32 forwards, channels_last, cuDNN and determinism.

Only model *forwards* change precision. In bf16 each forward runs under
`torch.autocast(device_type, torch.bfloat16)` and returns float32 logits, so everything
around it stays float32: the adversarial example, its noise, sign step and projection, the
parameters and the optimizer, CalFAT's log-prior, aggregation and the collectives.
Evaluation (the reported PGD yardstick) always runs in fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


# What `--precision auto` means on a CPU. Measured with benchmarks/local_throughput.py on the
# project's machine (AMD EPYC, AVX2 but no AVX512-BF16/AMX): bf16 autocast makes an attack
# step 2.5-10x *slower* there (oneDNN emulates bf16), so auto stays fp32 on CPUs. On CUDA,
# auto is bf16 wherever the GPU supports it (Ampere and later).
CPU_AUTO_PRECISION = "fp32"

# cuBLAS needs a fixed workspace to be deterministic; it reads this variable when CUDA starts.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def resolve_precision(requested: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for this worker's device ('auto': bf16 on a bf16-capable GPU)."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return CPU_AUTO_PRECISION


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def prepare_model(model: nn.Module, device: torch.device, precision: str = "fp32",
                  channels_last: Optional[bool] = None) -> nn.Module:
    """Move the model to the device, in channels_last (NHWC) for conv models on CUDA (the
    layout cuDNN's tensor-core kernels want) and for bf16 on CPU (2x faster per step than
    NCHW there). Not for fp32 on CPU: measured on this project's CPU it was a mixed bag, from
    0.4x (LeNet on 8x8 digits) to 1.1-1.7x (SmallCNN), and NCHW keeps CPU results as they were."""
    model = model.to(device)
    if channels_last is None:
        channels_last = device.type == "cuda" or precision == "bf16"
    if channels_last and has_convolutions(model):
        model = model.to(memory_format=torch.channels_last)
    return model


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's conv weights are stored channels_last (see prepare_model)."""
    # A conv with one input channel (MNIST's first) is contiguous both ways: look at all of them.
    return any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in model.modules() if isinstance(m, nn.Conv2d))


@dataclass(frozen=True)
class Forward:
    """Calls a model the way this worker computes: images channels_last when its weights are,
    and under bf16 autocast in bf16, always returning float32 logits."""

    precision: str = "fp32"  # "fp32" or "bf16" (resolved, never "auto")
    device_type: str = "cpu"
    channels_last: bool = False

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision != "bf16":
            return model(x)
        with torch.autocast(self.device_type, dtype=torch.bfloat16):
            logits = model(x)
        return logits.float()

    def of(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """`model` as a function of its input, for the attacks."""
        return lambda x: self(model, x)

    @classmethod
    def for_model(cls, model: nn.Module, precision: str, device: torch.device) -> "Forward":
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be resolved to fp32 or bf16, got {precision!r}")
        return cls(precision, device.type, is_channels_last(model))


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """cuDNN autotuning on CUDA, unless --deterministic asks for reproducible kernels."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def deterministic_env_vars(deterministic: bool) -> dict:
    """Environment variables the Ray Train workers need for --deterministic: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when CUDA starts, so it must come through the workers'
    runtime_env, not from the training loop. The user's own value wins."""
    if not deterministic:
        return {}
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)}
