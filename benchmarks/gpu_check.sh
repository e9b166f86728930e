#!/usr/bin/env bash
# The GPU check, ready to run on a machine with one CUDA device (about 6 minutes):
#   bash benchmarks/gpu_check.sh [DATA_DIR]      (DATA_DIR: holds cifar10_small/; default
#                                                 $PIGGYBACK_DATA, else ../shared/data)
# 1. the suite's gpu-marked tests; 2. benchmarks/run.py on cuda (ResNet-50, 224 px, bf16
# autocast, channels_last: training step ratios, compile, inference, task switch, memory);
# 2b. its compile section again with layout_optimization=false (on CPU it took compiled
# Piggyback from 1.13x to 1.05x compiled fine-tuning, benchmarks/README.md "torch.compile";
# the GPU trade decides whether model.compile_options should default to it there); 3. one
# epoch of the offline ImageNet backbone on the CIFAR-10 subset with trainer=gpu (bf16-mixed).
# Every figure is one line.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device visible to torch; run this on a GPU machine" >&2
  exit 2
fi
DATA="${1:-${PIGGYBACK_DATA:-../shared/data}}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
python -c "import torch; print('device =', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

echo "== 1/3 pytest -m gpu"
timeout 120 pytest -m gpu -q -p no:cacheprovider 2>&1 | tail -3

echo "== 2/3 benchmarks/run.py --device cuda"
timeout 150 python benchmarks/run.py --device cuda --quick 2>&1 | tee "$OUT/bench.txt" | grep " = "

echo "== 2b/3 torch.compile without Inductor's layout optimization (decides model.compile_options for GPUs)"
timeout 100 python benchmarks/run.py --device cuda --quick --only compile \
  --compile-option layout_optimization=false 2>&1 | tee "$OUT/bench_compile_nolayout.txt" | grep " = "

echo "== 3/3 one epoch, efficientnet_lite0 on cifar10_small, trainer=gpu"
if [ -d "$DATA/cifar10_small" ]; then
  start=$(date +%s)
  timeout 150 python train.py experiment=paper backbone=efficientnet_lite0 data=imagefolder \
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
else
  echo "gpu_cifar10_small_1epoch = skipped (no $DATA/cifar10_small)"
fi
echo "outputs in $OUT"
