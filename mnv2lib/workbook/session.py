"""The notebooks' one-line setup: ``nb = session.start("01_activation_study", profile, dataset, seed, interactive)``.

It sets the progress-bar mode, the plotting style, resolves the dataset once, and gives
each notebook ``nb.save(fig, name, caption)`` (writes the report figure and shows it) and
``nb.markdown(text)`` (renders prose computed from the run's numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..figures.common import FigureContext, apply_style, save_figure, show_figure
from ..runs.profiles import Profile, get_profile
from ..utils import paths


@dataclass
class Session:
    notebook: str
    profile: Profile
    dataset_name: str
    seed: int
    interactive: bool
    _dataset: object = field(default=None, repr=False)

    @property
    def dataset(self):
        """The profile's dataset (loaded on first use, shared by the notebook's cells)."""
        if self._dataset is None:
            from ..runs.runner import load_profile_dataset

            self._dataset = load_profile_dataset(self.profile, self.dataset_name, seed=0)
        return self._dataset

    def context(self, seeds: tuple | None = None, dataset: str | None = None,
                profile: str | None = None) -> FigureContext:
        """Provenance for a figure: ``dataset`` / ``profile`` override the session's (e.g. "none: analytic",
        or the several profiles of the budget ladder)."""
        described = dataset if dataset is not None else self.dataset.description
        return FigureContext(dataset=described, profile=profile or self.profile.name,
                             seeds=tuple(seeds if seeds is not None else (self.seed,)))

    def save(self, fig, name: str, caption: str, context: FigureContext | None = None):
        """Save a report figure (PNG + PDF + caption sidecar) and display it."""
        save_figure(fig, self.notebook, name, caption, context or self.context())
        show_figure(fig)

    def markdown(self, text: str):
        from IPython.display import Markdown, display

        display(Markdown(text))

    @property
    def figure_dir(self):
        return paths.figure_dir(self.notebook)


def start(notebook: str, profile: str = "quick", dataset: str = "auto", seed: int = 0,
            interactive: bool = True) -> Session:
    from ..utils.progress import progress_mode, set_progress_mode

    if not interactive and progress_mode() == "auto":
        set_progress_mode("text")  # no frozen widget text in executed notebooks
    apply_style()
    return Session(notebook=notebook, profile=get_profile(profile), dataset_name=dataset, seed=seed,
                   interactive=interactive)
