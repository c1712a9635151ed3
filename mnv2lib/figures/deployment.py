"""Figures of the deployment study (notebook 07)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.deployment import DISPLAY, TARGET_LABELS
from ..engine.deploy import TARGETS
from .common import FigureContext, new_figure, source_note

RUNTIME_COLOURS = {"onnxruntime": "#0173b2", "executorch": "#de8f05", "pytorch": "#949494"}
TARGET_COLOURS = {("pytorch", "fp32"): "#949494", ("onnxruntime", "fp32"): "#0173b2",
                  ("onnxruntime", "int8"): "#56b4e9", ("executorch", "fp32"): "#de8f05",
                  ("executorch", "int8"): "#f5c77e"}


def make_int8_drop_figure(drops: pd.DataFrame, variants: list[str], title: str,
                          context: FigureContext | None = None) -> Figure:
    """Per variant, int8 minus fp32 accuracy (points) in each runtime; clean and mean corruption panels.
    A variant without an int8 model in a runtime has no bar there (the failures table says why)."""
    metrics = [("clean_accuracy", "clean"), ("mean_corruption_accuracy", "mean corruption")]
    fig = new_figure(4.2 * len(metrics), 3.6)
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    runtimes = [r for r in ("onnxruntime", "executorch") if r in set(drops.get("runtime", []))]
    x = np.arange(len(variants))
    width = 0.8 / max(len(runtimes), 1)
    for ax, (metric, label) in zip(axes, metrics):
        for i, runtime in enumerate(runtimes):
            rows = drops[drops["runtime"] == runtime].set_index("variant")
            values = [rows.at[v, f"{metric}_drop_points"] if v in rows.index else np.nan for v in variants]
            ax.bar(x + (i - (len(runtimes) - 1) / 2) * width, values, width, color=RUNTIME_COLOURS[runtime],
                   label="ONNX Runtime" if runtime == "onnxruntime" else "ExecuTorch (XNNPACK)")
            for xi, v in zip(x, values):
                if np.isnan(v):
                    ax.text(xi + (i - (len(runtimes) - 1) / 2) * width, 0, "none", rotation=90, ha="center",
                            va="bottom", fontsize=7, color="0.4")
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(x, [DISPLAY.get(v, v) for v in variants], rotation=25, ha="right")
        ax.set_title(f"{label} accuracy")
        ax.set_ylabel("int8 - fp32 (percentage points)")
    if runtimes:
        axes[0].legend(loc="best", fontsize=8)
    fig.suptitle(title)
    return source_note(fig, context)


def make_latency_figure(results: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Batch-1 latency (log scale) per variant and (runtime, precision); a missing bar is a failed target."""
    variants = list(dict.fromkeys(results["variant"]))
    targets = [t for t in TARGETS if ((results["runtime"] == t[0]) & (results["precision"] == t[1])).any()]
    fig = new_figure(max(6.4, 1.1 * len(variants) + 2), 4.0)
    ax = fig.subplots()
    x = np.arange(len(variants))
    width = 0.8 / max(len(targets), 1)
    for i, target in enumerate(targets):
        rows = results[(results["runtime"] == target[0]) & (results["precision"] == target[1])].set_index("variant")
        values = [rows.at[v, "latency_ms_batch1"] if v in rows.index else np.nan for v in variants]
        ax.bar(x + (i - (len(targets) - 1) / 2) * width, values, width, color=TARGET_COLOURS[target],
               label=TARGET_LABELS[target])
    ax.set_yscale("log")
    ax.set_xticks(x, [DISPLAY.get(v, v) for v in variants], rotation=25, ha="right")
    ax.set_ylabel("latency at batch 1 (ms, median)")
    ax.legend(fontsize=8, ncols=2)
    ax.set_title("Inference latency per runtime")
    return source_note(fig, context)
