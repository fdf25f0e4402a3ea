"""``ldt export``: ONNX and TorchScript files that equal the PyTorch model, carry their metadata, and run in
``ldt infer`` (through the Predictor) and without ``ldt`` (ONNX Runtime, ``torch.jit.load``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ldt_plugins.heads.noise_level import calibrate_head, masked_median
from lowdose_toolkit import __version__
from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.checkpoint import Checkpoint, Normalization
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import resolve_recipe
from lowdose_toolkit.infer.export import export_model, load_exported
from lowdose_toolkit.infer.predictor import Predictor, forward_window
from lowdose_toolkit.models.lowdose_model import build_model
from lowdose_toolkit.models.strength import OutputStrength

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
# The tests' own torch.jit.load and legacy torch.onnx.export calls (ldt silences them where it uses them).
pytestmark = pytest.mark.filterwarnings("ignore:.*(deprecated|legacy TorchScript-based|will be removed)")

CPU = torch.device("cpu")
NOISE_HEAD = {"name": "noise_level", "input": "image", "target": "drf_class", "hidden": 8}
GUIDED = {
    "name": "tiny-guided",
    "data": {"drfs": [4, 100], "patch_size": 16},
    "model": {"generator": {"name": "mlnet", "channels": 4, "depth": 2, "residual": True},
              "heads": [NOISE_HEAD],
              "guidance": {"name": "film", "head": "noise_level"},
              "refiner": {"name": "contextual_net", "channels": 4, "num_blocks": 1}},
    "losses": [{"name": "l1", "on": "pred"}],
    "eval": {"patch_size": 16, "overlap": 4, "batch_size": 2, "consistency": {"z": 2.0, "sigma_mm": 3.0}},
}
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
SPACING = (2.0, 2.0, 3.0)  # mm: the consistency guard's width in voxels


def volume(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return 2.0 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def make_checkpoint(path: Path, recipe: dict, calibrate: bool = False, seed: int = 0,
                    strength: list[float] | None = None) -> Path:
    """A checkpoint of ``recipe``'s model with every weight moved off its initialisation (the FiLM layers
    start at zero, so an untrained guided model would ignore its head), and ``strength`` as its fitted
    output strength anchors."""
    torch.manual_seed(seed)
    resolved = resolve_recipe(recipe, get_registry())
    model, _ = build_model(resolved, get_registry())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if calibrate:
        volumes = [volume((1, 20, 20, 20), s) * (1 + s % 2) for s in range(4)]
        calibrate_head(model.heads["noise_level"], volumes, [0, 1, 0, 1])
    if strength is not None:
        model.strength.alpha.copy_(torch.tensor(strength, dtype=torch.float64))
        model.strength.fitted.fill_(True)
    Checkpoint(recipe=resolved, epoch=2, drfs=[4, 100], model=model.state_dict(),
               normalization=Normalization("robust", 0.99)).save(path)
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """A guided model with a calibrated noise-level head, exported to both formats by the command."""
    root = tmp_path_factory.mktemp("export")
    ckpt = make_checkpoint(root / "guided.pt", GUIDED, calibrate=True, strength=[0.6, 0.9])
    files = {fmt: root / name for fmt, name in FILES.items()}
    for fmt, path in files.items():
        assert main(["export", str(ckpt), "--format", fmt, "--out", str(path)]) == 0
    return ckpt, files


@pytest.mark.parametrize("fmt", FILES)
def test_exported_model_equals_the_pytorch_model_at_two_window_sizes(exported, fmt: str) -> None:
    """One export, two window sizes: the prediction and the dose head's vote equal the checkpoint's (1e-4)."""
    ckpt, files = exported
    low = volume((1, 30, 26, 34), 5)
    for patch in (16, 21):
        reference = Predictor.from_checkpoint(ckpt, CPU, "fp32", patch_size=patch)[0]
        reference.dose_estimate = "window"  # as the exported graph runs its head
        predictor = Predictor.from_file(files[fmt], CPU, trust_torchscript=True, patch_size=patch)
        assert predictor.exported is not None and predictor.exported.format == fmt and predictor.model is None
        assert predictor.window == {**reference.window} and predictor.drfs == (4, 100) and predictor.guided
        want, want_probs = reference.predict(low, spacing=SPACING)
        got, probs = predictor.predict(low, spacing=SPACING)
        assert got.shape == low.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(probs, want_probs, atol=1e-4, rtol=0)
        assert predictor.verdict(probs)["predicted_drf"] == reference.verdict(want_probs)["predicted_drf"]


@pytest.mark.parametrize("fmt", FILES)
def test_the_heads_prediction_conditions_the_exported_forward(exported, fmt: str) -> None:
    """Inside the graph each window's head prediction drives FiLM: a batch holding a DRF-4-like and a
    DRF-100-like window gives each the output conditioned on its own class, not the other's."""
    ckpt, files = exported
    model = Predictor.from_checkpoint(ckpt, CPU, "fp32")[0].model
    v = volume((1, 1, 18, 17, 20), 7)
    x = torch.cat([v, 2 * v])  # the calibration's class 1 is twice as noisy as class 0
    with torch.no_grad():
        pred, probs = load_exported(files[fmt], CPU, trust_torchscript=True)(x)
        want, want_probs = forward_window(model, x)
        torch.testing.assert_close(pred, want, atol=1e-4, rtol=0)
        torch.testing.assert_close(probs, want_probs, atol=1e-4, rtol=0)
        assert probs.argmax(dim=1).tolist() == [0, 1]
        stated = [forward_window(model, x, drf_class=k)[0] for k in (0, 1)]
    for i in (0, 1):
        torch.testing.assert_close(pred[i], stated[i][i], atol=1e-3, rtol=0)  # its own class (probability ~1)
        assert float((pred[i] - stated[1 - i][i]).abs().max()) > 1e-2  # not the other's


def test_metadata_in_onnx_props_and_torchscript_extra_files(exported) -> None:
    import onnx

    _, files = exported
    props = {p.key: json.loads(p.value) for p in onnx.load(str(files["onnx"])).metadata_props}
    extra = {"ldt.json": ""}
    torch.jit.load(str(files["torchscript"]), _extra_files=extra)
    for meta in (props, json.loads(extra["ldt.json"])):
        assert meta["normalization"]["method"] == "robust" and meta["normalization"]["quantile"] == 0.99
        assert meta["window"] == {"patch_size": 16, "overlap": 4, "batch_size": 2, "blending": "hann"}
        assert meta["drfs"] == [4, 100] and meta["recipe_name"] == "tiny-guided"
        assert meta["toolkit_version"] == __version__ and meta["precision"] == "fp32"
        assert meta["dose_head"] == "noise_level" and meta["guided"] is True and meta["refiner"] is True
        assert meta["checkpoint"]["epoch"] == 2 and len(meta["checkpoint"]["sha256"]) == 64
        assert set(meta["outputs"]) == {"pred", "probs"} and meta["recipe"]["name"] == "tiny-guided"
        assert meta["consistency"]["settings"] == {"z": 2.0, "sigma_mm": 3.0}
        assert meta["dose_level"]["head"] == "noise_level" and meta["dose_level"]["state"]["level_fitted"] is True
    assert props["exported_as"] == "onnx opset 17"


def test_exported_files_run_without_ldt(exported, tmp_path: Path) -> None:
    """ONNX Runtime and torch.jit.load alone, with lowdose_toolkit and ldt_plugins unimportable."""
    ckpt, files = exported
    x = volume((1, 1, 19, 22, 17), 9)
    np.save(tmp_path / "x.npy", x.numpy())
    code = """
import json, sys
sys.modules["lowdose_toolkit"] = sys.modules["ldt_plugins"] = None  # any import of ldt fails
import numpy as np, onnxruntime as ort, torch
onnx_file, ts_file, folder = sys.argv[1:]
x = np.load(folder + "/x.npy")
session = ort.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
meta = {k: json.loads(v) for k, v in session.get_modelmeta().custom_metadata_map.items()}
onnx_pred, onnx_probs = session.run(["pred", "probs"], {"low": x})
extra = {"ldt.json": ""}
ts_pred, ts_probs = torch.jit.load(ts_file, _extra_files=extra)(torch.from_numpy(x))
assert json.loads(extra["ldt.json"])["drfs"] == meta["drfs"] == [4, 100]
np.savez(folder + "/out.npz", onnx_pred=onnx_pred, onnx_probs=onnx_probs, ts_pred=ts_pred.detach().numpy(),
         ts_probs=ts_probs.detach().numpy())
"""
    done = subprocess.run([sys.executable, "-c", code, str(files["onnx"]), str(files["torchscript"]), str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = np.load(tmp_path / "out.npz")
    with torch.no_grad():
        want, want_probs = forward_window(Predictor.from_checkpoint(ckpt, CPU, "fp32")[0].model, x)
    for fmt in ("onnx", "ts"):
        np.testing.assert_allclose(out[f"{fmt}_pred"], want.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out[f"{fmt}_probs"], want_probs.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt", FILES)
def test_ldt_infer_on_the_exported_file_writes_the_checkpoints_prediction(exported, fmt: str, tmp_path: Path) -> None:
    ckpt, files = exported
    # As noisy as the volumes the head was calibrated on (uniform noise of relative spread 0.58): a dose level
    # between the two anchors, so the strength neither vanishes nor saturates.
    counts = np.random.default_rng(3).poisson(3, size=(27, 30, 23)).astype(np.float32)
    nib.save(nib.Nifti1Image(counts, np.diag([2.0, 2.0, 3.0, 1.0])), tmp_path / "scan.nii.gz")
    outputs = {}
    trust = ["--trust-torchscript"]
    compiled = ["--compile"] if fmt == "onnx" else []  # the checkpoint through torch.compile once (seconds)
    window = ["--dose-estimate", "window"]  # as the exported graph runs its head
    for name, model, extra in (("ckpt", ckpt, ["--precision", "fp32", *window, *compiled]),
                               ("exported", files[fmt], trust)):
        out = tmp_path / name
        assert main(["infer", str(model), str(tmp_path / "scan.nii.gz"), "--out", str(out), "--no-previews",
                     *extra]) == 0
        rows = list(csv.DictReader((out / "summary.csv").open()))
        outputs[name] = (np.asarray(nib.load(out / "scan.nii.gz").dataobj), rows[0],
                         json.loads((out / "summary.json").read_text()))
    (want, want_row, want_meta), (got, row, meta) = outputs["ckpt"], outputs["exported"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * float(np.abs(want).max()))
    assert row["predicted_drf"] == want_row["predicted_drf"] and row["conditioned_on"] == "dose head per window"
    # The strength follows the whole volume's dose level, read by the head rebuilt from the file's metadata as
    # by the checkpoint's own head (whether its windows are conditioned per window or on the whole volume).
    assert row["dose_level"] == want_row["dose_level"] != "" and row["strength"] == want_row["strength"]
    anchors = OutputStrength([4, 100])
    anchors.alpha.copy_(torch.tensor([0.6, 0.9], dtype=torch.float64))
    anchors.fitted.fill_(True)
    assert float(row["strength"]) == pytest.approx(anchors.factor(float(row["dose_level"])), abs=1e-4)
    assert 0 < float(row["strength"]) < 1
    assert abs(float(row["drf_probability"]) - float(want_row["drf_probability"])) <= 1.5e-4
    assert meta["model_format"] == fmt and want_meta["model_format"] == "checkpoint"
    assert meta["precision"] == "fp32" and meta["normalization"] == "robust"
    assert want_meta["compiled"] is bool(compiled) and meta["compiled"] is False
    assert want_meta["dose_estimate"] == meta["dose_estimate"] == "window"
    assert meta["consistency"] == want_meta["consistency"] == {"z": 2.0, "sigma_mm": 3.0}  # the recipe's guard
    assert row["consistency"] == want_row["consistency"] != ""


def test_an_exported_model_writes_dicom_naming_itself(exported, tmp_path: Path) -> None:
    """DICOM in, DICOM out through an exported model: its DerivationDescription names the file and its source."""
    import pydicom
    from badinputs import good_series

    _, files = exported
    series = good_series(tmp_path / "PET")
    out = tmp_path / "out"
    assert main(["infer", str(files["torchscript"]), str(series), "--out", str(out), "--no-previews",
                 "--trust-torchscript"]) == 0
    ds = pydicom.dcmread(sorted((out / "PET").iterdir())[0], stop_before_pixels=True)
    assert ds.DerivationDescription.startswith(
        f"Denoised by lowdose-toolkit {__version__} (ldt infer): model mlnet, recipe tiny-guided, from model.ts "
        "(torchscript export of guided.pt, epoch 2); source series ")
    assert ", conditioned on: dose head" in ds.DerivationDescription


@pytest.mark.parametrize(("name", "edit"), [
    ("unguided_bottleneck_head", lambda r: r["model"].update(
        heads=[{"name": "dose_classifier", "input": "bottleneck", "target": "drf_class", "hidden": [8]}],
        guidance=None, refiner=None)),
    ("guided_uncalibrated_head", lambda r: None),
    ("no_head", lambda r: r["model"].update(heads=[], guidance=None)),
])
def test_other_models_export_to_onnx(tmp_path: Path, name: str, edit) -> None:
    recipe = json.loads(json.dumps(GUIDED))
    edit(recipe)
    ckpt = make_checkpoint(tmp_path / "c.pt", recipe)
    meta, worst = export_model(ckpt, tmp_path / "m.onnx")
    assert worst <= 1e-4 and meta["guided"] == (name == "guided_uncalibrated_head")
    low = volume((1, 22, 25, 19), 4)
    reference = Predictor.from_checkpoint(ckpt, CPU, "fp32")[0]
    reference.dose_estimate = "window"  # as the exported graph runs its head
    want, want_probs = reference.predict(low, spacing=SPACING)
    got, probs = Predictor.from_file(tmp_path / "m.onnx", CPU).predict(low, spacing=SPACING)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    if name == "no_head":
        assert probs is None and want_probs is None and meta["dose_head"] is None and "probs" not in meta["outputs"]
    else:
        torch.testing.assert_close(probs, want_probs, atol=1e-4, rtol=0)


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_errors_are_one_line_naming_the_file_and_the_fix(exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, files = exported
    out = str(tmp_path / "m.onnx")
    assert "--format 'tflite' is unknown; use onnx or torchscript" in one_line_error(
        capsys, "export", str(ckpt), "--format", "tflite", "--out", out)
    assert "m.bin: cannot tell the format from the name; pass --format onnx or --format torchscript" in \
        one_line_error(capsys, "export", str(ckpt), "--out", str(tmp_path / "m.bin"))
    assert "needs a matching name; end it in .ts" in one_line_error(
        capsys, "export", str(ckpt), "--format", "torchscript", "--out", out)
    assert "needs a matching name; end it in .ts (.pt names checkpoints" in one_line_error(
        capsys, "export", str(ckpt), "--format", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert f"{files['onnx']} exists; pass --overwrite to replace it" in one_line_error(
        capsys, "export", str(ckpt), "--out", str(files["onnx"]))
    odd = tmp_path / "weights.onnx"  # a checkpoint under an exported model's name
    odd.write_bytes(ckpt.read_bytes())
    assert "is the checkpoint itself" in one_line_error(capsys, "export", str(odd), "--out", str(odd), "--overwrite")
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((12, 12, 12), 5.0, np.float32), np.eye(4)), scan)
    assert "leave --drf out, or use the checkpoint" in one_line_error(
        capsys, "infer", str(files["torchscript"]), str(scan), "--out", str(tmp_path / "o1"), "--drf", "4",
        "--trust-torchscript")
    assert "is an exported model, which runs as it was exported; leave --compile out" in one_line_error(
        capsys, "infer", str(files["onnx"]), str(scan), "--out", str(tmp_path / "o5"), "--compile")
    assert "is TorchScript, which is a program: ldt runs it only with --trust-torchscript" in one_line_error(
        capsys, "infer", str(files["torchscript"]), str(scan), "--out", str(tmp_path / "o4"))
    assert "runs in fp32, the precision it was exported in; leave --precision at auto" in one_line_error(
        capsys, "infer", str(files["onnx"]), str(scan), "--out", str(tmp_path / "o2"), "--precision", "bf16")
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Conv3d(1, 1, 3), (torch.rand(1, 1, 8, 8, 8),), str(foreign), dynamo=False)
    assert f"{foreign}: no lowdose-toolkit metadata" in one_line_error(
        capsys, "infer", str(foreign), str(scan), "--out", str(tmp_path / "o3"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # not installed
    err = one_line_error(capsys, "infer", str(files["onnx"]), str(scan), "--out", str(tmp_path / "o4"))
    assert f"{files['onnx']}: running an ONNX model needs onnxruntime" in err and "pip install onnxruntime" in err
    assert "pip install onnx onnxruntime" in one_line_error(capsys, "export", str(ckpt), "--out", out)
    assert not (tmp_path / "m.onnx").exists()


def test_masked_median_is_nanmedians_value() -> None:
    """The exporters' median (sort + gather) equals nanmedian over the masked values, 0 where none is left."""
    g = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4, 50, generator=g)
    values[0, 1, 7] = float("nan")
    mask = torch.rand(3, 4, 50, generator=g) > 0.4
    mask[1, 2] = False  # an empty row
    mask[2, 3] = False
    mask[2, 3, :2] = True  # two values: the lower one
    want = values.masked_fill(~mask, float("nan")).nanmedian(dim=-1).values.nan_to_num(0.0)
    assert torch.equal(masked_median(values, mask), want)


def test_a_checkpoint_shaped_torchscript_file_is_never_run(exported, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A TorchScript archive named like a checkpoint goes through torch.load(weights_only=True), never
    torch.jit.load: ldt infer refuses it as data, and nothing it holds runs (issue 12, item 4)."""
    import shutil

    _, files = exported
    disguised = tmp_path / "best.pt"
    shutil.copy(files["torchscript"], disguised)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((12, 12, 12), 5.0, np.float32), np.eye(4)), scan)
    assert main(["infer", str(disguised), str(scan), "--out", str(tmp_path / "o")]) == 2
    assert "not a lowdose-toolkit checkpoint" in " ".join(capsys.readouterr().err.split())


def test_a_dose_head_that_cannot_be_rebuilt_warns_once_and_the_windows_vote_serves(exported) -> None:
    """An exported file whose head's plugin is not installed where it runs: one warning naming the file and the
    fix; each volume is still predicted, its strength following the DRF its windows name."""
    _, files = exported
    predictor = Predictor.from_exported(files["onnx"], torch.device("cpu"))
    predictor.exported.meta["dose_level"]["head"] = "not_installed"
    predictor.exported.meta["recipe"]["model"]["heads"][0]["name"] = "not_installed"
    low = volume((1, 20, 20, 20), 5)
    with pytest.warns(UserWarning, match=r"model.onnx: its dose head cannot be rebuilt here .*install the head's"):
        predictor.predict(low, spacing=SPACING)
    assert predictor.applied["dose_level"] in (4.0, 100.0)  # a class's DRF, not a continuous level
    assert predictor.applied["strength"] in (0.6, 0.9)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again for the next volume
        predictor.predict(low, spacing=SPACING)
    with pytest.raises(ValueError, match=r"the consistency guard needs the volume's voxel size, spacing="):
        predictor.predict(low)  # the recipe's guard works in mm
