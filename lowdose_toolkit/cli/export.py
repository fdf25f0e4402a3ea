"""``ldt export``: a checkpoint's network as an ONNX or TorchScript file with its metadata."""

from __future__ import annotations

from pathlib import Path

import typer


def export_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint (.pt) or run directory."),
    out: Path = typer.Option(..., "--out", help="File to write: .onnx (ONNX), .pt or .ts (TorchScript)."),
    fmt: str | None = typer.Option(None, "--format", help="onnx | torchscript (default: from --out's suffix)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
) -> None:
    """Export the synthesis network (and dose head) to run in ONNX Runtime, MONAI Deploy or a viewer."""
    from rich.console import Console

    from lowdose_toolkit.infer.export import export_model

    meta, worst = export_model(checkpoint, out, fmt, overwrite)
    head = ""
    if meta["dose_head"]:
        head = f", dose head {meta['dose_head']}" + (" (conditions it)" if meta["guided"] else "")
    Console(stderr=True, soft_wrap=True).print(
        f"wrote {out} ({meta['exported_as']}, {meta['precision']}): {meta['recipe_name']}{head}, DRFs {meta['drfs']}, "
        f"normalisation {meta['normalization']['method']}; matches the checkpoint at windows "
        f"{', '.join('x'.join(map(str, s[2:])) for s in meta['checked_windows'])} (max difference {worst:.1e})")
