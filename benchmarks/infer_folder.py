"""Batch denoising of a folder: ``ldt infer`` with read-ahead / write-behind threads vs one volume at a time.

Both modes run in this process on the same copies of one volume, alternating, with the same checkpoint
and settings; the median wall time of each is reported with their ratio (>1: prefetching is faster)
and the peak resident memory above the start (sampled from /proc/self/statm). ``--no-model`` replaces
the sliding-window inference by a copy, the I/O-bound regime of a GPU, where a whole-body volume is
inferred in about a second while reading and writing its ``.nii.gz`` takes several.

Usage:
    python benchmarks/infer_folder.py RUN_DIR VOLUME.nii.gz [--copies 3] [--repeats 2] [--no-model]
    # measured in docs/BENCHMARKS.md with the CPU study's Baseline and a 360 x 360 x 673 volume
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer import PeakRSS  # noqa: E402  (benchmarks/infer.py)

from lowdose_toolkit.cli.infer import infer  # noqa: E402
from lowdose_toolkit.data.naming import nifti_suffix  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a run directory or checkpoint")
    parser.add_argument("volume", type=Path, help="a NIfTI volume, copied --copies times")
    parser.add_argument("--copies", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-model", action="store_true", help="skip the model: measure the I/O pipeline alone")
    args = parser.parse_args()
    if args.no_model:
        import lowdose_toolkit.infer.sliding as sliding

        sliding.infer_volume = lambda volume, predict, **_: volume.clone()  # type: ignore[assignment]

    with tempfile.TemporaryDirectory(prefix="ldt-infer-folder-") as tmp:
        root = Path(tmp)
        inputs = root / "in"
        inputs.mkdir()
        suffix = nifti_suffix(args.volume) or ".nii.gz"
        for i in range(args.copies):
            shutil.copy(args.volume, inputs / f"copy{i}{suffix}")
        times: dict[bool, list[float]] = {True: [], False: []}
        peaks: dict[bool, int] = {True: 0, False: 0}
        for r in range(args.repeats):
            for prefetch in (True, False) if r % 2 == 0 else (False, True):
                out = root / f"out-{prefetch}-{r}"
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    code = infer(args.checkpoint, [str(inputs)], out, args.patch_size, args.overlap, args.batch_size,
                                 None, args.device, "auto", False, previews=True, prefetch=prefetch)
                    times[prefetch].append(time.perf_counter() - t0)
                if code != 0:
                    sys.exit(f"ldt infer failed (exit {code})")
                peaks[prefetch] = max(peaks[prefetch], mem.peak)
                shutil.rmtree(out)
    regime = "I/O only (--no-model)" if args.no_model else "with the model"
    print(f"{args.copies} x {args.volume.name}, {regime}, median of {args.repeats}")
    for prefetch, label in ((True, "prefetch"), (False, "one at a time")):
        print(f"{label:<14} {statistics.median(times[prefetch]):8.1f} s   peak +{peaks[prefetch] / 2**30:.2f} GiB")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"speed prefetch / one at a time: {ratio:.2f}x (>1: prefetch faster)")


if __name__ == "__main__":
    main()
