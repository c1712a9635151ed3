"""Figures of notebook 03: per-channel statistics of CNSN's inputs and outputs under
distribution shift, CrossNorm's modes, coverage of the shift, and SelfNorm's gates."""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..analysis.cnsn import CROSSNORM_VARIANTS, corruption_order
from .common import FigureContext, new_figure, source_note

SOURCE_COLOURS = {"train": "#555555", "clean": "#0173b2", "corrupted": "#d55e00"}
VARIANT_COLOURS = {"off": "#555555", "2-instance": "#029e73", "1-instance": "#de8f05",
                   "2-instance, style crop": "#cc78bc", "2-instance, content crop": "#ca9161",
                   "2-instance, both crops": "#56b4e9"}
STATISTIC_LABELS = {"mean": "per-channel mean", "std": "per-channel std",
                    "selfnorm_mean": "per-channel mean after SelfNorm",
                    "selfnorm_std": "per-channel std after SelfNorm"}
BINS = 40
ZSCORE_LOG_ABOVE = 20.0  # z-score axes switch to a signed log scale when the data reach beyond +-20


def _finish(fig: Figure, context: FigureContext | None) -> Figure:
    """Keep a strip at the bottom for the provenance note, clear of the axis labels."""
    if context is not None:
        fig.get_layout_engine().set(rect=(0, 0.035, 1, 0.965))
    return source_note(fig, context)


def _check(name: str, value, allowed) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}: got {value!r}; allowed values are {tuple(allowed)}")


def _block(stats: pd.DataFrame, layer: str) -> int:
    return int(stats.loc[stats["layer"] == layer, "block"].iloc[0])


def _zscores(values: pd.DataFrame, reference: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` of ``values`` standardized per channel by the reference rows' mean and std over images."""
    g = reference.groupby("channel")[column]
    mu, sd = g.mean(), g.std(ddof=1).fillna(0.0)
    floor = max(0.01 * float(sd.median()), 1e-12) if len(sd) else 1e-12
    sd = sd.clip(lower=floor)
    ch = values["channel"].to_numpy()
    return (values[column].to_numpy(float) - mu.reindex(ch).to_numpy()) / sd.reindex(ch).to_numpy()


def signed_log(v):
    """sign(v) * log10(1 + |v|): linear near 0, logarithmic in the tails, defined for every sign."""
    v = np.asarray(v, float)
    return np.sign(v) * np.log10(1 + np.abs(v))


def _histograms(ax, groups: dict[str, np.ndarray], colours: dict[str, str], styles: dict[str, str] | None = None,
                lower: float = 0.5, upper: float = 99.5, signed_log_above: float | None = None) -> bool:
    """Step histograms (fraction of each group's values per bin) on shared bins spanning the pooled
    [lower, upper] percentiles; values beyond are counted in the edge bins. When the range reaches
    beyond +-``signed_log_above`` the axis switches to :func:`signed_log` (returns True)."""
    finite = [v[np.isfinite(v)] for v in groups.values() if np.isfinite(v).any()]
    ax.set_ylabel("fraction of values")
    if not finite:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return False
    lo, hi = np.percentile(np.concatenate(finite), [lower, upper])
    use_log = signed_log_above is not None and max(abs(lo), abs(hi)) > signed_log_above
    f = signed_log if use_log else (lambda v: np.asarray(v, float))
    tlo, thi = float(f(lo)), float(f(hi))
    if thi <= tlo:
        tlo, thi = tlo - 0.5, thi + 0.5
    bins = np.linspace(tlo, thi, BINS + 1)
    for name, v in groups.items():
        v = v[np.isfinite(v)]
        if len(v):
            ax.hist(np.clip(f(v), tlo, thi), bins=bins, weights=np.full(len(v), 1 / len(v)), histtype="step",
                    lw=1.6, color=colours[name], ls=(styles or {}).get(name, "-"), label=name)
    if use_log:
        top = int(np.ceil(np.log10(max(abs(lo), abs(hi), 1.0))))
        step = 1 if top <= 3 else 2  # at most about seven ticks
        powers = [(sign, k) for k in range(top, 0, -step) for sign in (-1, 1)]
        ticks = [(0.0, "0")] + [(sign * 10.0 ** k, f"${'-' if sign < 0 else ''}10^{{{k}}}$") for sign, k in powers]
        ticks = sorted((v, label) for v, label in ticks if tlo <= f(v) <= thi)
        ax.set_xticks([float(f(v)) for v, _ in ticks], [label for _, label in ticks])
    return use_log


def make_distribution_figure(stats: pd.DataFrame, layer: str, corruption: str, severity: int,
                             crossnorm: str = "2-instance", context: FigureContext | None = None) -> Figure:
    """One CNSN layer: distributions over (image, channel) of the per-channel mean and std entering
    SelfNorm (top) and leaving it (bottom), standardized per channel by the clean test images, for
    training images (with and without a CrossNorm variant), clean and corrupted test images; the
    SelfNorm gates (top right) and each channel's mean gate, clean against corrupted (bottom right)."""
    _check("layer", layer, stats["layer"].cat.categories if hasattr(stats["layer"], "cat") else stats["layer"].unique())
    _check("corruption", corruption, corruption_order(stats))
    _check("crossnorm", crossnorm, [v for v in CROSSNORM_VARIANTS if v in set(stats["crossnorm"].astype(str))])
    rows = stats[stats["layer"] == layer]
    corrupted = rows[(rows["source"] == corruption) & (rows["severity"] == severity)]
    if corrupted.empty:
        raise ValueError(f"severity: got {severity!r}; allowed values for {corruption} are "
                         f"{sorted(rows.loc[rows['source'] == corruption, 'severity'].unique().tolist())}")
    off = rows[rows["crossnorm"] == "off"]
    parts = {"train": off[off["source"] == "train"], "clean test": off[off["source"] == "clean"],
             f"{corruption}, severity {severity}": corrupted}
    if crossnorm != "off":
        parts[f"train + CrossNorm ({crossnorm})"] = rows[(rows["source"] == "train") & (rows["crossnorm"] == crossnorm)]
    names = list(parts)
    colours = dict(zip(names, [SOURCE_COLOURS["train"], SOURCE_COLOURS["clean"], SOURCE_COLOURS["corrupted"],
                               VARIANT_COLOURS.get(crossnorm, "#029e73")]))
    styles = {names[0]: "--"}
    clean = parts["clean test"]
    fig = new_figure(12.0, 6.4)
    axes = fig.subplots(2, 3)
    panels = [(0, 0, "mean", "per-channel mean entering SelfNorm"), (0, 1, "std", "per-channel std entering SelfNorm"),
              (1, 0, "selfnorm_mean", "per-channel mean after SelfNorm"),
              (1, 1, "selfnorm_std", "per-channel std after SelfNorm")]
    for r, c, column, title in panels:
        ax = axes[r, c]
        log = _histograms(ax, {n: _zscores(p, clean, column) for n, p in parts.items()}, colours, styles,
                          signed_log_above=ZSCORE_LOG_ABOVE)
        ax.set_xlabel(f"{title}\n(z-score per channel vs clean test{', signed log scale' if log else ''})")
        ax.axvline(0, color="black", lw=0.6)
    ax = axes[0, 2]
    _histograms(ax, {n: p["gate"].to_numpy(float) for n, p in parts.items()}, colours, styles, 0.0, 100.0)
    ax.set_xlabel("SelfNorm gate g (per image and channel)")
    ax = axes[1, 2]
    clean_gate = clean.groupby("channel")["gate"].mean()
    for name in names[2:]:
        g = parts[name].groupby("channel")["gate"].mean().reindex(clean_gate.index)
        ax.scatter(clean_gate, g, s=10, alpha=0.7, color=colours[name], label=name, edgecolor="none")
    finite = np.concatenate([clean_gate.to_numpy(float)] + [parts[n].groupby("channel")["gate"].mean().to_numpy(float)
                                                            for n in names[2:]])
    finite = finite[np.isfinite(finite)]
    if len(finite):
        lo, hi = finite.min(), finite.max()
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="black", lw=0.8, ls=":", label="no change")
    ax.set_xlabel("mean gate per channel, clean test")
    ax.set_ylabel("mean gate per channel, shifted")
    ax.legend(fontsize=7, loc="upper left")
    axes[0, 0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Block {_block(stats, layer)} ({layer}): per-channel statistics, clean vs {corruption} "
                 f"(severity {severity})", fontsize=11)
    return _finish(fig, context)


def make_crossnorm_figure(stats: pd.DataFrame, layer: str, context: FigureContext | None = None) -> Figure:
    """One CNSN layer: the training images' per-channel mean, std and SelfNorm gate after each CrossNorm
    variant, against no CrossNorm and the clean test images (z-scores per channel vs clean test)."""
    _check("layer", layer, stats["layer"].unique())
    rows = stats[(stats["layer"] == layer)]
    train = rows[rows["source"] == "train"]
    clean = rows[(rows["source"] == "clean") & (rows["crossnorm"] == "off")]
    variants = [v for v in CROSSNORM_VARIANTS if v in set(train["crossnorm"].astype(str))]
    fig = new_figure(12.0, 3.8)
    axes = fig.subplots(1, 3)
    for ax, column, title in ((axes[0], "mean", "per-channel mean"), (axes[1], "std", "per-channel std")):
        groups = {("train, no CrossNorm" if v == "off" else v): _zscores(train[train["crossnorm"] == v], clean, column)
                  for v in variants}
        groups["clean test"] = _zscores(clean, clean, column)
        colours = {("train, no CrossNorm" if v == "off" else v): VARIANT_COLOURS[v] for v in variants}
        colours["clean test"] = SOURCE_COLOURS["clean"]
        log = _histograms(ax, groups, colours, {"train, no CrossNorm": "--", "clean test": ":"},
                          signed_log_above=ZSCORE_LOG_ABOVE)
        scale = ", signed log scale" if log else ""
        ax.set_xlabel(f"{title} after CrossNorm\n(z-score per channel vs clean test{scale})")
    groups = {("train, no CrossNorm" if v == "off" else v): train.loc[train["crossnorm"] == v, "gate"].to_numpy(float)
              for v in variants}
    colours = {("train, no CrossNorm" if v == "off" else v): VARIANT_COLOURS[v] for v in variants}
    _histograms(axes[2], groups, colours, {"train, no CrossNorm": "--"}, 0.0, 100.0)
    axes[2].set_xlabel("SelfNorm gate g on the CrossNorm output")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Block {_block(stats, layer)} ({layer}): training-image statistics after each CrossNorm mode",
                 fontsize=11)
    return _finish(fig, context)


def _heatmap(fig, ax, matrix: pd.DataFrame, label: str, cmap: str = "viridis", annotate: bool = False,
             fmt: str = "{:.2f}"):
    from matplotlib.colors import PowerNorm

    values = matrix.to_numpy(float)
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if len(finite) and finite.max() > 0 else 1.0
    # square-root colour scale: shifts span orders of magnitude from early to late blocks
    im = ax.imshow(values, aspect="auto", cmap=cmap, interpolation="nearest", norm=PowerNorm(0.5, vmin=0.0, vmax=top))
    ax.set_yticks(np.arange(len(matrix.index)), [str(i) for i in matrix.index])
    ax.set_xticks(np.arange(len(matrix.columns)), [str(c) for c in matrix.columns])
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=f"{label}\n(square-root colour scale)", shrink=0.9)
    if annotate:
        for i in range(values.shape[0]):
            for j in range(values.shape[1]):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if im.norm(values[i, j]) < 0.6 else "black")
    return im


def make_shift_figure(shift: pd.DataFrame, statistic: str = "mean", severity: int | None = None,
                      context: FigureContext | None = None) -> Figure:
    """How far each corruption moves a statistic from clean: (a) per corruption and block at one
    severity (default: the highest measured; the top row is the training images, for scale),
    (b) per corruption and severity, averaged over blocks."""
    _check("statistic", statistic, shift["statistic"].unique())
    s = shift[shift["statistic"] == statistic]
    corruptions = corruption_order(s)
    if not corruptions:
        raise ValueError("shift: has no corrupted source")
    severities = sorted(s.loc[s["source"].isin(corruptions), "severity"].unique())
    severity = severities[-1] if severity is None else severity
    _check("severity", severity, severities)
    label = "standardized W1 distance (clean-sd units)"
    at = s[(s["source"].isin(corruptions)) & (s["severity"] == severity)]
    by_block = at.pivot_table(index="source", columns="block", values="distance", observed=True).reindex(corruptions)
    train = s[s["source"] == "train"].pivot_table(index="source", columns="block", values="distance")
    if len(train):
        by_block = pd.concat([train.rename(index={"train": "train (reference)"}), by_block])
    by_severity = (s[s["source"].isin(corruptions)].pivot_table(index="source", columns="severity", values="distance",
                                                                 aggfunc="mean").reindex(corruptions))
    fig = new_figure(12.5, 0.32 * len(by_block) + 2.4)
    axes = fig.subplots(1, 2, width_ratios=[2.6, 1])
    _heatmap(fig, axes[0], by_block, label, "viridis")
    axes[0].set_xlabel("CNSN block (input to output)")
    axes[0].set_ylabel("source (vs clean test)")
    axes[0].set_title(f"(a) {STATISTIC_LABELS.get(statistic, statistic)}: shift per block, severity {severity}",
                      loc="left", fontsize=10)
    if len(train):
        axes[0].axhline(0.5, color="white", lw=2)
    _heatmap(fig, axes[1], by_severity, label, "viridis", annotate=True)
    axes[1].set_xlabel("severity")
    axes[1].set_title("(b) mean over blocks", loc="left", fontsize=10)
    return _finish(fig, context)


def make_coverage_figure(cov: pd.DataFrame, context: FigureContext | None = None) -> Figure:
    """Fraction of corrupted test images' per-channel (mean, std) pairs inside the per-channel range of
    the training statistics, without and with each CrossNorm variant: (a) per block (mean over
    corruptions and severities; dotted: clean test images without CrossNorm, for reference),
    (b) per corruption (mean over blocks and severities)."""
    corruptions = corruption_order(cov)
    if not corruptions:
        raise ValueError("cov: has no corrupted source")
    variants = [v for v in CROSSNORM_VARIANTS if v in set(cov["crossnorm"])]
    corrupted = cov[cov["source"].isin(corruptions)]
    fig = new_figure(12.0, max(4.0, 0.27 * len(corruptions) + 1.8))
    axes = fig.subplots(1, 2, width_ratios=[1.3, 1])
    for v in variants:
        per_block = corrupted[corrupted["crossnorm"] == v].groupby("block")["covered"].mean()
        axes[0].plot(per_block.index, 100 * per_block, marker="o", ms=3, lw=1.6, color=VARIANT_COLOURS[v],
                     ls="--" if v == "off" else "-", label="no CrossNorm" if v == "off" else v)
    clean = cov[(cov["source"] == "clean") & (cov["crossnorm"] == "off")].groupby("block")["covered"].mean()
    if len(clean):
        axes[0].plot(clean.index, 100 * clean, color=SOURCE_COLOURS["clean"], ls=":", lw=1.6,
                     label="clean test, no CrossNorm")
    axes[0].set_xlabel("CNSN block (input to output)")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("test statistics inside the training range (%)")
    axes[0].set_ylim(0, 102)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[0].set_title("(a) corrupted test statistics covered, per block", loc="left", fontsize=10)
    y = np.arange(len(corruptions))
    offsets = np.linspace(-0.3, 0.3, len(variants)) if len(variants) > 1 else [0.0]
    for off, v in zip(offsets, variants):
        per = corrupted[corrupted["crossnorm"] == v].groupby("source")["covered"].mean().reindex(corruptions)
        axes[1].scatter(100 * per, y + off, s=18, color=VARIANT_COLOURS[v], marker="s" if v == "off" else "o",
                        label="no CrossNorm" if v == "off" else v, zorder=3)
    axes[1].set_yticks(y, corruptions)
    axes[1].invert_yaxis()
    axes[1].set_xlim(0, 102)
    axes[1].set_xlabel("corrupted statistics inside the training range (%)")
    axes[1].set_title("(b) per corruption", loc="left", fontsize=10)
    return _finish(fig, context)


def make_gate_response_figure(response: pd.DataFrame, shift: pd.DataFrame | None = None, statistic: str = "mean",
                              context: FigureContext | None = None) -> Figure:
    """SelfNorm's gates under corruption: (a) mean |gate change| per corruption and severity (mean over
    blocks), (b) per block for each severity (mean over corruptions), (c) gate change against the shift
    of the per-channel statistic, one point per (block, corruption, severity), with Spearman's rho."""
    import matplotlib as mpl
    from scipy.stats import spearmanr

    corruptions = corruption_order(response)
    if not corruptions:
        raise ValueError("response: has no corrupted source")
    corrupted = response[response["source"].isin(corruptions)]
    severities = sorted(corrupted["severity"].unique())
    panels = 3 if shift is not None else 2
    fig = new_figure(4.4 * panels + 1.0, max(4.0, 0.27 * len(corruptions) + 1.8))
    fig.get_layout_engine().set(wspace=0.06)
    axes = fig.subplots(1, panels, width_ratios=[1.0, 1.3, 1.2][:panels])
    matrix = corrupted.pivot_table(index="source", columns="severity", values="gate_change",
                                   aggfunc="mean").reindex(corruptions)
    _heatmap(fig, axes[0], matrix, "mean |gate change| vs clean", "magma", annotate=True, fmt="{:.2g}")
    axes[0].set_xlabel("severity")
    axes[0].set_title("(a) per corruption and severity", loc="left", fontsize=10)
    cmap = mpl.colormaps["viridis"]
    for i, sev in enumerate(severities):
        per_block = corrupted[corrupted["severity"] == sev].groupby("block")["gate_change"].mean()
        colour = cmap(0.15 + 0.7 * i / max(1, len(severities) - 1))
        axes[1].plot(per_block.index, per_block, marker="o", ms=3, color=colour, label=f"severity {sev}")
    train = response[response["source"] == "train"].groupby("block")["gate_change"].mean()
    if len(train):
        axes[1].plot(train.index, train, color=SOURCE_COLOURS["train"], ls="--", label="train images")
    axes[1].set_xlabel("CNSN block (input to output)")
    axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set_ylabel("mean |gate change| vs clean")
    axes[1].legend(fontsize=7)
    axes[1].set_title("(b) per block (mean over corruptions)", loc="left", fontsize=10)
    if shift is not None:
        s = shift[shift["statistic"] == statistic][["layer", "source", "severity", "distance"]]
        merged = corrupted.merge(s, on=["layer", "source", "severity"])
        bounds = np.arange(min(severities) - 0.5, max(severities) + 1.0)
        norm = mpl.colors.BoundaryNorm(bounds, mpl.colormaps["viridis"].N)
        sc = axes[2].scatter(merged["distance"], merged["gate_change"], c=merged["severity"], cmap="viridis",
                             norm=norm, s=12, alpha=0.75, edgecolor="none")
        fig.colorbar(sc, ax=axes[2], label="severity", ticks=severities)
        ok = len(merged) >= 3 and merged["distance"].nunique() > 1 and merged["gate_change"].nunique() > 1
        rho = spearmanr(merged["distance"], merged["gate_change"]).statistic if ok else float("nan")
        for column, set_scale in (("distance", axes[2].set_xscale), ("gate_change", axes[2].set_yscale)):
            positive = merged.loc[merged[column] > 0, column]
            if len(positive) > 1 and positive.max() / positive.min() > 100:  # spans decades: log-like axis
                set_scale("symlog", linthresh=float(positive.quantile(0.05)), linscale=0.3)
        axes[2].set_xlabel(f"shift of the {STATISTIC_LABELS.get(statistic, statistic)}\n"
                           "(standardized W1, clean-sd units)")
        axes[2].set_ylabel("mean |gate change| vs clean")
        axes[2].set_title(f"(c) gate change vs statistic shift, Spearman rho = {rho:.2f}", loc="left", fontsize=10)
    return _finish(fig, context)
