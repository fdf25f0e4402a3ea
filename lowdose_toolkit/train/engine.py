"""The training loop: ``Trainer(recipe, run_dir).fit()`` trains a resolved recipe into a run directory::

    run_dir/
      recipe.yaml          the resolved recipe (the first file written: the folder is resumable from then on)
      run.json             what ran: versions, device, split, plugins, loss records
      metrics.jsonl        one line per epoch: loss terms, lr, val PSNR/SSIM/NRMSE per DRF, time (the jsonl logger)
      curves.png           loss terms, validation PSNR per DRF against the input's, lr; redrawn each epoch
      checkpoints/last.pt  written atomically at each epoch's end (resume from here)
      checkpoints/best.pt  the epoch with the best validation metric
      previews/epoch_NNN.png  MIPs of low-dose / coarse / refined / full-dose (one val subject), with
                           PSNR/SSIM, a difference row and a zoomed inset
      tensorboard/         event files, when train.loggers lists tensorboard
      .lock                held (flock) by the process training here

The parts around the loop live in their own modules: the composition root (:mod:`lowdose_toolkit.train.build`),
the stage controller (:mod:`lowdose_toolkit.train.stages`), validation (:mod:`lowdose_toolkit.train.validation`), the
checkpoint file (:mod:`lowdose_toolkit.core.checkpoint`) and prediction (:mod:`lowdose_toolkit.infer.predictor`).
After each epoch the same steps run in one fixed order: validate, schedule, track the best, save, then
``curves.png`` and the loggers (``train.loggers``, :mod:`lowdose_toolkit.loggers`).

A kill at any moment leaves a resumable directory (:mod:`lowdose_toolkit.train.rundir`). The end of an
epoch writes ``last.pt`` (with the epoch's metrics line and the best epoch in it), then ``best.pt`` (a
copy of it, when it is the best), then ``curves.png`` and hands the epoch to the loggers, the ``jsonl``
logger rewriting ``metrics.jsonl`` atomically; a resume takes ``last.pt`` as the truth, gives the loggers
the epoch records up to it (the jsonl logger repairs ``metrics.jsonl`` from them) and repairs ``best.pt``.
A non-finite loss or weight stops training before anything non-finite is saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowdose_toolkit import __version__
from lowdose_toolkit.core.atomic import atomic_path
from lowdose_toolkit.core.checkpoint import Checkpoint, Normalization, load_checkpoint
from lowdose_toolkit.core.device import resolve_device
from lowdose_toolkit.core.recipe import dump_recipe
from lowdose_toolkit.core.registry import Registry
from lowdose_toolkit.core.spec import run_spec
from lowdose_toolkit.data.cache import resolve_layout
from lowdose_toolkit.data.cached_patches import CachedPatchStream, cached_pairs
from lowdose_toolkit.data.datasets import PatchStream, Split, pairs_dataset, shard, split_records
from lowdose_toolkit.data.normalize import QUANTILE
from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.infer.precision import training_precision
from lowdose_toolkit.infer.predictor import Predictor
from lowdose_toolkit.loggers import Logger
from lowdose_toolkit.models.lowdose_model import dry_run
from lowdose_toolkit.records import SubjectRecord
from lowdose_toolkit.schemes import NonFiniteLoss
from lowdose_toolkit.train.build import build_training
from lowdose_toolkit.train.distributed import (
    DistInfo,
    broadcast_buffers,
    broadcast_object,
    check_sync_batchnorm,
    cleanup,
    ddp_wrapper,
    gather_objects,
    init_distributed,
)
from lowdose_toolkit.train.rng import rng_state, seed_everything, set_rng_state
from lowdose_toolkit.train.rundir import (
    RunLock,
    committed_metrics,
    default_run_dir,
    remove_stale_temp_files,
    write_recipe,
)
from lowdose_toolkit.train.stages import StageController
from lowdose_toolkit.train.validation import Validator, monitor_value

__all__ = ["Trainer", "build_training", "default_run_dir", "resolve_device"]


class Trainer:
    """Trains a resolved recipe into ``run_dir`` (see the module docstring for the layout).

    Args:
        recipe: The resolved recipe (:func:`lowdose_toolkit.core.recipe.resolve_recipe`).
        run_dir: Run directory; created if missing (None: a new ``runs/<name>-<time>``).
        registry: The part registry.
        resume: Continue from ``run_dir/checkpoints/last.pt``, or from the beginning when the run was
            stopped before its first checkpoint. Without it, a ``run_dir`` that holds a checkpoint is refused.
        console: A rich console for messages (rank 0 only prints).

    The run directory is locked (see :class:`lowdose_toolkit.train.rundir.RunLock`) and its ``recipe.yaml``
    written before any data is read; :meth:`fit` releases the lock when it returns (or :meth:`close`).
    """

    def __init__(self, recipe: dict[str, Any], run_dir: Path | None, registry: Registry, resume: bool = False,
                 console: Any = None) -> None:
        from rich.console import Console

        self.recipe = recipe
        self.registry = registry
        self.resume = resume
        train = recipe["train"]
        self.device = resolve_device(train["device"])
        self.dist: DistInfo = init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.console = console or Console(stderr=True)
        self.spec = run_spec(recipe)
        self.precision = training_precision(self.spec.precision, self.device, self.spec.precision_cuda_only)
        self.drfs: list[int] = list(self.spec.drfs)
        self.run_dir = self._claim_run_dir(run_dir)  # before any data is read: resumable from here on
        self.precision = self._kept_precision(self.precision)
        try:
            self._build(recipe, registry, train)
        except BaseException:  # the lock is not kept by a trainer that could not be built
            self.close()
            raise

    def _build(self, recipe: dict[str, Any], registry: Registry, train: dict[str, Any]) -> None:
        """Seed, build the model, losses and scheme, check every shape, read the data."""
        seed_everything(recipe["seed"], train["deterministic"])
        if self.device.type == "cpu" and train["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
            # torch says this of every median with indices once deterministic mode is on, on a CPU too, where
            # the median is deterministic: a warning about CUDA in a CPU run only misleads.
            warnings.filterwarnings("ignore", message="median CUDA with indices output does not have a "
                                    "deterministic implementation")

        # Model, losses, scheme, stages.
        check_sync_batchnorm(train["sync_batchnorm"], self.dist, self.device)
        wrap = ddp_wrapper(self.dist, self.device, find_unused=len(self.spec.stages) > 1,
                           sync_batchnorm=train["sync_batchnorm"])
        self.model, self.discriminator, self.losses, self.scheme = build_training(
            recipe, registry, self.device, self.precision, wrap)
        self.stages = StageController(self.spec.stages, self.model.refiner is not None)
        self.schedulers = self._make_schedulers()
        self.base_lr = train["optimizer"]["lr"]
        self.predictor = Predictor(self.model, recipe["eval"], self.device, self.precision, tuple(self.drfs))
        if not self.dist.enabled:  # shapes checked before any data is read (ldt check does the same)
            dry_run(self.model, self.discriminator, self.spec, recipe["data"]["batch_size"],
                    recipe["eval"]["batch_size"])

        # Data.
        self.source = registry.build("source", recipe["data"]["source"], "data.source", context={"drfs": self.drfs})
        self.records: list[SubjectRecord] = self.source.records()
        split = recipe["data"]["split"]
        self.split: Split = split_records(self.records, split["val"], split["test"],
                                          recipe["seed"] if split["seed"] is None else split["seed"])
        if not self.split.val:
            raise RecipeError("data.split.val: validation needs at least one subject (the scheduler monitors it)")
        data_cfg = recipe["data"]
        train_records = shard(self.split.train, self.dist.rank, self.dist.world)
        # The cached layout (ldt cache): patches from memory maps; whole volumes (validation) from its .nii files.
        cached = resolve_layout(data_cfg["layout"], self.records, preload=data_cfg["preload"],
                                normalization=data_cfg["normalization"])
        self.layout = "volumes" if cached is None else "mmap"
        if cached is None:
            self.train_set = pairs_dataset(train_records, self.drfs, data_cfg["normalization"],
                                           sampling_map=data_cfg["sampler"] == "weighted", preload=data_cfg["preload"])
            self.stream: PatchStream | CachedPatchStream = PatchStream(self.train_set, data_cfg)
        else:
            train_cached = [cached[r.subject] for r in train_records]
            self.train_set = pairs_dataset([c.record() for c in train_cached], self.drfs, data_cfg["normalization"])
            self.stream = CachedPatchStream(cached_pairs(train_cached, self.drfs, data_cfg["normalization"]), data_cfg)
        n_val = recipe["eval"]["val_subjects"]
        all_val = self.split.val if cached is None else [cached[r.subject].record() for r in self.split.val]
        val_records = all_val if n_val is None else all_val[:n_val]
        self._all_val_records = all_val  # every validation subject: the strength fit uses them all
        self.val_set = pairs_dataset(val_records, self.drfs, data_cfg["normalization"], preload=data_cfg["preload"])
        self.val_subjects = [r.subject for r in val_records]
        self.steps_per_epoch = train["steps_per_epoch"] or self.stream.default_steps()

        self.validator = Validator(self.model, self.predictor, self.val_set, self.train_set, self.drfs,
                                   recipe["eval"]["ssim_range"],
                                   self.run_dir / "previews" if train["previews"] else None)
        self.loggers: list[Logger] = [  # rank 0 only; built before any epoch, started by fit()
            registry.build("logger", spec, f"train.loggers.{i}", context={"run_dir": self.run_dir, "recipe": recipe})
            for i, spec in enumerate(train["loggers"])] if self.dist.is_main else []
        self._started: list[Logger] = []
        self.history: list[dict[str, Any]] = []  # the committed epoch records (curves.png)
        self.epoch = 0  # epochs completed
        self.saved_epoch = 0  # the epoch in checkpoints/last.pt
        self.best: dict[str, Any] = {"epoch": -1, "value": None}
        self.elapsed = 0.0  # training seconds, over every resume (train.max_minutes)
        self.stage_elapsed = 0.0  # the part of them in the current stage (its max_minutes)
        self._stage_clock = 0.0  # time.monotonic() when the current stage started (less earlier attempts)
        self._metrics_line = ""  # the loaded checkpoint's metrics.jsonl line

    # ------------------------------------------------------------------ schedules
    def _make_schedulers(self) -> dict[str, Any]:
        cfg = self.recipe["train"]["scheduler"]
        if cfg["name"] == "none":
            return {}
        mode = self.spec.schedule.mode
        return {
            name: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=cfg["factor"],
                                                             patience=cfg["patience"])
            for name, opt in self.scheme.optimizers.items()
        }

    def lr(self) -> float:
        """Learning rate of the first optimizer (the generator's)."""
        first = next(iter(self.scheme.optimizers.values()))
        return float(first.param_groups[0]["lr"])

    @property
    def total_epochs(self) -> int:
        return self.stages.total_epochs

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
        self.stages.enter(index, self.stage_modules(), self.scheme)
        if fresh and index > 0:  # a new stage starts from the base learning rate and a fresh schedule
            for opt in self.scheme.optimizers.values():
                for group in opt.param_groups:
                    group["lr"] = self.base_lr * group.get("lr_scale", 1.0)
            self.schedulers = self._make_schedulers()

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self, rng: list[dict[str, Any]], metrics: str = "") -> Checkpoint:
        """The training state after the current epoch; ``metrics`` is its metrics.jsonl line."""
        method = self.recipe["data"]["normalization"]
        return Checkpoint(
            recipe=self.recipe, epoch=self.epoch, drfs=self.drfs, model=self.model.state_dict(),
            normalization=Normalization("robust" if method == "auto" else method, QUANTILE),
            version=__version__,
            discriminator=None if self.discriminator is None else self.discriminator.state_dict(),
            scheme=self.scheme.state_dict(),
            scheme_modules={n: m.state_dict() for n, m in self.scheme.extra_modules.items()},
            schedulers={n: s.state_dict() for n, s in self.schedulers.items()},
            rng=rng, best=self.best, split=self.split.summary(), world_size=self.dist.world,
            elapsed=self.elapsed, stage_elapsed=self.stage_elapsed, metrics=metrics,
        )

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.world_size != self.dist.world:
            raise UserError(f"{path}: saved by {ckpt.world_size} process(es), resumed by {self.dist.world}; "
                            f"resume with {ckpt.world_size} in all (torchrun --nnodes N --nproc-per-node M, "
                            f"N x M = {ckpt.world_size}): each rank's data shard and random state are saved")
        self.model.load_state_dict(ckpt.model)
        if self.discriminator is not None:
            self.discriminator.load_state_dict(ckpt.discriminator)
        self.epoch = self.saved_epoch = ckpt.epoch
        self.best = dict(ckpt.best)
        self.elapsed, self.stage_elapsed, self._metrics_line = ckpt.elapsed, ckpt.stage_elapsed, ckpt.metrics
        for name, module in self.scheme.extra_modules.items():
            module.load_state_dict(ckpt.scheme_modules[name])
        self.scheme.load_state_dict(ckpt.scheme)
        for name, sched in self.schedulers.items():
            sched.load_state_dict(ckpt.schedulers[name])
        set_rng_state(ckpt.rng[self.dist.rank])

    # ------------------------------------------------------------------ run directory
    def _claim_run_dir(self, run_dir: Path | None) -> Path:
        """Create, lock and start the run directory (``recipe.yaml`` first); rank 0 writes, every rank agrees."""
        if run_dir is None:
            made = default_run_dir(self.recipe) if self.dist.is_main else None
            run_dir = Path(broadcast_object(self.dist, None if made is None else str(made)))
        run_dir = Path(run_dir)
        self.lock = RunLock(run_dir)
        if not self.dist.is_main:
            return run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if not self.resume and (run_dir / "checkpoints" / "last.pt").exists():
                raise UserError(f"{run_dir} already holds a run; use --resume {run_dir} or another --out")
            recorded = run_dir / "recipe.yaml"
            if not recorded.is_file() or recorded.read_text() != dump_recipe(self.recipe):
                write_recipe(run_dir, self.recipe)
            remove_stale_temp_files(run_dir)
        except BaseException:
            self.lock.release()
            raise
        self._say(f"run directory: {run_dir}")
        return run_dir

    def _kept_precision(self, precision: str) -> str:
        """A resumed run keeps the precision it started in where ``train.precision: auto`` now picks another
        (another machine, or a version whose ``auto`` chooses differently), so its steps stay alike."""
        record = self.run_dir / "run.json"
        if not self.resume or self.spec.precision != "auto" or not record.is_file():
            return precision
        try:
            started = json.loads(record.read_text()).get("precision")
        except (OSError, ValueError):
            return precision
        if started in ("fp32", "bf16", "fp16") and started != precision:
            self._say(f"{self.run_dir}: started in {started} (train.precision: auto); it goes on in {started}, "
                      f"not {precision}")
            return started
        return precision

    def close(self) -> None:
        """Release the run directory's lock (done by :meth:`fit`; for a trainer that is not fitted)."""
        self.lock.release()

    def _prepare_run_dir(self) -> None:
        if not self.dist.is_main:
            return
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "previews").mkdir(exist_ok=True)
        record = {
            "name": self.recipe["name"],
            "lowdose_toolkit": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.platform(),
            "device": str(self.device),
            "gpu": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "precision": self.precision,
            "precision_setting": self.spec.precision,
            "world_size": self.dist.world,
            "split": self.split.summary(),
            "source": repr(self.source),
            "data_layout": self.layout,
            "steps_per_epoch": self.steps_per_epoch,
            "plugins": {e.name: f"{e.plugin} {e.version}" for e in self.registry.entries()},
            "losses": {t.name: getattr(t.loss, "record", None) for t in self.losses if hasattr(t.loss, "record")},
        }
        with atomic_path(self.run_dir / "run.json") as tmp:
            tmp.write_text(json.dumps(record, indent=2, default=str))

    def _repair_run_dir(self) -> None:
        """Make metrics.jsonl and best.pt agree with the checkpoint (a run killed between the epoch's writes).

        The loggers start from the epoch records up to the checkpoint's (``metrics.jsonl``'s, a partial last
        line dropped, with the checkpoint's own line put back when it was lost): the jsonl logger rewrites
        ``metrics.jsonl`` with them. ``best.pt`` is copied from ``last.pt`` when the checkpoint's epoch is
        the best one and best.pt does not hold it yet (a best.pt of that epoch is kept: its fitted DRF codes
        with it), and removed when no epoch was validated yet.
        """
        if not self.dist.is_main:
            return
        self.history = committed_metrics(self.run_dir / "metrics.jsonl", self.epoch, self._metrics_line)
        self._start_loggers()
        checkpoints = self.run_dir / "checkpoints"
        if self.epoch > 0 and self.best["epoch"] == self.epoch and _epoch_of(checkpoints / "best.pt") != self.epoch:
            with atomic_path(checkpoints / "best.pt") as tmp:
                shutil.copyfile(checkpoints / "last.pt", tmp)
        elif self.best["epoch"] < 1:
            (checkpoints / "best.pt").unlink(missing_ok=True)

    def _start_afresh(self) -> None:
        """Remove what an attempt killed before its first checkpoint left (the jsonl logger: metrics; best.pt)."""
        best = self.run_dir / "checkpoints" / "best.pt"
        if best.is_file():  # best.pt is written after last.pt, so it never exists alone unless last.pt was removed
            raise UserError(f"{self.run_dir}: has a trained checkpoints/best.pt but no last.pt to resume from; "
                            "starting again would replace it: move best.pt away (or evaluate it) and rerun, or "
                            "choose another run directory")
        if self.dist.is_main:
            self.history = []
            self._start_loggers()
            best.unlink(missing_ok=True)

    def _start_loggers(self) -> None:
        for logger in self.loggers:
            logger.start(self.epoch, list(self.history))
            self._started.append(logger)

    def _close_loggers(self, raising: bool = True) -> None:
        """Close every started logger, each whatever the others raise; the first error is raised if ``raising``."""
        error: Exception | None = None
        while self._started:
            try:
                self._started.pop(0).close()
            except Exception as exc:  # noqa: BLE001 - the others still close
                error = error or exc
        if error is not None and raising:
            raise error

    # ------------------------------------------------------------------ training
    def fit(self) -> dict[str, Any]:
        """Train until the last epoch, the lr floor or the time budget; returns the last metrics.

        Ctrl-C or SIGTERM (a KeyboardInterrupt) leaves a consistent run directory and a message on how
        to resume; the lock is released however it ends.
        """
        if self.dist.is_main:
            self.lock.acquire()
        try:
            try:
                record = self._fit()
            except BaseException:
                self._close_loggers(raising=False)  # the error under way is the one to report
                raise
            self._close_loggers()
            cleanup(self.dist)  # every rank waits for rank 0's last writes, then leaves the group
            return record
        except KeyboardInterrupt:
            done = (f"its checkpoint holds epoch {self.saved_epoch} of {self.total_epochs}" if self.saved_epoch
                    else "no epoch was finished")
            self._say(f"{self.run_dir}: interrupted; {done}; `ldt run --resume {self.run_dir}` continues it")
            raise
        finally:
            self.lock.release()

    def _fit(self) -> dict[str, Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        train = self.recipe["train"]
        last_ckpt = self.run_dir / "checkpoints" / "last.pt"
        if self.resume and last_ckpt.is_file():
            self._load(last_ckpt)
            self._repair_run_dir()
            self._say(f"resuming {self.run_dir} after epoch {self.epoch}")
        else:
            if self.resume:
                self._say(f"{self.run_dir}: stopped before its first checkpoint; starting it from the beginning")
            self._start_afresh()
        self._prepare_run_dir()
        clock = time.monotonic() - self.elapsed  # the budget counts the time of earlier attempts
        floor = train["stop_when_lr_below"]
        record: dict[str, Any] = {}
        entered: int | None = None
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"), TimeElapsedColumn(),
            console=self.console, disable=not self.dist.is_main,
        )
        with progress:
            while self.epoch < self.total_epochs:
                budget = train["max_minutes"]
                if budget is not None and self.epoch > 0 and (time.monotonic() - clock) / 60 > budget:
                    self._say(f"time budget of {budget} min spent after epoch {self.epoch}")
                    break
                index, start = self.stages.at(self.epoch)
                stage = self.stages.stages[index]
                stage_end = start + stage.epochs
                if entered != index:
                    # A stage entered at its first epoch starts fresh; a resumed one keeps its lr, schedule
                    # and the time already spent in it.
                    fresh = self.epoch == start
                    self._enter_stage(index, fresh=fresh)
                    entered = index
                    self._stage_clock = time.monotonic() - (0.0 if fresh else self.stage_elapsed)
                stage_budget = stage.max_minutes
                if stage_budget is not None and self.epoch > start \
                        and (time.monotonic() - self._stage_clock) / 60 > stage_budget:
                    self._say(f"stage {stage.name!r}: its {stage_budget} min spent after epoch {self.epoch}")
                    self.epoch = stage_end
                    continue
                if floor is not None and self.lr() < floor:
                    self._say(f"lr {self.lr():.2e} is below {floor:.0e}: stage {stage.name!r} stops")
                    self.epoch = stage_end
                    continue
                t0 = time.monotonic()
                losses = self._train_epoch(progress)
                self.elapsed = time.monotonic() - clock
                self.stage_elapsed = time.monotonic() - self._stage_clock
                record = self._after_epoch(losses, stage.name, t0)
        self._fit_codes()
        self._fit_strength()
        return record

    def _fit_codes(self) -> None:
        """A guidance with ``fit_codes``: map each class to the code that served its validation volumes best
        (``set_code_map``, see plugins/guidance/film.py), in best.pt, once; ``code_fit.json`` records the
        gains. Written before best.pt, so a run stopped in between fits again when resumed."""
        guidance = self.model.guidance
        best = self.run_dir / "checkpoints" / "best.pt"
        if not self.dist.is_main or guidance is None or not getattr(guidance, "fit_codes", False) \
                or not best.is_file():
            return
        ckpt = load_checkpoint(best)
        self.model.load_state_dict(ckpt.model)
        if bool(guidance.codes_fitted):
            return
        guidance.reset_code_map()
        gains = self.validator.code_gains()
        mapping = guidance.set_code_map(gains)
        fit = {"checkpoint": "best.pt", "epoch": ckpt.epoch, "drfs": self.drfs, "subjects": self.val_subjects,
               "gains_db": {str(d): [round(float(g), 4) for g in row] for d, row in zip(self.drfs, gains, strict=True)},
               "code_of": {str(d): self.drfs[c] for d, c in zip(self.drfs, mapping, strict=True)}}
        with atomic_path(self.run_dir / "code_fit.json") as tmp:
            tmp.write_text(json.dumps(fit, indent=2) + "\n")
        dataclasses.replace(ckpt, model=self.model.state_dict()).save(best)
        self._say("DRF codes fitted on the validation split (best.pt, code_fit.json): "
                  + ", ".join(f"DRF {d} -> {c}" for d, c in fit["code_of"].items()))

    def _fit_strength(self) -> None:
        """``eval.fit_strength``: fit how much of its correction the model applies per dose level
        (:mod:`lowdose_toolkit.models.strength`) on every validation subject, after the DRF codes, in best.pt,
        once; ``strength_fit.json`` records the anchors and each volume's gain at full and at fitted strength.
        Written before best.pt, so a run stopped in between fits again when resumed."""
        from lowdose_toolkit.train.validation import strength_psnr

        best = self.run_dir / "checkpoints" / "best.pt"
        if not self.dist.is_main or not self.recipe["eval"]["fit_strength"] or not best.is_file():
            return
        ckpt = load_checkpoint(best)
        self.model.load_state_dict(ckpt.model)
        strength = self.model.strength
        if bool(strength.fitted):
            return
        strength.reset()
        volumes = pairs_dataset(self._all_val_records, self.drfs, self.recipe["data"]["normalization"])
        rows = self.validator.strength_terms(volumes)
        if any(r["level"] is None for r in rows):  # no dose estimate: one strength for every volume
            for r in rows:
                r["level"] = None
        alpha = strength.fit([r["level"] for r in rows], [r["dot"] for r in rows], [r["energy"] for r in rows],
                             groups=[r["subject"] for r in rows])
        per_volume = []
        for r in rows:
            a = strength.factor(r["level"])
            base = strength_psnr(r, 0.0)
            per_volume.append({"subject": r["subject"], "drf": r["drf"], "dose_level": r["level"],
                               "strength": round(a, 4),
                               "gain_db_full_strength": round(strength_psnr(r, 1.0) - base, 4),
                               "gain_db_fitted": round(strength_psnr(r, a) - base, 4)})
        fit = {"checkpoint": "best.pt", "epoch": ckpt.epoch, "subjects": sorted({r["subject"] for r in rows}),
               "anchors": {str(int(k)): a for k, a in zip(strength.levels.tolist(), alpha, strict=True)},
               "volumes": per_volume}
        with atomic_path(self.run_dir / "strength_fit.json") as tmp:
            tmp.write_text(json.dumps(fit, indent=2) + "\n")
        dataclasses.replace(ckpt, model=self.model.state_dict()).save(best)
        self._say("strength fitted on the validation split (best.pt, strength_fit.json): "
                  + ", ".join(f"DRF {k} x{a:.2f}" for k, a in fit["anchors"].items()))

    def _non_finite(self, step: int, what: str) -> UserError:
        kept = (f"checkpoints/last.pt keeps epoch {self.saved_epoch}" if self.saved_epoch
                else "no checkpoint was written")
        return UserError(f"epoch {self.epoch + 1}, step {step + 1}/{self.steps_per_epoch}: {what}; training "
                         f"stopped ({self.run_dir}: {kept}, nothing non-finite saved); start a new run with a "
                         "lower train.optimizer.lr or check the data")

    def _train_epoch(self, progress: Any) -> dict[str, float]:
        """The optimisation steps of one epoch; returns the mean loss terms (a non-finite one stops training)."""
        self.model.train()
        self.stages.set_modes(self.stage_modules())
        self.stream.reset()
        sums: dict[str, float] = {}
        task = progress.add_task(f"epoch {self.epoch + 1}/{self.total_epochs}", total=self.steps_per_epoch,
                                 losses="")
        for step in range(self.steps_per_epoch):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.stream.next_batch().items()}
            try:
                values = self.scheme.train_step(batch)
            except NonFiniteLoss as exc:
                raise self._non_finite(step, exc.what) from None
            if not all(math.isfinite(v) for v in values.values()):
                terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                raise self._non_finite(step, f"non-finite loss ({terms})")
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
        return losses

    def _check_finite_weights(self) -> None:
        """A non-finite weight or buffer after an epoch stops training before it is validated or saved."""
        for part, module in self.stage_modules():
            for name, tensor in module.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    kept = (f"checkpoints/last.pt keeps epoch {self.saved_epoch}" if self.saved_epoch
                            else "no checkpoint was written")
                    raise UserError(f"epoch {self.epoch}: non-finite values in {part or 'scheme'} weight {name} "
                                    f"after training; training stopped ({self.run_dir}: {kept}, nothing "
                                    "non-finite saved); start a new run with a lower train.optimizer.lr")

    def _after_epoch(self, losses: dict[str, float], stage: str, t0: float) -> dict[str, Any]:
        """The end of an epoch, always in this order: validate, schedule, best, save, log."""
        self._check_finite_weights()
        val = self._validate_step()
        if val:
            value = monitor_value(self.spec.schedule.monitor, val)
            self._schedule_step(value)
            self._best_step(value)
        lrs = {name: float(opt.param_groups[0]["lr"]) for name, opt in self.scheme.optimizers.items()}
        record = {"epoch": self.epoch, "stage": stage, "lr": self.lr(), "lrs": lrs, "losses": losses, "val": val,
                  "best_epoch": self.best["epoch"], "epoch_seconds": round(time.monotonic() - t0, 3)}
        self._save_step(record)
        if self.dist.is_main:
            self._write_epoch(record)
        return record

    def _validate_step(self) -> dict[str, Any]:
        if self.epoch % self.spec.val_every and self.epoch != self.total_epochs:
            return {}
        val = self.validator(self.epoch, self.stages.use_refiner) if self.dist.is_main else {}
        return broadcast_object(self.dist, val)

    def _schedule_step(self, value: float) -> None:
        for sched in self.schedulers.values():
            sched.step(value)

    def _best_step(self, value: float) -> None:
        best = self.best["value"]
        higher = self.spec.schedule.mode == "max"
        if best is None or (value > best if higher else value < best):
            self.best = {"epoch": self.epoch, "value": value, "monitor": self.spec.schedule.monitor}

    def _save_step(self, record: dict[str, Any] | None = None) -> None:
        """``last.pt`` (the commit point: it holds the best epoch and the metrics line), then ``best.pt``."""
        rng = gather_objects(self.dist, rng_state())
        if self.dist.is_main:
            checkpoints = self.run_dir / "checkpoints"
            self.checkpoint_state(rng, "" if record is None else json.dumps(record)).save(checkpoints / "last.pt")
            self.saved_epoch = self.epoch
            if self.best["epoch"] == self.epoch:
                with atomic_path(checkpoints / "best.pt") as tmp:
                    shutil.copyfile(checkpoints / "last.pt", tmp)

    def _write_epoch(self, record: dict[str, Any]) -> None:
        """After the epoch is committed: ``curves.png`` (atomically), the loggers, the console line."""
        from lowdose_toolkit.train.curves import write_curves

        self.history = [*(r for r in self.history if r["epoch"] < record["epoch"]), record]
        pictures = {"curves": write_curves(self.run_dir / "curves.png", self.history,
                                           f"{self.recipe['name']} · {self.run_dir.name}")}
        preview = self.run_dir / "previews" / f"epoch_{record['epoch']:03d}.png"
        if record["val"] and self.validator.previews is not None and preview.is_file():
            pictures = {"preview": preview, **pictures}
        for logger in self.loggers:
            logger.log_epoch(record, pictures)
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

    def predict_volume(self, low: torch.Tensor, coarse_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whole-volume prediction through the run's :class:`Predictor` (the current stage's refiner switch)."""
        return self.predictor.predict(low, use_refiner=self.stages.use_refiner and not coarse_only)


def _epoch_of(path: Path) -> int | None:
    """The epoch a checkpoint file holds, or None when it is missing or unreadable (then it is rewritten)."""
    try:
        return load_checkpoint(path).epoch if path.is_file() else None
    except (UserError, OSError, RuntimeError):
        return None
