"""The ``phantom`` source: the embedded default data, a simulated whole-body FDG PET data set.

On first use it simulates the data set (:mod:`lowdose_toolkit.data.phantom` for the anatomy,
:mod:`lowdose_toolkit.data.scans` for count-based low-dose scans) into a cache folder named by a hash
of every parameter and the simulator version, and reuses it afterwards. The cache lives in
``~/.cache/lowdose-toolkit/phantom/<key>`` (``$XDG_CACHE_HOME`` is honoured); ``LDT_CACHE_DIR``
replaces ``~/.cache/lowdose-toolkit``, and ``cache_dir`` replaces the whole ``.../phantom`` folder.
A data set is generated in a temporary folder and renamed into place when complete, so an
interrupted run never leaves a half cache.

Example recipe: ``data: {source: {name: phantom, subjects: 10, seed: 0}, drfs: [4, 10, 20, 50, 100]}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.records import SubjectRecord


def cache_root() -> Path:
    """The folder that holds the phantom caches (``<LDT_CACHE_DIR or ~/.cache/lowdose-toolkit>/phantom``)."""
    base = os.environ.get("LDT_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "phantom"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "lowdose-toolkit" / "phantom"


class PhantomSource:
    """Simulated whole-body FDG PET subjects (full dose + low dose per DRF), generated once and cached.

    Args:
        subjects: Number of subjects.
        seed: Seed of anatomy, uptake and counts; the same seed gives the same files.
        drfs: Dose reduction factors (passed by the engine from the recipe's ``data.drfs``).
        cache_dir: Folder for the phantom caches (default: see the module docstring).
        shape: Volume ``[D, H, W]`` (axial slices, y, x); default ``[160, 80, 80]``.
        spacing_mm: Voxel size ``[sz, sy, sx]`` in mm; default ``[6, 6, 6]``.
        counts_per_bq: Full-dose true counts per Bq (noise level); default the calibrated value.
        iterations: OSEM iterations of every reconstruction; default 3.
        counts_model: ``listmode`` (default: each low-dose scan is the first 1/DRF of the full-dose
            events, nested as in the challenge) or ``independent`` (every dose level its own Poisson
            acquisition). The two noise regimes a model is tested on.
        texture: Largest heterogeneity of uptake (a subject's relative spread is drawn in ``[0, texture]``);
            default 0, uniform organs. Real organs are not uniform, and a model trained without texture
            takes it for noise (docs/RESULTS.md, "Data unlike the training data").
        texture_fwhm_mm: Correlation FWHM of the texture, mm (default 15).
        postfilter_fwhm_mm: 3D Gaussian post-filter on every reconstruction, mm (default 0: none), as many
            scanners' clinical protocols apply; the full dose gets the same filter as the low doses.

    Example:
        >>> src = PhantomSource(subjects=2, drfs=[4, 100], shape=[64, 40, 40],
        ...                     spacing_mm=[15, 12, 12])  # doctest: +SKIP
        >>> src.records()[0]  # doctest: +SKIP
        SubjectRecord('phantom_000', drfs=[4, 100], suv_factor=0.00027)
    """

    def __init__(
        self,
        subjects: int | None = None,
        seed: int = 0,
        drfs: list[int] | None = None,
        cache_dir: str | None = None,
        shape: list[int] | None = None,
        spacing_mm: list[float] | None = None,
        counts_per_bq: float | None = None,
        iterations: int | None = None,
        counts_model: Literal["listmode", "independent"] | None = None,
        texture: float | None = None,
        texture_fwhm_mm: float | None = None,
        postfilter_fwhm_mm: float | None = None,
    ) -> None:
        from lowdose_toolkit.data import simulate as sim
        from lowdose_toolkit.data.simulation_config import check_drfs, make_config

        self.subjects = sim.DEFAULT_SUBJECTS if subjects is None else subjects
        self.seed = seed
        self.drfs = list(check_drfs(sim.DEFAULT_DRFS if drfs is None else drfs))
        sim.check_subjects_seed(self.subjects, self.seed)
        params = {
            "shape": shape,
            "spacing_mm": spacing_mm,
            "counts_per_bq": counts_per_bq,
            "iterations": iterations,
            "counts_model": counts_model,
            "texture": texture,
            "texture_fwhm_mm": texture_fwhm_mm,
            "postfilter_fwhm_mm": postfilter_fwhm_mm,
        }
        self.params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if v is not None}
        self.config = make_config(**self.params)
        self._cache_parent = Path(cache_dir).expanduser() if cache_dir else None
        self._records: list[SubjectRecord] | None = None

    @property
    def key(self) -> str:
        """Hash of everything that determines the data (simulator version, seed, DRFs, config)."""
        from lowdose_toolkit.data import simulate as sim

        blob = json.dumps(
            {
                "sim_version": sim.SIM_VERSION,
                "subjects": self.subjects,
                "seed": self.seed,
                "drfs": self.drfs,
                "config": self.config.as_dict(),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def path(self) -> Path:
        """The cache folder of this data set."""
        return (self._cache_parent or cache_root()) / self.key

    def records(self) -> list[SubjectRecord]:
        """The subjects; simulates the data set into the cache on first use."""
        from lowdose_toolkit.data import simulate as sim

        if self._records is None:
            if not sim.is_simulation_output(self.path):
                self._generate()
            self._records = sim.read_dataset(self.path)
        return self._records

    def _generate(self) -> None:
        """Simulate into a temporary folder beside the cache and rename it into place."""
        import sys

        from rich.console import Console

        from lowdose_toolkit.data import simulate as sim

        final = self.path
        parent = final.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot create the phantom cache folder {parent} ({exc.strerror}); "
                "set LDT_CACHE_DIR or the source's cache_dir to a writable folder"
            ) from exc
        console = Console(stderr=True)
        d, h, w = self.config.shape
        console.print(
            f"[bold]phantom:[/] simulating {self.subjects} subjects ({d}x{h}x{w} voxels, "
            f"DRFs {self.drfs}) into {final} - once, then cached"
        )
        work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
        try:
            sim.write_dataset(
                work / "data", self.subjects, self.seed, self.drfs,
                progress=sys.stderr.isatty(), config=self.config,
            )
            if final.exists() and not sim.is_simulation_output(final):  # a stale or partial cache: set aside
                os.rename(final, work / "stale")
            try:
                os.rename(work / "data", final)
            except OSError:
                if not sim.is_simulation_output(final):  # not a concurrent run that finished first
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={list(v) if isinstance(v, tuple) else v}" for k, v in self.params.items())
        return (
            f"PhantomSource(subjects={self.subjects}, seed={self.seed}, drfs={self.drfs}{extra}, "
            f"cache={str(self.path)!r})"
        )


@hookimpl
def ldt_register_sources(register):
    """Register the ``phantom`` source."""
    register("phantom", PhantomSource)
