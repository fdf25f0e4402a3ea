"""The one inference path: a :class:`Predictor` holds a model with everything needed to apply it.

Validation, ``ldt evaluate RUN_DIR``, ``ldt infer``, the study figure and the benchmarks all predict
through it: the sliding window (``eval`` of the recipe, or overrides), one precision setting
(:mod:`lowdose_toolkit.infer.precision`), the normalisation the model was trained under, the DRFs and the
dose head. ``predict`` works in normalised units and returns the dose head's class probabilities (on the
whole volume, or averaged over the windows); :func:`lowdose_toolkit.infer.pipeline.denoise_all` applies it
to volumes in their own units.

The network behind it is a checkpoint's PyTorch model or a file written by ``ldt export``
(:mod:`lowdose_toolkit.infer.export`): both compute :func:`forward_window` per window, and the sliding
window, the normalisation and the vote over windows are this module's in both cases. A guided checkpoint
is conditioned on its dose head's estimate for the whole volume (:attr:`Predictor.dose_estimate`); an
exported model's head runs inside its graph, per window, while its dose level (for the strength) is read on
the whole volume by the head rebuilt from the file's metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lowdose_toolkit.core.checkpoint import Checkpoint, Normalization, load_checkpoint
from lowdose_toolkit.errors import RecipeError, UserError
from lowdose_toolkit.infer.consistency import Consistency
from lowdose_toolkit.infer.precision import resolve_precision
from lowdose_toolkit.models.lowdose_model import LowDoseModel
from lowdose_toolkit.models.strength import OutputStrength, log_interpolation

if TYPE_CHECKING:
    from lowdose_toolkit.infer.export import ExportedModel

WINDOW_KEYS = ("patch_size", "overlap", "batch_size", "blending")
#: Where the dose head of a guided checkpoint is run: once per whole volume, or on each window.
DOSE_ESTIMATES = ("volume", "window")
#: Whether inference copies use channels_last_3d, per device type (benchmarks/conv3d.py, docs/BENCHMARKS.md).
CHANNELS_LAST: dict[str, bool] = {"cpu": True, "cuda": True}


def model_from_checkpoint(ckpt: Checkpoint, device: torch.device) -> tuple[LowDoseModel, dict[str, Any]]:
    """Rebuild the synthesis model of a checkpoint (its recipe names the parts) and load its weights."""
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import resolve_recipe
    from lowdose_toolkit.models.lowdose_model import build_model

    registry = get_registry()
    try:
        recipe = resolve_recipe(ckpt.recipe, registry, "checkpoint recipe")
        model, _ = build_model(recipe, registry)
    except RecipeError as exc:
        if "unknown " not in str(exc):  # a recipe this version checks more strictly, not a missing part
            raise RecipeError(f"{exc} -- in the checkpoint's recorded recipe") from None
        raise RecipeError(f"{exc} -- the checkpoint was trained with a part that is not installed here; "
                          "install the plugin that provides it (see `ldt plugins`)") from None
    model.load_state_dict(ckpt.model)
    return model.to(device).eval(), recipe


def forward_window(model: LowDoseModel, x: torch.Tensor, use_refiner: bool = True,
                   drf_class: int | None = None, dose_logits: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One batch of windows ``[B, 1, d, h, w]`` -> ``(prediction, dose head softmax [B, K] or None)``.

    What the Predictor runs per window, and what ``ldt export`` traces (with ``drf_class=None``): a
    guided model's head drives its conditioning inside this call, on the window, unless ``dose_logits``
    (``[1, K]``, the head on the whole volume) are given.
    """
    head = model.dose_head
    if head is None:
        return model.predict(x, use_refiner), None
    cls = None if drf_class is None else torch.full((x.shape[0],), drf_class, device=x.device)
    out = model(x, use_refiner=use_refiner, drf_class=cls, dose_logits=dose_logits)
    return out["pred"], out[head].float().softmax(dim=1)


def checked_window(window: dict[str, Any]) -> dict[str, Any]:
    """The sliding window checked once, before any volume is read (``ldt infer --patch-size/--overlap/...``)."""
    from lowdose_toolkit.core.spec import three
    from lowdose_toolkit.infer.sliding import BLENDINGS, parse_overlap

    try:
        patch = three(window["patch_size"], "--patch-size")
        parse_overlap(window["overlap"], patch)
    except (RecipeError, UserError) as exc:
        raise UserError(f"sliding window {window['patch_size']} / overlap {window['overlap']}: {exc}; change "
                        "--patch-size or --overlap (an even number of voxels below the window, or a fraction < 1)") \
            from None
    if isinstance(window["batch_size"], bool) or not isinstance(window["batch_size"], int) or window["batch_size"] < 1:
        raise UserError(f"--batch-size: expected a positive integer, got {window['batch_size']!r}")
    if window["blending"] not in BLENDINGS:
        raise UserError(f"--blending {window['blending']!r} is unknown; use one of {', '.join(BLENDINGS)}")
    return window


@dataclass
class Predictor:
    """A model ready to predict whole volumes.

    Args:
        model: The synthesis model (put in eval mode by :meth:`predict`'s callers' models; training
            code switches modes itself); None for an exported one.
        window: ``patch_size``, ``overlap``, ``batch_size`` and ``blending`` of the sliding window.
        device: Where the model runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (resolved; see :func:`resolve_precision`).
        drfs: The DRFs the model was trained on (its dose classes, in order).
        normalization: How inputs are normalised (``ldt infer``'s pipeline applies and inverts it).
        exported: A model file written by ``ldt export``, run instead of ``model``.
        compiled: Run ``model``'s per-window forward through ``torch.compile`` (static shapes; compiled on
            the first window, again for a smaller last batch). benchmarks/compile.py: 1.3x faster in fp32
            on a 2-core CPU, slower in bf16 (docs/BENCHMARKS.md), so it is asked for, never automatic.
        dose_estimate: ``volume`` (default): a dose head that can classify a whole volume (``volume_logits``,
            as ``noise_level``) does so once per volume, and every window of a guided model is conditioned
            on that estimate; ``window``: the head runs on each window (the only way of an exported model
            and of heads without ``volume_logits``). Windows smaller than the body make the per-window
            estimate unreliable (docs/RESULTS.md, "Windows smaller than the body"). Either way the dose
            level the fitted strength follows is read on the whole volume where the head can (an exported
            model's head rebuilt from its metadata).
    """

    model: LowDoseModel | None
    window: Mapping[str, Any]
    device: torch.device
    precision: str = "fp32"
    drfs: tuple[int, ...] = ()
    normalization: Normalization | None = None
    channels_last: bool = False
    exported: ExportedModel | None = None
    compiled: bool = False
    dose_estimate: str = "volume"
    #: The local-consistency guard applied to every prediction (:mod:`lowdose_toolkit.infer.consistency`), or None.
    consistency: Consistency | None = None
    #: What the last :meth:`predict` read and applied: ``dose_level`` (with a dose head or a stated DRF) and
    #: ``strength`` (with a fitted strength).
    applied: dict[str, Any] = field(default_factory=dict, init=False, compare=False)
    #: The codes the last :meth:`predict` conditioned a guided model on, when it followed a continuous dose level.
    code_used: str | None = field(default=None, init=False, compare=False)
    per_window: str | None = field(default=None, init=False, compare=False)  # why the last volume was read per window
    _exported_strength: OutputStrength | None = field(default=None, init=False, repr=False, compare=False)
    _exported_head: torch.nn.Module | bool | None = field(default=None, init=False, repr=False, compare=False)
    _compiled_window: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] | None = field(
        default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_checkpoint(cls, checkpoint: Path | Checkpoint, device: torch.device, precision: str = "auto",
                        fold_bn: bool = True, channels_last: bool | None = None, compile: bool = False,
                        **window: Any) -> tuple[Predictor, dict[str, Any]]:
        """A predictor for a checkpoint (file, run directory or loaded) and its resolved recipe.

        The model is an inference copy (:mod:`lowdose_toolkit.infer.optimize`): BatchNorm folded into
        the convolutions (``fold_bn``) and channels_last_3d weights and windows (``channels_last``;
        None: :data:`CHANNELS_LAST`, measured per device in docs/BENCHMARKS.md). ``window`` overrides
        the recipe's ``eval`` keys (None keeps the recipe's). ``compile``: see :attr:`compiled`.
        """
        from lowdose_toolkit.infer.optimize import for_inference

        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        model, recipe = model_from_checkpoint(ckpt, device)
        channels_last = CHANNELS_LAST.get(device.type, False) if channels_last is None else channels_last
        model = for_inference(model, fold=fold_bn, channels_last=channels_last)
        unknown = set(window) - set(WINDOW_KEYS)
        if unknown:
            raise TypeError(f"unknown window keys {sorted(unknown)}; use {WINDOW_KEYS}")
        merged = checked_window({k: recipe["eval"][k] if window.get(k) is None else window[k] for k in WINDOW_KEYS})
        return cls(model, merged, device, resolve_precision(precision, device), tuple(ckpt.drfs),
                   ckpt.normalization, channels_last, compiled=compile,
                   consistency=Consistency.from_spec(recipe["eval"].get("consistency"))), recipe

    @classmethod
    def from_exported(cls, path: Path, device: torch.device, precision: str = "auto", trust_torchscript: bool = False,
                      **window: Any) -> Predictor:
        """A predictor for a file written by ``ldt export``: its metadata gives the window, DRFs, normalisation."""
        from lowdose_toolkit.infer.export import load_exported

        exported = load_exported(path, device, trust_torchscript)
        meta = exported.meta
        if precision not in ("auto", meta["precision"]):
            raise UserError(f"{path}: this exported model runs in {meta['precision']}, the precision it was "
                            f"exported in; leave --precision at auto (or use the checkpoint for {precision})")
        unknown = set(window) - set(WINDOW_KEYS)
        if unknown:
            raise TypeError(f"unknown window keys {sorted(unknown)}; use {WINDOW_KEYS}")
        merged = checked_window({k: meta["window"][k] if window.get(k) is None else window[k] for k in WINDOW_KEYS})
        norm = Normalization(meta["normalization"]["method"], float(meta["normalization"]["quantile"]))
        return cls(None, merged, exported.device, meta["precision"], tuple(meta["drfs"]), norm, exported=exported,
                   consistency=Consistency.from_spec(meta["recipe"].get("eval", {}).get("consistency"),
                                                     f"{path}: its recipe's eval.consistency"))

    @classmethod
    def from_file(cls, path: Path, device: torch.device, precision: str = "auto", trust_torchscript: bool = False,
                  **window: Any) -> Predictor:
        """A predictor for a checkpoint, a run directory or an exported model (``.onnx``, TorchScript)."""
        from lowdose_toolkit.infer.export import is_exported

        if is_exported(path):
            return cls.from_exported(path, device, precision, trust_torchscript, **window)
        return cls.from_checkpoint(path, device, precision, **window)[0]

    @property
    def dose_head(self) -> str | None:
        if self.exported is not None:
            return self.exported.meta["dose_head"]
        assert self.model is not None
        return self.model.dose_head

    @property
    def guided(self) -> bool:
        if self.exported is not None:
            return bool(self.exported.meta["guided"])
        assert self.model is not None
        return self.model.guidance is not None

    def drf_class(self, drf: int | None) -> int | None:
        """The class index of a stated DRF (``ldt infer --drf``), checked against the model."""
        if drf is None:
            return None
        if not self.guided:
            raise UserError(f"--drf {drf}: this checkpoint's model is not guided by a dose head (no model.guidance "
                            "in its recipe), so a stated DRF cannot change its output; leave --drf out")
        if drf not in self.drfs:
            raise UserError(f"--drf {drf}: the model was trained on DRFs {list(self.drfs)}; give one of them")
        if self.exported is not None:
            raise UserError(f"--drf {drf}: {self.exported.path} is an exported model, whose dose head conditions it "
                            "inside the graph; leave --drf out, or use the checkpoint it was exported from")
        return self.drfs.index(drf)

    def predict(self, low: torch.Tensor, drf_class: int | None = None, use_refiner: bool = True,
                strength: bool = True, spacing: Sequence[float] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict a normalised volume ``[1, X, Y, Z]``; returns ``(prediction, dose probabilities)``.

        ``drf_class`` conditions a guided model on that class (an oracle or the user's statement)
        instead of its head's prediction; ``use_refiner=False`` gives the coarse output. The
        probabilities ``[num_classes]`` are the dose head's softmax on the whole volume (see
        :attr:`dose_estimate`) or averaged over the windows (None without a dose head). The prediction
        is float32 on the CPU whatever the precision. :attr:`applied` records the input's dose level (the
        stated DRF, else the head's continuous estimate, else its class's DRF) and, for a checkpoint whose
        strength was fitted after training (:mod:`lowdose_toolkit.models.strength`), the strength applied to
        the final output at that level (``strength=False``: the prediction at full strength), and with
        :attr:`consistency` the share of body voxels the guard changed (``consistency``), applied last; the guard
        needs ``spacing``, the voxel size (mm) along the volume's three axes.
        """
        from lowdose_toolkit.infer.sliding import infer_volume

        votes: list[torch.Tensor] = []
        exported, model = self.exported, self.model
        if exported is not None and (drf_class is not None or not use_refiner):
            raise UserError(f"{exported.path}: an exported model runs its whole forward (head-driven conditioning, "
                            "refiner); predict with the checkpoint for a stated DRF or the coarse output")
        whole, self.per_window = self.whole_volume_dose, None
        try:
            logits, level = self._volume_dose(low)  # the whole volume's class logits and dose level, where it can
        except ValueError as exc:  # a volume smaller than the head reads (noise_level: 10 voxels a side)
            logits, level = None, None  # the level is then the DRF of the windows' vote, as before
            if whole:  # each window (padded to the window size) is read instead
                whole, self.per_window = False, str(exc)
        condition, self.code_used = (logits if whole else None), None
        if whole and logits is not None and level is not None and drf_class is None and model is not None \
                and model.guidance is not None:
            condition, self.code_used = self._level_code(level)

        def run(x: torch.Tensor) -> torch.Tensor:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            if exported is not None:
                pred, probs = exported(x)
            else:
                assert model is not None
                pred, probs = self._window()(model, x, use_refiner, drf_class, condition)
            if probs is not None:
                votes.append(probs.float().cpu())
            return pred

        w = self.window
        with torch.no_grad():
            pred = infer_volume(low, run, patch_size=w["patch_size"], overlap=w["overlap"],
                                batch_size=w["batch_size"], blending=w["blending"], device=self.device,
                                amp=self.precision)
        if whole and logits is not None:
            probs = logits[0].float().softmax(dim=0).cpu()
        else:
            probs = torch.cat(votes).mean(dim=0) if votes else None
        if drf_class is not None:
            level = float(self.drfs[drf_class])
        elif level is None and probs is not None:
            level = float(self.drfs[int(probs.argmax())])
        self.applied = {} if level is None else {"dose_level": level}
        fitted = self.strength
        if strength and fitted is not None and use_refiner and bool(fitted.fitted):
            pred, factor = fitted.apply(low.to(pred.device, pred.dtype), pred, level)
            self.applied["strength"] = factor
        if self.consistency is not None and use_refiner:  # the final output, as the strength
            if spacing is None:
                raise ValueError("Predictor.predict: the consistency guard needs the volume's voxel size, spacing=(mm, "
                                 "mm, mm); pass it, or set predictor.consistency = None")
            pred, changed = self.consistency.apply_with_share(low.to(pred.device), pred, spacing)
            self.applied["consistency"] = changed
        return pred, probs

    def _level_code(self, level: float) -> tuple[torch.Tensor, str]:
        """Logits ``[1, K]`` whose softmax puts the guidance's code between the two DRF classes that enclose a
        continuous dose level (linear in ln DRF, :func:`log_interpolation`), and a description of the codes
        that serve (through a fitted code map). On the validation subjects of three quickstart runs this
        gained 0.1-0.2 dB at DRF 20-100 over the class probabilities and changed DRF 4-10 by under 0.01 dB;
        on a head-and-neck field of view the classifier, which also reads the body fraction and the mean
        activity, named DRF 20 scans DRF 100 while the level read 15-19 (docs/RESULTS.md)."""
        weights = log_interpolation(self.drfs, level)
        used = [(self.code_drf(i), float(w)) for i, w in enumerate(weights) if w > 0]
        codes = " and ".join(f"{c}" for c, _ in used)
        share = " / ".join(f"{w:.2f}" for _, w in used)
        text = f"DRF {codes} code" + (f"s ({share})" if len(used) > 1 else "")
        return torch.log(weights.float() + 1e-6)[None], text

    def _volume_dose(self, low: torch.Tensor) -> tuple[torch.Tensor | None, float | None]:
        """The dose head on the whole normalised volume ``[1, X, Y, Z]``: ``(class logits [1, K], dose level)``,
        ``(None, None)`` for a head that cannot read whole volumes. A checkpoint's own head; for an exported
        model the head rebuilt from the file's metadata (``dose_level``), so its dose level, and the strength
        that follows it, are the checkpoint's even though its graph conditions each window on its own."""
        from lowdose_toolkit.models.lowdose_model import head_volume_dose

        if self.model is not None:
            return self.model.volume_dose(low[None].float())
        if self.exported is None or not self.exported.meta.get("dose_level"):
            return None, None
        if self._exported_head is None:
            self._exported_head = _head_from_metadata(self.exported.meta, self.exported.path)
        if self._exported_head is False:  # could not be rebuilt (warned once): the windows' vote serves
            return None, None
        assert isinstance(self._exported_head, torch.nn.Module)
        return head_volume_dose(self._exported_head, low[None].float())

    @property
    def strength(self) -> OutputStrength | None:
        """The model's fitted strength (a checkpoint's, or rebuilt from an exported file's metadata), or None."""
        if self.model is not None:
            return self.model.strength
        if self._exported_strength is None and self.exported is not None and "strength" in self.exported.meta:
            meta = self.exported.meta["strength"]
            self._exported_strength = OutputStrength([int(k) for k in meta["drfs"]])
            self._exported_strength.alpha.copy_(torch.tensor(meta["alpha"], dtype=torch.float64))
            self._exported_strength.fitted.fill_(bool(meta["fitted"]))
        return self._exported_strength

    @property
    def whole_volume_dose(self) -> bool:
        """Whether the dose head classifies each whole volume once (:attr:`dose_estimate`), which then
        conditions every window of a guided model, rather than each window on its own."""
        if self.dose_estimate not in DOSE_ESTIMATES:
            raise ValueError(f"dose_estimate={self.dose_estimate!r}: use one of {DOSE_ESTIMATES}")
        if self.dose_estimate != "volume" or self.exported is not None or self.model is None:
            return False
        return self.model.classifies_volumes

    def _window(self) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
        """:func:`forward_window`, compiled once if :attr:`compiled`."""
        if not self.compiled:
            return forward_window
        if self._compiled_window is None:
            self._compiled_window = torch.compile(forward_window, dynamic=False)
        return self._compiled_window

    def code_drf(self, drf_class: int) -> int | None:
        """The DRF whose code conditions a volume of class ``drf_class``: its own unless the guidance fitted a
        map after training (``code_map``, see plugins/guidance/film.py); None when not known here (no
        guidance, or an exported model, whose map is inside its graph)."""
        if self.exported is not None or self.model is None or self.model.guidance is None:
            return None
        code_map = getattr(self.model.guidance, "code_map", None)
        return self.drfs[int(code_map[drf_class])] if code_map is not None else self.drfs[drf_class]

    def verdict(self, probs: torch.Tensor | None) -> dict[str, Any]:
        """``predicted_drf`` and its probability, for summaries (empty without a dose head)."""
        if probs is None:
            return {}
        k = int(probs.argmax())
        return {"predicted_drf": self.drfs[k], "drf_probability": round(float(probs[k]), 4)}


def _head_from_metadata(meta: Mapping[str, Any], path: Path) -> torch.nn.Module | bool:
    """An exported file's dose head, built from its recipe's head entry and loaded with the metadata's state
    (``dose_level``), for :meth:`Predictor._volume_dose`; False, with one warning naming the file and the fix,
    when it cannot be (the head's plugin not installed here, a damaged state)."""
    import warnings

    from lowdose_toolkit.core.plugin_manager import get_registry

    record = meta["dose_level"]
    try:
        spec = next(h for h in meta["recipe"]["model"]["heads"] if h["name"] == record["head"])
        drfs = [int(d) for d in meta["drfs"]]
        head = get_registry().build("head", spec, f"{path}: model.heads ({record['head']})",
                                    engine_keys=("input", "target"),
                                    context={"in_channels": 1, "num_classes": len(drfs), "drfs": drfs})
        current = head.state_dict()
        head.load_state_dict({k: torch.tensor(v, dtype=current[k].dtype) for k, v in record["state"].items()})
    except Exception as exc:  # noqa: BLE001 - any failure: the strength follows the windows' vote instead
        warnings.warn(f"{path}: its dose head cannot be rebuilt here ({str(exc).splitlines()[0]}), so each volume's "
                      "strength follows the DRF its windows name instead of its dose level; install the head's "
                      "plugin (`ldt plugins`) or export the checkpoint again", stacklevel=2)
        return False
    return head.eval()


class NonFiniteError(UserError):
    """A prediction holds NaN or Inf voxels: an error for that volume, never a written file."""


def check_finite(pred: torch.Tensor, where: str, precision: str = "fp32") -> None:
    """Raise :class:`NonFiniteError` (counting NaN and Inf voxels, with the likely fix) unless all are finite."""
    finite = torch.isfinite(pred)
    if bool(finite.all()):
        return
    n = pred.numel()
    nan = int(torch.isnan(pred).sum())
    inf = n - int(finite.sum()) - nan
    fix = (f"rerun with --precision fp32 ({precision} can overflow)" if precision != "fp32" else
           "the checkpoint's weights may be damaged (a diverged training?) or the input far outside what the "
           "model was trained on; check the checkpoint with `ldt evaluate RUN_DIR`")
    raise NonFiniteError(f"{where}: the prediction has {nan} NaN and {inf} Inf voxels (of {n}); nothing was "
                         f"written; {fix}")


def confusion_matrix(true: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    """``matrix[t][p]``: volumes of true class ``t`` predicted as ``p``."""
    matrix = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(true, predicted, strict=True):
        matrix[t][p] += 1
    return matrix
