"""The ``tensorboard`` logger: TensorBoard event files (``pip install 'lowdose-toolkit[tensorboard]'``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowdose_toolkit import hookimpl
from lowdose_toolkit.errors import UserError
from lowdose_toolkit.hookspecs import Register
from lowdose_toolkit.loggers import Logger, scalars


def _png(path: Path) -> Any:
    """A PNG file as an ``[H, W, 3]`` float array in [0, 1]."""
    from matplotlib.image import imread

    image = imread(path)
    return image[..., :3] if image.ndim == 3 else image[..., None].repeat(3, axis=-1)


class TensorBoardLogger(Logger):
    """TensorBoard events in RUN_DIR/tensorboard: loss terms, val/input metrics per DRF, lrs, dose head, MIPs.

    Each epoch is one step: every name of :func:`lowdose_toolkit.loggers.scalars` as a scalar, and the
    epoch's preview MIPs as an image (``images: false`` leaves them out). A resume purges the steps from
    the checkpoint's epoch on (TensorBoard's ``purge_step``) and logs that epoch again, so what a kill
    cut short is not shown twice. Watch with ``tensorboard --logdir RUN_DIR/tensorboard``.

    Args:
        log_dir: Folder of the event files, relative to the run directory.
        images: Log the preview MIPs as images.
        flush_secs: Seconds between flushes of the event file (each epoch is flushed as it ends).
    """

    def __init__(self, run_dir: Path, recipe: Mapping[str, Any] | None = None, log_dir: str = "tensorboard",
                 images: bool = True, flush_secs: int = 30) -> None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UserError("the tensorboard package is not installed: pip install 'lowdose-toolkit[tensorboard]'") \
                from None
        self.run_dir, self.recipe = Path(run_dir), recipe
        self.dir = self.run_dir / log_dir
        self.images, self.flush_secs = images, flush_secs
        self.writer: Any = None

    def start(self, epoch: int, history: Sequence[Mapping[str, Any]]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.dir), purge_step=epoch, flush_secs=self.flush_secs)
        if epoch == 0 and self.recipe is not None:
            from lowdose_toolkit.core.recipe import dump_recipe

            text = "    " + dump_recipe(self.recipe).replace("\n", "\n    ")  # Markdown code block
            self.writer.add_text("recipe", text, 0)
        elif history and history[-1].get("epoch") == epoch:
            preview = self.run_dir / "previews" / f"epoch_{epoch:03d}.png"
            self.log_epoch(history[-1], {"preview": preview} if preview.is_file() else {})
        self.writer.flush()

    def log_epoch(self, record: Mapping[str, Any], pictures: Mapping[str, Path]) -> None:
        step = int(record["epoch"])
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if self.images:
            for name, path in pictures.items():
                if name != "curves":  # TensorBoard draws its own curves
                    self.writer.add_image(name, _png(Path(path)), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@hookimpl
def ldt_register_loggers(register: Register) -> None:
    register("tensorboard", TensorBoardLogger)
