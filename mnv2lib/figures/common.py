"""Shared figure plumbing: style, creation, provenance note, saving with a sidecar."""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from ..utils import paths

PALETTE = {  # one colour per variant across every notebook (colour-blind safe, seaborn "colorblind")
    "baseline": "#0173b2", "mish": "#de8f05", "triplet": "#029e73", "cnsn": "#d55e00",
    "mish+triplet": "#cc78bc", "mish+cnsn": "#ca9161", "triplet+cnsn": "#fbafe4", "mish+triplet+cnsn": "#949494",
    "relu6": "#0173b2", "relu": "#56b4e9", "silu": "#029e73", "hardswish": "#cc78bc", "identity": "#000000",
    "gelu": "#949494",
}


@dataclass(frozen=True)
class FigureContext:
    """Where a figure's numbers came from; printed on the figure and stored beside it."""

    dataset: str
    profile: str
    seeds: tuple = ()

    def note(self) -> str:
        seeds = f"; seed{'s' if len(self.seeds) > 1 else ''} {', '.join(map(str, self.seeds))}" if self.seeds else ""
        return f"data: {self.dataset}; profile: {self.profile}{seeds}"


def apply_style() -> None:
    """Paper-friendly defaults (readable at column width), applied once per process."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    mpl.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
                         "axes.titleweight": "bold", "legend.frameon": False})


def new_figure(width: float = 6.4, height: float = 4.0, **kwargs) -> Figure:
    apply_style()
    return Figure(figsize=(width, height), layout="constrained", **kwargs)


def source_note(fig: Figure, context: FigureContext | None) -> Figure:
    """Name the dataset, profile and seeds in the figure's corner, so a lifted figure keeps its provenance."""
    if context is not None:
        engine = fig.get_layout_engine()
        if isinstance(engine, ConstrainedLayoutEngine):  # keep a strip free so the note never covers a label
            strip = 0.18 / fig.get_figheight()
            engine.set(rect=(0, strip, 1, 1 - strip))
        fig.text(0.995, 0.002, context.note(), ha="right", va="bottom", fontsize=7, color="0.35")
    return fig


def save_figure(fig: Figure, notebook: str, name: str, caption: str, context: FigureContext,
                formats: tuple = ("png", "pdf")) -> Path:
    """Write ``reports/figures/<notebook>/<name>.{png,pdf,json}``; returns the PNG path."""
    folder = paths.figure_dir(notebook)
    for fmt in formats:
        fig.savefig(folder / f"{name}.{fmt}")
    sidecar = {"notebook": notebook, "name": name, "caption": caption, **asdict(context),
               "seeds": list(context.seeds), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    (folder / f"{name}.json").write_text(json.dumps(sidecar, indent=1))
    return folder / f"{name}.png"


def figure_png(fig: Figure, dpi: float | None = None) -> bytes:
    """PNG bytes of ``fig`` (tight bounding box), at ``dpi`` (default: the figure's own)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi or fig.dpi, bbox_inches="tight")
    return buffer.getvalue()


def show_figure(fig: Figure) -> None:
    """Display a pyplot-free Figure in a notebook as an inline PNG.

    A bare ``Figure`` has no rich repr without pyplot's inline backend (it would print as
    ``<Figure size ...>`` in an executed notebook), so the PNG is displayed explicitly.
    Returns None so a trailing call doesn't display the figure a second time.
    """
    from IPython.display import Image, display

    display(Image(data=figure_png(fig, dpi=2 * fig.dpi), width=int(fig.get_figwidth() * fig.dpi)))
