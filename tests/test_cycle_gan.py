"""The cycle_gan scheme: phases, the image pool, unpaired sampling, checkpoints and exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_tiny_dataset, tiny_recipe, write

from ldt_plugins.schemes.cycle_gan import CycleGAN, ImagePool, derangement
from lowdose_toolkit.core.plugin_manager import get_registry
from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe
from lowdose_toolkit.errors import RecipeError
from lowdose_toolkit.train.engine import Trainer

HEADS = "  heads: [{name: dose_classifier, input: bottleneck, hidden: [8]}]\n"
LOSSES = "  - {name: l1, weight: 300, on: coarse}\n  - {name: cross_entropy, weight: 10, on: dose_classifier}\n"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny"), subjects=3)


def cycle_recipe(data_root: Path, conditional: bool = False, scheme: str = "{name: cycle_gan, pool_size: 3}") -> str:
    text = tiny_recipe(data_root)
    assert HEADS in text and LOSSES in text
    flag = "true" if conditional else "false"
    disc = f"{{name: patchgan3d, channels: 4, n_layers: 1, conditional: {flag}}}"
    text = text.replace(HEADS, f"  discriminator: {disc}\n")
    text = text.replace(LOSSES, "  - {name: lsgan, weight: 1}\n")
    return text.replace("train:\n", f"train:\n  scheme: {scheme}\n")


def trainer_for(tmp_path: Path, text: str, overrides: tuple[str, ...] = (), run: str = "run",
                resume: bool = False) -> Trainer:
    path = write(tmp_path / f"{run}.yaml", text)
    recipe = resolve_recipe(load_recipe(path, overrides), get_registry(), str(path))
    return Trainer(recipe, tmp_path / run, get_registry(), resume=resume)


def test_one_step_updates_generators_then_discriminators(tmp_path: Path, data_root: Path) -> None:
    trainer = trainer_for(tmp_path, cycle_recipe(data_root))
    scheme = trainer.scheme
    assert isinstance(scheme, CycleGAN) and scheme.phases == ("generator", "discriminator")
    nets = {"g_a": trainer.model, "g_b": scheme.generator_b, "d_a": trainer.discriminator,
            "d_b": scheme.discriminator_b}
    assert scheme.extra_modules == {"generator_b": scheme.generator_b, "discriminator_b": scheme.discriminator_b}
    # G_B / D_B: the same architecture as G_A / D_A, freshly initialised.
    pairs = ((scheme.generator_b, trainer.model.generator), (scheme.discriminator_b, trainer.discriminator))
    for copy_, original in pairs:
        a, b = copy_.state_dict(), original.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
        assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("weight"))
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copy_.parameters(), original.parameters(), strict=True))
    params = {name: list(net.parameters()) for name, net in nets.items()}
    seen = []
    original_step = scheme.backward_step

    def spy(name: str, loss: torch.Tensor) -> None:
        before = {n: [p.detach().clone() for p in ps] for n, ps in params.items()}
        original_step(name, loss)
        changed = {n for n, ps in params.items()
                   if any(not torch.equal(a, p) for a, p in zip(before[n], ps, strict=True))}
        seen.append((name, changed))

    scheme.backward_step = spy
    trainer.model.train()
    values = scheme.train_step(trainer.stream.next_batch())
    assert seen == [("generator", {"g_a", "g_b"}), ("discriminator", {"d_a", "d_b"})]
    assert set(values) == {"gan_a", "gan_b", "cycle_a", "cycle_b", "idt_a", "idt_b", "d_a", "d_b", "total"}
    assert all(torch.isfinite(torch.tensor(v)) for v in values.values())
    assert values["idt_a"] > 0 and values["cycle_b"] > 0
    # The discriminators were frozen only during the generator step.
    assert all(p.requires_grad for net in nets.values() for p in net.parameters())
    assert len(scheme.pool_a) == len(scheme.pool_b) == 2  # batch of 2 into pools of 3


@pytest.mark.parametrize("unpaired", [True, False])
def test_unpaired_breaks_every_pair(tmp_path: Path, data_root: Path, unpaired: bool) -> None:
    scheme_spec = f"{{name: cycle_gan, unpaired: {str(unpaired).lower()}, lambda_identity: 0.0}}"
    text = cycle_recipe(data_root, scheme=scheme_spec).replace("batch_size: 2", "batch_size: 4")
    trainer = trainer_for(tmp_path, text, run=f"u{unpaired}")
    scheme = trainer.scheme
    inputs: list[torch.Tensor] = []
    g_b = scheme.g_b_net
    scheme.g_b_net = lambda x: inputs.append(x.detach().clone()) or g_b(x)  # type: ignore[assignment]
    batch = trainer.stream.next_batch()
    values = scheme.train_step(batch)
    assert values["idt_a"] == values["idt_b"] == 0.0
    full = batch["full"]
    fed = inputs[1]  # G_B's second call: fake_A = G_B(real_B)
    matches = [[torch.equal(fed[i], full[j]) for j in range(len(full))] for i in range(len(full))]
    assert all(sum(row) >= 1 for row in matches)  # a permutation of the batch's full-dose patches...
    assert all(matches[i][i] != unpaired for i in range(len(full)))  # ...with no fixed point when unpaired


def test_derangement_has_no_fixed_point() -> None:
    torch.manual_seed(1)
    assert derangement(1).tolist() == [0]
    for n in (2, 3, 5):
        for _ in range(20):
            perm = derangement(n)
            assert sorted(perm.tolist()) == list(range(n))
            assert all(perm[i] != i for i in range(n))


def test_image_pool_fills_then_swaps_half_the_time() -> None:
    torch.manual_seed(0)
    pool = ImagePool(4)
    first = torch.arange(3.0).view(3, 1, 1, 1, 1)
    assert torch.equal(pool.query(first), first) and len(pool) == 3  # filling: returned as is
    out = pool.query(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1, 1))
    assert len(pool) == 4 and out.shape == (2, 1, 1, 1, 1)
    assert float(out[0]) == 3.0  # the 4th image still went in (and came back) unchanged
    history = {float(t) for t in pool.images}
    old = 0
    n = 2000
    for value in range(100, 100 + n):
        image = torch.tensor([float(value)]).view(1, 1, 1, 1, 1)
        before = {float(t) for t in pool.images}
        got = float(pool.query(image))
        assert len(pool) == 4  # capped
        if got != value:  # an older image came back; the new one took its place
            assert got in before and value in {float(t) for t in pool.images}
            old += 1
        history |= {float(t) for t in pool.images}
    assert 0.45 < old / n < 0.55
    assert torch.equal(ImagePool(0).query(first), first) and len(ImagePool(0)) == 0
    restored = ImagePool(4)
    restored.load_state_dict(pool.state_dict())
    assert [float(t) for t in restored.images] == [float(t) for t in pool.images]
    with pytest.raises(RecipeError, match="pool_size: 4"):
        ImagePool(5).load_state_dict(pool.state_dict())


def test_fit_checkpoints_scheme_modules_and_resume_is_exact(tmp_path: Path, data_root: Path) -> None:
    text = cycle_recipe(data_root).replace("steps_per_epoch: 6", "steps_per_epoch: 2")
    ref = trainer_for(tmp_path, text, ("train.epochs=3",), run="ref")
    ref.fit()
    ckpt = torch.load(tmp_path / "ref" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["scheme_modules"]) == {"generator_b", "discriminator_b"}
    for key, value in ref.scheme.generator_b.state_dict().items():
        assert torch.equal(ckpt["scheme_modules"]["generator_b"][key], value), key
    assert len(ckpt["scheme"]["pools"]["b"]["images"]) == 3  # capped at pool_size
    assert set(ckpt["scheme"]["optimizers"]) == {"generator", "discriminator"}

    # Two epochs, then resume for the third: G_B, D_B, the pools and the optimizers continue exactly.
    trainer_for(tmp_path, text, ("train.epochs=2",), run="cut").fit()
    resumed = trainer_for(tmp_path, text, ("train.epochs=3",), run="cut", resume=True)
    fresh_g_b = {k: v.clone() for k, v in resumed.scheme.generator_b.state_dict().items()}
    resumed.fit()
    res = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=True)
    assert res["epoch"] == 3
    for part in ("generator_b", "discriminator_b"):
        for key, value in ckpt["scheme_modules"][part].items():
            assert torch.equal(value, res["scheme_modules"][part][key]), (part, key)
    for key, value in ckpt["model"].items():
        assert torch.equal(value, res["model"][key]), key
    assert any(not torch.equal(fresh_g_b[k], v) for k, v in res["scheme_modules"]["generator_b"].items())


def test_conditional_discriminator_is_refused(tmp_path: Path, data_root: Path) -> None:
    with pytest.raises(RecipeError, match=r"unconditional discriminator.*set conditional: false"):
        trainer_for(tmp_path, cycle_recipe(data_root, conditional=True))


@pytest.mark.parametrize(("scheme", "message"), [
    ("{name: cycle_gan, pool_size: -1}", "pool_size: must be >= 0"),
    ("{name: cycle_gan, lambda_cycle: -1.0}", "lambda_cycle: must be >= 0"),
])
def test_bad_options_name_the_key(tmp_path: Path, data_root: Path, scheme: str, message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        trainer_for(tmp_path, cycle_recipe(data_root, scheme=scheme))


def test_needs_one_adversarial_loss(tmp_path: Path, data_root: Path) -> None:
    text = cycle_recipe(data_root).replace("  - {name: lsgan, weight: 1}\n", "  - {name: l1, weight: 1, on: pred}\n")
    with pytest.raises(RecipeError, match="exactly one adversarial loss"):
        trainer_for(tmp_path, text)


def test_ldt_infer_uses_the_low_to_full_generator(tmp_path: Path, data_root: Path) -> None:
    import nibabel as nib

    from lowdose_toolkit.cli.app import main

    recipe = write(tmp_path / "c.yaml", cycle_recipe(data_root).replace("epochs: 3", "epochs: 1")
                   .replace("steps_per_epoch: 6", "steps_per_epoch: 2"))
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--set", "data.split.test=0"]) == 0
    source = data_root / "sub00" / "drf_100.nii.gz"
    assert main(["infer", str(tmp_path / "run"), str(source), "--out", str(tmp_path / "out")]) == 0
    pred = nib.load(tmp_path / "out" / "drf_100.nii.gz")
    assert pred.shape == nib.load(source).shape
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    # The checkpoint's model is G_A (low -> full); G_B and D_B travel as scheme modules.
    assert set(ckpt["scheme_modules"]) == {"generator_b", "discriminator_b"}


def _states(*modules: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]


def _same(before: list[dict[str, torch.Tensor]], modules: tuple[torch.nn.Module, ...]) -> bool:
    return all(torch.equal(b[k], v) for b, m in zip(before, modules, strict=True) for k, v in m.state_dict().items())


def test_stages_freeze_the_scheme_owned_networks(tmp_path: Path, data_root: Path) -> None:
    """A discriminator-only stage leaves G_A and G_B (weights and BatchNorm statistics) untouched."""
    text = cycle_recipe(data_root).replace(
        "train:\n", "train:\n  stages:\n    - {name: d-warmup, epochs: 1, trainable: [discriminator]}\n", 1
    )
    trainer = trainer_for(tmp_path, text)
    scheme = trainer.scheme
    generators = (trainer.model.generator, scheme.generator_b)
    discriminators = (trainer.discriminator, scheme.discriminator_b)
    g_before, d_before = _states(*generators), _states(*discriminators)
    trainer.fit()
    assert scheme.frozen_parts == {"generator", "heads", "refiner"}
    assert _same(g_before, generators)  # G_B is the scheme's, frozen with the generator part
    assert not any(_same([b], (m,)) for b, m in zip(d_before, discriminators, strict=True))  # both Ds trained
