"""Figures of the 2^3 ablation (notebook 04)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ..analysis.ablation import METRICS, variant_order
from .common import PALETTE, FigureContext, new_figure, source_note

COST_LABELS = {
    "multiply_adds": ("multiply-adds per image (M)", 1e-6),
    "parameters": ("parameters (M)", 1e-6),
    "latency_ms_batch1": ("latency at batch 1 (ms)", 1.0),
    "latency_ms_batch64": ("latency at batch 64 (ms)", 1.0),
    "train_seconds": ("training time (s)", 1.0),
    "train_memory_MiB": ("training-step memory (MiB)", 1.0),
    "train_images_per_s": ("training throughput (img/s)", 1.0),
}


def _colour(label: str) -> str:
    return PALETTE.get(label, "#333333")


def make_ablation_accuracy_figure(runs: pd.DataFrame, summary: pd.DataFrame,
                                  context: FigureContext | None = None) -> Figure:
    """Per metric, every seed's accuracy (dots) and the mean with its 95% CI (bar), per variant."""
    metrics = [m for m in METRICS if f"{m}_mean" in summary]
    fig = new_figure(4.2 * len(metrics), 4.0)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    order = variant_order(summary["label"])
    for ax, metric in zip(axes, metrics):
        s = summary.set_index("label").loc[order]
        y = np.arange(len(order))
        ax.barh(y, 100 * s[f"{metric}_mean"], color=[_colour(l) for l in order], alpha=0.35, height=0.6)
        lo, hi = 100 * s[f"{metric}_ci_low"], 100 * s[f"{metric}_ci_high"]
        has_ci = ~(lo.isna() | hi.isna())
        ax.errorbar(100 * s[f"{metric}_mean"][has_ci], y[has_ci.to_numpy()],
                    xerr=[(100 * s[f"{metric}_mean"] - lo)[has_ci], (hi - 100 * s[f"{metric}_mean"])[has_ci]],
                    fmt="none", ecolor="black", capsize=3, lw=1, label="95% CI of the mean")
        for i, label in enumerate(order):
            vals = 100 * runs.loc[runs["label"] == label, metric].dropna()
            ax.scatter(vals, np.full(len(vals), i), color=_colour(label), edgecolor="black", s=22, zorder=3)
        ax.set_yticks(y, order)
        ax.invert_yaxis()
        ax.set_xlabel(f"{METRICS[metric]} (%)")
        lo_lim = np.nanmin(100 * runs[metric]) if runs[metric].notna().any() else 0
        ax.set_xlim(max(0, lo_lim - 5), 100)  # an interval beyond 0-100% is clipped: few seeds, wide t-intervals
    axes[0].set_title("accuracy per variant (dots: seeds; whiskers: 95% CI of the mean)", loc="left")
    return source_note(fig, context)


def make_paired_difference_figure(diffs: dict[str, pd.DataFrame], context: FigureContext | None = None) -> Figure:
    """Forest plot: seed-paired difference to the baseline (percentage points) with 95% CIs."""
    frames = [f for f in diffs.values() if not f.empty]
    fig = new_figure(4.2 * max(1, len(frames)), 3.8)
    axes = fig.subplots(1, max(1, len(frames)), squeeze=False)[0]
    for ax, frame in zip(axes, frames):
        order = variant_order(frame["label"])
        f = frame.set_index("label").loc[order]
        y = np.arange(len(order))
        for i, (label, row) in enumerate(f.iterrows()):
            if not math.isnan(row["ci_low"]):
                ax.plot([100 * row["ci_low"], 100 * row["ci_high"]], [i, i], color=_colour(label), lw=2.5)
            ax.plot(100 * row["mean_difference"], i, "o", color=_colour(label), mec="black", ms=6)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(y, order)
        ax.invert_yaxis()
        ax.set_xlabel(f"{METRICS.get(f['metric'].iloc[0], f['metric'].iloc[0])}: variant - baseline (pp)")
    axes[0].set_title("difference to the baseline, 95% CI from the whole design", loc="left")
    return source_note(fig, context)


def make_factorial_effects_figure(effects: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Forest plot of the factorial model's terms (main effects, then interactions), one panel per metric."""
    metrics = list(dict.fromkeys(effects["metric"]))
    fig = new_figure(4.2 * max(1, len(metrics)), 0.9 + 0.42 * effects.groupby("metric").size().max())
    axes = fig.subplots(1, max(1, len(metrics)), squeeze=False, sharey=True)[0]
    for ax, metric in zip(axes, metrics):
        f = effects[effects["metric"] == metric].sort_values(["order", "term"], kind="stable")
        for i, (_, row) in enumerate(f.iterrows()):
            colour = _colour(row["term"]) if row["order"] == 1 else "0.35"
            ax.plot([100 * row["ci_low"], 100 * row["ci_high"]], [i, i], color=colour, lw=2.5)
            ax.plot(100 * row["effect"], i, "o", color=colour, mec="black", ms=6)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(np.arange(len(f)), [t.replace(":", " x ") for t in f["term"]])
        ax.invert_yaxis()
        ax.set_xlabel(f"{METRICS.get(metric, metric)}: effect (pp)")
    df = int(effects["df_resid"].iloc[0])
    axes[0].set_title(f"factorial effects, 95% CI ({df} residual df)", loc="left")
    return source_note(fig, context)


def make_accuracy_vs_cost_figure(summary: pd.DataFrame, cost: str = "multiply_adds",
                                 metric: str = "clean_accuracy", context: FigureContext | None = None) -> Figure:
    """Accuracy against one cost per variant; error bars are 95% CIs over seeds."""
    if cost not in COST_LABELS:
        raise ValueError(f"cost: got {cost!r}; allowed values are {tuple(COST_LABELS)}")
    if metric not in METRICS:
        raise ValueError(f"metric: got {metric!r}; allowed values are {tuple(METRICS)}")
    label_text, scale = COST_LABELS[cost]
    fig = new_figure(6.8, 4.2)
    ax = fig.subplots()
    for _, row in summary.iterrows():
        x, y = row[cost] * scale, 100 * row[f"{metric}_mean"]
        lo, hi = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
        if lo is not None and not math.isnan(lo):
            ax.errorbar(x, y, yerr=[[y - 100 * lo], [100 * hi - y]], color=_colour(row["label"]), capsize=3)
        ax.plot(x, y, "o", color=_colour(row["label"]), mec="black", ms=8, label=row["label"])
    # a legend, not point labels: variants often share a cost (Mish adds no multiply-adds)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel(label_text)
    ax.set_ylabel(f"{METRICS[metric]} (%)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(0.0, low), min(100.0, high))
    ax.set_title(f"{METRICS[metric]} vs {label_text.split(' (')[0]}", loc="left")
    return source_note(fig, context)


def make_corruption_heatmap_figure(corruption_table: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Accuracy (%) per corruption (rows) and variant (columns), averaged over severities and seeds."""
    import seaborn as sns

    order = variant_order(corruption_table.columns)
    table = 100 * corruption_table[order]
    fig = new_figure(1.1 * len(order) + 2.5, 0.32 * len(table) + 1.6)
    ax = fig.subplots()
    sns.heatmap(table, ax=ax, annot=True, fmt=".0f", cmap="viridis", cbar_kws={"label": "accuracy (%)"})
    ax.set_xlabel("")
    ax.set_ylabel("corruption")
    ax.set_title("accuracy under each corruption (mean over severities)", loc="left")
    return source_note(fig, context)


def make_training_curves_figure(curves: pd.DataFrame, context: FigureContext | None = None, x: str = "epoch",
                                y: str = "test_accuracy") -> Figure:
    """Accuracy along training (``x``: epoch or images_seen; ``y``: test_accuracy or validation_accuracy); a
    line per variant (mean over seeds), a band for the seed range."""
    labels = {"epoch": "epoch", "images_seen": "training images seen", "test_accuracy": "test accuracy (%)",
              "validation_accuracy": "validation accuracy (%)"}
    for name, value in (("x", x), ("y", y)):
        if value not in labels or value not in curves:
            raise ValueError(f"{name}: got {value!r}; allowed: columns of the table among {tuple(labels)}")
    fig = new_figure(6.0, 4.0)
    ax = fig.subplots()
    for label in variant_order(curves["label"]):
        h = curves[curves["label"] == label].groupby(x)[y]
        mean, low, high = 100 * h.mean(), 100 * h.min(), 100 * h.max()
        ax.plot(mean.index, mean, color=_colour(label), label=label, lw=1.6, marker="." if x != "epoch" else None)
        ax.fill_between(mean.index, low, high, color=_colour(label), alpha=0.15)
    ax.set_xlabel(labels[x])
    ax.set_ylabel(labels[y])
    ax.legend(ncol=2, fontsize=8)
    ax.set_title("learning curves (band: range over seeds)", loc="left")
    return source_note(fig, context)


def make_budget_ladder_figure(ladder: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Per metric, each improvement's seed-paired effect (improvement alone - baseline, pp) against the
    training budget (images seen, log scale); whiskers are 95% t-intervals over seeds where there are two
    or more seeds."""
    metrics = [m for m in METRICS if m in set(ladder["metric"])] or list(METRICS)
    fig = new_figure(4.4 * len(metrics), 3.9)
    axes = fig.subplots(1, len(metrics), squeeze=False, sharey=True)[0]
    for ax, metric in zip(axes, metrics):
        frame = ladder[ladder["metric"] == metric]
        for i, (factor, group) in enumerate(frame.groupby("improvement", sort=False)):
            group = group.sort_values("images_seen")
            x = group["images_seen"].to_numpy() * (1 + 0.03 * (i - 1))  # small dodge: whiskers stay apart
            y = 100 * group["effect"].to_numpy()
            ax.plot(x, y, "o-", color=_colour(factor), mec="black", label=factor)
            has_ci = group["ci_low"].notna().to_numpy()
            if has_ci.any():
                ax.errorbar(x[has_ci], y[has_ci], yerr=[y[has_ci] - 100 * group["ci_low"].to_numpy()[has_ci],
                                                        100 * group["ci_high"].to_numpy()[has_ci] - y[has_ci]],
                            fmt="none", ecolor=_colour(factor), capsize=3, lw=1)
        ax.axhline(0, color="black", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("training budget (images seen, log scale)")
        ax.set_title(METRICS[metric], loc="left")
    axes[0].set_ylabel("improvement alone - baseline (pp)")
    axes[-1].legend(loc="best", fontsize=8)
    return source_note(fig, context)
