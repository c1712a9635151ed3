"""Figures of notebook 05: the MobileNet families side by side."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .common import FigureContext, new_figure, source_note

FAMILY_COLOURS = {"MobileNetV1": "#56b4e9", "MobileNetV2": "#0173b2", "MobileNetV4": "#029e73"}


def _family_colour(name: str) -> str:
    for family, colour in FAMILY_COLOURS.items():
        if name.startswith(family):
            return colour if "+" not in name else "#d55e00"
    return "#333333"


def make_cost_tradeoff_figure(costs: pd.DataFrame, y: str = "latency_ms", context: FigureContext | None = None) -> Figure:
    """Multiply-adds (log) against a second cost, one labelled point per model."""
    labels = {"latency_ms": "CPU latency, batch 1 (ms)", "parameters": "parameters (M)"}
    if y not in labels:
        raise ValueError(f"y: got {y!r}; allowed values are {tuple(labels)}")
    fig = new_figure(6.0, 4.2)
    ax = fig.subplots()
    scale = 1e-6 if y == "parameters" else 1.0
    for _, row in costs.iterrows():
        ax.scatter(row["multiply_adds"] / 1e6, row[y] * scale, s=50, color=_family_colour(row["model"]),
                   edgecolor="black", zorder=3)
        ax.annotate(row["model"], (row["multiply_adds"] / 1e6, row[y] * scale), textcoords="offset points",
                    xytext=(5, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"multiply-adds per image at {int(costs['resolution'].iloc[0])}x{int(costs['resolution'].iloc[0])} (M)")
    ax.set_ylabel(labels[y])
    ax.set_title("cost of the MobileNet families", loc="left")
    return source_note(fig, context)


def make_memory_figure(memory: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Largest materialized tensor per resolution (KB, 16-bit), one bar group per resolution."""
    table = memory.drop(index="max", errors="ignore")
    fig = new_figure(6.4, 3.8)
    ax = fig.subplots()
    width = 0.8 / len(table.columns)
    x = np.arange(len(table.index))
    for i, name in enumerate(table.columns):
        ax.bar(x + i * width - 0.4 + width / 2, table[name], width, label=name, color=_family_colour(name))
    ax.set_yscale("log")
    ax.set_xlim(-0.5, len(x) - 0.5)  # bars of missing values do not widen the limits by themselves
    bottom = ax.get_ylim()[0]
    for i, name in enumerate(table.columns):  # a model with no tensor at that resolution: say so
        for j in np.flatnonzero(table[name].isna().to_numpy()):
            ax.text(x[j] + i * width - 0.4 + width / 2, bottom * 1.15, "none", rotation=90, ha="center",
                    va="bottom", fontsize=7, color=_family_colour(name))
    ax.set_xticks(x, [f"{r}x{r}" for r in table.index])
    ax.set_xlabel("spatial resolution of the tensor")
    ax.set_ylabel("largest materialized tensor (KB, fp16)")
    ax.legend(fontsize=8)
    ax.set_title("memory to materialize (MobileNetV2 paper, Table 3)", loc="left")
    return source_note(fig, context)


def make_family_accuracy_figure(results: pd.DataFrame, x: str = "multiply_adds",
                                context: FigureContext | None = None) -> Figure:
    """Accuracy of the trained family members (mean over seeds, whiskers = seed range) against a cost."""
    labels = {"multiply_adds": ("multiply-adds per image (M)", 1e-6), "parameters": ("parameters (M)", 1e-6),
              "train_seconds": ("training time (s)", 1.0), "latency_ms_batch1": ("latency, batch 1 (ms)", 1.0)}
    if x not in labels:
        raise ValueError(f"x: got {x!r}; allowed values are {tuple(labels)}")
    text, scale = labels[x]
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    for name, group in results.groupby("model"):
        acc = 100 * group["clean_accuracy"]
        cx = group[x].mean() * scale
        ax.errorbar(cx, acc.mean(), yerr=[[acc.mean() - acc.min()], [acc.max() - acc.mean()]], fmt="o",
                    color=_family_colour(name), mec="black", capsize=3)
        ax.annotate(name, (cx, acc.mean()), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xlabel(text)
    ax.set_ylabel("clean test accuracy (%)")
    ax.set_title("accuracy within the profile's budget", loc="left")
    return source_note(fig, context)
