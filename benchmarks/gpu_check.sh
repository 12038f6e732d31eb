#!/usr/bin/env bash
# The whole GPU check of issue 26 in one go, in at most 8 minutes on the device machine
# (one H200, Python 3.12, torch 2.11, no Ray, no network).
#
#   bash benchmarks/gpu_check.sh --prepare        # here, once: what must travel, into .device/ (ignored)
#   bash benchmarks/gpu_check.sh                  # on the GPU machine (--device cuda)
#   bash benchmarks/gpu_check.sh --device cpu     # the same steps on CPU: the rehearsal
#
# --prepare puts into .device/ (in .gitignore): Ray packed by ../shared/tools/pack-ray-for-device.sh
# (ray312.tar.xz, ~26 MiB), pytest's pure-Python wheels (the image may lack pytest), and the real
# MNIST test set (data/mnist-t10k, 1.6 MB), then prints the size of what travels (checkout +
# .device), which must stay under 64 MiB. On the device, `.device` is the run's one carry path.
#
# Steps (each writes OUT/<n>-<name>/output.log; OUT/steps.tsv has each step's exit code and
# seconds; OUT/summary.txt has the numbers; OUT is $OUT when set, as the device tool sets it):
#   1 facts       nvidia-smi; torch's CUDA, cuDNN, NCCL and bf16 facts; what --precision auto picks
#   2 pytest      the tests that can use CUDA, with RAY_FEDAT_TEST_DEVICE=cuda: precision paths,
#                 the sharded aggregation collectives on CUDA tensors, the CIFAR/ResNet-18 CLI path
#   3 bench       benchmarks/gpu.py: ResNet-18 PGD-10 images/s, reference vs ours fp32 vs bf16 +
#                 channels_last, peak memory
#   4 cli         the real CLI on the real MNIST 8k/2k split: --device cuda --workers 1, the default
#                 MNIST recipe, --time-budget 120, --final-attack pgd-100; keeps summary.json
#   5 determinism the same run twice with --precision fp32 --deterministic (fixed --rounds: a timed
#                 run stops by the clock, so two of them need not do the same rounds), then the two
#                 final models compared bit for bit
#
# One GPU means NCCL runs with ONE rank: NCCL refuses two ranks on one GPU. So step 2 runs the
# sharded aggregation's collectives on CUDA tensors through NCCL with world size 1 (each
# collective the rules use, called directly, since the rules skip collectives at world size 1)
# and through gloo with 2 processes sharing the GPU; the CLI runs use --workers 1 (NCCL, 1 rank).
#
# Every step has a cap and the whole run a deadline (GPU_CHECK_TOTAL_S, default 480 s on cuda):
# a step that runs over is stopped, the next one still runs, and a step that would start with
# under 15 s left is skipped. Knobs (environment), for the rehearsal or a rerun:
#   GPU_CHECK_STEPS="1 2 3 4 5"   which steps          GPU_CHECK_TOTAL_S   the deadline
#   GPU_CHECK_CAP_SCALE            the steps' caps x this (default 1 on cuda, 5 on cpu)
#   GPU_CHECK_BUDGET=120           step 4's --time-budget
#   GPU_CHECK_DET_ROUNDS=2         step 5's --rounds    GPU_CHECK_FINAL_ATTACK=pgd-100
#   GPU_CHECK_CLI_EXTRA="..."      extra CLI flags for steps 4 and 5 (e.g. --eval-samples 200)
#   GPU_CHECK_MNIST_SPLIT="8000 2000"  train / test images of the real MNIST split (smaller: rehearsal only)
#   GPU_CHECK_BENCH="..."          gpu.py's flags (default: full size on cuda, tiny on cpu)
#   GPU_CHECK_PYTEST="..."         step 2's test files / -k expression
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
[ -f ray_fedat/__init__.py ] || { echo "gpu_check: error: run it from a checkout (benchmarks/gpu_check.sh)" >&2; exit 2; }
DEVICE=cuda
PREPARE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:-}; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    --prepare) PREPARE=1; shift ;;
    -h|--help) sed -n '2,45p' "$0"; exit 0 ;;
    *) echo "gpu_check: error: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: error: --device must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;; esac
PY=${PYTHON:-$(command -v python3 || command -v python)}

# ---------------------------------------------------------------------------------- prepare
if [ "$PREPARE" = 1 ]; then
  set -e
  mkdir -p .device/data .device/wheels
  if [ ! -s .device/data/mnist-t10k/t10k-images-idx3-ubyte.gz ]; then
    src=""
    for d in "${MNIST_SRC:-}" ../shared/data/mnist-t10k ../../shared/data/mnist-t10k /work/shared/data/mnist-t10k; do
      if [ -n "$d" ] && [ -s "$d/t10k-images-idx3-ubyte.gz" ]; then src=$d; break; fi
    done
    [ -n "$src" ] || { echo "gpu_check: error: no MNIST test set found (set MNIST_SRC=DIR)" >&2; exit 1; }
    mkdir -p .device/data/mnist-t10k
    cp "$src"/t10k-*-ubyte.gz .device/data/mnist-t10k/
  fi
  if [ ! -s .device/ray312.tar.xz ]; then
    pack=""
    for p in ../shared/tools/pack-ray-for-device.sh ../../shared/tools/pack-ray-for-device.sh /work/shared/tools/pack-ray-for-device.sh; do
      [ -f "$p" ] && { pack=$p; break; }
    done
    [ -n "$pack" ] || { echo "gpu_check: error: pack-ray-for-device.sh not found" >&2; exit 1; }
    bash "$pack"
  fi
  if [ ! -s .device/data/digits.csv.gz ]; then  # the tests' bundled digits, should the image lack scikit-learn
    "$PY" -c "import os, shutil, sklearn; shutil.copy(os.path.join(os.path.dirname(sklearn.__file__), 'datasets', 'data', 'digits.csv.gz'), '.device/data/')"
  fi
  if ! ls .device/wheels/pytest-*.whl >/dev/null 2>&1; then
    # pure Python: the same wheels work on the device's 3.12
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .device/wheels pytest pluggy iniconfig packaging
  fi
  xz -t .device/ray312.tar.xz
  tree_bytes=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
  device_bytes=$(du -sb .device | cut -f1)
  total=$((tree_bytes + device_bytes))
  awk -v t="$tree_bytes" -v d="$device_bytes" 'BEGIN {m = 1048576;
    printf "what travels: checkout %.1f MiB + .device %.1f MiB = %.1f MiB (limit 64 MiB)\n", t / m, d / m, (t + d) / m}'
  du -sh .device/* | sed 's/^/  /'
  [ "$total" -lt $((64 * 1048576)) ] || { echo "gpu_check: error: over 64 MiB" >&2; exit 1; }
  echo "ready: on the device run   bash benchmarks/gpu_check.sh   with carry [\".device\"]"
  exit 0
fi

# ---------------------------------------------------------------------------------- set-up
STAMP=$(date -u +%Y%m%d-%H%M%S)
OUTDIR=${OUT:-$REPO/runs/gpu_check-$DEVICE-$STAMP}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # run dirs, checkpoints: not brought back
if [ "$DEVICE" = cuda ]; then TOTAL=${GPU_CHECK_TOTAL_S:-480}; SCALE=1; else TOTAL=${GPU_CHECK_TOTAL_S:-2400}; SCALE=5; fi
SCALE=${GPU_CHECK_CAP_SCALE:-$SCALE}  # the steps' caps x this (a slow or shared CPU)
STARTED=$(date +%s)
DEADLINE=$((STARTED + TOTAL))
STEPS=${GPU_CHECK_STEPS:-"1 2 3 4 5"}
BUDGET=${GPU_CHECK_BUDGET:-120}
DET_ROUNDS=${GPU_CHECK_DET_ROUNDS:-2}
FINAL_ATTACK=${GPU_CHECK_FINAL_ATTACK:-pgd-100}
MNIST_SPLIT=${GPU_CHECK_MNIST_SPLIT:-"8000 2000"}  # train / test images; smaller only for a CPU rehearsal
export GPU_CHECK_CLI_EXTRA=${GPU_CHECK_CLI_EXTRA:-}
exec > >(tee -a "$OUTDIR/gpu_check.log") 2>&1
echo "gpu_check: device $DEVICE, out $OUTDIR, deadline ${TOTAL} s, steps: $STEPS, $(date -u +%FT%TZ)"

# Ray and pytest, if the image lacks them: unpacked once per machine, outside the checkout
# (the checkout's .device is replaced on every device call; /tmp survives while it stays warm).
SITE=${GPU_CHECK_SITE:-/tmp/ray_fedat_device_site}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
need_site=0
"$PY" -c "import ray" 2>/dev/null || need_site=1
"$PY" -c "import pytest" 2>/dev/null || need_site=1
if [ "$need_site" = 1 ]; then
  t0=$(date +%s)
  mkdir -p "$SITE"
  if [ ! -f "$SITE/.ray-unpacked" ] && [ -s .device/ray312.tar.xz ]; then
    tar -xJf .device/ray312.tar.xz -C "$SITE" && touch "$SITE/.ray-unpacked"
  fi
  for w in .device/wheels/*.whl; do [ -f "$w" ] && "$PY" -m zipfile -e "$w" "$SITE" ; done
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "gpu_check: unpacked Ray/pytest into $SITE in $(( $(date +%s) - t0 )) s"
fi
if ! "$PY" -c "import sklearn" 2>/dev/null && [ -s .device/data/digits.csv.gz ]; then
  # The tests train on scikit-learn's bundled digits, which ray_fedat.data reads straight from
  # sklearn/datasets/data/digits.csv.gz: without scikit-learn, a stub package holding only that
  # file (in $SITE, on this machine only) lets them run.
  mkdir -p "$SITE/sklearn/datasets/data" && : > "$SITE/sklearn/__init__.py"
  cp .device/data/digits.csv.gz "$SITE/sklearn/datasets/data/"
  case ":$PYTHONPATH:" in *":$SITE:"*) ;; *) export PYTHONPATH="$SITE:$PYTHONPATH" ;; esac
  echo "gpu_check: no scikit-learn here: its digits file put in a stub package in $SITE"
fi
export PYTHONDONTWRITEBYTECODE=1 RAY_FEDAT_TEST_DEVICE=$DEVICE
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
"$PY" -c "import ray; print('ray', ray.__version__, 'from', ray.__file__)" || echo "gpu_check: Ray does not import: steps 2, 4, 5 will fail"
"$PY" -c "import pytest; print('pytest', pytest.__version__)" || echo "gpu_check: pytest does not import: step 2 will fail"
"$PY" - <<'EOF'
import importlib.util
mods = ["numpy", "torch", "ray", "pytest", "pyarrow", "yaml", "sklearn", "matplotlib", "PIL", "torchvision", "torchattacks"]
print("modules:", ", ".join(f"{m} {'yes' if importlib.util.find_spec(m) else 'NO'}" for m in mods))
EOF

MNIST_DIR=""
for d in .device/data/mnist-t10k ../shared/data/mnist-t10k ../../shared/data/mnist-t10k; do
  [ -s "$d/t10k-images-idx3-ubyte.gz" ] && { MNIST_DIR=$d; break; }
done
printf 'step\tname\texit\tseconds\tcap_s\n' > "$OUTDIR/steps.tsv"

# step N NAME CAP_S COMMAND...: runs COMMAND (cwd: the repo) under a cap, never past the deadline.
step() {
  local n=$1 name=$2 cap=$(( $3 * SCALE )) dir="$OUTDIR/$1-$2"; shift 3
  case " $STEPS " in *" $n "*) ;; *) return 0 ;; esac
  mkdir -p "$dir"
  local left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 15 ]; then
    echo "== step $n $name: skipped, ${left} s left before the deadline"
    printf '%s\t%s\tskipped\t0\t%s\n' "$n" "$name" "$cap" >> "$OUTDIR/steps.tsv"
    return 0
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== step $n $name (cap ${cap} s) $(date -u +%T)"
  local t0 t1 rc
  t0=$(date +%s.%N)
  # timeout signals the step's whole process group (Ray's processes included) when the cap is hit
  STEP_DIR=$dir timeout --kill-after=10 "$cap" bash -c '"$@"' step "$@" > "$dir/output.log" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  local secs
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}')
  printf '%s\t%s\t%s\t%.1f\t%s\n' "$n" "$name" "$rc" "$secs" "$cap" >> "$OUTDIR/steps.tsv"
  tail -n 25 "$dir/output.log" | sed 's/^/   | /'
  printf '== step %s %s: exit %s%s in %.1f s\n' "$n" "$name" "$rc" "$([ "$rc" = 124 ] && echo ' (ran past its cap)')" "$secs"
}

# ---------------------------------------------------------------------------------- steps
facts() {
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv
  else
    echo "no nvidia-smi on this machine"
  fi
  "$PY" - <<'EOF'
import platform, torch, torch.distributed as dist
from ray_fedat.precision import choose_precision, cpu_bf16_capability
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA build {torch.version.cuda}")
print(f"CUDA available: {torch.cuda.is_available()}, devices: {torch.cuda.device_count()}")
if torch.cuda.is_available():
    d = torch.device("cuda", 0)
    p = torch.cuda.get_device_properties(d)
    print(f"GPU 0: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        native = "n/a (torch without including_emulation)"
    print(f"bf16: supported {torch.cuda.is_bf16_supported()}, native {native}")
    print(f"cuDNN: available {torch.backends.cudnn.is_available()}, version {torch.backends.cudnn.version()}, "
          f"enabled {torch.backends.cudnn.enabled}")
    print(f"TF32: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN conv {torch.backends.cudnn.allow_tf32}; "
          f"float32 matmul precision {torch.get_float32_matmul_precision()}")
    print(f"NCCL: available {dist.is_nccl_available()}, version {torch.cuda.nccl.version() if dist.is_nccl_available() else '-'}")
    print("--precision auto on cuda:", choose_precision("auto", d))
    x = torch.randn(4096, 4096, device=d, dtype=torch.bfloat16)
    torch.cuda.synchronize(); import time; t = time.perf_counter()
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
    print(f"bf16 4096^3 matmul: {20 * 2 * 4096**3 / (time.perf_counter() - t) / 1e12:.0f} TFLOP/s (sanity, not a benchmark)")
print(f"gloo available: {dist.is_gloo_available()}")
print("--precision auto on this CPU:", choose_precision("auto", torch.device("cpu")), cpu_bf16_capability())
EOF
  grep -m1 "model name" /proc/cpuinfo 2>/dev/null; nproc; free -g 2>/dev/null | head -2
}

pytest_cuda() {
  # shellcheck disable=SC2086
  "$PY" -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning ${GPU_CHECK_PYTEST:-tests/test_precision.py tests/test_sharded_aggregation.py tests/test_cifar_path.py} \
    --junitxml="$STEP_DIR/junit.xml"
}

bench() {
  local args
  if [ "$DEVICE" = cuda ]; then args=${GPU_CHECK_BENCH:-"--images 2048 --repeats 2"}
  else args=${GPU_CHECK_BENCH:-"--images 4 --batch-size 4 --steps 1 --repeats 1"}; fi  # ResNet-18 on 2 shared cores: ~1 image/s
  # shellcheck disable=SC2086
  "$PY" benchmarks/gpu.py --device "$DEVICE" --no-cli $args
}

mnist_npz() {  # the real split: the MNIST test set's 10k images, 8k train / 2k test (seed 0), as benchmarks/common.py
  [ -n "$MNIST_DIR" ] || { echo "no MNIST test set: run --prepare where ../shared is, or copy it to .device/data/mnist-t10k"; return 1; }
  [ -s "$WORK/mnist.npz" ] || "$PY" - "$WORK/mnist.npz" "$REPO/$MNIST_DIR" $MNIST_SPLIT <<'EOF'
import os, sys
import numpy as np
from ray_fedat.data import read_idx_gz
out, d, n_train, n_test = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
x = read_idx_gz(os.path.join(d, "t10k-images-idx3-ubyte.gz"))
y = read_idx_gz(os.path.join(d, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)
order = np.random.default_rng(0).permutation(len(y))
train, test = order[:n_train], order[n_train:n_train + n_test]
np.savez(out, x_train=x[train], y_train=y[train], x_test=x[test], y_test=y[test])
print(f"real MNIST: {len(train)} train / {len(test)} test images from {d}")
EOF
}

cli() {  # cli NAME FLAGS...: the training CLI as a user runs it, on the real MNIST split
  local name=$1; shift
  # shellcheck disable=SC2086
  mnist_npz || return 1
  "$PY" -m ray_fedat.train --dataset npz --data-file "$WORK/mnist.npz" --preset mnist --device "$DEVICE" \
    --workers 1 --storage-path "$WORK/runs" --name "$name" "$@" $GPU_CHECK_CLI_EXTRA
  local rc=$?
  for f in summary.json metrics.jsonl workers.json; do
    [ -f "$WORK/runs/$name/$f" ] && cp "$WORK/runs/$name/$f" "$STEP_DIR/$name.$f"
  done
  return $rc
}

cli_run() {
  cli mnist-budget --time-budget "$BUDGET" --final-attack "$FINAL_ATTACK" || return $?
  "$PY" - "$STEP_DIR/mnist-budget.summary.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
w, f = s["workers"][0], s["final"] or {}
print(f"MNIST run: {s['status']}, {s['rounds_completed']} rounds in {s['wall_s']:.1f} s, device {w['device']}, "
      f"precision {w['precision']} ({w.get('precision_reason', '?')}); final natural {100 * f.get('natural_acc', 0):.1f}%, "
      f"PGD robust {100 * f.get('robust_acc', 0):.1f}%")
print("final attack:", json.dumps(s.get("final_attack"))[:1500])
EOF
}

determinism() {
  local flags=(--precision fp32 --deterministic --rounds "$DET_ROUNDS")
  cli det-a "${flags[@]}" || return $?
  cli det-b "${flags[@]}" || return $?
  "$PY" - "$WORK/runs" <<'EOF'
import json, os, sys, torch
runs = sys.argv[1]
a, b = (torch.load(os.path.join(runs, n, "final_model.pt"), weights_only=True) for n in ("det-a", "det-b"))
different = [k for k in a if not torch.equal(a[k], b[k])]
diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()), default=0.0)
timing = {"round_s", "train_s", "aggregate_s", "eval_s", "started_at", "ended_at"}
def records(n):
    with open(os.path.join(runs, n, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(l).items() if k not in timing and not k.endswith("_s")} for l in f if l.strip()]
same_metrics = records("det-a") == records("det-b")
print(f"--precision fp32 --deterministic twice: models bit-identical: {not different} "
      f"({len(different)} of {len(a)} tensors differ, max |diff| {diff:.3g}); metrics identical: {same_metrics}")
sys.exit(0 if not different and same_metrics else 1)
EOF
}

export PY DEVICE WORK MNIST_DIR MNIST_SPLIT BUDGET DET_ROUNDS FINAL_ATTACK REPO
export -f facts pytest_cuda bench mnist_npz cli cli_run determinism
step 1 facts 60 facts
step 2 pytest 150 pytest_cuda
step 3 bench 100 bench
step 4 cli $((BUDGET + 90)) cli_run
step 5 determinism 110 determinism

# ---------------------------------------------------------------------------------- summary
{
  echo "gpu_check on $DEVICE, $(date -u +%FT%TZ), $(( $(date +%s) - STARTED )) s in all (deadline ${TOTAL} s)"
  column -t -s $'\t' "$OUTDIR/steps.tsv" 2>/dev/null || cat "$OUTDIR/steps.tsv"
  grep -h "^modules:" "$OUTDIR/gpu_check.log" 2>/dev/null
  grep -h -E "^(GPU 0|bf16|cuDNN|NCCL|--precision auto)" "$OUTDIR"/1-facts/output.log 2>/dev/null
  tail -n 1 "$OUTDIR"/2-pytest/output.log 2>/dev/null
  sed -n '/^ResNet-18/,$p' "$OUTDIR"/3-bench/output.log 2>/dev/null
  grep -h "^MNIST run" "$OUTDIR"/4-cli/output.log 2>/dev/null
  grep -h "^--precision fp32 --deterministic" "$OUTDIR"/5-determinism/output.log 2>/dev/null
} > "$OUTDIR/summary.txt"
echo "== summary ($OUTDIR/summary.txt)"
cat "$OUTDIR/summary.txt"
rm -rf "$WORK"
awk -F'\t' 'NR > 1 && $3 != "0" {bad = 1} END {exit bad}' "$OUTDIR/steps.tsv"
