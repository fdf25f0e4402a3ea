"""The local-consistency guard (lowdose_toolkit/infer/consistency.py) on a whole-body-size volume: its time and
the memory it adds beside the two volumes it reads, against the sliding-window inference it follows (the
quickstart checkpoint's, if given). Usage:

    python benchmarks/consistency.py [RUN_DIR]   (default shape 673x360x360, the challenge's whole body)
"""
import resource
import sys
import time
from pathlib import Path

import torch

from lowdose_toolkit.infer.consistency import Consistency

SHAPE = (360, 360, 673)
SPACING = (1.65, 1.65, 2.89)  # the challenge's uEXPLORER voxels, mm


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


torch.manual_seed(0)
body = torch.zeros(1, *SHAPE)
body[:, 60:300, 80:280, 20:650] = 1.0
low = body + 0.3 * body.sqrt() * torch.randn(1, *SHAPE)
pred = body.clone()
del body
volume_gib = low.numel() * 4 / 2**30
before = peak_gib()
t0 = time.perf_counter()
out, share = Consistency().apply_with_share(low, pred, SPACING)
seconds = time.perf_counter() - t0
print(f"guard on {'x'.join(map(str, SHAPE))} ({volume_gib:.2f} GiB per float32 copy): {seconds:.1f} s, "
      f"changed {share:.4f} of the body; peak RSS {before:.2f} -> {peak_gib():.2f} GiB "
      f"(+{(peak_gib() - before) / volume_gib:.1f} copies beside low and pred)")
if len(sys.argv) > 1:
    from lowdose_toolkit.infer.predictor import Predictor

    predictor, _ = Predictor.from_checkpoint(Path(sys.argv[1]) / "checkpoints" / "best.pt", torch.device("cpu"))
    predictor.consistency = None
    del out
    t0 = time.perf_counter()
    with torch.no_grad():
        predictor.predict(low)
    infer = time.perf_counter() - t0
    print(f"sliding-window inference of the same volume ({predictor.precision}): {infer:.1f} s; the guard adds "
          f"{100 * seconds / infer:.0f} %")
