"""Classification guidance: the dose head's prediction conditions the generator (FiLM, gate), the
noise-level head, the DRF-weighted selection metric, stage budgets and the dose head's test record."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_recipe, write

from ldt_plugins.generators.mlnet import MLNet
from ldt_plugins.guidance.film import FiLMGuidance
from ldt_plugins.heads.noise_level import NoiseLevelHead
from ldt_plugins.refiners.contextual_net import ContextualNet
from lowdose_toolkit.cli.app import main
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import resolve_recipe, safe_load
from lowdose_toolkit.core.spec import monitor_mode, parse_stages
from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.models.lowdose_model import LowDoseModel, build_model
from lowdose_toolkit.train.validation import drf_weights, weighted_gain

DRFS = [4, 10, 20, 50, 100]


def guided_model(gate: str = "none", teacher_forcing: float = 0.5, detach: bool = True) -> LowDoseModel:
    torch.manual_seed(0)
    generator = MLNet(channels=4, depth=3, residual=True)
    head = NoiseLevelHead(in_channels=1, num_classes=len(DRFS), hidden=8)
    guidance = FiLMGuidance({"generator": generator.film_channels}, DRFS, hidden=8, teacher_forcing=teacher_forcing,
                            detach=detach, gate=gate)
    return LowDoseModel(generator, {"noise_level": head}, {"noise_level": "image"}, {"noise_level": "drf_class"},
                        guidance=guidance, guide_head="noise_level")


def randomise_film(model: LowDoseModel) -> None:
    """Give the (zero-initialised) FiLM output layer weights, as training would."""
    torch.manual_seed(1)
    torch.nn.init.normal_(model.guidance.stage_parts["generator"].mlp[-1].weight, std=0.5)


def test_guidance_starts_as_the_unguided_model() -> None:
    model = guided_model().eval()
    plain = MLNet(channels=4, depth=3, residual=True).eval()
    plain.load_state_dict(model.generator.state_dict())
    torch.nn.init.normal_(model.generator.output_layer.weight, std=0.1)  # a trained, non-identity generator
    plain.output_layer.weight.data.copy_(model.generator.output_layer.weight.data)
    x = torch.rand(2, 1, 16, 16, 16) + 0.5
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x), plain(x))
        torch.testing.assert_close(model.predict(x, drf_class=torch.tensor([0, 4])), plain(x))


def test_the_head_prediction_reaches_the_image() -> None:
    model = guided_model().eval()
    randomise_film(model)
    torch.nn.init.normal_(model.generator.output_layer.weight, std=0.1)
    x = torch.rand(1, 1, 16, 16, 16) + 0.5
    with torch.no_grad():
        at4 = model.predict(x, drf_class=torch.tensor([0]))
        at100 = model.predict(x, drf_class=torch.tensor([4]))
        by_head = model(x)
    assert (at4 - at100).abs().max() > 1e-3  # the DRF code changes the synthesis
    probs = by_head["noise_level"].softmax(dim=1)
    torch.testing.assert_close(by_head["guide_probs"], probs)  # inference: the head alone decides


def test_teacher_forcing_and_oracle_codes() -> None:
    guidance = FiLMGuidance({"generator": [4]}, DRFS, teacher_forcing=1.0)
    logits = torch.randn(6, 5)
    cls = torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = torch.nn.functional.one_hot(cls, 5).float()
    torch.testing.assert_close(guidance.train().code(logits, cls), onehot)  # always forced
    torch.testing.assert_close(guidance.eval().code(logits, cls), onehot)  # oracle in eval
    torch.testing.assert_close(guidance.eval().code(logits), logits.softmax(dim=1))  # the head decides
    guidance.teacher_forcing = 0.0
    torch.testing.assert_close(guidance.train().code(logits, cls), logits.softmax(dim=1))
    guidance.teacher_forcing = 0.5
    torch.manual_seed(0)
    mixed = guidance.train().code(logits, cls)
    forced = (mixed == onehot).all(dim=1)
    assert 0 < int(forced.sum()) < 6  # some samples forced, some by the head


def test_a_fitted_code_map_moves_each_class_to_its_best_code_at_inference_only() -> None:
    guidance = FiLMGuidance({"generator": [4]}, DRFS, teacher_forcing=1.0)
    logits = torch.randn(6, 5)
    cls = torch.tensor([0, 1, 2, 3, 4, 0])
    probs = logits.softmax(dim=1)
    torch.testing.assert_close(guidance.eval().code(logits), probs)  # identity until fitted
    gains = torch.tensor([[0.2, -2.7, -4.9, -6.0, -6.4],  # true DRF 4: its own code is best
                          [2.9, 1.3, -0.5, -1.5, -1.9],   # DRF 10: the DRF 4 code serves it better
                          [3.9, 3.6, 2.4, 1.5, 1.1],
                          [4.3, 5.5, 5.3, 4.8, 4.5],
                          [float("nan")] * 5])           # no validation volume of DRF 100: keeps its own
    assert guidance.set_code_map(gains) == [0, 0, 0, 1, 4] and bool(guidance.codes_fitted)
    mapped = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1, 4, 0]), 5).float()
    torch.testing.assert_close(guidance.eval().code(logits, cls), mapped)  # a stated DRF goes through the map
    moved = torch.stack([probs[:, :3].sum(1), probs[:, 3], torch.zeros(6), torch.zeros(6), probs[:, 4]], dim=1)
    torch.testing.assert_close(guidance.eval().code(logits), moved)  # the head's mass moves with it
    torch.testing.assert_close(guidance.train().code(logits, cls),
                               torch.nn.functional.one_hot(cls, 5).float())  # training never uses the map
    state = {k: v for k, v in guidance.state_dict().items() if k not in ("code_map", "codes_fitted")}
    older = FiLMGuidance({"generator": [4]}, DRFS)
    older.load_state_dict(state)  # saved before code maps existed: the identity
    assert older.code_map.tolist() == [0, 1, 2, 3, 4] and not bool(older.codes_fitted)
    with pytest.raises(ValueError, match=r"expects gains \[5, 5\], got \(2, 5\)"):
        guidance.set_code_map(torch.zeros(2, 5))


@pytest.mark.parametrize("detach", [True, False])
def test_the_reconstruction_loss_reaches_the_head_only_without_detach(detach: bool) -> None:
    model = guided_model(teacher_forcing=0.0, detach=detach).train()
    randomise_film(model)
    torch.nn.init.normal_(model.generator.output_layer.weight, std=0.1)  # zero at init: no gradient upstream
    x = torch.rand(2, 1, 16, 16, 16) + 0.5
    model(x)["pred"].square().mean().backward()
    grad = model.heads["noise_level"].mlp[-1].weight.grad
    assert (grad is not None and grad.abs().sum() > 0) == (not detach)


def test_list_mode_gate_scales_the_residual_by_one_minus_one_over_k() -> None:
    model = guided_model(gate="listmode").eval()
    torch.nn.init.normal_(model.generator.output_layer.weight, std=0.1)
    ungated = guided_model(gate="none").eval()
    ungated.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 16, 16, 16) + 0.5
    with torch.no_grad():
        for cls, drf in enumerate(DRFS):
            c = torch.tensor([cls])
            residual = ungated.predict(x, drf_class=c) - x
            torch.testing.assert_close(model.predict(x, drf_class=c) - x, (1 - 1 / drf) * residual)


def test_learned_gate_starts_open_and_can_close_per_class() -> None:
    model = guided_model(gate="learned").eval()
    torch.nn.init.normal_(model.generator.output_layer.weight, std=0.1)
    ungated = guided_model(gate="none").eval()
    ungated.load_state_dict(model.state_dict(), strict=False)
    x = torch.rand(1, 1, 16, 16, 16) + 0.5
    c4, c100 = torch.tensor([0]), torch.tensor([4])
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x, drf_class=c4), ungated.predict(x, drf_class=c4))
        model.guidance.stage_parts["generator"].gate_logits[0] = -30.0  # DRF 4: the correction closed
        torch.testing.assert_close(model.predict(x, drf_class=c4), x)
        torch.testing.assert_close(model.predict(x, drf_class=c100), ungated.predict(x, drf_class=c100))


def _recipe(text: str) -> dict:
    return resolve_recipe(safe_load(text), get_registry())


BASE = """
data: {drfs: [4, 100]}
model:
  generator: {name: mlnet, channels: 4, depth: 2, residual: true}
  heads: [{name: noise_level, input: image, target: drf_class}]
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  guidance: {name: film, head: nope}", "model.guidance.head: no head 'nope'"),
        ("  guidance: {name: film}", "model.guidance.head: name the dose head"),
        ("  guidance: {name: film, head: noise_level, teacher_forcing: 2.0}", "teacher_forcing=2.0 must be in"),
    ],
)
def test_guidance_recipe_errors(extra: str, message: str) -> None:
    with pytest.raises((RecipeError, UserError), match=message):
        build_model(_recipe(BASE + extra), get_registry())


def test_guidance_needs_a_guidable_generator_a_dose_target_and_a_residual_for_the_gate() -> None:
    text = BASE.replace("{name: mlnet, channels: 4, depth: 2, residual: true}",
                        "{name: unet3d, channels: 4, num_levels: 2}")
    with pytest.raises(RecipeError, match="generator 'unet3d' cannot be guided"):
        build_model(_recipe(text + "  guidance: {name: film, head: noise_level}"), get_registry())
    text = BASE.replace("target: drf_class", "target: drf")
    with pytest.raises(RecipeError, match="guidance needs a head with target: drf_class"):
        build_model(_recipe(text + "  guidance: {name: film, head: noise_level}"), get_registry())
    text = BASE.replace("residual: true", "residual: false")
    with pytest.raises(RecipeError, match="the gate scales a residual"):
        build_model(_recipe(text + "  guidance: {name: film, head: noise_level}"), get_registry())


def test_a_head_reading_the_bottleneck_can_drive_the_guidance() -> None:
    """The contract is logits over data.drfs: the paper's head (or a third party's) drives FiLM as well."""
    text = BASE.replace("{name: noise_level, input: image, target: drf_class}",
                        "{name: dose_classifier, input: bottleneck, target: drf_class}")
    model, _ = build_model(_recipe(text + "  guidance: {name: film, head: dose_classifier}"), get_registry())
    randomise_film(model)
    out = model.eval()(torch.rand(2, 1, 8, 8, 8))
    assert out["dose_classifier"].shape == (2, 2) and out["guide_probs"].shape == (2, 2)


def _poisson_like(drf: int, shape: tuple[int, int, int] = (24, 24, 24), seed: int = 0) -> torch.Tensor:
    """Piecewise-constant activity with noise whose variance is proportional to activity x DRF."""
    g = torch.Generator().manual_seed(seed)
    activity = torch.ones(shape)
    activity[6:18, 6:18, 6:18] = 3.0
    noise = torch.randn(shape, generator=g) * (activity * drf * 1e-3).sqrt()
    return (activity + noise)[None, None]


def test_noise_level_statistic_follows_log_drf_and_ignores_air() -> None:
    head = NoiseLevelHead(in_channels=1, num_classes=5)
    laplacian = [float(head.statistics(_poisson_like(d))[0, 0]) for d in DRFS]
    steps = [b - a for a, b in zip(laplacian, laplacian[1:], strict=False)]
    expected = [math.log(b / a) for a, b in zip(DRFS, DRFS[1:], strict=False)]
    for step, want in zip(steps, expected, strict=True):
        assert step == pytest.approx(want, abs=0.15)  # the median noise energy per activity grows like DRF
    # Air beside the body (a window half empty) moves the statistic by a fraction of one DRF step (the
    # body's surface adds edge voxels); the mean energy per activity would move with the body fraction.
    padded = torch.nn.functional.pad(_poisson_like(20), (0, 24, 0, 0, 0, 0))
    assert abs(float(head.statistics(padded)[0, 0]) - laplacian[2]) < 0.2 * math.log(50 / 20)
    assert float(head.statistics(torch.zeros(1, 1, 12, 12, 12))[0, 0]) == 0.0  # no body: no evidence


def test_noise_level_statistics_are_float32_under_bf16_autocast() -> None:
    # The zero-sum filters subtract nearly equal activities: in bf16 (8-bit mantissa) the DRF 4 statistic
    # was off by about one DRF step, so a bf16 training taught the head on statistics whole volumes lack.
    head = NoiseLevelHead(in_channels=1, num_classes=5)
    image = _poisson_like(4) + 10.0  # a low-noise scan on a high baseline: bf16's rounding would dominate
    exact = head.statistics(image)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = head.statistics(image)
    assert cast.dtype == torch.float32
    assert torch.equal(cast, exact)


def test_balanced_l1_weights_each_sample_by_its_inputs_error() -> None:
    from ldt_plugins.losses.l1 import L1Loss

    target = torch.zeros(2, 1, 4, 4, 4)
    low = torch.cat([torch.full((1, 1, 4, 4, 4), 0.1), torch.full((1, 1, 4, 4, 4), 0.5)])  # DRF 4-like, 100-like
    pred = low / 2  # both halve their input's error
    plain, balanced = L1Loss()(pred, target), L1Loss(balance="input")(pred, target, low=low)
    assert float(plain) == pytest.approx((0.05 + 0.25) / 2)
    # weights 1/0.1 : 1/0.5 normalised to mean 1 -> 5/3 and 1/3: the clean sample's error counts 5x more
    assert float(balanced) == pytest.approx((5 / 3 * 0.05 + 1 / 3 * 0.25) / 2)
    assert float(L1Loss(balance="input")(low, target, low=low)) == pytest.approx(1 / (0.5 * (1 / 0.1 + 1 / 0.5)))
    with pytest.raises(ValueError, match="needs the low-dose input"):
        L1Loss(balance="input")(pred, target)


def test_contextual_net_identity_init() -> None:
    net = ContextualNet(channels=4, identity_init=True)
    x = torch.rand(1, 1, 6, 6, 6)
    torch.testing.assert_close(net(x), x)


def test_val_gain_weights_the_drfs_as_the_challenge() -> None:
    assert drf_weights(DRFS) == pytest.approx({4: 0.05, 10: 0.15, 20: 0.20, 50: 0.25, 100: 0.35})
    assert drf_weights([4, 100]) == pytest.approx({4: 0.05 / 0.40, 100: 0.35 / 0.40})
    assert drf_weights([2, 8]) == {2: 0.5, 8: 0.5}  # not the challenge's DRFs: equal weights
    val = {"per_drf": {"4": {"psnr": 57.0}, "100": {"psnr": 49.0}},
           "low_dose": {"4": {"psnr": 58.0}, "100": {"psnr": 43.0}}}
    assert weighted_gain(val) == pytest.approx((0.05 * -1.0 + 0.35 * 6.0) / 0.40)
    assert monitor_mode("val_gain", DRFS) == "max"


def test_stage_max_minutes_is_checked() -> None:
    train = {"epochs": 3, "stages": [{"epochs": 2, "max_minutes": 0}]}
    with pytest.raises(RecipeError, match="train.stages.0.max_minutes: expected a positive number"):
        parse_stages(train, has_refiner=False)
    train["stages"][0]["max_minutes"] = 1.5
    assert parse_stages(train, has_refiner=False)[0].max_minutes == 1.5


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guided")
    data = make_tiny_dataset(root / "data")
    text = tiny_recipe(data).replace("depth: 2}", "depth: 2, residual: true}")
    text = text.replace("{name: dose_classifier, input: bottleneck, hidden: [8]}]",
                        "{name: noise_level, input: image, hidden: 4}]\n"
                        "  guidance: {name: film, head: noise_level, hidden: 4, fit_codes: true}\n"
                        "  refiner: {name: contextual_net, channels: 2, num_blocks: 1, identity_init: true}")
    text = text.replace("on: dose_classifier}", "on: noise_level}\n  - {name: l1, weight: 300, on: refined}")
    text = text.replace("  epochs: 3\n", "  stages:\n"
                        "    - {name: first, epochs: 3, max_minutes: 1.0e-6, trainable: [generator, heads],"
                        " use_refiner: false}\n"
                        "    - {name: second, epochs: 1, trainable: [refiner]}\n"
                        "  scheduler: {monitor: val_gain}\n")
    text = text.replace("val_subjects: 1}", "val_subjects: 1, fit_strength: true}")
    recipe = write(root / "recipe.yaml", text)
    assert main(["run", str(recipe), "--out", str(root / "run")]) == 0
    return root / "run"


def test_a_cpu_run_does_not_warn_about_cuda_medians(tmp_path: Path) -> None:
    """torch warns "median CUDA with indices ... deterministic" on a CPU too once deterministic mode is on
    (the noise_level head's statistics): a CUDA warning in a CPU run only misleads, so training hides it."""
    data = make_tiny_dataset(tmp_path / "data")
    text = tiny_recipe(data).replace("depth: 2}", "depth: 2, residual: true}").replace("epochs: 3", "epochs: 1")
    text = text.replace("{name: dose_classifier, input: bottleneck, hidden: [8]}]",
                        "{name: noise_level, input: image, hidden: 4}]\n"
                        "  guidance: {name: film, head: noise_level, hidden: 4}")
    recipe = write(tmp_path / "recipe.yaml", text.replace("on: dose_classifier}", "on: noise_level}"))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["run", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert not [w for w in seen if "median CUDA" in str(w.message)]


def test_a_refiner_stage_trains_the_refiners_conditioning_only(guided_run: Path) -> None:
    """Stage 2 trains [refiner]: the refiner's FiLM (zero at the start) learns; the generator's is frozen."""
    from lowdose_toolkit.core.checkpoint import load_checkpoint

    state = load_checkpoint(guided_run / "checkpoints" / "last.pt").model
    refiner_film = state["guidance.stage_parts.refiner.mlp.2.weight"]
    assert refiner_film.abs().sum() > 0
    assert "guidance.stage_parts.generator.mlp.2.weight" in state


def test_a_guided_run_records_the_dose_head_and_its_stage_budget(guided_run: Path) -> None:
    lines = [json.loads(line) for line in (guided_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["stage"] for line in lines] == ["first", "second"]  # stage 1 ended by its time budget
    assert all("dose_accuracy" in line["val"] and "gain" in line["val"] for line in lines)
    assert all(0.0 <= line["val"]["dose_calibration_accuracy"] <= 1.0 for line in lines)  # fitted on train volumes
    results = json.loads((guided_run / "results.json").read_text())
    head = results["dose_head"]
    assert head["head"] == "noise_level" and head["guides"] is True and head["drfs"] == [4, 100]
    assert head["volumes"] == 2 and sum(map(sum, head["confusion"])) == 2
    assert head["accuracy"] == pytest.approx(sum(head["confusion"][i][i] for i in range(2)) / 2)
    assert "| true \\ predicted | DRF 4 | DRF 100 |" in (guided_run / "results.md").read_text()


def test_a_run_fits_the_drf_codes_on_validation_into_best_pt_once(guided_run: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from lowdose_toolkit.core.checkpoint import load_checkpoint

    fit = json.loads((guided_run / "code_fit.json").read_text())
    assert fit["checkpoint"] == "best.pt" and fit["drfs"] == [4, 100] and len(fit["subjects"]) == 1
    gains = torch.tensor([fit["gains_db"]["4"], fit["gains_db"]["100"]])
    expected = [[4, 100][int(i)] for i in gains.argmax(dim=1)]  # each class: the code with the best gain
    assert [fit["code_of"]["4"], fit["code_of"]["100"]] == expected
    best = load_checkpoint(guided_run / "checkpoints" / "best.pt").model
    assert best["guidance.code_map"].tolist() == [[4, 100].index(c) for c in expected]
    assert bool(best["guidance.codes_fitted"])
    last = load_checkpoint(guided_run / "checkpoints" / "last.pt").model
    assert last["guidance.code_map"].tolist() == [0, 1]  # training's own state is never mapped
    before = (guided_run / "checkpoints" / "best.pt").stat().st_mtime_ns
    assert main(["run", "--resume", str(guided_run)]) == 0  # finished, already fitted: nothing refitted
    assert (guided_run / "checkpoints" / "best.pt").stat().st_mtime_ns == before
    assert "DRF codes fitted" not in capsys.readouterr().err


def test_a_run_fits_its_strength_on_every_validation_subject_and_inference_applies_it(
        guided_run: Path, tmp_path: Path) -> None:
    from lowdose_toolkit.core.checkpoint import load_checkpoint
    from lowdose_toolkit.evaluation.metrics import psnr
    from lowdose_toolkit.evaluation.subjects import subject_pairs
    from lowdose_toolkit.infer.predictor import Predictor

    fit = json.loads((guided_run / "strength_fit.json").read_text())
    ckpt = load_checkpoint(guided_run / "checkpoints" / "best.pt")
    assert fit["checkpoint"] == "best.pt" and fit["subjects"] == sorted(ckpt.split["val"])
    assert len(fit["volumes"]) == 2 * len(ckpt.split["val"])  # every validation subject at both DRFs
    assert bool(ckpt.model["strength.fitted"])
    assert [round(float(a), 4) for a in ckpt.model["strength.alpha"]] == [fit["anchors"]["4"], fit["anchors"]["100"]]
    assert not bool(load_checkpoint(guided_run / "checkpoints" / "last.pt").model["strength.fitted"])
    # The recorded gain at the fitted strength is the one inference gives.
    predictor, recipe = Predictor.from_checkpoint(ckpt, torch.device("cpu"), "fp32")
    pairs = subject_pairs(recipe, ckpt.split["val"][:1], [4])
    low, full = pairs[0]["low"].data.float(), pairs[0]["full"].data.float()
    pred, _ = predictor.predict(low)
    row = next(v for v in fit["volumes"] if v["subject"] == ckpt.split["val"][0] and v["drf"] == 4)
    assert predictor.applied == {"dose_level": pytest.approx(row["dose_level"], abs=1e-3),
                                 "strength": pytest.approx(row["strength"], abs=1e-4)}
    assert psnr(full[0], pred[0]) - psnr(full[0], low[0]) == pytest.approx(row["gain_db_fitted"], abs=2e-3)
    volume = str(guided_run.parent / "data" / "sub00" / "drf_004.nii.gz")
    assert main(["infer", str(guided_run), volume, "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["volumes"][0]
    assert 0.0 <= summary["strength"] <= 1.0 and summary["dose_level"] > 0


def test_evaluate_prints_the_dose_heads_confusion(guided_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    assert main(["evaluate", str(guided_run), "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert "dose head noise_level:" in out and "rows: true DRF, columns: predicted" in out


def test_infer_drf_conditions_a_guided_model_and_is_refused_otherwise(guided_run: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    data = guided_run.parent / "data"
    volume = str(data / "sub00" / "drf_004.nii.gz")
    assert main(["infer", str(guided_run), volume, "--out", str(tmp_path / "a"), "--drf", "100"]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["volumes"][0]
    code = json.loads((guided_run / "code_fit.json").read_text())["code_of"]["100"]  # the fitted map
    via = "" if code == 100 else f" via the DRF {code} code"
    assert summary["conditioned_on"] == f"DRF 100 (--drf){via}" and summary["predicted_drf"] in (4, 100)
    assert main(["infer", str(guided_run), volume, "--out", str(tmp_path / "c"), "--patch-size", "12"]) == 0
    written = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert written["volumes"][0]["conditioned_on"].startswith("dose head on the whole volume")
    assert written["dose_estimate"] == "volume"
    assert main(["infer", str(guided_run), volume, "--out", str(tmp_path / "d"), "--dose-estimate", "slab"]) == 2
    assert "--dose-estimate 'slab' is unknown; use volume or window" in capsys.readouterr().err
    assert main(["infer", str(guided_run), volume, "--out", str(tmp_path / "b"), "--drf", "7"]) == 2
    assert "--drf 7: the model was trained on DRFs [4, 100]" in capsys.readouterr().err


def test_a_volume_thinner_than_the_head_reads_is_conditioned_per_window(guided_run: Path, tmp_path: Path) -> None:
    """A slab of 6 slices (a 2-D-like crop) is under the noise_level head's 10 voxels a side: each window (padded
    to the window size) is read instead, and the summary says so; with --drf the head is not needed. (Both
    failed: 'NoiseLevelHead needs volumes of at least 10 voxels per side', even with --drf.)"""
    import nibabel as nib
    import numpy as np

    source = nib.load(guided_run.parent / "data" / "sub00" / "drf_004.nii.gz")
    thin = tmp_path / "thin.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:, :, 8:14].astype(np.float32), source.affine), thin)
    assert main(["infer", str(guided_run), str(thin), "--out", str(tmp_path / "a"), "--no-previews"]) == 0
    row = json.loads((tmp_path / "a" / "summary.json").read_text())["volumes"][0]
    assert row["status"] == "ok" and row["conditioned_on"].startswith(
        "dose head per window (NoiseLevelHead needs volumes of at least 10 voxels per side, got (1, 1, ")
    assert nib.load(tmp_path / "a" / "thin.nii.gz").shape == (24, 24, 6)
    assert main(["infer", str(guided_run), str(thin), "--out", str(tmp_path / "b"), "--drf", "4", "--no-previews"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["volumes"][0]["conditioned_on"].startswith(
        "DRF 4 (--drf)")


def test_calibrated_head_classifies_whole_volumes_confidently() -> None:
    """Fitted on whole 'training' volumes of three subjects, it names the DRF of a fourth's, confidently."""
    from ldt_plugins.heads.noise_level import calibrate_head

    head = NoiseLevelHead(in_channels=1, num_classes=5)
    volumes, classes = [], []
    for seed in range(3):
        for cls, drf in enumerate(DRFS):
            volumes.append(_poisson_like(drf, seed=seed)[0])
            classes.append(cls)
    assert calibrate_head(head, volumes, classes) == 1.0
    head.eval()
    with torch.no_grad():
        probs = torch.cat([head(_poisson_like(d, seed=7)) for d in DRFS]).softmax(dim=1)
    assert probs.argmax(dim=1).tolist() == [0, 1, 2, 3, 4]
    assert float(probs.max(dim=1).values.min()) > 0.8
    head.train()  # in training (patches) the MLP, trained by the cross-entropy, decides
    assert not torch.allclose(head(_poisson_like(4, seed=7)).softmax(dim=1), probs[:1])


def test_noise_filters_by_shifted_differences_equal_the_convolution_bank() -> None:
    from ldt_plugins.heads.noise_level import filter_bank, local_mean, responses

    x = torch.rand(2, 1, 13, 17, 11, generator=torch.Generator().manual_seed(3)) * 3 - 0.5
    torch.testing.assert_close(responses(x), torch.nn.functional.conv3d(x, filter_bank()), rtol=0, atol=1e-5)
    torch.testing.assert_close(responses(x, 1), torch.nn.functional.conv3d(x, filter_bank()[:1]), rtol=0, atol=1e-5)
    box = torch.nn.functional.avg_pool3d(x.clamp(min=0), 5, stride=1, padding=2, count_include_pad=False)
    torch.testing.assert_close(local_mean(x), box, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(40, 36, 50), (33, 41, 67)])
def test_whole_volume_statistics_in_slabs_equal_the_statistics_of_the_volume(shape: tuple[int, int, int]) -> None:
    """A whole-body scan is read in slabs (bounded memory, one pass): its medians within a histogram bin
    (6e-4) of the exact ones, whatever the slab; the body fraction and activity exact."""
    head = NoiseLevelHead(in_channels=1, num_classes=5)
    activity = torch.zeros(shape)
    activity[4:-4, 5:-5, 2:-2] = 1.5
    activity[10:20, 10:20, :] = 4.0  # an organ through every slab
    noisy = activity + torch.randn(shape, generator=torch.Generator().manual_seed(1)) * (activity * 0.02).sqrt()
    x = noisy[None, None]
    exact = head.statistics(x)
    for slab in (1, 4, 7, 32):
        torch.testing.assert_close(head.volume_statistics(x, max_voxels=1, slab=slab), exact, rtol=0, atol=6.2e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(head.volume_statistics(x, max_voxels=1, slab=9), exact, rtol=0, atol=6.2e-4)
    torch.testing.assert_close(head.volume_statistics(x, max_voxels=1)[:, 5:], exact[:, 5:], rtol=0, atol=1e-6)
    torch.testing.assert_close(head.volume_statistics(x), exact, rtol=0, atol=0)  # small: statistics() itself
    assert torch.equal(head.volume_statistics(torch.zeros(1, 1, 12, 12, 30), max_voxels=1)[0, :5], torch.zeros(5))
    with pytest.raises(ValueError, match=r"expects \[1, 1, X, Y, Z\], got \(2, 1, 12, 12, 12\)"):
        head.volume_statistics(torch.zeros(2, 1, 12, 12, 12))


def test_every_window_is_conditioned_on_the_dose_heads_estimate_for_the_whole_volume(guided_run: Path) -> None:
    from lowdose_toolkit.infer.predictor import Predictor

    predictor = Predictor.from_checkpoint(guided_run, torch.device("cpu"), "fp32", patch_size=12, overlap=4)[0]
    assert predictor.guided and predictor.whole_volume_dose
    model = predictor.model
    assert model is not None
    calls: list[tuple[int, ...]] = []
    estimate = model.volume_dose

    def sure_of(cls: int) -> None:
        def logits(volume: torch.Tensor) -> tuple[torch.Tensor, None]:
            calls.append(tuple(volume.shape))
            return torch.nn.functional.one_hot(torch.tensor([cls]), 2).float() * 30.0, None
        model.volume_dose = logits  # type: ignore[method-assign]

    low = torch.rand(1, 20, 22, 18, generator=torch.Generator().manual_seed(2)) * 2
    for cls in (0, 1):
        sure_of(cls)
        pred, probs = predictor.predict(low)
        assert calls[-1] == (1, 1, 20, 22, 18) and probs is not None and int(probs.argmax()) == cls
        torch.testing.assert_close(pred, predictor.predict(low, drf_class=cls)[0], rtol=0, atol=1e-5)
    assert len(calls) == 4  # once per volume, not per window
    model.volume_dose = estimate  # type: ignore[method-assign]
    by_volume = predictor.predict(low)
    torch.testing.assert_close(by_volume[1], model.volume_dose(low[None])[0][0].softmax(dim=0))
    predictor.dose_estimate = "window"  # the head on each 12^3 window instead: its own (different) votes
    assert not predictor.whole_volume_dose
    by_window = predictor.predict(low)
    assert not torch.allclose(by_window[1], by_volume[1])


def test_a_continuous_dose_level_conditions_on_the_codes_of_the_two_classes_around_it(guided_run: Path) -> None:
    """DRF 20 lies halfway between DRF 4 and 100 in ln DRF: the guided model is conditioned on half of each
    class's code, as if its head had given those probabilities; the summary names the codes."""
    from lowdose_toolkit.infer.predictor import Predictor

    predictor = Predictor.from_checkpoint(guided_run, torch.device("cpu"), "fp32")[0]
    model = predictor.model
    assert model is not None
    low = torch.rand(1, 20, 22, 18, generator=torch.Generator().manual_seed(3)) * 2
    model.volume_dose = lambda volume: (torch.tensor([[5.0, -5.0]]), 20.0)  # type: ignore[method-assign]
    by_level, probs = predictor.predict(low, strength=False)  # the conditioning alone (the strength follows too)
    assert int(probs.argmax()) == 0 and predictor.applied["dose_level"] == 20.0  # the classifier is still reported
    codes = [predictor.code_drf(0), predictor.code_drf(1)]
    assert predictor.code_used == f"DRF {codes[0]} and {codes[1]} codes (0.50 / 0.50)"
    model.volume_dose = lambda volume: (torch.zeros(1, 2), None)  # type: ignore[method-assign]
    by_halves, _ = predictor.predict(low, strength=False)  # a head that gives each class half
    torch.testing.assert_close(by_level, by_halves, rtol=0, atol=1e-5)
    assert predictor.code_used is None


def test_lr_scale_puts_a_part_in_its_own_parameter_group() -> None:
    from lowdose_toolkit.train.build import build_training

    recipe = _recipe(BASE + "  guidance: {name: film, head: noise_level, lr_scale: 5.0}\n"
                     "losses: [{name: l1, weight: 300, on: coarse},\n"
                     "         {name: cross_entropy, weight: 10, on: noise_level}]")
    model, _, _, scheme = build_training(recipe, get_registry(), torch.device("cpu"))
    groups = scheme.optimizers["generator"].param_groups
    assert [(g["lr_scale"], g["lr"]) for g in groups] == [(1.0, 2e-4), (5.0, 1e-3), (10.0, 2e-3)]
    head_params = {id(p) for p in model.heads["noise_level"].parameters()}
    assert {id(p) for p in groups[2]["params"]} == head_params
