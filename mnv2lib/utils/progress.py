"""Progress bars that behave in a terminal, in JupyterLab and under papermill.

tqdm's notebook widget is right in a live JupyterLab session but freezes as dead
widget text in executed notebooks, so the report runner asks for plain text by
setting ``MNV2_PROGRESS=text`` (papermill kernels inherit the environment).
``MNV2_PROGRESS=off`` silences the bars.
"""
from __future__ import annotations

import os
from typing import Iterable

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm as auto_tqdm

ENV_VAR = "MNV2_PROGRESS"
MODES = ("auto", "text", "off")


def progress_mode() -> str:
    mode = os.environ.get(ENV_VAR, "auto")
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}: got {mode!r}; allowed values are {MODES}")
    return mode


def set_progress_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"progress mode: got {mode!r}; allowed values are {MODES}")
    os.environ[ENV_VAR] = mode


def progress(iterable: Iterable | None = None, enabled: bool = True, **kwargs):
    """``tqdm`` over ``iterable``: a widget in live notebooks, text elsewhere, nothing when off."""
    mode = progress_mode()
    if not enabled or mode == "off":
        return text_tqdm(iterable, disable=True, **kwargs)
    if mode == "text":
        kwargs.setdefault("mininterval", 10.0)
        kwargs.setdefault("ascii", True)
        return text_tqdm(iterable, **kwargs)
    return auto_tqdm(iterable, **kwargs)
