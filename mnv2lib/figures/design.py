"""Figures of MobileNetV2's design study (notebook 06): the paper's Figure 6 on the workbook's
data, accuracy against cost for the expansion and width sweeps, and the width x resolution
cost grid."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ..analysis.ablation import METRICS
from ..analysis.design import FIGURE6, KNOBS, pareto_front
from .ablation import COST_LABELS
from .common import PALETTE, FigureContext, new_figure, source_note

DESIGN_COLOURS = {"baseline": PALETTE["baseline"], "bottleneck=relu6": "#de8f05",
                  "shortcut=expansion": "#029e73", "shortcut=none": "#d55e00"}
KNOB_STYLE = {"expand_ratio": ("#cc78bc", "o"), "width_mult": ("#ca9161", "s")}
CURVE_METRICS = {"test_accuracy": ("test accuracy (%)", 100.0), "train_accuracy": ("training accuracy (%)", 100.0),
                 "test_loss": ("test loss (cross-entropy)", 1.0), "train_loss": ("training loss", 1.0)}
PANEL_TITLES = {"bottleneck": "(a) non-linearity in the bottleneck", "shortcut": "(b) where the shortcut goes"}


def _noted(fig: Figure, context: FigureContext | None, bottom: float = 0.05) -> Figure:
    """The provenance note, with room kept for it below the axes."""
    if context is not None:
        fig.get_layout_engine().set(rect=(0, bottom, 1, 1 - bottom / 4))
    return source_note(fig, context)


def _check(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed values are {tuple(allowed)}")


def make_figure6_curves_figure(histories: pd.DataFrame, y: str = "test_accuracy",
                               context: FigureContext | None = None) -> Figure:
    """The paper's Figure 6 on this data: a metric per epoch for (a) linear vs ReLU6 bottleneck and
    (b) the three shortcut placements; lines are means over seeds, bands the range over seeds."""
    _check("y", y, CURVE_METRICS)
    y_label, scale = CURVE_METRICS[y]
    fig = new_figure(10.0, 3.9)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (panel, names) in zip(axes, FIGURE6.items()):
        for label, name in names.items():
            h = histories[histories["label"] == label]
            if h.empty:
                continue
            g = h.groupby("epoch")[y]
            mean, low, high = scale * g.mean(), scale * g.min(), scale * g.max()
            seeds = h["seed"].nunique()
            colour = DESIGN_COLOURS[label]
            ax.plot(mean.index, mean, color=colour, lw=1.8, marker="o", ms=3,
                    label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
            if seeds > 1:
                ax.fill_between(mean.index, low, high, color=colour, alpha=0.15, lw=0)
        ax.set_title(PANEL_TITLES[panel], loc="left")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8, loc="lower right" if "accuracy" in y else "upper right")
    axes[0].set_ylabel(y_label)
    return _noted(fig, context)


def make_figure6_accuracy_figure(runs: pd.DataFrame, summary: pd.DataFrame, metric: str = "clean_accuracy",
                                 context: FigureContext | None = None) -> Figure:
    """Final accuracy per variant of each Figure 6 panel: seeds as dots, the mean as a bar and its
    95% confidence interval as whiskers."""
    _check("metric", metric, METRICS)
    s = summary.set_index("label")
    fig = new_figure(6.4, 4.6)
    axes = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2, 3]})
    values = 100 * runs[metric].dropna()
    for ax, (panel, names) in zip(axes, FIGURE6.items()):
        labels = [l for l in names if l in s.index and f"{metric}_mean" in s]
        for i, label in enumerate(labels):
            colour, mean = DESIGN_COLOURS[label], 100 * s.loc[label, f"{metric}_mean"]
            ax.barh(i, mean, color=colour, alpha=0.35, height=0.6)
            lo, hi = s.loc[label, f"{metric}_ci_low"], s.loc[label, f"{metric}_ci_high"]
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.errorbar(mean, i, xerr=[[mean - 100 * lo], [100 * hi - mean]], fmt="none", ecolor="black",
                            capsize=3, lw=1)
            seeds = 100 * runs.loc[runs["label"] == label, metric].dropna()
            ax.scatter(seeds, np.full(len(seeds), i), color=colour, edgecolor="black", s=24, zorder=3)
        ax.set_yticks(range(len(labels)), [names[l] for l in labels])
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_title(PANEL_TITLES[panel], loc="left")
    axes[-1].set_xlabel(f"final {METRICS[metric]} (%): dots are seeds, whiskers the 95% CI of the mean")
    if len(values):
        span = max(1.0, values.max() - values.min())
        axes[0].set_xlim(max(0.0, values.min() - 0.6 * span), min(100.0, values.max() + 0.3 * span))
    return _noted(fig, context, 0.04)


def make_tradeoff_figure(table: pd.DataFrame, cost: str = "multiply_adds", metric: str = "clean_accuracy",
                         context: FigureContext | None = None) -> Figure:
    """Accuracy against a cost for the expansion-ratio and width sweeps (one line per knob, points
    sorted by cost, 95% CI whiskers where there are several seeds); the dashed line is the Pareto front."""
    _check("cost", cost, COST_LABELS)
    _check("metric", metric, METRICS)
    label_text, scale = COST_LABELS[cost]
    fig = new_figure(6.4, 4.4)
    ax = fig.subplots()
    col = f"{metric}_mean"
    for knob, group in table.groupby("knob", sort=False):
        colour, marker = KNOB_STYLE[knob]
        g = group.sort_values(cost)
        x, y = scale * g[cost], 100 * g[col]
        ax.plot(x, y, color=colour, marker=marker, ms=7, mec="black", lw=1.4, label=KNOBS[knob])
        lo, hi = g.get(f"{metric}_ci_low"), g.get(f"{metric}_ci_high")
        if lo is not None and lo.notna().any():
            ok = lo.notna().to_numpy()
            ax.errorbar(x[ok], y[ok], yerr=[(y - 100 * lo)[ok], (100 * hi - y)[ok]], fmt="none", ecolor=colour,
                        capsize=3)
        for (_, row), xi, yi in zip(g.iterrows(), x, y):
            if row["label"] != "baseline":  # the star marks it
                ax.annotate(row["label"], (xi, yi), textcoords="offset points",
                            xytext=(5, -11 if knob == "width_mult" else 5), fontsize=8)
    points = table.drop_duplicates("label")
    if len(points) > 1 and points[cost].notna().all():
        front = points[pareto_front(points, cost, col)].sort_values(cost)
        ax.step(scale * front[cost], 100 * front[col], where="post", color="0.4", ls="--", lw=1,
                label="Pareto front")
    base = table[table["label"] == "baseline"]
    if not base.empty:
        ax.plot(scale * base[cost].iloc[0], 100 * base[col].iloc[0], "*", color=DESIGN_COLOURS["baseline"],
                ms=15, mec="black", label="MobileNetV2 as published (table t, profile width)", zorder=4)
    ax.set_xlabel(label_text)
    ax.set_ylabel(f"{METRICS[metric]} (%)")
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{METRICS[metric]} vs {label_text.split(' (')[0]}", loc="left")
    return _noted(fig, context)


def make_cost_grid_figure(grid: pd.DataFrame, native_resolution: int | None = None,
                          context: FigureContext | None = None) -> Figure:
    """Multiply-adds and CPU latency for every width multiplier (rows) and input side (columns);
    the framed column is the resolution the models were trained at."""
    import seaborn as sns

    panels = [("multiply_adds", "multiply-adds per image (M)", 1e-6, ".1f"),
              ("latency_ms", "latency at batch 1, one thread (ms)", 1.0, ".2f")]
    panels = [p for p in panels if p[0] in grid]
    fig = new_figure(4.6 * len(panels), 0.45 * grid["width_mult"].nunique() + 2.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, text, scale, fmt) in zip(axes, panels):
        table = scale * grid.pivot_table(index="width_mult", columns="resolution", values=column)
        table.index = [f"{w:g}" for w in table.index]
        sns.heatmap(table, ax=ax, annot=True, fmt=fmt, cmap="viridis", cbar_kws={"label": text})
        ax.set_xlabel("input side (pixels)")
        ax.set_ylabel("width multiplier")
        ax.set_title(text.split(" (")[0], loc="left")
        if native_resolution in list(table.columns):
            j = list(table.columns).index(native_resolution)
            ax.add_patch(Rectangle((j, 0), 1, len(table), fill=False, edgecolor="#d55e00", lw=2.5, clip_on=False))
            ax.set_xticks(np.arange(len(table.columns)) + 0.5,
                          [f"{r}\n(trained)" if r == native_resolution else str(r) for r in table.columns])
    return _noted(fig, context, 0.07)
