#!/usr/bin/env bash
# The quickstart (guided CG-3DSRGAN, CPU-sized) on both noise regimes of the phantom: low doses nested in
# the full-dose events (list-mode subsets, as the challenge) and independent acquisitions; each run is
# scored on its held-out subjects (results.md), then experiments/guidance_diagnostic.py splits its gain
# into head-conditioned, oracle-conditioned and coarse. About 9 minutes on 2 CPU cores (bf16; 12 in fp32); run nothing else
# meanwhile. Usage: bash experiments/guided_regimes.sh [OUT]   (default runs/guided-regimes)
set -eu
OUT=${1:-runs/guided-regimes}
ldt run recipes/quickstart.yaml --out "$OUT/listmode"
ldt run recipes/quickstart.yaml --set data.source.counts_model=independent --set name=quickstart-independent \
  --out "$OUT/independent"
for regime in listmode independent; do
  python "$(dirname "$0")/guidance_diagnostic.py" "$OUT/$regime" test best
done
