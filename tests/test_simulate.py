"""Count-based low-dose simulation: projector, physics of the noise, data set writer, source, command."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from ldt_plugins.sources import phantom as phantom_plugin
from ldt_plugins.sources.phantom import PhantomSource
from lowdose_toolkit.data import simulate as sim
from lowdose_toolkit.data.phantom import LABELS, make_phantom, nifti_affine
from lowdose_toolkit.data.projector import Projector
from lowdose_toolkit.data.reconstruction import osem
from lowdose_toolkit.data.scans import _draw_counts, simulate_scans
from lowdose_toolkit.data.simulation_config import SimulationConfig, check_drfs, make_config
from lowdose_toolkit.errors import DataError, UserError
from lowdose_toolkit.evaluation.metrics import psnr

SMALL = {"shape": (64, 40, 40), "spacing_mm": (15.0, 12.0, 12.0), "n_angles": 48}
CFG = SimulationConfig(**SMALL)
LIVER = next(k for k, v in LABELS.items() if v == "liver")
LESION = next(k for k, v in LABELS.items() if v == "lesion")


# ---------------------------------------------------------------------------------------- projector


def test_projector_is_adjoint_and_integrates_lines() -> None:
    proj = Projector((40, 40), (12.0, 12.0), n_angles=48, subsets=4)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(proj.npix, 3, generator=g)
    y = torch.rand(proj.n_rows, 3, generator=g)
    lhs = (proj.forward(x) * y).sum(dtype=torch.float64)
    rhs = (x * proj.back(y)).sum(dtype=torch.float64)
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-5)
    for k in range(proj.subsets):
        assert torch.allclose(proj.forward(x, k), proj.forward(x)[proj.rows(k)])
    # A uniform disc of mu (radius 150 mm): the central bin holds the diameter, 300 mm.
    c = (torch.arange(40) - 19.5) * 12.0
    disc = ((c[:, None] ** 2 + c[None, :] ** 2) <= 150.0**2).float()[None] * 0.0096
    line = proj.forward(proj.to_columns(disc)).reshape(48, proj.n_bins)
    centre = line[:, proj.n_bins // 2]
    assert float(centre.mean()) == pytest.approx(300.0 * 0.0096, rel=0.05)
    # Each view conserves the disc's integral (area x mu / bin width).
    per_view = line.sum(1) * proj.bin_mm
    assert torch.allclose(per_view, per_view.mean().expand(48), rtol=1e-4)
    assert torch.equal(proj.to_volume(proj.to_columns(disc)), disc)


def test_osem_recovers_noise_free_activity() -> None:
    proj = Projector((40, 40), (12.0, 12.0), n_angles=48, subsets=4)
    c = (torch.arange(40) - 19.5) * 12.0
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    img = torch.where(r2 <= 150.0**2, 1000.0, 0.0) + torch.where(r2 <= 40.0**2, 3000.0, 0.0)
    x = proj.to_columns(img[None])
    af = torch.exp(-proj.forward(proj.to_columns((r2 <= 150.0**2).float()[None] * 0.0096)))
    bg = torch.full_like(af, 5.0)
    y = 0.5 * af * proj.forward(x) + bg
    rec = proj.to_volume(osem(y, af, 0.5, bg, proj, iterations=20))[0]
    inner = r2 <= 100.0**2
    assert float(rec[inner & (r2 > 60.0**2)].mean()) == pytest.approx(1000.0, rel=0.03)
    assert float(rec.sum()) == pytest.approx(float(img.sum()), rel=0.03)


# ------------------------------------------------------------------------------------------ physics


@pytest.fixture(scope="module")
def scans() -> tuple:
    # A lower count level than the default: at 12-15 mm voxels the default leaves so little noise
    # that the liver's CoV is dominated by partial-volume structure, not by counting statistics.
    ph = make_phantom(CFG.shape, CFG.spacing_mm, seed=11)
    stats: dict = {}
    cfg = make_config(CFG, counts_per_bq=4.0)
    images = simulate_scans(ph.activity, ph.mu, (4, 10, 100), cfg, seed=5, stats=stats)
    return ph, images, stats


def test_low_dose_is_unbiased_in_bq_per_ml(scans: tuple) -> None:
    ph, images, _ = scans
    full = images["full"]
    assert set(images) == {"full", 4, 10, 100}
    for d in (4, 10, 100):
        assert images[d].dtype == torch.float32 and images[d].shape == CFG.shape
        assert float(images[d].mean()) == pytest.approx(float(full.mean()), rel=0.03)
    # The full-dose image is in the truth's units: same total activity as the phantom.
    assert float(full.sum()) == pytest.approx(float(ph.activity.sum()), rel=0.05)
    liver = ph.labels == LIVER
    assert float(full[liver].mean()) == pytest.approx(float(ph.activity[liver].mean()), rel=0.1)


def test_noise_grows_like_sqrt_drf(scans: tuple) -> None:
    ph, images, _ = scans
    labels = ph.labels.numpy()
    roi = ndimage.binary_erosion(labels == LIVER) & ~ndimage.binary_dilation(labels == LESION, iterations=2)
    assert roi.sum() > 100
    cov = {k: float(v.numpy()[roi].std() / v.numpy()[roi].mean()) for k, v in images.items()}
    assert cov["full"] < cov[4] < cov[10] < cov[100]
    assert 3.5 <= cov[100] / cov[4] <= 7.0  # sqrt(100 / 4) = 5


def test_psnr_falls_with_drf(scans: tuple) -> None:
    _, images, stats = scans
    values = [psnr(images["full"], images[d]) for d in (4, 10, 100)]
    assert values[0] > values[1] > values[2]
    # List-mode subsets: error variance ~ DRF - 1, i.e. 10 log10(99 / 3) = 15.2 dB from DRF 4 to 100.
    assert 12.0 <= values[0] - values[2] <= 18.5
    p = stats["prompts"]
    assert p["full"] > p["4"] > p["10"] > p["100"]
    assert p["4"] / p["full"] == pytest.approx(0.25, rel=0.01)
    true_plus_bg = stats["trues"] + stats["scatter"] + stats["randoms"]
    assert p["full"] == pytest.approx(true_plus_bg, rel=1e-3)
    assert stats["scatter"] / (stats["trues"] + stats["scatter"]) == pytest.approx(CFG.scatter_fraction, rel=1e-3)


def test_listmode_counts_are_nested_and_poisson() -> None:
    rng = np.random.default_rng(0)
    ybar = np.full((2000, 10), 40.0)
    counts = _draw_counts(ybar, (4, 20, 100), "listmode", rng)
    assert bool((counts[100] <= counts[20]).all() and (counts[20] <= counts[4]).all())
    assert bool((counts[4] <= counts["full"]).all())
    for key, frac in (("full", 1.0), (4, 0.25), (100, 0.01)):
        c = counts[key].double()
        assert float(c.mean()) == pytest.approx(40 * frac, rel=0.02)
        assert float(c.var()) == pytest.approx(40 * frac, rel=0.08)  # Poisson: variance = mean
    # Low dose shares its events with the full dose (corr = sqrt(1/4)); independent draws do not.
    def corr(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1])

    assert corr(counts[4], counts["full"]) == pytest.approx(0.5, abs=0.03)
    ind = _draw_counts(ybar, (4,), "independent", np.random.default_rng(0))
    assert abs(corr(ind[4], ind["full"])) < 0.03


def test_simulation_is_deterministic_by_seed() -> None:
    ph = make_phantom(CFG.shape, CFG.spacing_mm, seed=2)
    a = simulate_scans(ph.activity, ph.mu, (10,), CFG, seed=1)
    b = simulate_scans(ph.activity, ph.mu, (10,), CFG, seed=1)
    c = simulate_scans(ph.activity, ph.mu, (10,), CFG, seed=2)
    assert torch.equal(a["full"], b["full"]) and torch.equal(a[10], b[10])
    assert not torch.equal(a[10], c[10])


def test_bad_parameters_are_user_errors() -> None:
    with pytest.raises(UserError, match="unknown simulation parameter.*'countz'"):
        make_config(countz=3)
    with pytest.raises(UserError, match=r"n_angles \(50\).*subsets \(8\)"):
        SimulationConfig(n_angles=50)
    with pytest.raises(UserError, match="counts_model"):
        SimulationConfig(counts_model="poisson")
    with pytest.raises(UserError, match=r"integers >= 2, got 1"):
        check_drfs([4, 1])
    ph = make_phantom(CFG.shape, CFG.spacing_mm, seed=0)
    with pytest.raises(UserError, match=r"configured shape \(160, 80, 80\)"):
        simulate_scans(ph.activity, ph.mu, (4,), SimulationConfig())


# ------------------------------------------------------------------------------------- data set


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sim") / "ds"
    sim.write_dataset(out, subjects=2, seed=3, drfs=(4, 100), **SMALL)
    return out


def test_write_dataset_layout_manifest_and_nifti(dataset: Path) -> None:
    recs = sim.read_dataset(dataset)
    assert [r.subject for r in recs] == ["phantom_000", "phantom_001"]
    assert all(sorted(r.low) == [4, 100] for r in recs)
    assert recs[0].full == (dataset / "phantom_000" / "full.nii.gz").resolve()
    assert recs[0].low[4].name == "drf_004.nii.gz" and recs[0].suv_factor > 0
    header = (dataset / "manifest.csv").read_text().splitlines()[0]
    assert header == "subject,drf,path,suv_factor"
    img = nib.load(recs[0].low[100])
    assert img.shape == (40, 40, 64) and img.get_data_dtype() == np.float32
    assert np.array_equal(img.affine, nifti_affine(CFG.shape, CFG.spacing_mm))
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert b"Bq/mL" in img.header["descrip"].tobytes() and img.header["aux_file"].tobytes().startswith(b"Bq/mL")
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    labels = nib.load(dataset / "phantom_000" / "labels.nii.gz")
    assert labels.shape == (40, 40, 64)
    meta = json.loads((dataset / "simulation.json").read_text())
    assert meta["generator"] == sim.GENERATOR and meta["sim_version"] == sim.SIM_VERSION
    assert meta["config"]["shape"] == [64, 40, 40] and meta["drfs"] == [4, 100]
    assert meta["subject_facts"][0]["suv_factor"] == recs[0].suv_factor
    # The nifti source reads the same folder.
    from ldt_plugins.sources.nifti import NiftiSource

    assert [r.subject for r in NiftiSource(str(dataset), drfs=[4, 100]).records()] == ["phantom_000", "phantom_001"]
    # The written image equals an in-memory simulation of the same subject (data on disk is x, y, z).
    ph, images, _ = sim._simulate_subject(1, 3, (4, 100), CFG)
    on_disk = np.asarray(nib.load(recs[1].low[4]).dataobj).transpose(2, 1, 0)
    assert np.array_equal(on_disk, images[4].numpy())


def test_write_dataset_is_bit_identical_and_refuses_foreign_folders(dataset: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    sim.write_dataset(again, subjects=2, seed=3, drfs=(4, 100), **SMALL)
    for f in sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file()):
        assert (again / f).read_bytes() == (dataset / f).read_bytes(), f
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and is not a previous simulation output"):
        sim.write_dataset(foreign, subjects=1, **SMALL)
    assert (foreign / "notes.txt").read_text() == "mine"
    # A previous output is replaced as a whole (no stale subject left behind).
    sim.write_dataset(again, subjects=1, seed=4, drfs=(4, 100), **SMALL)
    assert not (again / "phantom_001").exists()
    assert [r.subject for r in sim.read_dataset(again)] == ["phantom_000"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
    with pytest.raises(DataError, match="manifest.csv not found"):
        sim.read_dataset(foreign)


def test_calibration_report_rows_and_table(dataset: Path) -> None:
    from rich.console import Console

    rows = sim.dataset_report(dataset)
    assert [r["drf"] for r in rows] == [4, 100] and rows[0]["subjects"] == 2
    assert rows[0]["psnr_mean"] > rows[1]["psnr_mean"]
    assert rows[1]["paper"] == sim.PAPER_LOW_DOSE_PSNR[100]
    assert rows[1]["difference"] == pytest.approx(rows[1]["psnr_mean"] - 42.490)
    mem = sim.calibration_report(subjects=2, seed=3, drfs=(4, 100), **SMALL)
    for a, b in zip(rows, mem, strict=True):
        assert a["psnr_mean"] == pytest.approx(b["psnr_mean"], abs=1e-6)
    console = Console(record=True, width=120)
    sim.print_calibration(rows, console)
    text = console.export_text()
    assert "42.49" in text and f"{rows[0]['psnr_mean']:.2f}" in text


# ------------------------------------------------------------------------------------- the source


def _small_source(**kw: object) -> PhantomSource:
    return PhantomSource(subjects=1, seed=0, drfs=[4, 100], shape=[64, 40, 40], spacing_mm=[15, 12, 12], **kw)


def test_source_caches_under_ldt_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDT_CACHE_DIR", str(tmp_path / "cache"))
    src = _small_source()
    assert src.path.parent == tmp_path / "cache" / "phantom"
    assert "subjects=1" in repr(src) and "drfs=[4, 100]" in repr(src) and str(src.path) in repr(src)
    calls = []
    real = sim.write_dataset

    def counting(*args: object, **kw: object) -> Path:
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(sim, "write_dataset", counting)
    recs = src.records()
    assert len(calls) == 1 and recs[0].full.is_file() and recs[0].full.is_relative_to(src.path)
    stamp = recs[0].full.stat().st_mtime_ns
    again = _small_source().records()  # a new instance: reuses the cache
    assert len(calls) == 1 and again[0].full == recs[0].full
    assert recs[0].full.stat().st_mtime_ns == stamp
    # Any parameter change is another cache entry.
    assert _small_source(counts_per_bq=10.0).path != src.path
    assert PhantomSource(subjects=1, drfs=[4, 10], shape=[64, 40, 40], spacing_mm=[15, 12, 12]).path != src.path
    assert [p.name for p in src.path.parent.iterdir()] == [src.key]  # no temp folders left
    assert _small_source(texture=0.2).path != src.path and _small_source(texture=0.0).path == src.path


def test_the_default_phantom_keeps_its_cache_key_and_texture_is_drawn_per_subject() -> None:
    """Texture is off by default, and a config without it hashes as before the option existed (caches stay
    valid); with it, each subject draws its own spread, recorded in its info, and its anatomy is unchanged."""
    assert PhantomSource(drfs=[4, 10, 20, 50, 100]).key == "5c282968906aa505"
    assert PhantomSource(drfs=[4, 10, 20, 50, 100], postfilter_fwhm_mm=0.0).key == "5c282968906aa505"
    filtered = PhantomSource(drfs=[4, 10, 20, 50, 100], postfilter_fwhm_mm=6.0)
    assert filtered.key != "5c282968906aa505" and filtered.config.postfilter_fwhm_mm == 6.0
    assert "texture" not in SimulationConfig().as_dict()
    cfg = make_config(SimulationConfig(**SMALL), texture=0.3)
    plain = sim._simulate_subject(0, 3, (4,), SimulationConfig(**SMALL))[0]
    textured = sim._simulate_subject(0, 3, (4,), cfg)[0]
    assert 0.0 <= textured.info["texture_sigma"] <= 0.3 and "texture_sigma" not in plain.info
    assert torch.equal(textured.labels, plain.labels) and not torch.equal(textured.activity, plain.activity)
    with pytest.raises(UserError, match=r"texture must be in \[0, 1\]"):
        SimulationConfig(texture=2.0)


def test_format_name_is_fixed_and_a_stale_cache_is_regenerated(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """simulation.json's generator names the data set format, not a module path: moving the module must not
    invalidate every cache and `ldt simulate` output. A cache folder that is not a valid output is replaced."""
    assert sim.GENERATOR == "lowdose_toolkit.simulate"
    monkeypatch.setenv("LDT_CACHE_DIR", str(tmp_path))
    src = _small_source()
    src.path.mkdir(parents=True)
    (src.path / "simulation.json").write_text('{"generator": "something else"}')
    (src.path / "leftover.txt").write_text("partial")
    recs = src.records()
    assert recs[0].full.is_file() and sim.is_simulation_output(src.path)
    assert not (src.path / "leftover.txt").exists()
    assert [p.name for p in src.path.parent.iterdir()] == [src.key]  # no temp or stale folders left


def test_interrupted_generation_leaves_no_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LDT_CACHE_DIR", str(tmp_path))
    src = PhantomSource(subjects=2, drfs=[4], shape=[64, 40, 40], spacing_mm=[15, 12, 12])
    real = sim._simulate_subject

    def fail_second(i: int, *args: object) -> tuple:
        if i == 1:
            raise KeyboardInterrupt
        return real(i, *args)

    monkeypatch.setattr(sim, "_simulate_subject", fail_second)
    with pytest.raises(KeyboardInterrupt):
        src.records()
    assert not src.path.exists()
    assert list((tmp_path / "phantom").iterdir()) == []


def test_source_is_registered_through_the_hook_and_checks_arguments(tmp_path: Path) -> None:
    got = {}
    phantom_plugin.ldt_register_sources(lambda name, factory: got.__setitem__(name, factory))
    assert got == {"phantom": PhantomSource}
    src = PhantomSource(cache_dir=str(tmp_path))
    assert src.subjects == sim.DEFAULT_SUBJECTS and src.drfs == list(sim.DEFAULT_DRFS)
    assert src.path.parent == tmp_path
    with pytest.raises(UserError, match="subjects must be a positive integer, got 0"):
        PhantomSource(subjects=0)
    with pytest.raises(UserError, match="integers >= 2"):
        PhantomSource(drfs=[0, 4])
    with pytest.raises(UserError, match="spacing_mm"):
        PhantomSource(spacing_mm=[6, 0, 6])


# ------------------------------------------------------------------------------------ the command


def test_simulate_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from lowdose_toolkit.cli.simulate import simulate

    monkeypatch.setattr(sim, "write_dataset", functools.partial(sim.write_dataset, **SMALL))
    app = typer.Typer()
    app.command()(simulate)
    runner = CliRunner()
    out = tmp_path / "data"
    res = runner.invoke(app, ["--out", str(out), "--subjects", "1", "--seed", "2", "--report"])
    assert res.exit_code == 0, res.output
    assert sim.is_simulation_output(out) and (out / "phantom_000" / "drf_100.nii.gz").is_file()
    assert "42.49" in res.output and "58.72" in res.output  # the paper column of the table
    res = runner.invoke(app, ["--subjects", "1"])
    assert isinstance(res.exception, UserError) and "nothing to do" in str(res.exception)
    res = runner.invoke(app, ["--out", str(tmp_path / "textured"), "--subjects", "1", "--texture", "0.2"])
    assert res.exit_code == 0, res.output
    assert '"texture_sigma"' in (tmp_path / "textured" / "simulation.json").read_text()
    res = runner.invoke(app, ["--out", str(tmp_path / "bad"), "--subjects", "1", "--texture", "2"])
    assert isinstance(res.exception, UserError) and "texture must be in [0, 1]" in str(res.exception)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    res = runner.invoke(app, ["--out", str(tmp_path / "other"), "--subjects", "1"])
    assert isinstance(res.exception, UserError) and "not a previous simulation output" in str(res.exception)
    res = runner.invoke(app, ["--out", str(out), "--subjects", "0"])
    assert isinstance(res.exception, UserError) and "--subjects" in str(res.exception)
    assert math.isfinite(sim.dataset_report(out)[0]["psnr_mean"])
    res = runner.invoke(app, ["--out", str(tmp_path / "ind"), "--subjects", "1", "--counts-model", "independent"])
    assert res.exit_code == 0, res.output
    assert '"counts_model": "independent"' in (tmp_path / "ind" / "simulation.json").read_text()
    res = runner.invoke(app, ["--out", str(tmp_path / "bad"), "--subjects", "1", "--counts-model", "nested"])
    assert isinstance(res.exception, UserError) and "--counts-model 'nested': use one of listmode" in str(res.exception)


def test_dataset_folder_mode_follows_the_umask(tmp_path: Path) -> None:
    """Written as the files in it are: 0o777 less the umask (tempfile.mkdtemp made it 0700)."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        sim.write_dataset(tmp_path / "ds", 1, 0, [4], shape=(64, 40, 40), spacing_mm=(15, 12, 12))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ds").stat().st_mode) == 0o755
