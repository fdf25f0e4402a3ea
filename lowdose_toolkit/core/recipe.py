"""YAML recipes: loading (``extends:`` + deep merge), ``--set`` overrides, and validation.

A recipe is plain data. :func:`load_recipe` returns the merged mapping; :func:`resolve_recipe` checks
every section and key against :data:`SCHEMA` and every part against its factory's signature, and
returns the *resolved* recipe (defaults filled in), which is what runs and checkpoints record.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from lowdose_toolkit.core.registry import Registry, suggestion
from lowdose_toolkit.core.typecheck import check_value
from lowdose_toolkit.errors import RecipeError


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of each number of a list): ``lo <= v`` (``lo < v`` if ``open_lo``), ``v <= hi``."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def check(self, value: Any, where: str) -> None:
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None or isinstance(v, (bool, str)):
                continue
            low = self.lo is not None and (v <= self.lo if self.open_lo else v < self.lo)
            high = self.hi is not None and (v >= self.hi if self.open_hi else v > self.hi)
            if low or high:
                raise RecipeError(f"{where}: {value!r} is out of range; expected {self.describe()}")

    def describe(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.open_lo else '>='} {self.lo:g}")
        if self.hi is not None:
            parts.append(f"{'<' if self.open_hi else '<='} {self.hi:g}")
        return " and ".join(parts)


POSITIVE = Range(lo=0, open_lo=True)
AT_LEAST_1 = Range(lo=1)
NON_NEGATIVE = Range(lo=0)


@dataclass(frozen=True)
class Field:
    """An engine-level recipe key: its type, default and range."""

    annotation: Any
    default: Any
    help: str = ""
    range: Range | None = None


@dataclass(frozen=True)
class Part:
    """A recipe key holding a part (or a list of parts) of ``kind``."""

    kind: str
    default: Any = None
    many: bool = False
    engine_keys: tuple[str, ...] = ()
    required: bool = False


Schema = dict[str, "Field | Part | Schema"]

SCHEMA: Schema = {
    "name": Field(str, "unnamed", "run name, used for the run directory"),
    "description": Field(str, ""),
    "seed": Field(int, 0, "seed for torch, numpy, TorchIO and the data split", Range(0, 2**32 - 1)),
    "data": {
        "source": Part("source", {"name": "phantom"}, required=True),
        "drfs": Field(list[int], [4, 10, 20, 50, 100], "dose reduction factors to train on", AT_LEAST_1),
        "patch_size": Field(int | list[int], 64, "", AT_LEAST_1),
        "batch_size": Field(int, 4, "", AT_LEAST_1),
        "samples_per_volume": Field(int, 8, "", AT_LEAST_1),
        "queue_length": Field(int, 48, "", AT_LEAST_1),
        "num_workers": Field(int, 0, "workers of the TorchIO queue (the outer loader always uses 0)", NON_NEGATIVE),
        "sampler": Field(Literal["uniform", "weighted"], "uniform"),
        "normalization": Field(Literal["auto", "suv", "robust", "none"], "auto"),
        "preload": Field(bool, False, "read and normalise every volume once, keep in memory (small data)"),
        "layout": Field(Literal["auto", "volumes", "mmap"], "auto",
                        "mmap: patches sliced from the `ldt cache` layout's memory maps; volumes: whole volumes "
                        "per draw; auto: mmap when a cache is found (and preload is off)"),
        "split": {
            "val": Field(float | int, 0.2, "fraction (<1) or number of validation subjects", NON_NEGATIVE),
            "test": Field(float | int, 0.2, "fraction (<1) or number of test subjects", NON_NEGATIVE),
            "seed": Field(int | None, None, "seed of the subject shuffle (default: the recipe's seed); fix it to "
                          "vary the training seed on one split", Range(0, 2**32 - 1)),
        },
    },
    "model": {
        "generator": Part("generator", required=True),
        "heads": Part("head", [], many=True, engine_keys=("input", "target")),
        "refiner": Part("refiner"),
        "discriminator": Part("discriminator"),
        "guidance": Part("guidance", engine_keys=("head",)),
    },
    "losses": Part("loss", [], many=True, engine_keys=("weight", "on")),
    "train": {
        "scheme": Part("scheme", {"name": "supervised"}, required=True),
        "epochs": Field(int, 100, "", AT_LEAST_1),
        "steps_per_epoch": Field(int | None, None, "default: one pass over the queue's patches", AT_LEAST_1),
        "optimizer": {
            "name": Field(Literal["adam", "adamw", "sgd"], "adam"),
            "lr": Field(float, 2.0e-4, "", POSITIVE),
            "betas": Field(list[float], [0.5, 0.999]),
            "weight_decay": Field(float, 0.0, "", NON_NEGATIVE),
        },
        "scheduler": {
            "name": Field(Literal["plateau", "none"], "plateau"),
            "factor": Field(float, 0.1, "", Range(0, 1, open_lo=True, open_hi=True)),
            "patience": Field(int, 5, "", NON_NEGATIVE),
            "monitor": Field(str, "val_psnr", "val_gain (DRF-weighted gain over the input), val_psnr (mean over "
                                               "DRFs), val_psnr_drf<N> (one DRF) or val_loss"),
        },
        "stop_when_lr_below": Field(float | None, 2.0e-6, "", NON_NEGATIVE),
        "stages": Field(list[dict] | None, None, "two-stage training; see recipes/cg3dsrgan.yaml"),
        "device": Field(str, "auto", "auto, cpu, cuda or cuda:N"),
        "precision": Field(Literal["auto", "fp32", "bf16", "fp16"], "fp32",
                           "fp32, or bf16/fp16 autocast, on CPU and CUDA; auto: bf16 where the device runs it "
                           "natively (CPU avx512_bf16/AMX, CUDA sm80+), else fp32"),
        "amp": Field(Literal["none", "bf16", "fp16"] | None, None, "deprecated: train.precision (none is fp32)"),
        "val_every": Field(int, 1, "", AT_LEAST_1),
        "max_minutes": Field(float | None, None, "wall-clock budget; training stops after the epoch", POSITIVE),
        "deterministic": Field(bool, True),
        "previews": Field(bool, True),
        "sync_batchnorm": Field(bool, False, "under torchrun on GPUs: BatchNorm statistics over every rank's "
                                             "samples (torch's SyncBatchNorm; CUDA only)"),
        "loggers": Part("logger", ["jsonl"], many=True),
    },
    "eval": {
        "patch_size": Field(int | list[int], 64, "", AT_LEAST_1),
        "overlap": Field(int | float, 0.25, "voxels (int) or fraction of the patch (float < 1)", NON_NEGATIVE),
        "batch_size": Field(int, 4, "", AT_LEAST_1),
        "blending": Field(Literal["hann", "average", "crop"], "hann"),
        "ssim_range": Field(Literal["challenge", "standard"], "challenge"),
        "val_subjects": Field(int | None, 2, "validation volumes per epoch (None: all)", AT_LEAST_1),
        "fit_strength": Field(bool, False, "after training, fit how much of its correction the model applies per "
                                           "dose level on every validation subject (strength_fit.json)"),
        "consistency": Field(dict | bool | None, None, "at inference, give back the local means a prediction "
                                                       "changed beyond its input's noise: true, or {z, sigma_mm} "
                                                       "(lowdose_toolkit/infer/consistency.py); null: off"),
    },
}


def _schema_at(path: list[str]) -> Field | Part | Schema | None:
    node: Any = SCHEMA
    for key in path:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, Part):
            return node
        else:
            return None
    return node


# --------------------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with YAML 1.2 booleans: only true/false, so ``on: coarse`` keeps its key ``on``."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)

RecipeLoader.add_implicit_resolver(  # 1e-3 is a float in YAML 1.2 (YAML 1.1 wants a dot)
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def safe_load(text: str) -> Any:
    """Parse YAML safely (no Python objects), with YAML 1.2 booleans."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - RecipeLoader is a SafeLoader


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc.strerror}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: Mapping[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``child`` over ``base``: mappings merge key by key, anything else replaces.

    A mapping that names another part than the inherited one (``generator: {name: unet3d}`` over
    ``{name: mlnet, depth: 5}``) replaces it whole: the old part's keyword arguments are not its own.
    """
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        inherited = out.get(key)
        renamed = isinstance(value, Mapping) and isinstance(inherited, Mapping) and "name" in value \
            and "name" in inherited and value["name"] != inherited["name"]
        if isinstance(value, Mapping) and isinstance(inherited, Mapping) and not renamed:
            out[key] = deep_merge(inherited, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_chain(path: Path, stack: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in (*stack, path))
        raise RecipeError(f"{path}: cyclic 'extends': {chain}")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a relative file name, got {parent!r}")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends: file {parent!r} not found (looked for {parent_path})")
    return deep_merge(_load_chain(parent_path, (*stack, path)), data)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a recipe file with its ``extends:`` chain and apply ``--set key=value`` overrides."""
    path = Path(path)
    recipe = _load_chain(path, ())
    for item in overrides:
        apply_override(recipe, item, source=str(path))
    return recipe


def apply_override(recipe: dict[str, Any], item: str, source: str = "--set") -> None:
    """Apply one ``dotted.key=value`` (value parsed as YAML) in place; the key must exist."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected dotted.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    keys = dotted.strip().split(".")
    node: Any = recipe
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        here = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise RecipeError(f"--set {item}: {here}: no item {key!r} (the list has {len(node)} items)")
            if last:
                node[int(key)] = value
                return
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {item}: {'.'.join(keys[:depth])} is a value, not a section")
        schema = _schema_at(keys[: depth + 1])
        in_part = isinstance(_schema_at(keys[:depth]), Part) or schema is None and _inside_part(keys[:depth]) \
            or _is_stage_key(keys[: depth + 1])
        if key not in node:
            if schema is None and not in_part:
                known = list(node) + list(_schema_keys(keys[:depth]))
                raise RecipeError(f"--set {item}: no such key {here!r} in {source}{suggestion(key, known)}")
            if not last:
                default = schema.default if isinstance(schema, (Field, Part)) else {}
                node[key] = copy.deepcopy(default) if default is not None else {}
        if last:
            node[key] = value
            return
        node = node[key]


def _is_stage_key(path: list[str]) -> bool:
    """``train.stages.N.<stage key>``: a key a stage may have but this recipe's stage does not set yet."""
    from lowdose_toolkit.core.spec import STAGE_KEYS

    return len(path) == 4 and path[:2] == ["train", "stages"] and path[3] in STAGE_KEYS


def _inside_part(path: list[str]) -> bool:
    return any(isinstance(_schema_at(path[:i]), Part) for i in range(1, len(path) + 1))


def _schema_keys(path: list[str]) -> list[str]:
    node = _schema_at(path) if path else SCHEMA
    return list(node) if isinstance(node, dict) else []


# --------------------------------------------------------------------------- validation


def resolve_recipe(recipe: Mapping[str, Any], registry: Registry, source: str = "recipe") -> dict[str, Any]:
    """Validate ``recipe`` and return it with defaults filled in and parts in mapping form.

    Every unknown section or key, wrong type, number out of range, unknown part name and every key
    that contradicts another (:func:`lowdose_toolkit.core.spec.run_spec`) is a RecipeError whose message
    starts with ``source`` and the dotted key path.
    """
    from lowdose_toolkit.core.spec import run_spec

    try:
        resolved = _resolve(recipe, SCHEMA, [], registry)
        run_spec(resolved)
        return resolved
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None


def _resolve(data: Mapping[str, Any], schema: Schema, path: list[str], registry: Registry) -> dict[str, Any]:
    where = ".".join(path)
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    for key in data:
        if key not in schema:
            what = "section" if not path else "key"
            raise RecipeError(
                f"{'.'.join([*path, str(key)])}: unknown {what}{suggestion(str(key), schema)}; "
                f"known: {', '.join(schema)}"
            )
    out: dict[str, Any] = {}
    for key, node in schema.items():
        dotted = ".".join([*path, key])
        present = key in data
        value = data[key] if present else None
        if isinstance(node, dict):
            out[key] = _resolve(value if value is not None else {}, node, [*path, key], registry)
        elif isinstance(node, Field):
            out[key] = check_value(value, node.annotation, dotted) if present else copy.deepcopy(node.default)
            if present and node.range is not None:
                node.range.check(out[key], dotted)
        else:
            out[key] = _resolve_part(node, value if present else copy.deepcopy(node.default), dotted, registry)
    return out


def _resolve_part(node: Part, value: Any, where: str, registry: Registry) -> Any:
    if node.many:
        if value is None:
            return []
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list of {node.kind}s, got {value!r}")
        return [_one_part(node, v, f"{where}.{i}", registry) for i, v in enumerate(value)]
    if value is None:
        if node.required:
            raise RecipeError(f"{where}: a {node.kind} is required; available: {', '.join(registry.names(node.kind))}")
        return None
    return _one_part(node, value, where, registry)


def _one_part(node: Part, value: Any, where: str, registry: Registry) -> dict[str, Any]:
    entry, kwargs = registry.resolve(node.kind, value, where, node.engine_keys)
    spec = {"name": entry.name, **kwargs}
    if isinstance(value, Mapping):
        for key in node.engine_keys:
            if key in value:
                spec[key] = value[key]
    if node.kind == "loss":
        spec["weight"] = check_value(spec.get("weight", 1.0), float, f"{where}.weight")
        NON_NEGATIVE.check(spec["weight"], f"{where}.weight")
        spec["on"] = check_value(spec.get("on", "pred"), str, f"{where}.on")
    if node.kind == "guidance":
        if "head" not in spec:
            raise RecipeError(f"{where}.head: name the dose head whose prediction guides the generator, "
                              "e.g. head: noise_level")
        spec["head"] = check_value(spec["head"], str, f"{where}.head")
    if node.kind == "head":
        if "input" not in spec:
            raise RecipeError(f"{where}.input: a head names the generator feature it reads, e.g. 'bottleneck'")
        spec["input"] = check_value(spec["input"], str, f"{where}.input")
        spec["target"] = check_value(spec.get("target", "drf_class"), str, f"{where}.target")
    return spec


def dump_recipe(recipe: Mapping[str, Any]) -> str:
    """The recipe as YAML text (keys in schema order)."""
    return yaml.safe_dump(dict(recipe), sort_keys=False, default_flow_style=None)
