"""Pictures drawn with matplotlib: a figure on the Agg canvas, saved atomically as PNG.

matplotlib is imported inside these functions (``ldt --help`` does not load it). Figures are made as
``matplotlib.figure.Figure`` on their own Agg canvas, never through pyplot: no global backend or figure
registry is touched, so the ``ldt infer`` writer thread and a training run draw independently.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowdose_toolkit.core.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
#: Style of every picture: plain text (no LaTeX), small fonts, white background.
STYLE: dict[str, Any] = {
    "text.usetex": False,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
}


@contextmanager
def styled() -> Iterator[None]:
    """Draw inside this block to get :data:`STYLE` (matplotlib reads it as each artist is made)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float) -> Figure:
    """An empty ``width`` x ``height`` inch figure on its own Agg canvas, constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plain(text: object) -> str:
    """``text`` as matplotlib prints it literally (a ``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (temporary file, fsync, rename); returns the path."""
    path = Path(path)
    with styled(), atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
    return path


def texts(figure: Figure) -> list[str]:
    """Every piece of text in ``figure`` (titles, labels, tick labels, legends), for tests and checks."""
    from matplotlib.text import Text

    return [t.get_text() for t in figure.findobj(Text) if t.get_text()]
