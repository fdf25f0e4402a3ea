"""The comparison study: every method and ablation trained under one fixed budget, on the same data
and seed, evaluated on the same held-out subjects, written as the paper's Table I and Table II.

A study file (YAML) names the methods (a recipe each, plus overrides) and the overrides shared by all
(the budget: data, epochs, steps). ``ldt study recipes/study_cpu.yaml`` trains what is not trained yet
(a finished method is reused, an interrupted one resumed, each only when the recipe recorded in its run
directory is the one the study file gives it now), evaluates, adds the classical references
(Gaussian filter with σ tuned per DRF on the validation split; BM4D when installed), and writes::

    OUT/<method>/...            one run directory per method (checkpoints, metrics, results.csv)
    OUT/classical/results.*     the classical references' per-case rows (lowdose_toolkit.evaluation.results)
    OUT/table_i.{md,csv,png}    Table I: methods x DRF, the paper's figures beside ours (png: as a chart)
    OUT/table_ii.{md,csv,png}   Table II: ablations at DRF 100
    OUT/results.csv             method, drf, psnr, ssim, nrmse (means over test subjects)
    OUT/figure2.png             MIPs of one test subject at DRF 100 for every method (paper Fig. 2)
    OUT/table_iii.md, table_iv.md, uptake.png   lesion and organ uptake against the full dose (where scored)

With ``--docs DIR`` the tables, CSV and figure are also written to ``DIR/RESULTS.md``,
``DIR/results.csv``, ``DIR/figure2.png`` (and ``DIR/uptake.png``); a "Reading" section already in RESULTS.md is
kept.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lowdose_toolkit.core.atomic import TEXT, atomic_path
from lowdose_toolkit.errors import RecipeError, UserError

STUDY_KEYS = {"name", "description", "seed", "set", "methods", "classical", "figure_drf", "bm4d_drfs", "checkpoint"}
METHOD_KEYS = {"method", "recipe", "set"}
READING_MARK = "<!-- reading: kept when the study rewrites this file -->"


def slug(label: str) -> str:
    """A folder name for a method label (``3D-UNet`` -> ``3d-unet``, ``Baseline+CG`` -> ``baseline-cg``)."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def load_study(path: Path) -> dict[str, Any]:
    """Read and check a study file."""
    from lowdose_toolkit.core.recipe import _read_yaml

    study = _read_yaml(path)
    unknown = set(study) - STUDY_KEYS
    if unknown:
        raise RecipeError(f"{path}: {sorted(unknown)[0]}: unknown key; study keys: {', '.join(sorted(STUDY_KEYS))}")
    methods = study.get("methods")
    if not isinstance(methods, list) or not methods:
        raise RecipeError(f"{path}: methods: a list of {{method: label, recipe: file, set: [...]}} is required")
    for i, m in enumerate(methods):
        if not isinstance(m, dict) or set(m) - METHOD_KEYS or "method" not in m or "recipe" not in m:
            raise RecipeError(f"{path}: methods.{i}: expected {{method: label, recipe: file, set: [...]}}, got {m!r}")
        recipe = (path.parent / m["recipe"]).resolve()
        if not recipe.is_file():
            raise RecipeError(f"{path}: methods.{i}.recipe: {m['recipe']!r} not found (looked for {recipe})")
        m["recipe_path"] = recipe
    labels = [m["method"] for m in methods]
    if len(set(labels)) != len(labels):
        raise RecipeError(f"{path}: methods: labels must be unique, got {labels}")
    study.setdefault("seed", 0)
    study.setdefault("set", [])
    study.setdefault("classical", ["gaussian"])
    study.setdefault("figure_drf", 100)
    study.setdefault("bm4d_drfs", [100])
    study.setdefault("checkpoint", "best")
    if study["checkpoint"] not in ("best", "last"):
        raise RecipeError(f"{path}: checkpoint: {study['checkpoint']!r} is unknown; use best (the monitored "
                          "validation metric's best epoch) or last")
    study["path"] = path
    return study


def _recipe_for(study: Mapping[str, Any], method: Mapping[str, Any]) -> dict[str, Any]:
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.core.recipe import load_recipe, resolve_recipe

    overrides = [*study["set"], *method.get("set", []), f"name={slug(method['method'])}", f"seed={study['seed']}"]
    return resolve_recipe(load_recipe(method["recipe_path"], overrides), get_registry(), str(method["recipe_path"]))


def check_run_matches(run_dir: Path, recipe: Mapping[str, Any], label: str, study_path: Path) -> None:
    """Refuse to reuse or resume ``run_dir`` when its recorded recipe is not the method's recipe now."""
    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.train.rundir import first_difference, recorded_recipe

    recorded = recorded_recipe(run_dir, get_registry())
    difference = None if recorded is None else first_difference(recorded, recipe)
    if difference is not None:
        key, was, now = difference
        raise UserError(f"{run_dir}: trained with another recipe than {study_path} now gives {label!r}: {key} is "
                        f"{was!r} there and {now!r} in the study; remove {run_dir} to train it again, or restore "
                        "the study file")


def run_study(path: Path, out: Path, docs: Path | None = None, only: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train (or reuse) every method, evaluate, and write the tables; returns the summary rows."""
    from rich.console import Console

    from lowdose_toolkit.core.plugin_manager import get_registry
    from lowdose_toolkit.evaluation.paper_tables import (
        build_table_i,
        build_table_ii,
        print_table,
        write_table,
        write_table_chart,
    )
    from lowdose_toolkit.evaluation.results import load_results
    from lowdose_toolkit.evaluation.runeval import evaluate_run
    from lowdose_toolkit.evaluation.summary import aggregate
    from lowdose_toolkit.train.engine import Trainer

    console = Console(stderr=True)
    study = load_study(Path(path))
    out.mkdir(parents=True, exist_ok=True)
    recipes = {m["method"]: _recipe_for(study, m) for m in study["methods"]}  # all validated before training
    for method in study["methods"]:  # and every run to reuse or resume checked against them
        if not only or method["method"] in only:
            check_run_matches(out / slug(method["method"]), recipes[method["method"]], method["method"],
                              study["path"])
    timings: dict[str, float] = {}
    run_dirs: dict[str, Path] = {}
    for method in study["methods"]:
        label = method["method"]
        run_dir = out / slug(label)
        run_dirs[label] = run_dir
        if only and label not in only:
            continue
        if (run_dir / "results.csv").is_file():
            console.print(f"[dim]{label}: done earlier, reusing {run_dir}[/]")
            continue
        resume = (run_dir / "recipe.yaml").is_file()  # stopped at any point: resumed (from the start if need be)
        console.rule(f"{label} ({method['recipe']})")
        t0 = time.monotonic()
        trainer = Trainer(recipes[label], run_dir, get_registry(), resume=resume, console=console)
        trainer.fit()
        timings[label] = time.monotonic() - t0
        evaluate_run(run_dir, method=label, checkpoint=study["checkpoint"], console=console)
    first = recipes[study["methods"][0]["method"]]
    classical_dir = out / "classical"
    if study["classical"] and not (classical_dir / "results.csv").is_file():
        evaluate_classical(first, run_dirs[study["methods"][0]["method"]], study, classical_dir, console)
    inputs = [d for d in run_dirs.values() if (d / "results.csv").is_file()]
    if (classical_dir / "results.csv").is_file():
        inputs.append(classical_dir)
    rows = load_results(inputs)
    summary = aggregate(rows)
    table_i, table_ii = build_table_i(rows), build_table_ii(rows)
    for table, stem in ((table_i, "table_i"), (table_ii, "table_ii")):
        write_table(table, out / stem)
        write_table_chart(table, out / stem)
    print_table(table_i)
    print_table(table_ii)
    from lowdose_toolkit.evaluation.lesions import (
        UPTAKE_PNG,
        markdown,
        organ_markdown,
        uptake_tables,
        write_uptake_chart,
    )

    by_lesion, by_organ = uptake_tables(inputs)
    lesions = markdown(by_lesion) if by_lesion else ""
    organs = organ_markdown(by_organ) if by_organ else ""
    for text, name in ((lesions, "table_iii.md"), (organs, "table_iv.md")):
        if text:
            with atomic_path(out / name) as tmp:
                tmp.write_text(text, **TEXT)
    write_uptake_chart(by_lesion, by_organ, out / UPTAKE_PNG)  # Tables III and IV as a chart
    _write_summary_csv(summary, out / "results.csv")
    figure = out / "figure2.png"
    make_figure(study, recipes, run_dirs, figure, console)
    record = {"study": str(path), "machine": platform.platform(), "python": platform.python_version(),
              "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "seconds_per_method": timings, "shared_overrides": study["set"]}
    prior = out / "study.json"
    if prior.is_file():
        old = json.loads(prior.read_text())
        record["seconds_per_method"] = {**old.get("seconds_per_method", {}), **timings}
    with atomic_path(prior) as tmp:
        tmp.write_text(json.dumps(record, indent=2), **TEXT)
    if docs is not None:
        write_docs(study, record, table_i, table_ii, summary, figure, docs, lesions, organs)
    return summary


def _write_summary_csv(summary: Sequence[Mapping[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "drf", "psnr", "ssim", "nrmse"])
    for s in summary:
        writer.writerow([s["method"], s["drf"], f"{s['psnr_mean']:.4f}", f"{s['ssim_mean']:.5f}",
                         f"{100 * s['nrmse_mean']:.4f}"])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue(), **TEXT)


def _test_dataset(recipe: Mapping[str, Any], run_dir: Path, split: str = "test") -> Any:
    from lowdose_toolkit.core.checkpoint import load_checkpoint
    from lowdose_toolkit.evaluation.subjects import subject_pairs

    return subject_pairs(recipe, load_checkpoint(run_dir / "checkpoints" / "last.pt").split[split])


def evaluate_classical(recipe: Mapping[str, Any], run_dir: Path, study: Mapping[str, Any], out: Path,
                       console: Any) -> None:
    """Gaussian (σ tuned per DRF on the validation split) and BM4D rows on the test split."""
    from rich.progress import Progress

    from lowdose_toolkit.evaluation.classical import bm4d_denoise, gaussian, tune_gaussian_sigma
    from lowdose_toolkit.evaluation.lesions import LesionMasks, auto_masks, region_facts, write_region_files
    from lowdose_toolkit.evaluation.metrics import compute_all
    from lowdose_toolkit.evaluation.results import write_results
    from lowdose_toolkit.evaluation.runeval import LOW_DOSE, lesion_cases_of
    from lowdose_toolkit.evaluation.summary import aggregate

    val = _test_dataset(recipe, run_dir, "val")
    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in range(len(val)):
        s = val[i]
        pairs.setdefault(int(s["drf"]), []).append((s["low"].data, s["full"].data))
    sigmas = tune_gaussian_sigma(pairs)
    test = _test_dataset(recipe, run_dir, "test")
    rows: list[dict[str, Any]] = []
    use_bm4d = "bm4d" in study["classical"]
    if use_bm4d:
        try:
            import bm4d  # noqa: F401
        except ImportError:
            console.print("[yellow]BM4D skipped: pip install 'lowdose-toolkit[bm4d]' to include it[/]")
            use_bm4d = False
    ssim_range = recipe["eval"]["ssim_range"]
    lesions = auto_masks(recipe)
    masks = None if lesions is None else LesionMasks(lesions)
    lesion_cases: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("classical references", total=len(test))
        for i in range(len(test)):
            s = test[i]
            low, full, drf = s["low"].data.float(), s["full"].data.float(), int(s["drf"])
            outputs = [(LOW_DOSE, low), ("Gaussian", gaussian(low, sigmas[drf]))]
            if use_bm4d and drf in study["bm4d_drfs"]:
                outputs.append(("BM4D", bm4d_denoise(low)))
            for name, image in outputs:
                m = compute_all(full[0], image[0], ssim_range=ssim_range)
                rows.append({"method": name, "subject": s["subject_id"], "drf": drf, "psnr": m["psnr"],
                             "ssim": m["ssim"], "nrmse": m["nrmse"], "ssim_range": ssim_range, "masked": False})
            if masks is not None:
                lesion_cases += lesion_cases_of(masks, s, dict(outputs))
            progress.advance(task)
    settings = {"ssim_range": ssim_range, "mask": False}
    facts: dict[str, Any] = {"gaussian_sigma_vox": sigmas}
    if masks is not None:
        facts.update(region_facts(lesions, lesion_cases))
        write_region_files(lesion_cases, facts, out)
    write_results(out, "classical", rows, aggregate(rows), settings, **facts)


def make_figure(study: Mapping[str, Any], recipes: Mapping[str, Any], run_dirs: Mapping[str, Path], path: Path,
                console: Any) -> None:
    """Coronal MIPs of the first test subject at ``figure_drf`` for every trained method (paper Fig. 2): each
    method's PSNR/SSIM against the full dose, a difference row and a zoomed inset."""
    from lowdose_toolkit.infer.predictor import Predictor
    from lowdose_toolkit.infer.preview import save_mips_png, subject_units, volume_panels

    drf = study["figure_drf"]
    name = f"{study['checkpoint']}.pt"
    done = [m for m in study["methods"] if (run_dirs[m["method"]] / "checkpoints" / name).is_file()]
    if not done:
        return
    first = done[0]["method"]
    dataset = _test_dataset(recipes[first], run_dirs[first])
    index = next((i for i in range(len(dataset)) if int(dataset[i]["drf"]) == drf), None)
    if index is None:
        console.print(f"[yellow]figure skipped: no test volume at DRF {drf}[/]")
        return
    subject = dataset[index]
    low, full = subject["low"].data.float(), subject["full"].data.float()
    panels = [("low-dose", low[0])]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for m in done:
        predictor, _ = Predictor.from_checkpoint(run_dirs[m["method"]] / "checkpoints" / name, device, "fp32")
        pred, _ = predictor.predict(low, spacing=subject["low"].spacing)
        panels.append((m["method"], pred[0]))
    panels.append(("full-dose", full[0]))
    factor, units = subject_units(subject)
    figure_panels = volume_panels(panels, reference=len(panels) - 1, factor=factor,
                                  ssim_range=recipes[first]["eval"]["ssim_range"])
    save_mips_png(figure_panels, path, units=units, reference=len(panels) - 1, difference_label="method − full dose",
                  title=f"{subject['subject_id']} · DRF {drf} · each method's {name}")


def write_docs(study: Mapping[str, Any], record: Mapping[str, Any], table_i: Any, table_ii: Any,
               summary: Sequence[Mapping[str, Any]], figure: Path, docs: Path, lesions: str = "",
               organs: str = "") -> None:
    """RESULTS.md (generated tables + the kept reading), results.csv, figure2.png and uptake.png in ``docs``."""
    import shutil

    from lowdose_toolkit.evaluation.lesions import UPTAKE_PNG
    from lowdose_toolkit.evaluation.paper_tables import table_markdown

    docs.mkdir(parents=True, exist_ok=True)
    results = docs / "RESULTS.md"
    reading = ""
    if results.is_file() and READING_MARK in results.read_text():
        reading = results.read_text().split(READING_MARK, 1)[1]
    machine = record["gpu"] or f"CPU, {record['cpu_threads']} threads"
    study_arg = f"recipes/{Path(study['path']).name}"
    text = [
        "# Results: CG-3DSRGAN, its ablations and the baselines on the embedded phantom",
        "",
        f"Made by `ldt study {study_arg} --docs docs` on {record['machine']} ({machine}), torch {record['torch']}.",
        "Every method was trained under the same budget (shared overrides: "
        + ", ".join(f"`{s}`" for s in study["set"]) + f"), seed {study['seed']}, on the same phantom subjects, "
        "and evaluated on the same held-out test subjects with the challenge's metrics. The paper's figures "
        "(real uEXPLORER data, 100 epochs on a GPU) stand beside ours for orientation, not as a target.",
        "",
        table_markdown(table_i),
        table_markdown(table_ii),
        *(["### Table III (ours): lesion uptake against the full dose", "",
            "Each test lesion's mean and maximum activity in the method's output against the full dose's, in "
            "percent (mean ± std over lesions, and the mean of their absolute values; "
            "lowdose_toolkit/evaluation/lesions.py). The paper reports no lesion measure.", "", lesions]
           if lesions else []),
        *(["### Table IV (ours): organ uptake against the full dose", "",
            "Each organ's mean activity in the method's output against the full dose's, in percent (mean ± std over "
            "the test subjects; the challenge scores the liver, heart and kidneys, PERCIST refers to the liver and "
            "blood pool; lowdose_toolkit/evaluation/lesions.py). The paper reports no organ measure.", "", organs]
           if organs else []),
        *([f"![Lesion and organ uptake against the full dose]({UPTAKE_PNG})", ""] if lesions or organs else []),
        "![Coronal MIPs at DRF 100](figure2.png)",
        "",
        "Per-method training time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in record["seconds_per_method"].items()),
        "",
        READING_MARK,
    ]
    with atomic_path(results) as tmp:
        tmp.write_text("\n".join(text) + (reading or "\n\n## Reading\n\n(to be written after the run)\n"), **TEXT)
    _write_summary_csv(summary, docs / "results.csv")
    for picture in (figure, figure.with_name(UPTAKE_PNG)):
        if picture.is_file():
            with atomic_path(docs / picture.name) as tmp:
                shutil.copyfile(picture, tmp)
