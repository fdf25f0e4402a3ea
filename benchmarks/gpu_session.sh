#!/usr/bin/env bash
# The GPU measurements recorded in docs/BENCHMARKS.md, as run on a lent GPU machine that has torch but
# no package registry: the project's pure-Python dependencies (torchio, nibabel, ...) travel in an
# ignored folder .gpu/site, with a dist-info holding our entry points and ldt_plugins -> ../../plugins.
# Usage there: OUT=/some/folder bash benchmarks/gpu_session.sh
set -eu
export PYTHONPATH="$PWD/.gpu/site:$PWD" LDT_CACHE_DIR=/tmp/ldt-cache COLUMNS=160
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
for amp in bf16 none; do
  python3 benchmarks/train_step.py --recipe recipes/cg3dsrgan.yaml --device cuda --amp "$amp" --steps 10 \
    | tee "$OUT/train_step_$amp.txt"
done
python3 benchmarks/data.py --recipe recipes/cg3dsrgan.yaml --device cuda --set data.num_workers=8 \
  | tee "$OUT/data_gpu.txt"
python3 -m lowdose_toolkit.cli run recipes/cg3dsrgan.yaml --out /tmp/gpu-run --set data.num_workers=8 \
  --set train.epochs=8 --set train.steps_per_epoch=150 --set "eval.patch_size=[80, 80, 160]" \
  --set eval.overlap=0 --set eval.batch_size=1 --set eval.val_subjects=2 2>&1 | tail -40 | tee "$OUT/run_gpu.txt"
tar czf "$OUT/gpu_run.tgz" -C /tmp/gpu-run --exclude=checkpoints .
# Sliding-window inference vs MONAI (copy .venv/lib/python3*/site-packages/monai into .gpu/site first): whole-body on the GPU, a small volume on its CPU.
python3 benchmarks/infer.py --shape 360 360 673 --patch 96 --batch-size 8 --device cuda | tee "$OUT/infer_gpu.txt"
python3 benchmarks/infer.py --device cpu | tee "$OUT/infer_cpu.txt"
