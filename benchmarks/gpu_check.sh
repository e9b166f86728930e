#!/usr/bin/env bash
# The GPU check, ready to run on a machine with one CUDA device, in at most 5 minutes:
#   bash benchmarks/gpu_check.sh [DATA_DIR]      (DATA_DIR: holds cifar10_small/; default
#                                                 $PIGGYBACK_DATA, else ../shared/data)
# Steps, most important first. The whole check has a budget (GPU_CHECK_BUDGET_S, default
# 290 s, counted from the start); each step runs for at most its cap or what is left, and a
# step that would start with less than its floor prints "NAME = skipped (...)" instead:
# 1. the suite's gpu-marked tests;
# 2. benchmarks/run.py on cuda (ResNet-50, 224 px, bf16 autocast, channels_last): training
#    step ratios, inference, task switch, memory, loader, faults;
# 3. its compile section (compiled vs eager, compile time);
# 4. one epoch of the offline ImageNet backbone on the CIFAR-10 subset, trainer=gpu;
# 5. the compile section again with layout_optimization=false (on CPU it took compiled
#    Piggyback from 1.13-1.18x to 1.05-1.10x compiled fine-tuning, benchmarks/README.md "torch.compile";
#    the GPU trade decides whether model.compile_options should default to it there).
# Every figure is one line; a step cut off by its time keeps the lines it printed.
set -uo pipefail
BUDGET="${GPU_CHECK_BUDGET_S:-290}"
DEADLINE=$(( $(date +%s) + BUDGET ))
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch; run this on a GPU machine" >&2
  exit 2
fi
DATA="${1:-${PIGGYBACK_DATA:-../shared/data}}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python -c "import torch; print('device =', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

# slot NAME CAP FLOOR: sets T to the seconds this step may run (CAP, or what is left of the
# budget if less); prints "NAME = skipped" and fails when fewer than FLOOR seconds are left.
slot() {
  local left=$(( DEADLINE - 5 - $(date +%s) ))  # 5 s: timeout's kill grace
  if (( left < $3 )); then
    echo "$1 = skipped (${left} s of the ${BUDGET} s budget left, the step needs ${3} s)"
    return 1
  fi
  T=$(( left < $2 ? left : $2 ))
}

echo "== 1/5 pytest -m gpu"
if slot gpu_tests 45 15; then
  timeout -k 5 "$T" pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -3
fi

echo "== 2/5 benchmarks/run.py --device cuda"
if slot gpu_benchmarks 100 40; then
  timeout -k 5 "$T" python benchmarks/run.py --device cuda --quick \
    --only train inference switch memory loader faults 2>&1 | tee "$OUT/bench.txt" | grep " = "
fi

echo "== 3/5 torch.compile, Inductor's defaults"
if slot gpu_compile 80 40; then
  timeout -k 5 "$T" python benchmarks/run.py --device cuda --quick --only compile 2>&1 \
    | tee "$OUT/bench_compile.txt" | grep " = "
fi

echo "== 4/5 one epoch, efficientnet_lite0 on cifar10_small, trainer=gpu"
if [ ! -d "$DATA/cifar10_small" ]; then
  echo "gpu_cifar10_small_1epoch = skipped (no $DATA/cifar10_small)"
elif slot gpu_cifar10_small_1epoch 70 40; then
  start=$(date +%s)
  timeout -k 5 "$T" python train.py experiment=paper backbone=efficientnet_lite0 data=imagefolder \
    data.root="$DATA/cifar10_small" trainer=gpu trainer.max_epochs=1 logger=none \
    hydra.run.dir="$OUT/cifar" print_table=false > "$OUT/train.txt" 2>&1
  rc=$?
  python - "$OUT/cifar/metrics.json" "$rc" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
path, rc, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if rc:
    print(f"gpu_cifar10_small_1epoch = failed (exit {rc}); see train.txt")
else:
    m = json.load(open(path))["metrics"]
    acc = m.get("test/acc")
    print(f"gpu_cifar10_small_1epoch_test_acc = {acc}  [{seconds} s wall, 1 epoch, bf16-mixed]")
PY
fi

echo "== 5/5 torch.compile without Inductor's layout optimization (the GPU default of model.compile_options)"
if slot gpu_compile_nolayout 80 40; then
  timeout -k 5 "$T" python benchmarks/run.py --device cuda --quick --only compile \
    --compile-option layout_optimization=false 2>&1 | tee "$OUT/bench_compile_nolayout.txt" \
    | grep " = "
fi
echo "gpu_check_wall_s = $(( BUDGET - (DEADLINE - $(date +%s)) ))  (budget ${BUDGET} s)  [outputs in $OUT]"
