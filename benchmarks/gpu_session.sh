#!/usr/bin/env bash
# The GPU measurements recorded in docs/BENCHMARKS.md and docs/RESULTS.md, as one command on a lent GPU
# machine (torch there, no package registry). Here first: `bash benchmarks/gpu_wheels.sh`; then the
# device call carries .whl and runs `OUT=... bash benchmarks/gpu_session.sh` (about 8 minutes): the training
# step against a plain loop with its roofline, then the GPU study (recipes/study_gpu.yaml). Each part has its
# own time limit, so one that overruns still leaves the others' outputs in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site LDT_CACHE_DIR=/tmp/ldt-cache COLUMNS=160 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, lowdose_toolkit; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"
timeout 90 python3 benchmarks/train_step.py --recipe recipes/cg3dsrgan.yaml --device cuda --amp bf16 --steps 5 \
  --rounds 2 2>&1 | grep -v -i "warn\|return entry" | tee "$OUT/train_step_bf16.txt"
timeout 450 python3 -m lowdose_toolkit.cli study recipes/study_gpu.yaml --out /tmp/study-gpu --docs /tmp/study-docs \
  > "$OUT/study.log" 2>&1
echo "study exit $?" | tee -a "$OUT/study.log"
tar czf "$OUT/study.tgz" -C /tmp --exclude=checkpoints study-docs study-gpu 2>/dev/null
ls -la "$OUT"
