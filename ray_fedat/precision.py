"""How a worker computes: bf16 autocast or fp32 forwards, channels_last, cuDNN and determinism.

Only model *forwards* change precision. In bf16 each forward runs under
`torch.autocast(device_type, torch.bfloat16)` and returns float32 logits, so everything
around it stays float32: the adversarial example, its noise, sign step and projection, the
parameters and the optimizer, CalFAT's log-prior, aggregation and the collectives.
Evaluation (the reported PGD yardstick) always runs in fp32. `--precision auto` is decided
once for the whole run: bf16 only where every worker's device computes bf16 natively
(choose_precision on each, then run_precision's one all_gather), else fp32 on every worker.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn


# What `--precision auto` means. bf16 autocast only pays where the hardware computes in bf16:
# - CPU: measured with benchmarks/local_throughput.py, an attack step runs 2.5-10x *slower* in
#   bf16 on a CPU without AVX512-BF16/AMX (oneDNN emulates it: the project's first machine, an
#   AMD EPYC with AVX2), and 2.6-2.8x faster on CPUs with them (issue 24; benchmarks/README.md).
#   torch.ops.mkldnn._is_mkldnn_bf16_supported() alone is not enough: on x86 it is true on any
#   AVX512 CPU (oneDNN *can* run bf16 there, emulated), so the CPU's own flags decide.
# - CUDA: torch.cuda.is_bf16_supported() counts emulation (pre-Ampere GPUs) unless told not to.
CPU_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 flags in /proc/cpuinfo
ARM_NATIVE_BF16_FLAG = "bf16"  # arm64's "Features" line (FEAT_BF16)
CPUINFO = "/proc/cpuinfo"

# cuBLAS needs a fixed workspace to be deterministic; it reads this variable when CUDA starts.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


def cpu_flags(cpuinfo_text: str) -> Optional[set]:
    """The feature flags of the first CPU in /proc/cpuinfo's text (x86 "flags", arm64
    "Features"), or None when the text has neither line."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def native_cpu_bf16(cpuinfo_text: Optional[str], onednn_bf16: bool) -> Tuple[bool, str]:
    """(whether this CPU computes bf16 natively, why): oneDNN must have bf16 kernels, and the CPU
    must have AMX-BF16 / AVX512-BF16 (x86) or BF16 (arm64) to run them without emulation."""
    if not onednn_bf16:
        return False, "this torch's oneDNN has no bf16 kernels for this CPU"
    flags = cpu_flags(cpuinfo_text or "")
    if flags is None:
        return False, "cannot read this CPU's flags, so bf16 may be emulated"
    native = [f for f in CPU_NATIVE_BF16_FLAGS if f in flags]
    if native:
        return True, f"this CPU has {'/'.join(native)}"
    if ARM_NATIVE_BF16_FLAG in flags:
        return True, "this CPU has bf16 (arm64)"
    return False, f"this CPU has no {'/'.join(CPU_NATIVE_BF16_FLAGS)}: bf16 would be emulated"


def cpu_model_name(cpuinfo_text: str) -> Optional[str]:
    """The first CPU's model in /proc/cpuinfo's text (x86 "model name", some arm64 "Model"), or None."""
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model") and value.strip():
            return value.strip()
    return None


def device_name(device: torch.device) -> str:
    """What computes: the GPU's name, or the CPU's model (summary.json's workers, the trackers' params)."""
    import platform

    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    text = read_cpuinfo()
    name = cpu_model_name(text) if text is not None else None
    return name or platform.processor() or platform.machine() or "unknown CPU"


def read_cpuinfo() -> Optional[str]:
    """CPUINFO's text, or None where there is none (not Linux)."""
    try:
        with open(CPUINFO) as f:
            return f.read()
    except OSError:
        return None


def onednn_bf16() -> bool:
    """Whether this torch's oneDNN has bf16 kernels for this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def cpu_bf16_capability() -> Tuple[bool, str]:
    """native_cpu_bf16 for the CPU this process runs on (CPUINFO's text)."""
    return native_cpu_bf16(read_cpuinfo(), onednn_bf16())


def cuda_bf16_capability(device: torch.device) -> Tuple[bool, str]:
    """(whether this GPU computes bf16 natively, why). Older torch has no `including_emulation`
    argument; it then answered for native support only (compute capability 8.0 and up)."""
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = torch.cuda.is_bf16_supported()
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
    return (True, f"{name} has native bf16") if native else (False, f"{name} has no native bf16")


def choose_precision(requested: str, device: torch.device) -> Tuple[str, str]:
    """('fp32' or 'bf16', why) for this worker's device: 'auto' is bf16 where the device
    computes bf16 natively, else fp32."""
    if requested != "auto":
        return requested, f"--precision {requested}"
    native, why = cuda_bf16_capability(device) if device.type == "cuda" else cpu_bf16_capability()
    return ("bf16" if native else "fp32"), f"auto: {why}"


def resolve_precision(requested: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for this worker's device (see choose_precision)."""
    return choose_precision(requested, device)[0]


def agree_on_precision(requested: str, local_choice: str, local_reason: str,
                       native_by_rank: Sequence[bool]) -> Tuple[str, str]:
    """The run's precision, the same on every worker, from this worker's own choice
    (choose_precision) and whether each rank's device computes bf16 natively: under `auto`,
    bf16 only when every rank does; when only some do, fp32 everywhere and the reason names
    the ranks without it. An explicit --precision is every worker's choice already, and when
    no rank has native bf16 each one's own reason says why."""
    without = [rank for rank, native in enumerate(native_by_rank) if not native]
    if requested != "auto" or not without or len(without) == len(native_by_rank):
        return local_choice, local_reason
    ranks = ", ".join(map(str, without))
    whose = f"rank {ranks} has" if len(without) == 1 else f"ranks {ranks} have"
    own = local_reason[len("auto: "):] if local_reason.startswith("auto: ") else local_reason
    return "fp32", f"auto: {whose} no native bf16, so every worker runs fp32 (this worker: {own})"


def run_precision(requested: str, device: torch.device) -> Tuple[str, str]:
    """('fp32' or 'bf16', why) for the whole run, the same on every worker: under `auto` each
    worker says whether its device computes bf16 natively (one all_gather of a 0/1 flag on
    `device`, where the run's other collectives are), and bf16 needs all of them to; a
    cluster of mixed CPUs or GPUs runs fp32 everywhere. Without a process group (one
    process) it is choose_precision."""
    choice, reason = choose_precision(requested, device)
    if requested != "auto" or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return choice, reason
    mine = torch.tensor([1.0 if choice == "bf16" else 0.0], dtype=torch.float32, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return agree_on_precision(requested, choice, reason, [t.item() > 0.5 for t in everyone])


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


# What `--compile auto` means: eager until torch.compile has measured faster somewhere.
# benchmarks/local_throughput.py --compile on this project's 2-core AMD EPYC (AVX2): SmallCNN's
# CalFAT step ran at 0.87x eager in fp32 once compiled (20 s of compiling), 1.01x in emulated
# bf16 (47 s). Inductor fuses the pointwise ops; the convolutions, 78% of an attack step, stay
# oneDNN calls. No GPU has measured it yet.
COMPILE_AUTO_REASON = {"cpu": "auto: eager (torch.compile measured no faster on this project's CPUs)",
                       "cuda": "auto: eager (torch.compile not measured on a GPU yet)"}


def compile_toolchain_missing(device: torch.device) -> Optional[str]:
    """What torch.compile lacks to generate kernels for `device` here, or None: a C++ compiler
    for a CPU (inductor writes C++), Triton for a GPU."""
    import shutil

    if device.type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return "this torch has no Triton support"
        return None if has_triton() else "Triton is not installed"
    if os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler (g++, c++ or clang++) is on PATH"


def choose_compile(requested: str, device: torch.device) -> Tuple[bool, str]:
    """(whether this worker compiles its model, why), for --compile auto|on|off."""
    if requested == "off":
        return False, "--compile off"
    if requested == "auto":
        return False, COMPILE_AUTO_REASON.get(device.type, COMPILE_AUTO_REASON["cpu"])
    missing = compile_toolchain_missing(device)
    if missing:
        return False, f"--compile on, but {missing}: eager"
    return True, "--compile on"
