#!/usr/bin/env bash
# The GPU measurements recorded in docs/BENCHMARKS.md and docs/RESULTS.md, as one command on a lent GPU
# machine (torch there, no package registry). Here first: `bash benchmarks/gpu_wheels.sh`; then the
# device call carries .whl and runs `OUT=... bash benchmarks/gpu_session.sh`. PARTS chooses what runs (default
# "step study", about 8 minutes): step = the training step against a plain loop with its roofline; study = the
# GPU study (recipes/study_gpu.yaml); infer = issue 13's GPU figures for inference and data (about 5 minutes):
# a GPU quickstart, then benchmarks/predictor.py (ldt against MONAI, fp32/bf16, folded, channels_last),
# benchmarks/compile.py and benchmarks/data.py on its checkpoint and data. Each part has its own time
# limit, so one that overruns still leaves the others' outputs in $OUT.
set -u
OUT=${OUT:-/tmp/gpu-out}
PARTS=${PARTS:-step study}
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site LDT_CACHE_DIR=/tmp/ldt-cache COLUMNS=160 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch, lowdose_toolkit; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"
if part step; then
  timeout 90 python3 benchmarks/train_step.py --recipe recipes/cg3dsrgan.yaml --device cuda --amp bf16 --steps 5 \
    --rounds 2 2>&1 | grep -v -i "warn\|return entry" | tee "$OUT/train_step_bf16.txt"
fi
if part study; then
  timeout 450 python3 -m lowdose_toolkit.cli study recipes/study_gpu.yaml --out /tmp/study-gpu --docs /tmp/study-docs \
    > "$OUT/study.log" 2>&1
  echo "study exit $?" | tee -a "$OUT/study.log"
  tar czf "$OUT/study.tgz" -C /tmp --exclude=checkpoints study-docs study-gpu 2>/dev/null
fi
if part infer; then
  timeout 150 python3 -m lowdose_toolkit.cli run recipes/quickstart.yaml --set train.device=cuda --out /tmp/qs-gpu \
    > "$OUT/quickstart.log" 2>&1
  echo "quickstart exit $?" | tee -a "$OUT/quickstart.log"
  timeout 90 python3 benchmarks/predictor.py /tmp/qs-gpu --device cuda \
    --settings auto/fold/cl fp32/fold/cl fp32/fold/cf bf16/nofold/cf fp32/fold/cl/compile 2>&1 | tee "$OUT/predictor.txt"
  timeout 90 python3 benchmarks/compile.py --checkpoint /tmp/qs-gpu/checkpoints/best.pt --device cuda 2>&1 \
    | tee "$OUT/compile.txt"
  timeout 60 python3 benchmarks/data.py --device cuda 2>&1 | tee "$OUT/data.txt"
fi
ls -la "$OUT"
