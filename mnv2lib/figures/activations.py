"""Figures of notebook 01: activation curves, the spiral experiment (the paper's Figure 1),
gradient norms at initialization and the distributions of trained activation outputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..analysis.activations import QUANTILES, display_name
from .common import PALETTE, FigureContext, new_figure, source_note

CURVE_PANELS = (("f", "f(x)", "the function"), ("df", "f'(x)", "first derivative"),
                ("d2f", "f''(x)", "second derivative"))
_LINESTYLES = {"relu6": "-", "relu": "--", "mish": "-", "silu": "-.", "hardswish": ":", "identity": "-"}


def colour(name: str) -> str:
    return PALETTE.get(name, "#333333")


def make_activation_curves_figure(curves: dict[str, dict[str, np.ndarray]], names=None,
                                  context: FigureContext | None = None) -> Figure:
    """f, f' and f'' of the chosen activations side by side (autograd on the reference definitions)."""
    names = [n for n in (names if names is not None else curves) if n in curves]
    if not names:
        raise ValueError(f"names: got {names!r}; allowed: a non-empty subset of {tuple(curves)}")
    fig = new_figure(11.0, 3.6)
    axes = fig.subplots(1, 3)
    for ax, (key, ylabel, title) in zip(axes, CURVE_PANELS):
        for name in names:
            c = curves[name]
            ax.plot(c["x"], c[key], color=colour(name), ls=_LINESTYLES.get(name, "-"), lw=1.8,
                    label=display_name(name))
        ax.axhline(0, color="0.3", lw=0.6)
        ax.axvline(0, color="0.3", lw=0.6)
        ax.set_xlabel("pre-activation x")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    axes[0].legend(loc="upper left")
    if any(n in ("relu", "relu6", "hardswish") for n in names):
        axes[2].annotate("piecewise-linear kinks: f'' is an impulse there (not drawn)", (0.02, 0.02),
                         xycoords="axes fraction", fontsize=7, color="0.35")
    return source_note(fig, context)


def _scatter_spiral(ax, xy: torch.Tensor, position: torch.Tensor):
    xy = xy.detach().numpy()
    return ax.scatter(xy[:, 0], xy[:, 1], c=position.numpy(), cmap="viridis", s=4, lw=0, vmin=0, vmax=1)


def _panel_note(ax, metrics: pd.DataFrame, activation: str, n: int) -> None:
    row = metrics[(metrics["activation"] == activation) & (metrics["n"] == n)].iloc[0]
    ax.text(0.03, 0.97, f"kept {100 * row['kept_shown']:.0f}%\nerr {100 * row['readout_error_shown']:.0f}%",
            transform=ax.transAxes, va="top", fontsize=7,
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8})


def make_manifold_figure(experiment: dict, activations=None, dims=None,
                         context: FigureContext | None = None) -> Figure:
    """The paper's Figure 1 for several activations: the input spiral (left), and T^+ f(T x) for each
    dimension n (columns) and activation (rows); each panel names the share of points kept (locally
    invertible) and the read-out error, for the T shown."""
    metrics = experiment["metrics"]
    activations = list(activations or dict.fromkeys(metrics["activation"]))
    dims = list(dims or sorted(metrics["n"].unique()))
    rows = len(activations)
    first_column = ["input", "colorbar"] + ["."] * max(0, rows - 2)
    mosaic = [[first_column[r]] + [f"{a}|{n}" for n in dims] for r, a in enumerate(activations)]
    fig = new_figure(1.75 * (len(dims) + 1) + 0.6, 1.75 * rows + 0.5)
    axes = fig.subplot_mosaic(mosaic, empty_sentinel=".")
    sc = _scatter_spiral(axes["input"], experiment["points"], experiment["position"])
    axes["input"].set_title("input spiral")
    axes["input"].set_aspect("equal", adjustable="box")
    for r, act in enumerate(activations):
        for c, n in enumerate(dims):
            ax = axes[f"{act}|{n}"]
            _scatter_spiral(ax, experiment["outputs"][(act, n)], experiment["position"])
            ax.set_aspect("equal", adjustable="datalim")
            ax.set_xticks([]), ax.set_yticks([])
            _panel_note(ax, metrics, act, n)
            if r == 0:
                ax.set_title(f"n = {n}")
            if c == 0:
                ax.set_ylabel(display_name(act), fontsize=10, fontweight="bold")
    axes["input"].set_xlabel("x1")
    axes["input"].set_ylabel("x2")
    if "colorbar" in axes:  # a thin bar at the top of the cell below the input
        axes["colorbar"].axis("off")
        cax = axes["colorbar"].inset_axes([0.0, 0.8, 1.0, 0.08])
    else:
        cax = axes["input"].inset_axes([0.0, -0.35, 1.0, 0.06])
    fig.colorbar(sc, cax=cax, orientation="horizontal", label="position along the spiral")
    fig.suptitle("T⁺ f(T x): a 2-D spiral through n random dimensions and an activation", fontsize=10)
    return source_note(fig, context)


def make_manifold_dimension_figure(experiment: dict, n: int, activations=None,
                                   context: FigureContext | None = None) -> Figure:
    """One dimension n, larger: the input spiral and T^+ f(T x) for each activation."""
    metrics = experiment["metrics"]
    activations = list(activations or dict.fromkeys(metrics["activation"]))
    if (activations[0], n) not in experiment["outputs"]:
        raise ValueError(f"n: got {n!r}; allowed values are {sorted(metrics['n'].unique())}")
    fig = new_figure(2.6 * (len(activations) + 1), 3.0)
    axes = fig.subplots(1, len(activations) + 1)
    _scatter_spiral(axes[0], experiment["points"], experiment["position"])
    axes[0].set_title("input spiral")
    for ax, act in zip(axes[1:], activations):
        sc = _scatter_spiral(ax, experiment["outputs"][(act, n)], experiment["position"])
        ax.set_title(f"{display_name(act)}, n = {n}")
        _panel_note(ax, metrics, act, n)
    for ax in axes:
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("coordinate 1")
    axes[0].set_ylabel("coordinate 2")
    fig.colorbar(sc, ax=axes[-1], label="position along the spiral", shrink=0.8)
    return source_note(fig, context)


def make_manifold_metrics_figure(experiment: dict, context: FigureContext | None = None) -> Figure:
    """Share of points kept and read-out error against n, per activation (mean ± sd over random T)."""
    metrics = experiment["metrics"]
    fig = new_figure(8.6, 3.4)
    axes = fig.subplots(1, 2)
    panels = (("kept", "points kept (locally invertible, %)"), ("readout_error", "read-out error (% of variance)"))
    for ax, (key, label) in zip(axes, panels):
        for act, g in metrics.groupby("activation", sort=False):
            mean, sd = 100 * g[key].to_numpy(), 100 * g[f"{key}_std"].fillna(0).to_numpy()
            ax.plot(g["n"], mean, "o-", color=colour(act), label=display_name(act), ms=4)
            ax.fill_between(g["n"], mean - sd, mean + sd, color=colour(act), alpha=0.15, lw=0)
        ax.set_xscale("log")
        dims = sorted(metrics["n"].unique())
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.minorticks_off()
        ax.set_xlabel("dimension n of the embedding")
        ax.set_ylabel(label)
    axes[0].set_ylim(-3, 103)
    axes[0].legend(loc="lower right")
    draws = int(metrics["draws"].iloc[0])
    axes[1].set_title(f"mean ± sd over {draws} random T", loc="right", fontsize=9, fontweight="normal")
    return source_note(fig, context)


def _block_ticks(ax, table: pd.DataFrame) -> None:
    """x ticks at each block's first layer, labelled with the block."""
    first = table.drop_duplicates("block", keep="first")
    ax.set_xticks(first["depth"], first["block"], fontsize=7, rotation=90)


def _with_blocks(table: pd.DataFrame) -> pd.DataFrame:
    t = table.copy()
    t["block"] = t["label"].str.split(" ").str[0]
    return t


def make_gradient_norms_figure(norms: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Per conv layer in depth order: gradient norm at initialization per activation (median line,
    band min–max over seeds/batches), and the ratio of the two activations' medians below."""
    from ..analysis.activations import gradient_summary

    summary = _with_blocks(gradient_summary(norms))
    models = list(dict.fromkeys(summary["model"]))
    two = len(models) == 2
    fig = new_figure(10.0, 5.2 if two else 3.6)
    axes = fig.subplots(2 if two else 1, 1, sharex=True, squeeze=False, height_ratios=[2.2, 1] if two else [1])[:, 0]
    seeds = norms["seed"].nunique()
    markers = {"conv": "s", "expand": "o", "depthwise": "^", "project": "v"}
    marker_labels = {"conv": "stem / head conv", "expand": "expansion 1x1", "depthwise": "depthwise 3x3",
                     "project": "projection 1x1"}
    for m in models:
        s = summary[summary["model"] == m]
        axes[0].plot(s["depth"], s["median"], color=colour(m), lw=1.5, label=f"{display_name(m)} (median)")
        axes[0].fill_between(s["depth"], s["low"], s["high"], color=colour(m), alpha=0.2, lw=0)
        for kind, k in s.groupby("kind"):
            axes[0].scatter(k["depth"], k["median"], marker=markers.get(kind, "o"), color=colour(m), s=14, zorder=3)
    for kind, marker in markers.items():
        if kind in set(summary["kind"]):
            axes[0].scatter([], [], marker=marker, color="0.4", s=14, label=marker_labels[kind])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("‖∂L/∂W‖ (Frobenius)")
    axes[0].set_title(f"gradient norm per conv layer at initialization (band: min–max over {seeds} seeds/batches)",
                      loc="left", fontsize=9)
    axes[0].legend(ncol=3, fontsize=7, loc="best")
    if two:
        a, b = models
        wide = summary.pivot_table(index="depth", columns="model", values="median")
        axes[1].plot(wide.index, wide[b] / wide[a], color=colour(b), lw=1.5)
        axes[1].axhline(1, color="0.3", lw=0.8, ls="--")
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"{display_name(b)} / {display_name(a)}")
    _block_ticks(axes[-1], summary[summary["model"] == models[0]])
    axes[-1].set_xlabel("conv layer, in depth order")
    return source_note(fig, context)


def make_activation_quantiles_figure(summary: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Per activation layer in depth order, the output quantiles of each trained model (bands 1–99%,
    5–95%, 25–75%, median line; symmetric-log axis), and the shares of zero, negative and
    six-valued outputs below."""
    summary = _with_blocks(summary)
    models = list(dict.fromkeys(summary["model"]))
    fig = new_figure(5.2 * len(models), 5.6)
    # linear zone of the symmetric-log axis: about a quarter of a typical layer's 5-95% range
    linthresh = _symlog_threshold(float(np.nanmedian(summary["q95"] - summary["q05"])))
    axes = fig.subplots(2, len(models), squeeze=False, height_ratios=[2, 1], sharex=True)
    for j, m in enumerate(models):
        s = summary[summary["model"] == m]
        ax = axes[0, j]
        c = colour(m)
        for (lo, hi), alpha in (((1, 99), 0.15), ((5, 95), 0.25), ((25, 75), 0.4)):
            ax.fill_between(s["depth"], s[f"q{lo:02d}"], s[f"q{hi:02d}"], color=c, alpha=alpha, lw=0,
                            label=f"{lo}–{hi}%")
        ax.plot(s["depth"], s["q50"], color=c, lw=1.5, label="median")
        ax.axhline(0, color="0.3", lw=0.6)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_title(f"{display_name(m)}: output quantiles per layer", loc="left", fontsize=9)
        ax.set_ylabel(f"activation output (linear within ±{linthresh:g})")
        share = axes[1, j]
        shares = (("fraction_zero", "= 0", "-"), ("fraction_negative", "< 0", "--"), ("fraction_six", "= 6", ":"))
        for key, label, ls in shares:
            if s[key].max() > 0:
                share.plot(s["depth"], 100 * s[key], color=c, ls=ls, lw=1.4, label=f"share {label}")
        share.set_ylim(-3, 103)
        share.set_ylabel("share of outputs (%)")
        share.legend(fontsize=7, loc="upper right")
        _block_ticks(share, s)
        share.set_xlabel("activation layer, in depth order")
    axes[0, 0].legend(fontsize=7, loc="upper left", ncol=2)
    if len(models) > 1:
        lims = [ax.get_ylim() for ax in axes[0]]
        for ax in axes[0]:
            ax.set_ylim(min(l[0] for l in lims), max(l[1] for l in lims))
    return source_note(fig, context)


def _symlog_threshold(spread: float) -> float:
    """Linear zone of a symmetric-log axis: a power of ten near a quarter of a typical spread."""
    return float(10 ** np.floor(np.log10(max(spread / 4, 1e-6))))


def make_layer_distribution_figure(records: dict[str, dict[str, dict]], layer: str,
                                   context: FigureContext | None = None, bins: int = 80) -> Figure:
    """One activation layer: histograms of every model's sampled outputs on the same test images
    (share of outputs per bin, log scale; symmetric-log x axis so that a long tail and the values
    near zero are both visible), with each model's quantiles marked below."""
    models = list(records)
    if any(layer not in records[m] for m in models):
        raise ValueError(f"layer: got {layer!r}; allowed values are {tuple(records[models[0]])}")
    samples = {m: records[m][layer]["sample"].double().numpy() for m in models}
    spread = max(float(np.quantile(v, 0.95) - np.quantile(v, 0.05)) for v in samples.values())
    c = _symlog_threshold(spread)

    def forward(v):
        return np.sign(v) * np.log10(1 + np.abs(v) / c)

    def inverse(t):
        return np.sign(t) * c * (10 ** np.abs(t) - 1)

    low = min(float(v.min()) for v in samples.values())
    high = max(float(v.max()) for v in samples.values())
    edges = inverse(np.linspace(forward(low), forward(high if high > low else low + c), bins + 1))
    fig = new_figure(7.0, 4.2)
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    for i, m in enumerate(models):
        r = records[m][layer]
        v = samples[m]
        weights = np.full(len(v), 100.0 / len(v))
        label = (f"{display_name(m)}: {100 * r['fraction_zero']:.0f}% = 0, "
                 f"{100 * r['fraction_negative']:.0f}% < 0")
        axes[0].hist(v, bins=edges, weights=weights, histtype="stepfilled", alpha=0.3, color=colour(m))
        axes[0].hist(v, bins=edges, weights=weights, histtype="step", lw=1.4, color=colour(m), label=label)
        q = np.quantile(v, QUANTILES)
        axes[1].plot([q[0], q[-1]], [i, i], color=colour(m), lw=1)
        axes[1].plot([q[1], q[-2]], [i, i], color=colour(m), lw=3)
        axes[1].plot([q[2], q[-3]], [i, i], color=colour(m), lw=7, solid_capstyle="butt")
        axes[1].plot(q[3], i, "o", color="white", mec="black", ms=5, zorder=3)
    axes[0].set_yscale("log")
    axes[0].set_xscale("symlog", linthresh=c)
    axes[0].set_ylabel("share of outputs per bin (%)")
    axes[0].legend(fontsize=8)
    label = records[models[0]][layer]["label"]
    axes[0].set_title(f"outputs of activation layer `{label}` ({layer})", loc="left", fontsize=9)
    axes[1].set_yticks(range(len(models)), [display_name(m) for m in models])
    axes[1].set_ylim(-0.6, len(models) - 0.4)
    axes[1].set_xlabel(f"activation output (symlog, linear in ±{c:g})")
    axes[1].set_title("quantiles: 1–99% (thin), 5–95%, 25–75% (thick), median (dot)", loc="left", fontsize=8,
                      fontweight="normal")
    return source_note(fig, context)
