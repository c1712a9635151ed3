"""The sentences of notebook prose about design, generated from the numbers (computation: ``mnv2lib.analysis.design``)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..design import FIGURE6, KNOBS, PAPER_FINDING, DesignPlan, _pp, pareto_front, planned_runs, verdict


def describe_plan(plan: DesignPlan, profile) -> str:
    """What this profile trains, in a sentence or two (numbers from the plan)."""
    t = ", ".join(f"{x:g}" for x in plan.expand_ratios)
    w = ", ".join(f"{x:g}" for x in plan.widths)
    seeds = lambda s: f"seed{'s' if len(s) > 1 else ''} {', '.join(map(str, s))}"  # noqa: E731
    return (f"Profile `{profile.name}` ({profile.train.epochs} epoch(s) on "
            f"{profile.train_size if profile.train_size else 'all'} training images, width {profile.width_mult:g}, "
            f"stem `{profile.stem}`): the four Figure 6 variants with {seeds(plan.figure6_seeds)}; expansion "
            f"ratios t = {t} and widths {w} with {seeds(plan.sweep_seeds)}; {planned_runs(plan)} runs in all, of which "
            f"the {len(plan.figure6_seeds)} baseline run(s) are shared with notebook 04 and every finished run is "
            f"read back from the results store. The cost grid covers widths "
            f"{', '.join(f'{x:g}' for x in plan.cost_widths)} at input sides "
            f"{', '.join(map(str, plan.resolutions))} pixels.")


def describe_shortcuts(table: pd.DataFrame) -> str:
    lines = []
    for _, row in table.iterrows():
        if row["shortcuts"] == 0:
            lines.append(f"- **{row['variant']}**: no shortcut at all; {int(row['parameters']):,} parameters.")
        else:
            lines.append(f"- **{row['variant']}**: {row['shortcuts']} shortcuts joining tensors of "
                         f"{int(row['min_channels'])} to {int(row['max_channels'])} channels; "
                         f"{int(row['parameters']):,} parameters.")
    if table["parameters"].nunique() == 1:
        lines.append("- The parameter count is the same for all three: only the wiring differs.")
    return "\n".join(lines)


def describe_figure6(summary: pd.DataFrame, diffs: dict[str, pd.DataFrame], dataset: str, profile: str) -> str:
    """Markdown sentences for the Figure 6 comparisons, built only from the numbers passed in."""
    s = summary.set_index("label")
    base = s.loc["baseline"]
    lines = [f"**Figure 6 on {dataset}, profile `{profile}`, {int(base['seeds'])} seed(s) per variant.**", "",
             f"- The paper's MobileNetV2 (linear bottleneck, shortcuts between bottlenecks) reaches "
             f"{100 * base['clean_accuracy_mean']:.1f}% clean accuracy"
             + (f" and {100 * base['mean_corruption_accuracy_mean']:.1f}% mean corruption accuracy."
                if "mean_corruption_accuracy_mean" in s and not math.isnan(base["mean_corruption_accuracy_mean"])
                else ".")]
    clean = diffs.get("clean_accuracy")
    clean = clean.set_index("label") if clean is not None and not clean.empty else None
    for label, finding in PAPER_FINDING.items():
        if label not in s.index:
            continue
        name = {**FIGURE6["bottleneck"], **FIGURE6["shortcut"]}[label]
        text = f"- **{name}**: {100 * s.loc[label, 'clean_accuracy_mean']:.1f}% clean accuracy"
        if clean is not None and label in clean.index:
            row = clean.loc[label]
            ci = "" if math.isnan(row["ci_low"]) else (
                f", 95% CI {_pp(row['ci_low'])} to {_pp(row['ci_high'])} from one model of the variants with seed "
                f"blocks, {int(row['df_resid'])} degrees of freedom")
            text += (f", {_pp(row['mean_difference'])} against the paper's choice ({int(row['seeds'])} "
                     f"seed(s){ci}). The paper found that {finding}; here {verdict(row)}.")
        lines.append(text)
    corr = diffs.get("mean_corruption_accuracy")
    if corr is not None and not corr.empty:
        parts = ", ".join(f"{r['label']} {_pp(r['mean_difference'])}" for _, r in corr.iterrows())
        lines.append(f"- Mean corruption accuracy, difference to the paper's design: {parts}.")
    return "\n".join(lines)


def describe_tradeoffs(table: pd.DataFrame, dataset: str, profile: str, seeds: tuple,
                       cost: str = "multiply_adds") -> str:
    """Sentences per sweep: cost and accuracy at the ends, and the Pareto-optimal points."""
    seed_text = f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
    lines = [f"**Sweeps on {dataset}, profile `{profile}`, {seed_text}; costs at the training resolution.**", ""]
    for knob, group in table.groupby("knob", sort=False):
        if len(group) < 2:
            lines.append(f"- {KNOBS[knob].capitalize()}: only {group['name'].iloc[0]} was run.")
            continue
        lo, hi = group.loc[group[cost].idxmin()], group.loc[group[cost].idxmax()]
        best = group.loc[group["clean_accuracy_mean"].idxmax()]
        front = group[pareto_front(group, cost)]["name"].tolist()
        lines.append(
            f"- {KNOBS[knob].capitalize()}: from **{lo['name']}** to **{hi['name']}** multiply-adds grow "
            f"{hi['multiply_adds'] / lo['multiply_adds']:.1f}x ({lo['multiply_adds'] / 1e6:.1f}M to "
            f"{hi['multiply_adds'] / 1e6:.1f}M) and parameters {hi['parameters'] / lo['parameters']:.1f}x; "
            f"clean accuracy goes from {100 * lo['clean_accuracy_mean']:.1f}% to {100 * hi['clean_accuracy_mean']:.1f}% "
            f"({_pp(hi['clean_accuracy_mean'] - lo['clean_accuracy_mean'])}). The most accurate point is "
            f"**{best['name']}** ({100 * best['clean_accuracy_mean']:.1f}%); on the accuracy/multiply-add Pareto "
            f"front: {', '.join(front)}.")
    return "\n".join(lines)


def describe_cost_grid(grid: pd.DataFrame, native_resolution: int) -> str:
    """How multiply-adds and latency scale with width and resolution, against the rules of thumb
    (width^2 and resolution^2 for multiply-adds)."""
    lines = []
    widths, resolutions = sorted(grid["width_mult"].unique()), sorted(grid["resolution"].unique())
    table = grid.set_index(["width_mult", "resolution"])
    native = native_resolution if native_resolution in resolutions else resolutions[len(resolutions) // 2]
    if len(widths) > 1:
        w0, w1 = widths[0], widths[-1]
        a, b = table.loc[(w0, native)], table.loc[(w1, native)]
        ratio, rule = b["multiply_adds"] / a["multiply_adds"], (w1 / w0) ** 2
        why = ("; the 1280-channel head, which never gets narrower than at width 1, and channel counts rounded "
               "up to multiples of 8 keep the narrow models above the rule" if ratio < 0.9 * rule else "")
        text = (f"- At {native}x{native}, width {w0:g} -> {w1:g} multiplies multiply-adds by "
                f"{ratio:.1f}x (the width-squared rule predicts {rule:.1f}x{why}) and parameters by "
                f"{b['parameters'] / a['parameters']:.1f}x")
        if "latency_ms" in grid:
            text += f", latency by {b['latency_ms'] / a['latency_ms']:.1f}x"
        lines.append(text + ".")
    if len(resolutions) > 1:
        w = widths[len(widths) // 2]
        r0, r1 = resolutions[0], resolutions[-1]
        a, b = table.loc[(w, r0)], table.loc[(w, r1)]
        text = (f"- At width {w:g}, input side {r0} -> {r1} multiplies multiply-adds by "
                f"{b['multiply_adds'] / a['multiply_adds']:.2f}x (resolution squared: {(r1 / r0) ** 2:.2f}x) and "
                f"leaves parameters unchanged ({int(a['parameters']):,})")
        if "latency_ms" in grid:
            text += (f"; latency grows {b['latency_ms'] / a['latency_ms']:.2f}x, "
                     + ("less than" if b["latency_ms"] / a["latency_ms"] < b["multiply_adds"] / a["multiply_adds"]
                        else "at least as much as")
                     + " the multiply-adds on this CPU")
        lines.append(text + ".")
    if "latency_ms" in grid and len(grid) > 2:
        corr = float(np.corrcoef(np.log(grid["multiply_adds"]), np.log(grid["latency_ms"]))[0, 1])
        lines.append(f"- Over the whole grid, log latency and log multiply-adds correlate at r = {corr:.2f}: "
                     "multiply-adds are " + ("a good" if corr > 0.9 else "only a rough")
                     + " proxy for speed here.")
    return "\n".join(lines)
