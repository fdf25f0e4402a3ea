"""The training engine: data, model, scheme, schedules, validation, checkpoints, previews.

``Trainer(recipe, run_dir).fit()`` trains a resolved recipe into a run directory::

    run_dir/
      recipe.yaml          the resolved recipe
      run.json             what ran: versions, device, split, plugins, loss records
      metrics.jsonl        one line per epoch: loss terms, lr, val PSNR/SSIM/NRMSE per DRF, time
      checkpoints/last.pt  written atomically at each epoch's end (resume from here)
      checkpoints/best.pt  the epoch with the best validation metric
      previews/epoch_NNN.png  MIPs of low-dose / coarse / refined / full-dose (one val subject)
"""

from __future__ import annotations

import json
import platform
import random
import re
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowdose_toolkit import __version__
from lowdose_toolkit.atomic import atomic_path
from lowdose_toolkit.data import PatchStream, Split, pairs_dataset, shard, split_records
from lowdose_toolkit.distributed import (
    DistInfo,
    broadcast_buffers,
    broadcast_object,
    cleanup,
    ddp_wrapper,
    gather_objects,
    init_distributed,
)
from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.model import LossTerm, LowDoseModel, build_losses, build_model
from lowdose_toolkit.normalize import QUANTILE
from lowdose_toolkit.recipe import dump_recipe
from lowdose_toolkit.records import SubjectRecord
from lowdose_toolkit.registry import Registry
from lowdose_toolkit.schemes import Scheme, identity

CHECKPOINT_FORMAT = 1
CALIBRATION_VOLUMES = 200  # whole training volumes a calibrated dose head is fitted on (evenly spaced)
STAGE_PARTS = ("generator", "heads", "refiner", "discriminator")


# --------------------------------------------------------------------------- small helpers


def make_optimizer_factory(cfg: Mapping[str, Any]) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """Optimizer factory from ``train.optimizer`` (paper: Adam, lr 2e-4; betas as pix2pix)."""
    name, lr, wd = cfg["name"], cfg["lr"], cfg["weight_decay"]
    betas = tuple(cfg["betas"])
    if len(betas) != 2:
        raise RecipeError(f"train.optimizer.betas: expected two values, got {list(betas)}")

    def factory(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        if name == "adam":
            return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
        if name == "adamw":
            return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)  # type: ignore[arg-type]
        return torch.optim.SGD(params, lr=lr, momentum=betas[0], weight_decay=wd)

    return factory


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a clear error for unusable devices."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise RecipeError(f"train.device: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecipeError(f"train.device: {spec!r} asked for but CUDA is not available; use auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed torch, numpy and Python's random (TorchIO samples with torch's RNG)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict[str, Any]:
    """All RNG states as tensors and ints (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(state: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` to a temporary file, then rename (an interrupted write leaves the old file)."""
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear error for a missing or foreign file."""
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                path = candidate
                break
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint here (expected a .pt file or a run directory with checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        from lowdose_toolkit.safeload import load_failure

        raise UserError(f"{path}: not a lowdose-toolkit checkpoint ({load_failure(exc)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "recipe" not in ckpt:
        raise UserError(f"{path}: not a lowdose-toolkit checkpoint (format {CHECKPOINT_FORMAT} expected)")
    return ckpt


def parse_stages(train: Mapping[str, Any], has_refiner: bool) -> list[dict[str, Any]]:
    """``train.stages`` checked, or one stage of ``train.epochs`` training everything end-to-end.

    A stage trains the parts it lists in ``trainable`` (generator, heads, refiner, discriminator) and
    freezes the others: no gradient, no optimizer step, and eval mode (BatchNorm statistics kept).
    Networks a scheme owns belong to the part it names (CycleGAN's G_B: generator, D_B: discriminator);
    a guidance part belongs to the part it conditions (its ``stage_parts``; else the generator).
    ``max_minutes`` ends a stage after the epoch that crosses
    that wall-clock budget (the next stage then starts), so a time-budgeted run still reaches every stage;
    epochs keep their planned numbers (the next stage's first epoch is the one after the earlier stages'
    planned epochs).
    """
    if not train["stages"]:
        return [{"name": "end-to-end", "epochs": train["epochs"], "trainable": list(STAGE_PARTS),
                 "use_refiner": True, "max_minutes": None}]
    stages = []
    allowed = {"name", "epochs", "trainable", "use_refiner", "max_minutes"}
    for i, stage in enumerate(train["stages"]):
        where = f"train.stages.{i}"
        unknown = set(stage) - allowed
        if unknown:
            raise RecipeError(f"{where}.{sorted(unknown)[0]}: unknown key; stage keys: {', '.join(sorted(allowed))}")
        if not isinstance(stage.get("epochs"), int) or stage["epochs"] < 1:
            raise RecipeError(f"{where}.epochs: expected a positive int, got {stage.get('epochs')!r}")
        trainable = stage.get("trainable", list(STAGE_PARTS))
        bad = [p for p in trainable if p not in STAGE_PARTS]
        if bad:
            raise RecipeError(f"{where}.trainable: unknown part {bad[0]!r}; parts: {', '.join(STAGE_PARTS)}")
        minutes = stage.get("max_minutes")
        if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                    or minutes <= 0):
            raise RecipeError(f"{where}.max_minutes: expected a positive number of minutes, got {minutes!r}")
        use_refiner = bool(stage.get("use_refiner", True))
        if use_refiner and not has_refiner and "refiner" in trainable and train["stages"]:
            use_refiner = False
        stages.append({"name": stage.get("name", f"stage{i + 1}"), "epochs": stage["epochs"],
                       "trainable": list(trainable), "use_refiner": use_refiner, "max_minutes": minutes})
    return stages


#: The Ultra-Low-Dose PET challenge's ranking weights per DRF (udpet-challenge.github.io, evaluation).
CHALLENGE_DRF_WEIGHTS: dict[int, float] = {4: 0.05, 10: 0.15, 20: 0.20, 50: 0.25, 100: 0.35}


def drf_weights(drfs: Iterable[int]) -> dict[int, float]:
    """Weights of the DRFs in ``val_gain``: the challenge's (renormalised) when every DRF has one, else equal."""
    drfs = [int(d) for d in drfs]
    if all(d in CHALLENGE_DRF_WEIGHTS for d in drfs):
        total = sum(CHALLENGE_DRF_WEIGHTS[d] for d in drfs)
        return {d: CHALLENGE_DRF_WEIGHTS[d] / total for d in drfs}
    return {d: 1.0 / len(drfs) for d in drfs}


def weighted_gain(val: Mapping[str, Any]) -> float:
    """DRF-weighted mean of the validation PSNR gain over the low-dose input (dB), see :func:`drf_weights`.

    (A variant that also subtracted every DRF's loss below the input selected the first, near-identity
    epoch of every unguided ML-Net run in the CPU study and stopped plateau schedules within a few
    epochs, so it was dropped: docs/RESULTS.md.)"""
    gains = {int(d): val["per_drf"][d]["psnr"] - val["low_dose"][d]["psnr"] for d in val["per_drf"]}
    weights = drf_weights(gains)
    return float(sum(weights[d] * g for d, g in gains.items()))


def monitor_mode(monitor: str, drfs: Iterable[int]) -> str:
    """``"max"`` or ``"min"`` for ``train.scheduler.monitor``, which is checked against ``data.drfs``.

    Monitors: ``val_gain`` (the PSNR gain over the input, weighted per DRF as the challenge ranks:
    4/10/20/50/100 at 5/15/20/25/35 %, see :func:`weighted_gain`),
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


def monitor_value(monitor: str, val: Mapping[str, Any]) -> float:
    """The monitored number in a validation record (see :func:`monitor_mode`)."""
    if monitor == "val_loss":
        return float(val["loss"])
    if monitor == "val_psnr":
        return float(val["psnr"])
    if monitor == "val_gain":
        return float(val["gain"])
    return float(val["per_drf"][str(int(monitor.removeprefix("val_psnr_drf")))]["psnr"])


def build_training(
    recipe: Mapping[str, Any],
    registry: Registry,
    device: torch.device,
    precision: str = "none",
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> tuple[LowDoseModel, nn.Module | None, list[LossTerm], Scheme]:
    """Build the model, discriminator, loss terms (on ``device``) and the scheme that trains them."""
    monitor_mode(recipe["train"]["scheduler"]["monitor"], recipe["data"]["drfs"])
    model, discriminator = build_model(recipe, registry)
    model.to(device)
    if discriminator is not None:
        discriminator.to(device)
    losses = build_losses(recipe, registry, model, discriminator)
    for term in losses:
        term.to(device)
    scheme = registry.build(
        "scheme", recipe["train"]["scheme"], "train.scheme",
        context={"model": model, "discriminator": discriminator, "losses": losses,
                 "optimizer": make_optimizer_factory(recipe["train"]["optimizer"]), "wrap": wrap or identity,
                 "precision": precision, "device": device, "registry": registry},
    )
    return model, discriminator, losses, scheme


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Trains a resolved recipe into ``run_dir`` (see the module docstring for the layout).

    Args:
        recipe: The resolved recipe (:func:`lowdose_toolkit.recipe.resolve_recipe`).
        run_dir: Run directory; created if missing.
        registry: The part registry.
        resume: Continue from ``run_dir/checkpoints/last.pt``.
        console: A rich console for messages (rank 0 only prints).
    """

    def __init__(self, recipe: dict[str, Any], run_dir: Path, registry: Registry, resume: bool = False,
                 console: Any = None) -> None:
        from rich.console import Console

        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.registry = registry
        self.resume = resume
        train = recipe["train"]
        self.device = resolve_device(train["device"])
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.console = console or Console(stderr=True)
        self.precision = train["amp"] if self.device.type == "cuda" else "none"
        self.drfs: list[int] = list(recipe["data"]["drfs"])
        if len(set(self.drfs)) != len(self.drfs) or not self.drfs:
            raise RecipeError(f"data.drfs: expected distinct dose reduction factors, got {self.drfs}")
        seed_everything(recipe["seed"], train["deterministic"])
        if self.device.type == "cpu" and train["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)

        # Model, losses, scheme.
        self.stages = parse_stages(train, recipe["model"]["refiner"] is not None)
        wrap = ddp_wrapper(self.dist, self.device, find_unused=len(self.stages) > 1)
        self.model, self.discriminator, self.losses, self.scheme = build_training(
            recipe, registry, self.device, self.precision, wrap)
        self.schedulers = self._make_schedulers()
        self.base_lr = train["optimizer"]["lr"]

        # Data.
        self.source = registry.build("source", recipe["data"]["source"], "data.source", context={"drfs": self.drfs})
        self.records: list[SubjectRecord] = self.source.records()
        split = recipe["data"]["split"]
        self.split: Split = split_records(self.records, split["val"], split["test"], recipe["seed"])
        if not self.split.val:
            raise RecipeError("data.split.val: validation needs at least one subject (the scheduler monitors it)")
        data_cfg = recipe["data"]
        train_records = shard(self.split.train, self.dist.rank, self.dist.world)
        self.train_set = pairs_dataset(train_records, self.drfs, data_cfg["normalization"],
                                       sampling_map=data_cfg["sampler"] == "weighted", preload=data_cfg["preload"])
        self.stream = PatchStream(self.train_set, data_cfg)
        n_val = recipe["eval"]["val_subjects"]
        val_records = self.split.val if n_val is None else self.split.val[:n_val]
        self.val_set = pairs_dataset(val_records, self.drfs, data_cfg["normalization"], preload=data_cfg["preload"])
        self.steps_per_epoch = train["steps_per_epoch"] or self.stream.default_steps()

        self._val_inputs: dict[str, dict[str, float]] | None = None
        self._calibration: tuple[torch.Tensor, torch.Tensor] | None = None
        self.epoch = 0  # epochs completed
        self.best: dict[str, Any] = {"epoch": -1, "value": None}

    # ------------------------------------------------------------------ schedules
    def _make_schedulers(self) -> dict[str, Any]:
        cfg = self.recipe["train"]["scheduler"]
        if cfg["name"] == "none":
            return {}
        mode = monitor_mode(cfg["monitor"], self.drfs)
        return {
            name: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg["factor"],
                                                             patience=cfg["patience"])
            for name, opt in self.scheme.optimizers.items()
        }

    def lr(self) -> float:
        """Learning rate of the first optimizer (the generator's)."""
        first = next(iter(self.scheme.optimizers.values()))
        return float(first.param_groups[0]["lr"])

    def stage_at(self, epoch: int) -> tuple[int, int]:
        """(stage index, first epoch of that stage) for a 0-based epoch."""
        start = 0
        for i, stage in enumerate(self.stages):
            if epoch < start + stage["epochs"]:
                return i, start
            start += stage["epochs"]
        return len(self.stages) - 1, start - self.stages[-1]["epochs"]

    @property
    def total_epochs(self) -> int:
        return sum(s["epochs"] for s in self.stages)

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """Every network with the stage part it belongs to, scheme-owned ones (e.g. CycleGAN's G_B) included."""
        parts = [("generator", self.model.generator), ("heads", self.model.heads), ("refiner", self.model.refiner),
                 ("discriminator", self.discriminator)]
        guidance = self.model.guidance
        if guidance is not None:  # per part when it says which part each piece conditions, else the generator's
            pieces = getattr(guidance, "stage_parts", None)
            parts += list(pieces.items()) if pieces is not None else [("generator", guidance)]
        parts += [(self.scheme.extra_module_parts.get(n, ""), m) for n, m in self.scheme.extra_modules.items()]
        return [(part, module) for part, module in parts if module is not None]

    def _enter_stage(self, index: int, fresh: bool) -> None:
        stage = self.stages[index]
        for part, module in self.stage_modules():
            for p in module.parameters():  # a scheme module of no stage part ("") always trains
                p.requires_grad_(part in stage["trainable"] or not part)
        self.scheme.frozen_parts = frozenset(STAGE_PARTS) - set(stage["trainable"])
        self.scheme.use_refiner = stage["use_refiner"] and self.model.refiner is not None
        if fresh and index > 0:  # a new stage starts from the base learning rate and a fresh schedule
            for opt in self.scheme.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = self.base_lr * group.get("lr_scale", 1.0)
            self.schedulers = self._make_schedulers()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "recipe": self.recipe,
            "epoch": self.epoch,
            "drfs": self.drfs,
            "model": self.model.state_dict(),
            "discriminator": None if self.discriminator is None else self.discriminator.state_dict(),
            "scheme": self.scheme.state_dict(),
            "scheme_modules": {n: m.state_dict() for n, m in self.scheme.extra_modules.items()},
            "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
            "rng": rng,
            "best": self.best,
            "normalization": {"method": "robust" if self.recipe["data"]["normalization"] == "auto"
                              else self.recipe["data"]["normalization"], "quantile": QUANTILE},
            "split": self.split.summary(),
            "world_size": self.dist.world,
        }

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get("world_size", 1) != self.dist.world:
            raise UserError(f"{path}: saved with {ckpt.get('world_size', 1)} processes; resume with the same number")
        self.model.load_state_dict(ckpt["model"])
        if self.discriminator is not None:
            self.discriminator.load_state_dict(ckpt["discriminator"])
        self.epoch = int(ckpt["epoch"])
        self.best = dict(ckpt["best"])
        for name, module in self.scheme.extra_modules.items():
            module.load_state_dict(ckpt["scheme_modules"][name])
        self.scheme.load_state_dict(ckpt["scheme"])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(ckpt["schedulers"][name])
        set_rng_state(ckpt["rng"][self.dist.rank])

    # ------------------------------------------------------------------ run directory
    def _prepare_run_dir(self) -> None:
        if not self.dist.is_main:
            return
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "previews").mkdir(exist_ok=True)
        with atomic_path(self.run_dir / "recipe.yaml") as tmp:
            tmp.write_text(dump_recipe(self.recipe))
        record = {
            "name": self.recipe["name"],
            "lowdose_toolkit": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.platform(),
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "precision": self.precision,
            "world_size": self.dist.world,
            "split": self.split.summary(),
            "source": repr(self.source),
            "steps_per_epoch": self.steps_per_epoch,
            "plugins": {e.name: f"{e.plugin} {e.version}" for e in self.registry.entries()},
            "losses": {t.name: getattr(t.loss, "record", None) for t in self.losses if hasattr(t.loss, "record")},
        }
        with atomic_path(self.run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str))

    def _trim_metrics(self) -> None:
        """Drop metrics lines of epochs after the checkpoint (a run killed between the two writes)."""
        path = self.run_dir / "metrics.jsonl"
        if not self.dist.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip()
                and json.loads(line).get("epoch", 0) <= self.epoch]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train until the last epoch, the lr floor or the time budget; returns the last metrics."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        train = self.recipe["train"]
        last_ckpt = self.run_dir / "checkpoints" / "last.pt"
        if self.resume:
            if not last_ckpt.is_file():
                raise UserError(f"{self.run_dir}: nothing to resume (no checkpoints/last.pt)")
            self._load(last_ckpt)
            self._trim_metrics()
            self._say(f"resuming {self.run_dir} after epoch {self.epoch}")
        self._prepare_run_dir()
        started = time.monotonic()
        floor = train["stop_when_lr_below"]
        record: dict[str, Any] = {}
        entered: int | None = None
        stage_started = time.monotonic()
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.dist.is_main,
        )
        with progress:
            while self.epoch < self.total_epochs:
                index, start = self.stage_at(self.epoch)
                stage_end = start + self.stages[index]["epochs"]
                if entered != index:
                    # A stage entered at its first epoch starts fresh; a resumed one keeps its lr and schedule.
                    self._enter_stage(index, fresh=self.epoch == start)
                    entered = index
                    stage_started = time.monotonic()
                if floor is not None and self.lr() < floor:
                    self._say(f"lr {self.lr():.2e} is below {floor:.0e}: stage {self.stages[index]['name']!r} stops")
                    self.epoch = stage_end
                    continue
                record = self._train_epoch(progress, index)
                if self.dist.is_main:
                    self._write_epoch(record)
                budget = train["max_minutes"]
                if budget is not None and (time.monotonic() - started) / 60 > budget:
                    self._say(f"time budget of {budget} min spent after epoch {self.epoch}")
                    break
                stage_budget = self.stages[index]["max_minutes"]
                if stage_budget is not None and self.epoch < stage_end \
                        and (time.monotonic() - stage_started) / 60 > stage_budget:
                    self._say(f"stage {self.stages[index]['name']!r}: its {stage_budget} min spent after epoch "
                              f"{self.epoch}")
                    self.epoch = stage_end
        cleanup(self.dist)
        return record

    def _train_epoch(self, progress: Any, stage: int) -> dict[str, Any]:
        t0 = time.monotonic()
        self.model.train()
        for part, module in self.stage_modules():  # a frozen part also keeps its BatchNorm statistics
            module.train(part not in self.scheme.frozen_parts)
        self.stream.reset()
        sums: dict[str, float] = {}
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.total_epochs}", total=self.steps_per_epoch,
                                 losses="")
        for step in range(self.steps_per_epoch):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next_batch().items()}
            values = self.scheme.train_step(batch)
            for key, value in values.items():
                sums[key] = sums.get(key, 0.0) + value
            shown = " ".join(f"{k}={v / (step + 1):.4g}" for k, v in sums.items() if k != "total")
            progress.update(task, advance=1, losses=shown)
        progress.remove_task(task)
        broadcast_buffers(self.dist, self.model, self.discriminator, *self.scheme.extra_modules.values())
        losses = {k: v / self.steps_per_epoch for k, v in sums.items()}
        if self.dist.enabled:
            losses = {k: float(np.mean([r[k] for r in gather_objects(self.dist, losses)])) for k in losses}
        self.epoch += 1
        val: dict[str, Any] = {}
        if self.epoch % self.recipe["train"]["val_every"] == 0 or self.epoch == self.total_epochs:
            val = self._validate() if self.dist.is_main else {}
            val = broadcast_object(self.dist, val)
            monitor = self.recipe["train"]["scheduler"]["monitor"]
            value = monitor_value(monitor, val)
            for sched in self.schedulers.values():
                sched.step(value)
            best = self.best["value"]
            higher = monitor_mode(monitor, self.drfs) == "max"
            better = best is None or (value > best if higher else value < best)
            if better:
                self.best = {"epoch": self.epoch, "value": value, "monitor": monitor}
        record = {
            "epoch": self.epoch,
            "stage": self.stages[stage]["name"],
            "lr": self.lr(),
            "losses": losses,
            "val": val,
            "best_epoch": self.best["epoch"],
            "epoch_seconds": round(time.monotonic() - t0, 3),
        }
        rng = gather_objects(self.dist, rng_state())
        if self.dist.is_main:
            state = self.checkpoint_state(rng)
            save_checkpoint(state, self.run_dir / "checkpoints" / "last.pt")
            if self.best["epoch"] == self.epoch:
                with atomic_path(self.run_dir / "checkpoints" / "best.pt") as tmp:
                    shutil.copyfile(self.run_dir / "checkpoints" / "last.pt", tmp)
        return record

    def _write_epoch(self, record: dict[str, Any]) -> None:
        with (self.run_dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        val = record["val"]
        text = f"epoch {record['epoch']}/{self.total_epochs} lr {record['lr']:.1e}"
        if val:
            text += f" | val PSNR {val['psnr']:.2f} dB SSIM {val['ssim']:.4f} NRMSE {100 * val['nrmse']:.3f}%"
            gain = [val["per_drf"][d]["psnr"] - val["low_dose"][d]["psnr"] for d in val["per_drf"]]
            text += f" | vs input {min(gain):+.2f}..{max(gain):+.2f} dB (weighted {val['gain']:+.2f})"
            if "dose_accuracy" in val:
                text += f" | dose head {100 * val['dose_accuracy']:.0f}%"
        text += f" | {record['epoch_seconds']:.1f} s"
        self._say(text)

    def _say(self, text: str) -> None:
        if self.dist.is_main:
            self.console.print(text)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        from lowdose_toolkit.metrics import compute_all

        self.model.eval()
        calibration = self._calibrate_dose_head()
        cfg = self.recipe["eval"]
        per_drf: dict[int, list[dict[str, float]]] = {}
        inputs: dict[int, list[dict[str, float]]] = {}
        l1: list[float] = []
        dose_hits: list[bool] = []
        preview_index = len(self.drfs) - 1  # the first validation subject at the last (highest) DRF
        for i in range(len(self.val_set)):
            subject = self.val_set[i]
            low, full = subject["low"].data.float(), subject["full"].data.float()
            pred, probs = self.predict_volume(low, cfg)
            if probs is not None:
                dose_hits.append(int(probs.argmax()) == int(subject["drf_class"]))
            m = compute_all(full[0], pred[0], ssim_range=cfg["ssim_range"])
            per_drf.setdefault(int(subject["drf"]), []).append(m)
            if self._val_inputs is None:  # the low-dose input's own metrics, once: the bar to clear
                inputs.setdefault(int(subject["drf"]), []).append(
                    compute_all(full[0], low[0], ssim_range=cfg["ssim_range"]))
            l1.append(float((pred - full).abs().mean()))
            if self.recipe["train"]["previews"] and i == preview_index:
                self._preview(low, full, pred, cfg, int(subject["drf"]), subject["subject_id"])
        self.model.train()
        out: dict[str, Any] = {"per_drf": {}}
        for drf, rows in sorted(per_drf.items()):
            out["per_drf"][str(drf)] = {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nrmse")}
        for key in ("psnr", "ssim", "nrmse"):
            out[key] = float(np.mean([v[key] for v in out["per_drf"].values()]))
        out["loss"] = float(np.mean(l1))
        if dose_hits:
            out["dose_accuracy"] = float(np.mean(dose_hits))
        if calibration is not None:
            out["dose_calibration_accuracy"] = calibration
        if self._val_inputs is None:
            self._val_inputs = {str(d): {k: float(np.mean([r[k] for r in rows])) for k in ("psnr", "ssim", "nrmse")}
                                for d, rows in sorted(inputs.items())}
        out["low_dose"] = self._val_inputs
        out["gain"] = weighted_gain(out)
        return out

    def _calibrate_dose_head(self) -> float | None:
        """Calibrate a dose head that can be (``calibrate(statistics, classes)``, see ``parts.py``) on whole
        training volumes; returns its training accuracy, or None. The statistics are computed once."""
        name = self.model.dose_head
        head = self.model.heads[name] if name is not None else None
        if head is None or not callable(getattr(head, "calibrate", None)):
            return None
        if self._calibration is None:
            n = len(self.train_set)
            picks = sorted({round(i * (n - 1) / max(1, CALIBRATION_VOLUMES - 1)) for i in range(CALIBRATION_VOLUMES)}) \
                if n > CALIBRATION_VOLUMES else range(n)
            stats, classes = [], []
            for i in picks:
                subject = self.train_set[i]
                stats.append(head.statistics(subject["low"].data[None].float().to(self.device)).cpu())
                classes.append(int(subject["drf_class"]))
            self._calibration = (torch.cat(stats), torch.tensor(classes))
        return float(head.calibrate(*self._calibration))

    def predict_volume(self, low: torch.Tensor, cfg: Mapping[str, Any],
                       coarse_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sliding-window prediction of a whole normalised volume ``[1, X, Y, Z]`` and the dose head's
        class probabilities (None without a dose head); see :func:`lowdose_toolkit.predict.predict_volume`."""
        from lowdose_toolkit.predict import predict_volume

        use_refiner = self.scheme.use_refiner and not coarse_only
        return predict_volume(self.model, low, cfg, self.device, amp=self.precision != "none",
                              use_refiner=use_refiner)

    def _preview(self, low: torch.Tensor, full: torch.Tensor, pred: torch.Tensor, cfg: Mapping[str, Any],
                 drf: int, subject: str) -> None:
        from lowdose_toolkit.preview import save_mip_png

        panels = [("low-dose", low)]
        if self.model.refiner is not None and self.scheme.use_refiner:
            panels.append(("coarse", self.predict_volume(low, cfg, coarse_only=True)[0]))
            panels.append(("refined", pred))
        else:
            panels.append(("prediction", pred))
        panels.append(("full-dose", full))
        path = self.run_dir / "previews" / f"epoch_{self.epoch:03d}.png"
        save_mip_png([(name, t[0]) for name, t in panels], path, title=f"{subject} DRF {drf}")


def default_run_dir(recipe: Mapping[str, Any], root: Path = Path("runs")) -> Path:
    """``runs/<name>-<YYYYmmdd-HHMMSS>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{recipe['name']}-{stamp}"
