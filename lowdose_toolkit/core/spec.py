"""Typed, frozen run specs: a resolved recipe checked across keys, once, for every command.

:func:`lowdose_toolkit.core.recipe.resolve_recipe` checks each key's type and range (the schema); this
module checks what needs several keys at once (stages against the model's parts, the overlap against
the window, the monitor against the DRFs) and returns :class:`RunSpec`, which the trainer, the
scheduler and the sliding window read instead of parsing the recipe again. ``ldt check``, ``ldt run``,
``ldt study`` and checkpoint loading all pass through it, so a recipe ``ldt check`` accepts is one
``ldt run`` will not reject later. Every error names the dotted key, the value and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lowdose_toolkit.errors import RecipeError, UserError

#: The parts a training stage trains or freezes.
STAGE_PARTS = ("generator", "heads", "refiner", "discriminator")
STAGE_KEYS = ("name", "epochs", "trainable", "use_refiner", "max_minutes")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


@dataclass(frozen=True)
class StageSpec:
    """One training stage: the parts it trains (the rest are frozen) and its budget."""

    name: str
    epochs: int
    trainable: tuple[str, ...]
    use_refiner: bool
    max_minutes: float | None


@dataclass(frozen=True)
class WindowSpec:
    """The sliding window of validation and inference (``eval``)."""

    patch_size: tuple[int, int, int]
    overlap: tuple[int, int, int]
    batch_size: int
    blending: str
    ssim_range: str
    val_subjects: int | None


@dataclass(frozen=True)
class ScheduleSpec:
    """The plateau schedule, checkpoint selection (``monitor``, ``mode``) and the learning-rate floor."""

    name: str
    factor: float
    patience: int
    monitor: str
    mode: str
    stop_when_lr_below: float | None


@dataclass(frozen=True)
class RunSpec:
    """What the engine reads of a resolved recipe, checked."""

    drfs: tuple[int, ...]
    patch_size: tuple[int, int, int]
    stages: tuple[StageSpec, ...]
    betas: tuple[float, float]
    schedule: ScheduleSpec
    window: WindowSpec
    val_every: int
    max_minutes: float | None
    device: str
    precision: str  # auto, fp32, bf16 or fp16 (resolved per device by lowdose_toolkit.infer.precision)
    precision_cuda_only: bool = False  # from the older train.amp, which autocast on CUDA only

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)


def three(value: int | Sequence[int], key: str) -> tuple[int, int, int]:
    """One size or three, as three positive ints (``key`` names the recipe key in the error)."""
    values = [value] * 3 if isinstance(value, int) else list(value)
    if len(values) != 3:
        raise RecipeError(f"{key}: expected one size or three (x, y, z), got {values!r}; e.g. {key}=64 or "
                          f"{key}=[80, 80, 160]")
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise RecipeError(f"{key}: sizes must be positive integers, got {values!r}")
    return (values[0], values[1], values[2])


def parse_stages(train: Mapping[str, Any], has_refiner: bool) -> tuple[StageSpec, ...]:
    """``train.stages`` checked, or one stage of ``train.epochs`` training everything end-to-end.

    A stage trains the parts it lists in ``trainable`` (generator, heads, refiner, discriminator) and
    freezes the others: no gradient, no optimizer step, and eval mode (BatchNorm statistics kept).
    Networks a scheme owns belong to the part it names (CycleGAN's G_B: generator, D_B: discriminator);
    a guidance part belongs to the part it conditions (its ``stage_parts``; else the generator).
    ``max_minutes`` ends a stage after the epoch that crosses that wall-clock budget (the next stage then
    starts), so a time-budgeted run still reaches every stage; epochs keep their planned numbers (the
    next stage's first epoch is the one after the earlier stages' planned epochs).
    """
    if not train["stages"]:
        return (StageSpec("end-to-end", train["epochs"], STAGE_PARTS, True, None),)
    stages = []
    names: set[str] = set()
    for i, stage in enumerate(train["stages"]):
        where = f"train.stages.{i}"
        if not isinstance(stage, Mapping):
            raise RecipeError(f"{where}: expected a mapping such as {{name: ml-net, epochs: 60, trainable: "
                              f"[generator, heads]}}, got {stage!r}")
        unknown = sorted(set(stage) - set(STAGE_KEYS))
        if unknown:
            raise RecipeError(f"{where}.{unknown[0]}: unknown key; stage keys: {', '.join(STAGE_KEYS)}")
        epochs = stage.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise RecipeError(f"{where}.epochs: expected a positive int, got {epochs!r}")
        trainable = stage.get("trainable", list(STAGE_PARTS))
        if isinstance(trainable, str) or not isinstance(trainable, list) or not trainable:
            raise RecipeError(f"{where}.trainable: expected a non-empty list of parts ({', '.join(STAGE_PARTS)}), "
                              f"got {trainable!r}")
        bad = [p for p in trainable if p not in STAGE_PARTS]
        if bad:
            raise RecipeError(f"{where}.trainable: unknown part {bad[0]!r}; parts: {', '.join(STAGE_PARTS)}")
        minutes = stage.get("max_minutes")
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                    or minutes <= 0):
            raise RecipeError(f"{where}.max_minutes: expected a positive number of minutes or null, got {minutes!r}")
        use_refiner = stage.get("use_refiner", True)
        if not isinstance(use_refiner, bool):
            raise RecipeError(f"{where}.use_refiner: expected true or false, got {use_refiner!r}")
        name = stage.get("name", f"stage{i + 1}")
        if not isinstance(name, str) or not name or name in names:
            raise RecipeError(f"{where}.name: expected a unique non-empty name, got {name!r}")
        names.add(name)
        stages.append(StageSpec(name, epochs, tuple(trainable), use_refiner and has_refiner,
                                None if minutes is None else float(minutes)))
    return tuple(stages)


def monitor_mode(monitor: str, drfs: Iterable[int]) -> str:
    """``"max"`` or ``"min"`` for ``train.scheduler.monitor``, which is checked against ``data.drfs``.

    Monitors: ``val_gain`` (the PSNR gain over the input, weighted per DRF as the challenge ranks:
    4/10/20/50/100 at 5/15/20/25/35 %, see :func:`lowdose_toolkit.train.validation.weighted_gain`),
    ``val_psnr`` (validation PSNR averaged over the DRFs),
    ``val_psnr_drf<N>`` (at DRF N only, e.g. for a DRF-100 ablation like the paper's Table II) and
    ``val_loss``. A plain mean PSNR lets a model trade DRF 4 for DRF 100; the weighted gain does not
    reward a model for matching the input where the input is already good.
    """
    if monitor == "val_loss":
        return "min"
    if monitor in ("val_psnr", "val_gain"):
        return "max"
    match = re.fullmatch(r"val_psnr_drf(\d+)", monitor)
    drfs = [int(d) for d in drfs]
    if match is None or int(match.group(1)) not in drfs:
        raise RecipeError(f"train.scheduler.monitor: {monitor!r} is unknown; use val_gain (DRF-weighted gain over "
                          f"the input), val_psnr (mean over the DRFs), val_loss, or val_psnr_drf<N> with N one of "
                          f"data.drfs {drfs}")
    return "max"


def _window(cfg: Mapping[str, Any]) -> WindowSpec:
    from lowdose_toolkit.infer.sliding import parse_overlap

    patch = three(cfg["patch_size"], "eval.patch_size")
    overlap = cfg["overlap"]
    try:
        voxels = parse_overlap(overlap, patch)
    except UserError as exc:
        raise RecipeError(f"eval.overlap: {overlap!r} does not fit eval.patch_size {list(patch)}: {exc}; use an even "
                          f"number of voxels below the window, or a fraction in [0, 1) such as 0.25") from None
    return WindowSpec(patch, voxels, cfg["batch_size"], cfg["blending"], cfg["ssim_range"], cfg["val_subjects"])


def canonical_precision(train: Mapping[str, Any]) -> tuple[str, bool]:
    """``(precision, cuda_only)`` of a recipe's ``train`` section: ``train.precision``, or the older
    ``train.amp`` (``none`` is fp32; ``bf16``/``fp16`` autocast on CUDA only, as it did)."""
    precision = train.get("precision", "fp32")
    if train.get("amp") is None:
        return precision, False
    legacy = "fp32" if train["amp"] == "none" else train["amp"]
    if precision not in ("fp32", legacy):
        raise RecipeError(f"train.amp: {train['amp']!r} contradicts train.precision {precision!r}; "
                          f"drop train.amp (the older name)")
    return legacy, legacy != "fp32"


def canonical_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved recipe with the older ``train.amp`` folded into ``train.precision``, so a run recorded by
    an earlier version compares equal to the same recipe now (``ldt study``, ``ldt run --resume DIR RECIPE``)."""
    import copy

    out = copy.deepcopy(dict(recipe))
    train = dict(out.get("train", {}))
    if train.get("amp") is not None:
        train["precision"], _ = canonical_precision(train)
    train.pop("amp", None)
    out["train"] = train
    return out


def run_spec(recipe: Mapping[str, Any]) -> RunSpec:
    """Check the keys of a resolved recipe against each other and return the typed spec."""
    data, train = recipe["data"], recipe["train"]
    drfs = tuple(data["drfs"])
    if not drfs or len(set(drfs)) != len(drfs):
        raise RecipeError(f"data.drfs: expected distinct dose reduction factors, got {list(drfs)}; list each once, "
                          f"e.g. [4, 10, 20, 50, 100]")
    for key in ("val", "test"):
        value = data["split"][key]
        if isinstance(value, float) and value >= 1 and not value.is_integer():
            raise RecipeError(f"data.split.{key}: expected a fraction < 1 or a whole number of subjects, got {value!r}")
    val, test = data["split"]["val"], data["split"]["test"]
    if val == 0:
        raise RecipeError("data.split.val: 0 leaves no validation subject, but validation selects the best epoch and "
                          "drives the schedule; give a fraction such as 0.2 or a number of subjects >= 1")
    if isinstance(val, float) and isinstance(test, float) and val < 1 and test < 1 and val + test >= 1:
        raise RecipeError(f"data.split: val {val} + test {test} leave no training subjects; make the fractions sum "
                          "to less than 1")
    if data["queue_length"] < data["samples_per_volume"]:
        raise RecipeError(f"data.queue_length: {data['queue_length']} is shorter than data.samples_per_volume "
                          f"{data['samples_per_volume']}; the queue must hold one volume's patches at least")
    betas = tuple(train["optimizer"]["betas"])
    if len(betas) != 2:
        raise RecipeError(f"train.optimizer.betas: expected two values, got {list(betas)}; e.g. [0.5, 0.999]")
    if not all(0 <= b < 1 for b in betas):
        raise RecipeError(f"train.optimizer.betas: each must be in [0, 1), got {list(betas)}")
    device = train["device"]
    if not _DEVICE.fullmatch(device):
        raise RecipeError(f"train.device: {device!r} is not a device; use auto, cpu, cuda or cuda:N")
    precision, cuda_only = canonical_precision(train)
    from lowdose_toolkit.infer.consistency import Consistency

    try:
        Consistency.from_spec(recipe["eval"].get("consistency"))
    except UserError as exc:
        raise RecipeError(str(exc)) from None
    sched = train["scheduler"]
    schedule = ScheduleSpec(sched["name"], sched["factor"], sched["patience"], sched["monitor"],
                            monitor_mode(sched["monitor"], drfs), train["stop_when_lr_below"])
    return RunSpec(
        drfs=drfs,
        patch_size=three(data["patch_size"], "data.patch_size"),
        stages=parse_stages(train, recipe["model"]["refiner"] is not None),
        betas=(float(betas[0]), float(betas[1])),
        schedule=schedule,
        window=_window(recipe["eval"]),
        val_every=train["val_every"],
        max_minutes=train["max_minutes"],
        device=device,
        precision=precision,
        precision_cuda_only=cuda_only,
    )
