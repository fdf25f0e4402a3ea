"""Exported models: a checkpoint's network as an ONNX or TorchScript file that runs without ``ldt``.

The file holds :func:`~lowdose_toolkit.infer.predictor.forward_window` of the checkpoint's model in eval
mode, the per-window forward the :class:`~lowdose_toolkit.infer.predictor.Predictor` runs: input ``low``
``[B, 1, D, H, W]`` float32 (normalised windows, any ``B`` and spatial size), outputs ``pred`` (same
shape) and, with a dose head, ``probs`` ``[B, K]`` (the head's softmax over ``drfs``). A guided model's
head drives its FiLM conditioning (and gate) inside the graph, per window, as in the Predictor. Left to
the caller, as :class:`Predictor` does it for ``ldt infer``: the normalisation (``normalised = x / scale``,
``scale`` from the whole volume, see :mod:`lowdose_toolkit.data.normalize`), the sliding window and its
blending, the volume's verdict (the mean of ``probs`` over the windows), the volume's dose level (the dose
head rebuilt from the metadata's ``dose_level`` state, run once on the whole volume) with the fitted
strength that follows it, and the local-consistency guard (``consistency``). What the checkpoint can do and
the file cannot: condition on a stated DRF (``ldt infer --drf``) or on the whole volume's dose level (the
graph conditions each window on its own head), give the coarse output without the refiner, run in another
precision than the one it was exported in (fp32).

The graph is traced (``torch.jit.trace``; ONNX through the TorchScript-based ``torch.onnx.export(...,
dynamo=False)``, opset 17) at a window with odd sides, so every shape computation (the generators' padding
to a multiple of their stride) is recorded rather than fixed; the dose head's state (e.g. ``noise_level``'s
whole-volume classifier, when calibrated) is fixed at export. Before the file is renamed into place it is
loaded back and checked against the PyTorch model at two other window sizes (:data:`TOLERANCE`).

Metadata (:func:`metadata`): ONNX ``metadata_props`` (one key per entry, each value JSON), TorchScript
``_extra_files["ldt.json"]``. A TorchScript file is a program (``torch.jit.load`` runs its code): load
only files you trust; an ONNX file is a graph.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowdose_toolkit import __version__
from lowdose_toolkit.core.checkpoint import Checkpoint
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.models.lowdose_model import LowDoseModel

FORMATS = ("onnx", "torchscript")
FORMAT_NAME = "lowdose-toolkit exported model"
FORMAT_VERSION = 1
META_FILE = "ldt.json"  # the TorchScript extra file
OPSET = 17
TOLERANCE = 1e-4  # |exported - PyTorch| <= TOLERANCE * (1 + |PyTorch|), checked at export
NORMALIZATIONS = {
    "robust": "scale = mean of the voxels above 5% of the volume's {quantile} quantile (the body's mean activity)",
    "suv": "scale = 1 / SUV factor (injected dose / body weight), so normalised units are SUV",
    "none": "scale = 1",
}


class WindowModule(nn.Module):
    """The traced module: ``low -> pred`` or ``low -> (pred, probs)`` (:func:`forward_window`)."""

    def __init__(self, model: LowDoseModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, low: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        from lowdose_toolkit.infer.predictor import forward_window

        pred, probs = forward_window(self.model, low)
        return pred if probs is None else (pred, probs)


@dataclass
class ExportedModel:
    """An exported file ready to run windows: ``model(x) -> (pred, probs or None)`` on ``device``."""

    path: Path
    format: str
    meta: dict[str, Any]
    device: torch.device
    runs_on: str
    run: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.run(x)


def resolve_format(fmt: str | None, out: Path) -> str:
    """The export format: ``fmt``, or from ``out``'s suffix (``.onnx``: ONNX; ``.ts``: TorchScript).

    TorchScript files must end in ``.ts``, never ``.pt``: a ``.pt`` is a checkpoint (data, read with
    ``weights_only``), and nothing that looks like one may be run as a program."""
    onnx_name = out.suffix.lower() == ".onnx"
    if fmt is None:
        if onnx_name:
            return "onnx"
        if out.suffix.lower() == ".ts":
            return "torchscript"
        raise UserError(f"{out}: cannot tell the format from the name; pass --format onnx or --format torchscript")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown; use onnx or torchscript")
    if (fmt == "onnx") != onnx_name or (fmt == "torchscript" and out.suffix.lower() != ".ts"):
        want = "end it in .onnx" if fmt == "onnx" else "end it in .ts (.pt names checkpoints, .onnx ONNX files)"
        raise UserError(f"{out}: --format {fmt} needs a matching name; {want}")
    return fmt


def is_exported(path: Path) -> bool:
    """Whether ``path`` names a file written by ``ldt export``: by its name alone (``.onnx`` or ``.ts``), so a
    checkpoint (``.pt``, a run directory) is never opened as a program, whatever it holds."""
    path = Path(path)
    return path.is_file() and path.suffix.lower() in (".onnx", ".ts")


def _import_onnxruntime(path: Path) -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise UserError(f"{path}: running an ONNX model needs onnxruntime, which is not installed; "
                        "pip install onnxruntime") from None
    return onnxruntime


def _check_meta(meta: dict[str, Any], path: Path) -> dict[str, Any]:
    if meta.get("format") != FORMAT_NAME:
        raise UserError(f"{path}: no lowdose-toolkit metadata (not written by ldt export); export the checkpoint "
                        "with `ldt export CHECKPOINT --out FILE`")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: exported-model format {meta.get('format_version')!r}; this version of ldt reads "
                        f"{FORMAT_VERSION} (install the version that wrote it, or export the checkpoint again)")
    return meta


def load_exported(path: Path, device: torch.device, trust_torchscript: bool = False) -> ExportedModel:
    """Load a file written by ``ldt export`` for running windows on ``device`` (ONNX: onnxruntime's provider).

    A TorchScript file is a program (``torch.jit.load`` runs its code), so it is loaded only with
    ``trust_torchscript``; an ONNX file is a graph of operators, data only."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        ort = _import_onnxruntime(path)
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))  # type: ignore[arg-type]
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - any parse failure means a bad file
            raise UserError(f"{path}: not a readable ONNX model ({str(exc).splitlines()[0]})") from None
        raw = session.get_modelmeta().custom_metadata_map
        meta = _check_meta({k: json.loads(v) for k, v in raw.items()}, path)
        outputs = [o.name for o in session.get_outputs()]

        def run_onnx(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            got = session.run(outputs, {"low": x.detach().float().cpu().contiguous().numpy()})
            tensors = [torch.from_numpy(a).to(x.device) for a in got]
            return tensors[0], (tensors[1] if len(tensors) > 1 else None)

        provider = session.get_providers()[0]
        return ExportedModel(path, "onnx", meta, torch.device("cpu"),
                             f"{'cuda' if provider.startswith('CUDA') else 'cpu'} (onnxruntime {provider})", run_onnx)
    if not trust_torchscript:
        raise UserError(f"{path} is TorchScript, which is a program: ldt runs it only with --trust-torchscript "
                        "(when you trust where the file comes from); an .onnx export or the checkpoint needs no trust")
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load. is deprecated", category=Warning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: not a readable TorchScript model ({str(exc).splitlines()[0]})") from None
    try:
        meta = json.loads(extra[META_FILE] or "{}")
    except json.JSONDecodeError:
        meta = {}
    meta = _check_meta(meta, path)
    module.eval()

    def run_torchscript(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = module(x)
        return (out[0], out[1]) if isinstance(out, tuple) else (out, None)

    return ExportedModel(path, "torchscript", meta, device, f"{device} (TorchScript)", run_torchscript)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metadata(ckpt: Checkpoint, source: Path, recipe: dict[str, Any], model: LowDoseModel, fmt: str,
             traced: tuple[int, ...], checked: list[tuple[int, ...]]) -> dict[str, Any]:
    """What a runtime without ``ldt`` needs to use the file, and where it came from."""
    from lowdose_toolkit.infer.predictor import WINDOW_KEYS

    norm = ckpt.normalization
    head = model.dose_head
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "exported_as": fmt if fmt == "torchscript" else f"onnx opset {OPSET}",
        "toolkit_version": __version__,
        "torch_version": torch.__version__,
        "precision": "fp32",
        "recipe_name": recipe["name"],
        "checkpoint": {"file": source.name, "epoch": ckpt.epoch, "version": ckpt.version, "sha256": _sha256(source)},
        "drfs": list(ckpt.drfs),
        "normalization": {"method": norm.method, "quantile": norm.quantile,
                          "definition": "normalised = x / scale; prediction in x's units = pred * scale; "
                          + NORMALIZATIONS.get(norm.method, "").format(quantile=norm.quantile)},
        "window": {k: recipe["eval"][k] for k in WINDOW_KEYS},
        "dose_head": head,
        "guided": model.guidance is not None,
        "refiner": model.refiner is not None,
        "inputs": {"low": "float32 [B, 1, D, H, W]: normalised low-dose PET windows"},
        "outputs": {"pred": "float32 [B, 1, D, H, W]: predicted full-dose PET (normalised)",
                    **({"probs": "float32 [B, K]: the dose head's probability of each of drfs, per window; "
                                 "a volume's verdict is their mean over its windows"} if head else {})},
        "conditioning": ("the dose head's per-window probabilities condition the network inside the graph"
                         if model.guidance is not None else "none"),
        "dose_level": _dose_level(model),
        "strength": {"fitted": bool(model.strength.fitted), "drfs": model.strength.levels.tolist(),
                     "alpha": model.strength.alpha.tolist(),
                     "definition": "per volume, output = low + a * (pred - low) with a interpolated linearly in "
                                   "ln k between the anchors (drfs -> alpha), the last anchor above them, and "
                                   "alpha[0] * (1 - 1/k) / (1 - 1/drfs[0]) below; k = the volume's dose level "
                                   "(dose_level), else the DRF the volume's mean probs name; a = 1 when not "
                                   "fitted"},
        "consistency": {"settings": recipe["eval"].get("consistency"),
                        "definition": "applied last, when settings are given (true: z 3, sigma_mm 3): with "
                                      "r = G_sigma * (low - out) and s = sqrt(G_sigma * max(out, 0) + 0.05), "
                                      "t = r / s, c = 1.4826 * median |t| over voxels whose G_sigma * out > 0.3, "
                                      "out += sign(t) * max(|t| - z c, 0) * s (G_sigma: Gaussian of sigma_mm "
                                      "mm, in voxels per axis from the volume's spacing; "
                                      "lowdose_toolkit/infer/consistency.py)"},
        "traced_window": list(traced),
        "checked_windows": [list(s) for s in checked],
        "tolerance": TOLERANCE,
        "recipe": recipe,
    }


def _dose_level(model: LowDoseModel) -> dict[str, Any] | None:
    """The dose head's state, for reading each whole volume's dose level outside the graph (None when the head
    cannot classify whole volumes)."""
    if model.dose_head is None or not model.classifies_volumes:
        return None
    head = model.heads[model.dose_head]
    return {"head": model.dose_head,
            "state": {k: v.detach().cpu().tolist() for k, v in head.state_dict().items()},
            "definition": "the dose head of the recipe with this state, run once on each whole normalised volume "
                          "(its volume_estimate), gives the volume's class and continuous dose level; ldt infer "
                          "reads the dose level with it for the strength, while the graph's own head conditions "
                          "each window"}


def _example(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A positive test input about the body's normalised level (1), with noise."""
    return 2.0 * torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _write_onnx(module: WindowModule, example: torch.Tensor, meta: dict[str, Any], target: Path) -> None:
    import io

    import onnx

    outputs = ["pred", "probs"] if meta["dose_head"] else ["pred"]
    spatial = {0: "batch", 2: "depth", 3: "height", 4: "width"}
    axes = {"low": spatial, "pred": spatial, **({"probs": {0: "batch"}} if meta["dose_head"] else {})}
    buffer = io.BytesIO()
    torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["low"],
                      output_names=outputs, dynamic_axes=axes, do_constant_folding=True)
    proto = onnx.load_from_string(buffer.getvalue())
    proto.producer_name, proto.producer_version = "lowdose-toolkit", __version__
    proto.doc_string = f"{meta['recipe_name']}: low-dose PET -> full-dose PET (lowdose-toolkit {__version__})"
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value, default=str))
    onnx.save(proto, str(target))


def export_model(checkpoint: Path, out: Path, fmt: str | None = None, overwrite: bool = False
                 ) -> tuple[dict[str, Any], float]:
    """Write ``checkpoint``'s model to ``out`` (ONNX or TorchScript) with its metadata, checked against it.

    Returns the metadata and the largest difference from the PyTorch model at the checked windows.
    """
    from lowdose_toolkit.core.atomic import atomic_path
    from lowdose_toolkit.core.checkpoint import find_checkpoint, load_checkpoint
    from lowdose_toolkit.infer.predictor import model_from_checkpoint
    from lowdose_toolkit.infer.sliding import parse_patch_size

    out = Path(out)
    fmt = resolve_format(fmt, out)
    if out.is_dir():
        name = "model.onnx" if fmt == "onnx" else "model.pt"
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / name}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UserError(f"{out}: writing (and checking) ONNX needs the onnx and onnxruntime packages; "
                            "pip install onnx onnxruntime") from None
    source = find_checkpoint(checkpoint)
    if out.resolve() == source.resolve():
        raise UserError(f"--out {out} is the checkpoint itself; choose another file name")
    ckpt = load_checkpoint(source)
    cpu = torch.device("cpu")
    model, recipe = model_from_checkpoint(ckpt, cpu)
    module = WindowModule(model).eval()
    patch = parse_patch_size(recipe["eval"]["patch_size"])
    odd = tuple(p | 1 for p in patch)  # odd sides: every axis padded inside the network, so traced as computed
    traced = (2, 1, *odd)
    checked = [(1, 1, *patch), (1, 1, *(p + 2 for p in odd))]  # another batch and two other sizes
    meta = metadata(ckpt, source, recipe, model, fmt, traced, checked)
    example = _example(traced, 0)
    with atomic_path(out) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings (shape-dependent Python values: checked below)
        if fmt == "onnx":
            _write_onnx(module, example, meta, tmp)
        else:
            script = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(script, str(tmp), _extra_files={META_FILE: json.dumps(meta, default=str)})
        exported = load_exported(tmp, cpu, trust_torchscript=True)  # the file this process just wrote
        worst = 0.0
        for i, shape in enumerate(checked):
            x = _example(shape, i + 1)
            want, got = module(x), exported(x)
            want = want if isinstance(want, tuple) else (want, None)
            for name, a, b in zip(("pred", "probs"), got, want, strict=True):
                if b is None:
                    continue
                if a is None or a.shape != b.shape:
                    raise UserError(f"{out}: the exported {name} has shape {None if a is None else tuple(a.shape)} "
                                    f"at window {list(shape)}, the model's {tuple(b.shape)}; not written "
                                    "(an export bug: report it with the recipe)")
                excess = ((a - b).abs() / (1 + b.abs())).max().item()
                worst = max(worst, float((a - b).abs().max()))
                if excess > TOLERANCE:
                    raise UserError(f"{out}: the exported {name} differs from the model's by {excess:.2g} at window "
                                    f"{list(shape)} (tolerance {TOLERANCE}); not written (an export bug: report it "
                                    "with the recipe)")
    return meta, worst
