"""ipywidgets views around the pure figure functions.

``figure_view(make_figure, controls)`` re-renders ``make_figure(**values)`` whenever a
control changes. Under papermill (``interactive=False``) it renders once with the
controls' initial values, so executed notebooks hold a plain image and no dead widget.
"""
from __future__ import annotations

from typing import Callable

from matplotlib.figure import Figure

from ..figures.common import show_figure


class FigureView:
    """Controls + an output area showing the figure of the current values."""

    def __init__(self, make_figure: Callable[..., Figure], controls: dict, interactive: bool = True,
                 title: str | None = None) -> None:
        import ipywidgets as widgets

        self.make_figure = make_figure
        self.controls = controls
        self.output = widgets.Output()
        self.renders = 0
        self.last_figure: Figure | None = None
        self.interactive = interactive
        header = [widgets.HTML(f"<b>{title}</b>")] if title else []
        self.widget = widgets.VBox(header + [widgets.HBox(list(controls.values())), self.output])
        if interactive:
            for control in controls.values():
                control.observe(self._on_change, names="value")

    def values(self) -> dict:
        return {name: control.value for name, control in self.controls.items()}

    def render(self) -> Figure:
        fig = self.make_figure(**self.values())
        self.last_figure = fig
        self.renders += 1
        self.output.clear_output(wait=True)
        with self.output:
            show_figure(fig)
        return fig

    def _on_change(self, change) -> None:
        self.render()

    def show(self) -> None:
        """Display: the live widget in JupyterLab, or a single static image when not interactive."""
        from IPython.display import display

        if not self.interactive:
            fig = self.make_figure(**self.values())
            self.last_figure = fig
            self.renders += 1
            show_figure(fig)
            return
        self.render()
        display(self.widget)


def figure_view(make_figure: Callable[..., Figure], controls: dict, interactive: bool = True,
                title: str | None = None) -> FigureView:
    return FigureView(make_figure, controls, interactive, title)
