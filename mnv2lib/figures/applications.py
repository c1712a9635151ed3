"""Figures of notebook 08: the variants as detection and segmentation backbones."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.applications import HEAD_NAMES
from .common import PALETTE, FigureContext, new_figure, source_note

METRIC_LABELS = {"multiply_adds": "multiply-adds", "parameters": "parameters",
                 "largest_layer_MB": "largest layer working set", "latency_ms_eager": "latency, eager PyTorch",
                 "latency_ms_onnx": "latency, ONNX Runtime"}


def make_relative_cost_figure(relative: pd.DataFrame, metrics=("multiply_adds", "latency_ms_eager"),
                              context: FigureContext | None = None) -> Figure:
    """Each improvement's cost over the baseline's (percent change, 0 = the same), one bar group per head,
    one panel per metric, each bar labelled with its value."""
    unknown = [m for m in metrics if m not in METRIC_LABELS]
    if unknown:
        raise ValueError(f"metrics: got {unknown}; allowed values are {tuple(METRIC_LABELS)}")
    variants = [v for v in relative["variant"].unique() if v != "baseline"]
    groups = list(dict.fromkeys(zip(relative["head"], relative["resolution"])))
    fig = new_figure(3.4 * len(metrics), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(metrics), sharey=False))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(groups))
    for ax, metric in zip(axes, metrics):
        for i, variant in enumerate(variants):
            rows = relative[relative["variant"] == variant].set_index(["head", "resolution"])
            values = [100 * (rows[metric].get(g, np.nan) - 1) for g in groups]
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=variant,
                          color=PALETTE.get(variant, "0.5"))
            ax.bar_label(bars, [f"{v:+.0f}" if np.isfinite(v) else "" for v in values], fontsize=6, padding=1)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(x, [f"{HEAD_NAMES.get(h, h)}\n{r}x{r}" for h, r in groups], fontsize=7)
        ax.set_ylabel(f"{METRIC_LABELS[metric]}: % over the baseline")
        ax.set_title(METRIC_LABELS[metric], loc="left", fontsize=9)
    axes[0].legend(fontsize=7)
    return source_note(fig, context)
