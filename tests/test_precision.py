"""The fast path: bf16 forwards, channels_last, device-resident data, one host sync per client
round, and the --precision/--deterministic settings (no Ray here). On CPU by default;
RAY_FEDAT_TEST_DEVICE=cuda runs the training and evaluation tests on a GPU (benchmarks/gpu_check.sh)."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ray_fedat.attacks import kl_attack, pgd_ce
from ray_fedat.client import ClientShard, LocalTrainingConfig, train_client
from ray_fedat.config import parse_config
from ray_fedat.errors import ConfigError
from ray_fedat.run_config import RunConfig
from ray_fedat.data import load_dataset, load_digits, to_float
from ray_fedat.round_eval import count_correct
from ray_fedat.federation import generator_for
from ray_fedat.models import build_model
from ray_fedat.precision import (Forward, agree_on_precision, choose_precision, configure_backends, cpu_bf16_capability,
                                 cpu_flags, deterministic_env_vars, is_channels_last, native_cpu_bf16, prepare_model,
                                 resolve_precision, run_precision)

EPS, STEP = 0.1, 0.025
CPU = torch.device("cpu")
# Where the training and evaluation tests compute; the tests of CPU-only facts keep CPU.
DEVICE = torch.device(os.environ.get("RAY_FEDAT_TEST_DEVICE", "cpu"))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def shard_of(digits, n=None):
    x, y = digits.x_train[:n], digits.y_train[:n]
    return ClientShard(0, x, y, torch.bincount(y, minlength=10).float())


def local_cfg(method, epochs, precision, steps=3):
    return LocalTrainingConfig(method, epochs, 32, 0.05, 0.9, 0.0, EPS, STEP, steps, 6.0, 0.1, False,
                               precision=precision)


def output_dtypes(model, kind=nn.Conv2d):
    """Record the dtype of every conv (or linear) output while the hooks are on."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, kind)]
    return seen, hooks


def train_recording_dtypes(model, kind, shard, cfg):
    seen, hooks = output_dtypes(model, kind)
    loss = train_client(model, shard.to(DEVICE), cfg, generator_for(0, 1, 0), DEVICE)
    for h in hooks:
        h.remove()
    return loss, set(seen)


@pytest.fixture(scope="module")
def bf16_model(digits):
    """A LeNet (channels_last) after a short CalFAT round in bf16. bf16 is emulated on CPUs
    without AVX512-BF16/AMX, and slow: the LeNet checks use little data."""
    torch.manual_seed(0)
    model = prepare_model(build_model("lenet", digits.shape, 10), DEVICE, "bf16")
    loss, dtypes = train_recording_dtypes(model, nn.Conv2d, shard_of(digits, 96), local_cfg("calfat", 1, "bf16", 2))
    return model, loss, dtypes


def test_bf16_training_runs_its_forwards_in_bf16_and_keeps_float32_parameters(bf16_model):
    model, loss, conv_dtypes = bf16_model
    assert conv_dtypes == {torch.bfloat16}  # attack steps, natural logits and update all under autocast
    assert np.isfinite(loss) and is_channels_last(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for b in model.buffers() if b.is_floating_point())


def test_bf16_adversarial_training_learns(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.shape, 10).to(DEVICE)
    loss, dtypes = train_recording_dtypes(model, nn.Linear, shard_of(digits), local_cfg("calfat", 2, "bf16", 2))
    assert dtypes == {torch.bfloat16} and np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with torch.no_grad():
        predicted = model.eval()(to_float(digits.x_test).to(DEVICE)).argmax(1).cpu()
    accuracy = (predicted == digits.y_test).float().mean().item()
    assert accuracy > 0.6  # chance is 0.1


def test_a_model_trained_in_bf16_evaluates_in_fp32(digits, bf16_model):
    model, _, _ = bf16_model
    seen, hooks = output_dtypes(model)
    x_test, y_test = digits.x_test[:128], digits.y_test[:128]
    n, natural, robust = count_correct(model, x_test, y_test, epsilon=EPS, step_size=STEP, steps=3,
                                       batch_size=64, seed=0, round_=1, device=DEVICE).tolist()
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.float32}
    with torch.no_grad():
        expected = (model(to_float(x_test).to(DEVICE)).argmax(1).cpu() == y_test).sum().item()
    assert (n, natural) == (128, expected) and robust <= natural


def test_bf16_adversarial_examples_are_float32_inside_the_eps_ball_and_pixel_range(digits, bf16_model):
    model, _, _ = bf16_model
    forward = Forward.for_model(model, "bf16", DEVICE)
    x, y = to_float(digits.x_test[:64]).to(DEVICE), digits.y_test[:64].to(DEVICE)
    logits = forward(model, x)
    assert logits.dtype == torch.float32
    probs = F.softmax(logits, 1).detach()
    g = torch.Generator().manual_seed(0)
    for x_adv in (pgd_ce(forward.of(model), x, y, EPS, STEP, 4, g),
                  kl_attack(forward.of(model), x, probs, EPS, STEP, 4, g, start="uniform"),
                  kl_attack(forward.of(model), x, probs, 0.3, 0.2, 3, g)):
        assert x_adv.dtype == torch.float32
        assert (x_adv - x).abs().max() <= 0.3 + 1e-6
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    # and the attack is still an attack: it moves the examples and lowers the accuracy
    x_adv = pgd_ce(forward.of(model), x, y, EPS, STEP, 5, g)
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == y).sum() < (model(x).argmax(1) == y).sum()
    assert 0.05 < (x_adv - x).abs().max() <= EPS + 1e-6


def test_channels_last_changes_the_layout_not_the_model(digits):
    torch.manual_seed(0)
    plain = build_model("lenet", digits.shape, 10)
    fast = prepare_model(build_model("lenet", digits.shape, 10), CPU, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    assert is_channels_last(fast) and not is_channels_last(plain)  # LeNet's first conv has one input channel
    assert not is_channels_last(prepare_model(build_model("lenet", digits.shape, 10), CPU))  # CPU default: NCHW
    assert not is_channels_last(prepare_model(build_model("mlp", digits.shape, 10), CPU, channels_last=True))
    x = to_float(digits.x_test[:64])
    outputs = []
    for model in (plain, fast):
        x_in = x.clone().requires_grad_(True)
        logits = Forward.for_model(model, "fp32", CPU)(model, x_in)
        (grad,) = torch.autograd.grad(logits.logsumexp(1).sum(), x_in)
        outputs.append((logits.detach(), grad))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    assert torch.allclose(outputs[0][1], outputs[1][1], atol=1e-5)
    train_client(fast, shard_of(digits, 64), local_cfg("pgd", 1, "fp32", steps=1), generator_for(0, 1, 0), CPU)
    assert is_channels_last(fast)  # load_state_dict and SGD keep the layout


def test_the_loss_is_read_once_per_client_round_not_per_batch(digits, monkeypatch):
    calls = []
    item = torch.Tensor.item

    def counting_item(self):
        calls.append(self.shape)
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    torch.manual_seed(0)
    model = build_model("mlp", digits.shape, 10).to(DEVICE)
    shard = shard_of(digits, 320).to(DEVICE)  # 10 batches of 32, two epochs
    loss = train_client(model, shard, local_cfg("trades", 2, "fp32", steps=1), generator_for(0, 1, 0), DEVICE)
    assert len(calls) == 1 and np.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the device path is tested where it exists")
def test_a_shard_moved_to_the_gpu_trains_like_one_left_on_the_host(digits):
    """The worker moves each shard to its GPU once and indexes, converts and attacks batches
    there, with the same CPU-seeded draws: the model must come out as on the CPU (to float
    tolerance: GPU kernels sum in another order)."""
    gpu = torch.device("cuda", 0)
    shard = shard_of(digits, 200)
    moved = shard.to(gpu)
    assert moved.x.device.type == "cuda" and moved.x.dtype == torch.uint8 and len(moved) == 200
    assert moved.y.device.type == "cuda" and shard.x.device.type == "cpu"  # a copy: the host shard stays
    models = []
    for s, device in ((shard, CPU), (moved, gpu)):
        torch.manual_seed(0)
        models.append(build_model("mlp", digits.shape, 10).to(device))
        train_client(models[-1], s, local_cfg("calfat", 1, "fp32", steps=2), generator_for(0, 1, 0), device)
    for key, a in models[0].state_dict().items():
        b = models[1].state_dict()[key]
        assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), atol=1e-4), key


X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\n" \
              "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n"
ARM_CPUINFO = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve {extra}\n"


@pytest.mark.parametrize("text,onednn,native", [
    (X86_CPUINFO.format(extra="amx_bf16 amx_tile avx512_bf16"), True, True),  # Sapphire Rapids and later
    (X86_CPUINFO.format(extra="avx512_bf16"), True, True),  # Zen 4, Cooper Lake
    (X86_CPUINFO.format(extra="avx512vl"), True, False),  # AVX512 without bf16: oneDNN would emulate it
    (X86_CPUINFO.format(extra=""), False, False),  # AVX2 only (the project's first machine)
    (X86_CPUINFO.format(extra="amx_bf16"), False, False),  # a torch without oneDNN's bf16 kernels
    (ARM_CPUINFO.format(extra="bf16 i8mm"), True, True),  # Graviton 3, Neoverse V1
    (ARM_CPUINFO.format(extra=""), True, False),
    ("", True, False), (None, True, False),  # no /proc/cpuinfo (macOS, Windows): do not guess
])
def test_native_cpu_bf16_reads_the_cpu_flags(text, onednn, native):
    answer, why = native_cpu_bf16(text, onednn)
    assert answer is native and why
    if native:
        assert "has" in why and "bf16" in why
    else:
        assert "emulated" in why or "no bf16 kernels" in why


def test_precision_auto_is_bf16_where_the_cpu_has_native_bf16_and_fp32_where_it_is_emulated(monkeypatch):
    import ray_fedat.precision as precision

    monkeypatch.setattr(precision, "CPUINFO", "/nonexistent/cpuinfo")
    monkeypatch.setattr(precision, "onednn_bf16", lambda: True)  # whatever this machine's torch has
    assert choose_precision("auto", CPU) == ("fp32", "auto: cannot read this CPU's flags, so bf16 may be emulated")
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda: (True, "this CPU has amx_bf16"))
    assert choose_precision("auto", CPU) == ("bf16", "auto: this CPU has amx_bf16")
    assert choose_precision("fp32", CPU) == ("fp32", "--precision fp32")  # an explicit choice is kept
    monkeypatch.setattr(precision, "cpu_bf16_capability", lambda: (False, "this CPU has no avx512_bf16"))
    assert choose_precision("auto", CPU) == ("fp32", "auto: this CPU has no avx512_bf16")
    assert choose_precision("bf16", CPU) == ("bf16", "--precision bf16")
    assert resolve_precision("auto", CPU) == "fp32"


@pytest.mark.parametrize("text,onednn,native", [
    (X86_CPUINFO.format(extra="amx_bf16 amx_tile avx512_bf16"), True, True),
    (X86_CPUINFO.format(extra="avx512_bf16"), True, True),
    (X86_CPUINFO.format(extra="avx512vl avx512_vnni"), True, False),  # AVX512 alone: oneDNN would emulate bf16
    (X86_CPUINFO.format(extra="amx_bf16"), False, False),
    (ARM_CPUINFO.format(extra="bf16"), True, True),
    (None, True, False),  # no cpuinfo file at all
])
def test_auto_reads_the_cpuinfo_file_and_onednn_it_is_given(tmp_path, monkeypatch, text, onednn, native):
    """cpu_bf16_capability and choose_precision on fixed /proc/cpuinfo texts and a fixed oneDNN
    answer, whatever CPU runs the test: each case can fail on any machine."""
    import ray_fedat.precision as precision

    path = tmp_path / "cpuinfo"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(precision, "CPUINFO", str(path))
    monkeypatch.setattr(precision, "onednn_bf16", lambda: onednn)
    assert cpu_bf16_capability()[0] is native
    assert choose_precision("auto", CPU)[0] == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_this_machines_cpu_answer_follows_its_flags_both_ways():
    """On the CPU the tests run on: bf16 exactly when oneDNN has bf16 kernels and the flags show
    AMX-BF16 / AVX512-BF16 (x86) or BF16 (arm64), fp32 otherwise (both directions checked)."""
    import ray_fedat.precision as precision

    try:
        with open("/proc/cpuinfo") as f:
            flags = cpu_flags(f.read())
    except OSError:
        flags = None
    expected = bool(flags) and precision.onednn_bf16() and bool({"amx_bf16", "avx512_bf16", "bf16"} & flags)
    assert cpu_bf16_capability()[0] is expected
    assert resolve_precision("auto", CPU) == ("bf16" if expected else "fp32")


def test_auto_is_agreed_by_all_workers_and_explicit_choices_are_kept():
    native = ("bf16", "auto: this CPU has amx_bf16")
    emulated = ("fp32", "auto: this CPU has no amx_bf16/avx512_bf16: bf16 would be emulated")
    assert agree_on_precision("auto", *native, [True, True]) == native  # every worker native: bf16
    assert agree_on_precision("auto", *emulated, [False, False]) == emulated  # none: each says why itself
    choice, why = agree_on_precision("auto", *native, [True, False])  # another worker lacks it: fp32 here too
    assert choice == "fp32" and why == "auto: rank 1 has no native bf16, so every worker runs fp32 " \
                                       "(this worker: this CPU has amx_bf16)"
    choice, why = agree_on_precision("auto", *emulated, [False, True, False])
    assert choice == "fp32" and why.startswith("auto: ranks 0, 2 have no native bf16, so every worker runs fp32")
    assert agree_on_precision("bf16", "bf16", "--precision bf16", [True, False]) == ("bf16", "--precision bf16")
    assert agree_on_precision("fp32", "fp32", "--precision fp32", [True, True]) == ("fp32", "--precision fp32")
    assert agree_on_precision("auto", *native, [True]) == native  # one worker
    assert run_precision("fp32", CPU) == ("fp32", "--precision fp32")  # no process group: this worker alone


PRECISION_CASES = {  # name -> (--precision, the ranks that fake a CPU without native bf16)
    "rank 1 lacks bf16": ("auto", (1,)),
    "rank 0 lacks bf16": ("auto", (0,)),
    "both have bf16": ("auto", ()),
    "neither has bf16": ("auto", (0, 1)),
    "explicit bf16": ("bf16", (1,)),
}


def agree_precision_rank(rank, world, store_file, out_dir):
    import torch.distributed as dist

    import ray_fedat.precision as precision

    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world)
    results = {}
    for name, (requested, without) in PRECISION_CASES.items():
        precision.cpu_bf16_capability = ((lambda: (False, "this CPU has no avx512_bf16: bf16 would be emulated"))
                                         if rank in without else (lambda: (True, "this CPU has amx_bf16")))
        results[name] = run_precision(requested, CPU)
    torch.save(results, os.path.join(out_dir, f"precision{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two real processes
def test_two_gloo_workers_agree_on_one_precision(tmp_path):
    """2 real gloo processes, as Ray Train's workers: one faking a CPU without native bf16 makes
    both run fp32, and both give the same reason for it."""
    import torch.multiprocessing as mp

    mp.spawn(agree_precision_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"precision{r}.pt") for r in (0, 1))
    for name, (requested, without) in PRECISION_CASES.items():
        expected = "bf16" if requested == "bf16" or not without else "fp32"
        assert r0[name][0] == r1[name][0] == expected, name
    for name, lacking in (("rank 1 lacks bf16", "rank 1 has"), ("rank 0 lacks bf16", "rank 0 has")):
        head = f"auto: {lacking} no native bf16, so every worker runs fp32"
        assert r0[name][1].startswith(head) and r1[name][1].startswith(head), (name, r0[name], r1[name])
    assert r0["rank 1 lacks bf16"][1].endswith("(this worker: this CPU has amx_bf16)")  # native itself
    assert r1["rank 1 lacks bf16"][1].endswith("(this worker: this CPU has no avx512_bf16: bf16 would be emulated)")
    assert r0["neither has bf16"] == r1["neither has bf16"] == ("fp32", "auto: this CPU has no avx512_bf16: bf16 "
                                                                         "would be emulated")
    assert r0["both have bf16"] == r1["both have bf16"] == ("bf16", "auto: this CPU has amx_bf16")
    assert r0["explicit bf16"] == r1["explicit bf16"] == ("bf16", "--precision bf16")


def test_precision_auto_on_cuda_asks_for_native_bf16_only(monkeypatch):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return not including_emulation and native_gpu

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the name is not looked up without a GPU
    native_gpu = True
    assert choose_precision("auto", torch.device("cuda", 0)) == ("bf16", "auto: this GPU has native bf16")
    native_gpu = False  # pre-Ampere: bf16 only emulated, which is_bf16_supported() alone would count
    assert choose_precision("auto", torch.device("cuda", 0)) == ("fp32", "auto: this GPU has no native bf16")
    assert asked == [False, False]
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    # an older torch without the argument answered for native support only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    with pytest.raises(ValueError):
        Forward.for_model(nn.Linear(2, 2), "auto", CPU)


def test_precision_and_deterministic_flags():
    assert parse_config([]).precision == "auto" and parse_config([]).deterministic is False
    cfg = parse_config(["--precision", "bf16", "--deterministic"])
    assert cfg.precision == "bf16" and cfg.deterministic is True
    with pytest.raises(ConfigError, match="--precision 'fp16' is not one of auto, fp32, bf16"):
        parse_config(["--precision", "fp16"])


def test_deterministic_sets_the_kernels_and_the_workers_cublas_workspace(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert deterministic_env_vars(False) == {}
    assert deterministic_env_vars(True) == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice wins
    assert deterministic_env_vars(True) == {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    was = torch.are_deterministic_algorithms_enabled()
    try:
        configure_backends(CPU, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(was)


def test_an_npz_with_the_cifar10_preset_is_augmented(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y_train=np.arange(8) % 2,
             x_test=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y_test=np.arange(4) % 2)
    assert load_dataset(RunConfig(dataset="npz", data_file=str(path), preset="cifar10")).augment
    assert not load_dataset(RunConfig(dataset="npz", data_file=str(path), preset="mnist")).augment
    assert not load_dataset(RunConfig(dataset="npz", data_file=str(path))).augment


def test_compile_is_chosen_per_worker_and_falls_back_to_eager_without_a_compiler(monkeypatch):
    from ray_fedat.precision import choose_compile

    assert choose_compile("off", CPU) == (False, "--compile off")
    compiled, why = choose_compile("auto", CPU)
    assert not compiled and why.startswith("auto: eager")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    assert choose_compile("on", CPU) == (True, "--compile on")
    monkeypatch.setattr("shutil.which", lambda name: None)
    compiled, why = choose_compile("on", CPU)
    assert not compiled and why == "--compile on, but no C++ compiler (g++, c++ or clang++) is on PATH: eager"
    with pytest.raises(ConfigError, match="--compile 'yes' is not one of auto, on, off"):
        parse_config(["--dataset", "digits", "--compile", "yes"])


@pytest.mark.slow
def test_compiled_training_gives_the_eager_model_within_tolerance(digits):
    """The worker's `model.compile()` (--compile on) against eager, in the precision tests'
    tolerance: the attack's forward and input gradient in eval mode, and a client round (with a
    last batch of another size: a second compiled shape). The round trains naturally: the
    attacks' sign steps turn any last-bit difference into a whole step, so an adversarial
    round's model is compared by the quantities above, not by its weights."""
    from ray_fedat.precision import compile_toolchain_missing

    if compile_toolchain_missing(DEVICE):
        pytest.skip(f"torch.compile cannot run here: {compile_toolchain_missing(DEVICE)}")
    shard = shard_of(digits, 80).to(DEVICE)  # batches of 32, 32 and 16
    x = to_float(shard.x[:32]).requires_grad_(True)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = prepare_model(build_model("smallcnn", digits.shape, 10), DEVICE)
        if compiled:
            model.compile()
        model.eval()
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, shard.y[:32]), x)
        loss = train_client(model, shard, local_cfg("natural", 2, "fp32"), generator_for(0, 1, 0), DEVICE)
        results.append((logits.detach(), grad, loss, model.state_dict()))
    (logits, grad, loss, eager), (c_logits, c_grad, c_loss, compiled) = results
    assert torch.allclose(logits, c_logits, atol=1e-5) and torch.allclose(grad, c_grad, atol=1e-5)
    assert eager.keys() == compiled.keys()  # in place: checkpoints and aggregation see the same names
    assert c_loss == pytest.approx(loss, rel=1e-5)
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) <= 1e-5


def test_compile_on_without_a_compiler_says_so_in_one_line_before_training(monkeypatch, capsys):
    """The driver's header: `--compile on` on a CPU run without a C++ compiler is one console line
    (the workers then train eager, precision.choose_compile)."""
    from ray_fedat.train import print_header

    cfg = parse_config(["--dataset", "digits", "--compile", "on"])
    header = dict(name="r", run_dir="/tmp/r", where="local Ray", placement="2 workers", use_gpu=False,
                  storage_note="", owns_ray=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: f"/usr/bin/{name}" if name == "g++" else None)
    print_header(cfg, **header)
    assert "--compile" not in capsys.readouterr().out  # a compiler is there: nothing to say
    monkeypatch.setattr("shutil.which", lambda name: None)
    print_header(cfg, **header)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "--compile" in ln]
    assert lines == ["ray_fedat: --compile on, but no C++ compiler (g++, c++ or clang++) is on PATH: the workers "
                     "train eager"]
