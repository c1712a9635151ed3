"""Pure figure functions, ``make_*_figure(...) -> matplotlib.figure.Figure``, one module per notebook.

The same function feeds the static report cell and the ipywidgets view. Figures are
made with ``matplotlib.figure.Figure`` directly (not pyplot), so nothing global changes
and no figure leaks; ``save_figure`` writes PNG + PDF and a JSON sidecar with the caption,
dataset, profile and seeds, which the report index reads.
"""
from .common import FigureContext, apply_style, new_figure, save_figure, show_figure, source_note

__all__ = ["FigureContext", "apply_style", "new_figure", "save_figure", "show_figure", "source_note"]
