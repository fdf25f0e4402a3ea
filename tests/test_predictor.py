"""The one inference path: Predictor, its precision setting, and the typed Checkpoint it is built from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowdose_toolkit.core.checkpoint import Checkpoint, Normalization, load_checkpoint
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import resolve_recipe
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.infer import precision as prec
from lowdose_toolkit.infer.predictor import Predictor
from lowdose_toolkit.models.lowdose_model import build_model

RECIPE = {
    "name": "tiny",
    "data": {"drfs": [4, 100], "patch_size": 16},
    "model": {"generator": {"name": "mlnet", "channels": 4, "depth": 2, "residual": True},
              "heads": [{"name": "dose_classifier", "input": "bottleneck"}]},
    "losses": [{"name": "l1", "on": "pred"}],
    "eval": {"patch_size": 16, "overlap": 4, "batch_size": 2},
}
CPU = torch.device("cpu")


def tiny() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    recipe = resolve_recipe(RECIPE, get_registry())
    model, _ = build_model(recipe, get_registry())
    return model.eval(), recipe


def checkpoint(tmp_path: Path) -> Path:
    model, recipe = tiny()
    ckpt = Checkpoint(recipe=recipe, epoch=3, drfs=[4, 100], model=model.state_dict(),
                      normalization=Normalization("robust", 0.99), split={"test": ["a"]})
    ckpt.save(tmp_path / "c.pt")
    return tmp_path / "c.pt"


def test_checkpoint_round_trip_and_typed_fields(tmp_path: Path) -> None:
    ckpt = load_checkpoint(checkpoint(tmp_path))
    assert ckpt.epoch == 3 and ckpt.drfs == [4, 100] and ckpt.normalization == Normalization("robust", 0.99)
    assert ckpt.split == {"test": ["a"]} and ckpt.world_size == 1
    with pytest.raises(AttributeError):
        ckpt.epoch = 4  # type: ignore[misc]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("model"), "missing model"),
    (lambda d: [d.pop("drfs"), d.pop("recipe")], "missing recipe, drfs"),
    (lambda d: d.update(format=2), "checkpoint format 2; this version of ldt reads format 1"),
    (lambda d: d.update(normalization="robust"), "normalization must name its method"),
])
def test_foreign_or_truncated_checkpoint_is_one_line_naming_what_is_missing(tmp_path: Path, edit, message: str) -> None:
    data = torch.load(checkpoint(tmp_path), weights_only=True)
    edit(data)
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(UserError, match=message) as info:
        load_checkpoint(tmp_path / "bad.pt")
    assert "\n" not in str(info.value) and "bad.pt" in str(info.value)


def test_old_checkpoint_without_quantile_reads_the_legacy_one(tmp_path: Path) -> None:
    data = torch.load(checkpoint(tmp_path), weights_only=True)
    del data["normalization"]["quantile"]
    torch.save(data, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt").normalization.quantile == 0.999


def test_precision_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    assert prec.resolve_precision("none", CPU) == "fp32"
    for name in ("fp32", "bf16", "fp16"):
        assert prec.resolve_precision(name, CPU) == name
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert prec.resolve_precision("auto", CPU) == "bf16"
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset({"avx2"}))
    assert prec.resolve_precision("auto", CPU) == "fp32"
    with pytest.raises(UserError, match="--precision: 'fp8' is unknown; use one of auto, fp32, bf16, fp16"):
        prec.resolve_precision("fp8", CPU, "--precision")


@pytest.mark.parametrize(("name", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_predictor_runs_the_network_in_its_precision(tmp_path: Path, name: str, dtype: torch.dtype) -> None:
    """fp16 means fp16 (and bf16 bf16) on the code path every command uses; the output is float32."""
    predictor, _ = Predictor.from_checkpoint(checkpoint(tmp_path), CPU, name)
    assert predictor.precision == name
    seen: list[torch.dtype] = []
    conv = next(m for m in predictor.model.modules() if isinstance(m, torch.nn.Conv3d))
    conv.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    low = torch.rand(1, 20, 18, 22, generator=torch.Generator().manual_seed(1))
    pred, probs = predictor.predict(low)
    assert set(seen) == {dtype} and pred.dtype == torch.float32 and pred.shape == low.shape
    assert probs is not None and probs.shape == (2,) and float(probs.sum()) == pytest.approx(1.0, abs=1e-3)
    reference, _ = Predictor.from_checkpoint(checkpoint(tmp_path), CPU, "fp32")[0].predict(low)
    tol = {"fp32": 1e-6, "bf16": 5e-2, "fp16": 5e-3}[name]
    torch.testing.assert_close(pred, reference, atol=tol, rtol=tol)


def test_predictor_window_overrides_checked_before_any_volume(tmp_path: Path) -> None:
    predictor, recipe = Predictor.from_checkpoint(checkpoint(tmp_path), CPU, "fp32", patch_size=12, overlap=None)
    assert predictor.window == {"patch_size": 12, "overlap": 4, "batch_size": 2, "blending": "hann"}
    assert recipe["name"] == "tiny" and predictor.drfs == (4, 100)
    _, probs = predictor.predict(torch.rand(1, 20, 18, 22, generator=torch.Generator().manual_seed(2)))
    assert predictor.verdict(probs)["predicted_drf"] in (4, 100)
    for bad, message in (({"overlap": 3}, "change --patch-size or --overlap"), ({"batch_size": 0}, "--batch-size"),
                         ({"blending": "max"}, "--blending 'max' is unknown")):
        with pytest.raises(UserError, match=message):
            Predictor.from_checkpoint(checkpoint(tmp_path), CPU, "fp32", **bad)
    with pytest.raises(UserError, match="not guided by a dose head"):
        predictor.drf_class(4)


def test_folding_batchnorm_is_exact_and_channels_last_changes_nothing(tmp_path: Path) -> None:
    from lowdose_toolkit.infer.optimize import fold_batchnorm, for_inference

    model, _ = tiny()
    for m in model.modules():  # running statistics far from the identity, so folding has work to do
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model.predict(x)
        for channels_last in (False, True):
            fast = for_inference(model, fold=True, channels_last=channels_last)
            assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.modules())
            xi = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
            torch.testing.assert_close(fast.predict(xi), reference, atol=1e-5, rtol=1e-5)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())  # the original is untouched
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model.train())


def test_predictor_from_checkpoint_is_an_optimised_copy_with_the_same_output(tmp_path: Path) -> None:
    path = checkpoint(tmp_path)
    low = torch.rand(1, 20, 18, 22, generator=torch.Generator().manual_seed(4))
    plain, _ = Predictor.from_checkpoint(path, CPU, "fp32", fold_bn=False, channels_last=False)
    fast, _ = Predictor.from_checkpoint(path, CPU, "fp32", fold_bn=True, channels_last=True)
    assert fast.channels_last and not any(isinstance(m, torch.nn.BatchNorm3d) for m in fast.model.modules())
    (a, pa), (b, pb) = plain.predict(low), fast.predict(low)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5)


def test_compiled_predictor_compiles_once_and_gives_the_eager_output(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = checkpoint(tmp_path)
    low = torch.rand(1, 20, 18, 22, generator=torch.Generator().manual_seed(4))
    calls: list[dict] = []
    real = torch.compile

    def counting(fn, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append(kwargs)
        return real(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", counting)
    eager, _ = Predictor.from_checkpoint(path, CPU, "fp32")
    compiled, _ = Predictor.from_checkpoint(path, CPU, "fp32", compile=True)
    assert not eager.compiled and compiled.compiled
    a, pa = eager.predict(low)
    assert calls == []  # an eager predictor never compiles
    (b, pb), (b2, _) = compiled.predict(low), compiled.predict(low)
    assert calls == [{"dynamic": False}]  # once per predictor, not per window or volume
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pb, pa, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b2, b)
