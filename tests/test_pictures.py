"""Pictures a person reads: MIP previews (units, PSNR/SSIM, difference row, zoomed inset), curves.png, the
table charts; each checked through its matplotlib objects, then as a PNG file of a sensible size."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO

from lowdose_toolkit.core.figures import texts
from lowdose_toolkit.infer.preview import (
    BQML,
    INPUT_UNITS,
    SUV,
    Panel,
    input_units,
    mip_figure,
    save_mips_png,
    volume_panels,
    zoom_box,
)
from lowdose_toolkit.loggers import example_record
from lowdose_toolkit.train.curves import curves_figure, write_curves


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file (its signature and IHDR checked)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def blobs(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float32)
    rng = np.random.default_rng(seed)
    volume = np.full(shape, 10.0, dtype=np.float32)
    for _ in range(3):
        centre = rng.uniform(6, np.array(shape) - 6)
        volume += 200 * np.exp(-((grid - centre) ** 2).sum(-1) / 8)
    return torch.from_numpy(volume)


def test_training_preview_has_units_metrics_difference_row_and_zoomed_inset(tmp_path: Path) -> None:
    full = blobs((40, 20, 64))
    low = full + torch.from_numpy(np.random.default_rng(1).normal(0, 20, full.shape).astype(np.float32))
    pred = full.clone()
    pred[10:16, :, 40:46] += 150  # the region where the prediction is wrong: the zoom must find it
    panels = volume_panels([("low-dose input", low), ("prediction", pred), ("full-dose", full)], reference=2,
                           factor=2.0)
    assert panels[2].psnr is None and 20 < panels[0].psnr < panels[1].psnr + 20 and 0 < panels[1].ssim < 1
    np.testing.assert_allclose(panels[2].image.max(), 2.0 * float(full.max()), rtol=1e-6)  # display units
    figure = mip_figure(panels, title="sub01 · DRF 100 · epoch 3", units=BQML, reference=2,
                        difference_label="prediction − full dose")
    words = texts(figure)
    assert "sub01 · DRF 100 · epoch 3" in words
    assert f"prediction\nPSNR {panels[1].psnr:.2f} dB\nSSIM {panels[1].ssim:.4f}" in words
    assert "full-dose\n(reference)" in words
    assert BQML in words and "prediction − full dose (Bq/mL)" in words  # the colour bars say the units
    flat = [" ".join(w.split()) for w in words]
    assert "prediction − full-dose" in flat and "low-dose input − full-dose" in flat  # the difference row
    assert sum(w.startswith("zoomed inset") for w in words) == 3
    axes = [ax for ax in figure.axes if ax.images]
    assert len(axes) == 3 + 3 + 2  # MIPs, zoomed insets, differences (none under the reference)
    # The box sits on the wrong region: rows 64-1-45..64-1-40 (head up), columns 10..15.
    row, col = zoom_box(np.abs(panels[1].image - panels[2].image), 19)
    assert row <= 64 - 46 and row + 19 >= 64 - 40 and col <= 10 and col + 19 >= 16
    path = save_mips_png(panels, tmp_path / "previews" / "epoch_003.png", units=BQML, reference=2)
    width, height = png_size(path)
    assert 400 < width < 2000 and 400 < height < 2000
    assert [p.name for p in path.parent.iterdir()] == ["epoch_003.png"]  # written atomically: no temporary left


def test_preview_without_reference_and_small_images() -> None:
    """ldt infer: no metrics, the difference to the input; a MIP under 32 pixels gets no inset."""
    low, den = np.random.default_rng(0).random((24, 20)), np.full((24, 20), 0.5)
    figure = mip_figure([Panel("input", low), Panel("denoised", den)], units=SUV, difference_to=0,
                        difference_label="denoised − input")
    words = texts(figure)
    assert "input" in words and "denoised" in words and not any("PSNR" in w for w in words)
    assert SUV in words and "denoised − input (SUV)" in words and not any("zoom" in w for w in words)
    alone = texts(mip_figure([Panel("input $x$", low)], title="a_$1.nii.gz"))
    assert "a_$1.nii.gz" in [t.replace("\\$", "$") for t in alone]  # dollars print as written


def test_units_of_an_input(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4))
    nib.save(image, tmp_path / "plain.nii.gz")
    image.header["aux_file"] = b"Bq/mL"  # as ldt simulate writes it
    nib.save(image, tmp_path / "sim.nii.gz")
    assert input_units(tmp_path / "plain.nii.gz") == INPUT_UNITS and input_units(tmp_path / "sim.nii.gz") == BQML
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    for units, expected in (("BQML", BQML), ("GML", "SUV (g/mL)")):
        folder = tmp_path / units
        folder.mkdir()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.128"  # PET image
        ds.Modality, ds.Units = "PT", units
        pydicom.dcmwrite(folder / "1.dcm", ds, enforce_file_format=True)
        (folder / "notes.txt").write_text("not DICOM")
        assert input_units(folder) == expected


def records() -> list[dict]:
    """Four epochs over two stages, validated at epochs 2 and 4, best at 4."""
    out = []
    for epoch in (1, 2, 3, 4):
        record = example_record(epoch)
        record["stage"] = "coarse" if epoch <= 2 else "refine"
        record["lrs"] = {"generator": 1e-3 / epoch, "discriminator": 2e-4}
        if epoch % 2:
            record["val"] = {}
        record["best_epoch"] = 2 if epoch < 4 else 4
        out.append(record)
    return out


def test_curves_show_loss_terms_psnr_per_drf_against_the_input_and_lrs(tmp_path: Path) -> None:
    figure = curves_figure(records(), title="quickstart · run-1")
    words = texts(figure)
    for word in ("l1", "total (weighted sum)", "DRF 4: model", "DRF 4: low-dose input", "DRF 100: model",
                 "DRF 100: low-dose input", "best epoch (4)", "generator", "discriminator", "refine", "epoch",
                 "PSNR (dB)", "quickstart · run-1"):
        assert word in words, word
    psnr = next(ax for ax in figure.axes if ax.get_ylabel() == "PSNR (dB)")
    model = next(line for line in psnr.lines if line.get_label() == "DRF 100: model")
    assert list(model.get_xdata()) == [2, 4] and model.get_ydata()[1] == pytest.approx(45.0)  # validated epochs
    low = next(line for line in psnr.lines if line.get_label() == "DRF 100: low-dose input")
    assert list(low.get_ydata()) == [39.0, 39.0]
    assert texts(curves_figure(records()[:1]))  # one unvalidated epoch draws too
    width, height = png_size(write_curves(tmp_path / "curves.png", records()))
    assert 800 < width < 2500 and 250 < height < 1000


def test_table_charts_print_method_names_as_written(tmp_path: Path) -> None:
    from lowdose_toolkit.evaluation.paper_tables import build_table_i, build_table_ii, table_figure, write_table_chart

    def case(method: str, subject: str, drf: int, psnr: float) -> dict:
        return {"method": method, "subject": subject, "drf": drf, "psnr": psnr, "ssim": 0.99, "nrmse": 0.004,
                "ssim_range": "challenge", "masked": False}

    rows = [case(m, s, drf, 45 + i + drf / 50 + j) for i, m in enumerate(["Baseline", "Baseline+CG", "CG-3DSRGAN",
                                                                          "Low-Dose"])
            for j, s in enumerate(["s1", "s2"]) for drf in (4, 100)]
    words = texts(table_figure(build_table_ii(rows)))
    assert "Baseline+CG" in words and "CG-3DGAN" in words and "PSNR (dB)" in words and "NRMSE (%)" in words
    assert "Table II: ablations at DRF 100" in words and "paper" in words
    words = texts(table_figure(build_table_i(rows)))
    assert "DRF 4" in words and "DRF 100" in words and "3D-CycleGAN" in words and "Low-Dose" in words
    width, height = png_size(write_table_chart(build_table_i(rows), tmp_path / "table1"))
    assert (tmp_path / "table1.png").is_file() and 800 < width < 2500 and 250 < height < 1000


def test_ldt_help_does_not_import_matplotlib() -> None:
    code = ("import sys\nfrom lowdose_toolkit.cli.app import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'matplotlib' not in sys.modules, 'matplotlib imported by ldt --help'\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
