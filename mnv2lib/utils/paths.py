"""Every path of the project derives from here (cookiecutter-data-science style).

The data folder can be moved with the environment variable ``MNV2_DATA_DIR``
(CI points it at the shared, read-only CIFAR-10 copy). Everything the project
writes goes under ``reports/`` and ``data/cache/``; ``MNV2_REPORTS_DIR`` moves the
reports (the notebook tests use it so that smoke runs never overwrite real reports).
"""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV_VAR = "MNV2_DATA_DIR"
REPORTS_ENV_VAR = "MNV2_REPORTS_DIR"

DATA_DIR = PROJECT_ROOT / "data"          # project-local data and caches (ignored by git)
CACHE_DIR = DATA_DIR / "cache"            # decoded tensors, generated corruption sets
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
REPORTS_DIR = Path(os.environ.get(REPORTS_ENV_VAR) or PROJECT_ROOT / "reports").expanduser().resolve()
FIGURES_DIR = REPORTS_DIR / "figures"
RESULTS_DIR = REPORTS_DIR / "results"     # one JSON record per finished experiment run
RUNS_DIR = REPORTS_DIR / "runs"           # checkpoints of runs in progress
EXECUTED_NOTEBOOKS_DIR = REPORTS_DIR / "notebooks"
RECIPES_DIR = PROJECT_ROOT / "reports" / "recipes"  # the recipe search's records: tracked, so not moved by MNV2_REPORTS_DIR


def external_data_dir() -> Path | None:
    """The folder named by ``MNV2_DATA_DIR``, or None when the variable is unset or empty."""
    value = os.environ.get(DATA_ENV_VAR, "").strip()
    return Path(value).expanduser().resolve() if value else None


def data_search_dirs() -> list[Path]:
    """Where datasets are looked for, in order: ``$MNV2_DATA_DIR`` then ``data/``."""
    dirs = [d for d in (external_data_dir(), DATA_DIR) if d is not None]
    return list(dict.fromkeys(dirs))


def figure_dir(notebook: str) -> Path:
    """``reports/figures/<notebook>/``, created on demand."""
    path = FIGURES_DIR / notebook
    path.mkdir(parents=True, exist_ok=True)
    return path
