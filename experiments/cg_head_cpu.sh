#!/usr/bin/env bash
# The dose-head follow-up in docs/RESULTS.md (2026-11-25): Baseline vs Baseline+CG with equal steps
# (300 epochs x 40 steps, not equal minutes), the CPU study's settings otherwise, then every run scored
# on the held-out subjects with its best and its last checkpoint. About 45 minutes on 2 CPU cores.
# Run nothing else meanwhile: two torch processes on two cores slow each other down about fivefold.
# Usage: bash experiments/cg_head_cpu.sh [OUT]   (default runs/cg-head-cpu)
set -eu
OUT=${1:-runs/cg-head-cpu}
SET=(--set data.patch_size=32 --set data.samples_per_volume=4 --set data.queue_length=40 --set data.preload=true
     --set train.epochs=300 --set train.max_minutes=null --set train.steps_per_epoch=40
     --set train.scheduler.name=none --set train.stop_when_lr_below=null --set train.amp=none
     --set "eval.patch_size=[80,80,160]" --set eval.overlap=0 --set eval.batch_size=1 --set eval.val_subjects=1
     --set model.generator.residual=true --set seed=0 --set model.generator.channels=16
     --set model.generator.max_channels=128 --set train.previews=false)
ldt run recipes/baseline.yaml "${SET[@]}" --out "$OUT/baseline"
ldt run recipes/baseline_cg.yaml "${SET[@]}" --set model.heads.0.input=enc2 --set model.heads.0.pool=std \
  --set name=baseline_cg_enc2_std --out "$OUT/cg-enc2-std"  # its own method name in the tables
ldt run recipes/baseline_cg.yaml "${SET[@]}" --out "$OUT/cg-bottleneck-avg"
ldt run recipes/baseline_cg.yaml "${SET[@]}" --set model.heads.0.encoder_grad=0.1 \
  --set name=baseline_cg_grad01 --out "$OUT/cg-grad01"  # the paper's head, a tenth of its guidance
for run in baseline cg-enc2-std cg-bottleneck-avg cg-grad01; do
  ldt evaluate "$OUT/$run" --checkpoint last --out "$OUT/$run/last"
done
ldt table "$OUT"/*/ --out "$OUT/tables-best"
ldt table "$OUT"/*/last --out "$OUT/tables-last"
