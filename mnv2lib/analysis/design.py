"""MobileNetV2's own design choices (notebook 06): the paper's Figure 6 ablations (linear vs
ReLU6 bottleneck; shortcut between bottlenecks, between expansions, or none), the expansion
ratio sweep and the width x resolution trade-off, with the sentences that report them.

Runs come from the shared results store (``mnv2lib.experiments.ensure_runs``); the summaries
reuse the ablation's helpers (``summarize``, ``paired_differences``, ``histories_frame``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..measure import count_parameters, make_eval_step, multiply_adds, time_call
from ..models import build_model
from ..progress import progress
from .ablation import METRICS, paired_differences, summarize

# The paper's Figure 6: (a) the bottleneck's non-linearity, (b) where the shortcut goes.
FIGURE6 = {
    "bottleneck": {"baseline": "linear bottleneck (paper)", "bottleneck=relu6": "ReLU6 in the bottleneck"},
    "shortcut": {"baseline": "shortcut between bottlenecks (paper)",
                 "shortcut=expansion": "shortcut between expansions", "shortcut=none": "no residual"},
}
FIGURE6_OVERRIDES = {"baseline": {}, "bottleneck=relu6": {"bottleneck_activation": "relu6"},
                     "shortcut=expansion": {"shortcut": "expansion"}, "shortcut=none": {"shortcut": "none"}}
# What the paper found (Figure 6, ImageNet): each alternative is worse than the paper's choice.
PAPER_FINDING = {"bottleneck=relu6": "the linear bottleneck is better than ReLU6 (Figure 6a)",
                 "shortcut=expansion": "shortcuts between bottlenecks beat shortcuts between expansions (Figure 6b)",
                 "shortcut=none": "shortcuts between bottlenecks beat no residual connection (Figure 6b)"}
KNOBS = {"expand_ratio": "expansion ratio t", "width_mult": "width multiplier"}


@dataclass(frozen=True)
class DesignPlan:
    """How much of the design study a profile runs (the sweeps are the expensive part)."""

    figure6_seeds: tuple      # seeds of the Figure 6 comparisons (several: confidence intervals)
    sweep_seeds: tuple        # seeds of the expansion and width sweeps
    expand_ratios: tuple      # t values trained (every block; the baseline is the table's t)
    widths: tuple             # width multipliers trained besides the profile's own
    cost_widths: tuple        # width x resolution cost grid (no training)
    resolutions: tuple
    latency_repeats: int


def design_plan(profile) -> DesignPlan:
    """The plan for a profile, scaled by its name: smoke seconds, quick ~15 CPU minutes, full all of it."""
    seeds, width = tuple(profile.seeds), profile.width_mult
    if profile.name == "smoke":
        return DesignPlan(seeds, seeds[:1], (2,), (0.5,), (0.25, 0.5), (24, 32), 2)
    if profile.name == "quick":
        # width 0.75 costs two quick runs: left to the full profile
        return DesignPlan(seeds, seeds[:1], (2, 4), tuple(w for w in (0.25,) if w != width),
                          (0.25, 0.5, 0.75, 1.0), (24, 32, 40, 48), 5)
    return DesignPlan(seeds, seeds, (2, 4, 6, 8, 10), tuple(w for w in (0.35, 0.5, 0.75, 1.0, 1.4) if w != width),
                      (0.35, 0.5, 0.75, 1.0, 1.4), (24, 32, 40, 48, 64), 10)


def figure6_configs() -> list[dict]:
    """Model overrides of the Figure 6 comparisons, the shared baseline first."""
    return [dict(o) for o in FIGURE6_OVERRIDES.values()]


def sweep_configs(plan: DesignPlan) -> list[dict]:
    """Model overrides of the expansion-ratio and width sweeps (the baseline is trained by Figure 6)."""
    return [{"expand_ratio": t} for t in plan.expand_ratios] + [{"width_mult": w} for w in plan.widths]


def planned_runs(plan: DesignPlan) -> int:
    """Runs the plan asks for, the baseline included (finished ones are read back, not retrained)."""
    return len(figure6_configs()) * len(plan.figure6_seeds) + len(sweep_configs(plan)) * len(plan.sweep_seeds)


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


def shortcut_table(profile, num_classes: int = 10) -> pd.DataFrame:
    """For the profile's model, each shortcut placement: how many shortcuts, and how many channels
    the joined tensors have (thin bottlenecks vs wide expansions)."""
    from ..experiments import model_config_for

    rows = []
    for label in FIGURE6["shortcut"]:
        model = build_model(model_config_for(FIGURE6_OVERRIDES[label], profile, num_classes))
        pairs = model.shortcuts()
        blocks = model.blocks
        channels = [blocks[a].hidden_dim if kind == "expansion" else blocks[a].out_channels for a, _, kind in pairs]
        rows.append({"label": label, "variant": FIGURE6["shortcut"][label], "shortcuts": len(pairs),
                     "blocks": [f"{a}->{b}" if a != b else str(a) for a, b, _ in pairs],
                     "min_channels": min(channels) if channels else None,
                     "max_channels": max(channels) if channels else None,
                     "parameters": count_parameters(model)})
    return pd.DataFrame(rows)


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


def run_label(model_config: dict, profile_width: float) -> str:
    """The ModelConfig label, with ``w=<width>`` added when the width is not the profile's."""
    from ..models import ModelConfig

    label = ModelConfig.from_dict(model_config).label
    width = model_config.get("width_mult", profile_width)
    if not math.isclose(width, profile_width):
        label = f"w={width:g}" if label == "baseline" else f"{label}+w={width:g}"
    return label


def design_frame(records: list[dict], profile_width: float) -> pd.DataFrame:
    """One row per finished run (``records_to_frame``), labelled relative to the profile's width,
    with the design options as columns."""
    from ..experiments import records_to_frame, valid_records

    records = valid_records(records)  # a bad record is left out of the frame and of the columns below
    frame = records_to_frame(records)
    if frame.empty:
        return frame
    configs = [r["model_config"] for r in records]
    frame["label"] = [run_label(c, profile_width) for c in configs]
    frame["width_mult"] = [float(c.get("width_mult", profile_width)) for c in configs]
    frame["expand_ratio"] = [c.get("expand_ratio") for c in configs]
    frame["expand_ratio"] = frame["expand_ratio"].astype(float)
    frame["bottleneck_activation"] = [c.get("bottleneck_activation") for c in configs]
    frame["shortcut"] = [c.get("shortcut", "bottleneck") for c in configs]
    return frame


# --- Figure 6 --------------------------------------------------------------------------------

def figure6_runs(frame: pd.DataFrame, panel: str | None = None) -> pd.DataFrame:
    """The runs of one Figure 6 panel ("bottleneck" or "shortcut"), or of both."""
    if panel is not None and panel not in FIGURE6:
        raise ValueError(f"panel: got {panel!r}; allowed values are {tuple(FIGURE6)}")
    labels = FIGURE6[panel] if panel else {k for p in FIGURE6.values() for k in p}
    return frame[frame["label"].isin(labels)]


def figure6_summary(frame: pd.DataFrame, confidence: float = 0.95) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """Summary over seeds per variant and, per metric, the seed-paired differences to the baseline."""
    runs = figure6_runs(frame)
    summary = summarize(runs, confidence)
    diffs = {metric: paired_differences(runs, metric, confidence=confidence) for metric in METRICS
             if runs[metric].notna().any()}
    return summary, diffs


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def verdict(row) -> str:
    """Whether a paired difference (alternative - paper's choice) agrees with the paper."""
    if row["seeds"] < 2 or math.isnan(row["ci_low"]):
        return "a single seed, so no confidence interval: indicative only"
    if row["ci_high"] < 0:
        return "the interval excludes zero: **agrees with the paper**"
    if row["ci_low"] > 0:
        return "the interval excludes zero in the other direction: **contradicts the paper** at this budget"
    return "the interval includes zero: **not resolved** at this budget"


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
            ci = "" if math.isnan(row["ci_low"]) else f", 95% CI {_pp(row['ci_low'])} to {_pp(row['ci_high'])}"
            text += (f", {_pp(row['mean_difference'])} against the paper's choice ({int(row['seeds'])} paired "
                     f"seed(s){ci}). The paper found that {finding}; here {verdict(row)}.")
        lines.append(text)
    corr = diffs.get("mean_corruption_accuracy")
    if corr is not None and not corr.empty:
        parts = ", ".join(f"{r['label']} {_pp(r['mean_difference'])}" for _, r in corr.iterrows())
        lines.append(f"- Mean corruption accuracy, difference to the paper's design: {parts}.")
    return "\n".join(lines)


# --- sweeps: accuracy against cost -------------------------------------------------------------

def tradeoff_table(frame: pd.DataFrame, profile_width: float, seeds: tuple | None = None,
                   confidence: float = 0.95) -> pd.DataFrame:
    """The expansion-ratio and width sweeps, one row per (knob, point): accuracy over the given
    seeds (mean and CI) and the costs. The baseline appears in both sweeps (t from the table:
    1 in the first block, 6 elsewhere; the profile's width)."""
    runs = frame if seeds is None else frame[frame["seed"].isin(seeds)]
    default = (runs["bottleneck_activation"].isna() & (runs["shortcut"] == "bottleneck")
               & (runs["activation"] == "relu6") & runs["attention"].isna() & runs["cnsn"].isna())
    at_width = np.isclose(runs["width_mult"], profile_width)
    series = {
        "expand_ratio": runs[default & at_width],
        "width_mult": runs[default & runs["expand_ratio"].isna()],
    }
    rows = []
    for knob, group in series.items():
        if group.empty:
            continue
        summary = summarize(group, confidence).set_index("label")
        for label, row in summary.iterrows():
            member = group[group["label"] == label].iloc[0]
            value = member[knob]
            name = label
            if label == "baseline":
                name = "baseline (table t)" if knob == "expand_ratio" else f"baseline (w={profile_width:g})"
            rows.append({"knob": knob, "label": label, "name": name,
                         "value": float(value) if not pd.isna(value) else math.nan,
                         "table_t": knob == "expand_ratio" and pd.isna(value), **row.to_dict()})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["sort"] = table["value"].fillna(6.0)  # the table's t: 6 in all but the first block
    return table.sort_values(["knob", "sort", "table_t"]).drop(columns="sort").reset_index(drop=True)


def pareto_front(table: pd.DataFrame, cost: str = "multiply_adds", metric: str = "clean_accuracy_mean") -> pd.Series:
    """True for points that no other point beats (cost <= and metric >=, one of them strictly)."""
    c, m = table[cost].to_numpy(float), table[metric].to_numpy(float)
    front = []
    for i in range(len(table)):
        dominated = np.any((c <= c[i]) & (m >= m[i]) & ((c < c[i]) | (m > m[i])))
        front.append(not dominated)
    return pd.Series(front, index=table.index, name="pareto")


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


# --- cost across width and resolution (no training) --------------------------------------------

def resolution_cost_grid(widths, resolutions, num_classes: int = 10, stem: str = "cifar_lite",
                         overrides: dict | None = None, latency_repeats: int = 5, measure_latency: bool = True,
                         show_progress: bool = True, latency_threads: int = 1) -> pd.DataFrame:
    """Parameters, multiply-adds and single-image CPU latency for every width x input side.

    Latency is measured on ``latency_threads`` CPU threads (1: as on one mobile core, and immune to
    thread oversubscription on a shared machine) and is the fastest of ``latency_repeats`` timed
    runs after warm-up: on a shared CPU the slower runs measure the neighbours' load."""
    rows = []
    grid = [(w, r) for w in widths for r in resolutions]
    models = {}
    for width, resolution in progress(grid, enabled=show_progress, desc="cost grid", unit="model"):
        if width not in models:
            models[width] = build_model(num_classes=num_classes, width_mult=width, stem=stem,
                                        **(overrides or {})).eval()
        model = models[width]
        row = {"width_mult": float(width), "resolution": int(resolution), "parameters": count_parameters(model),
               "multiply_adds": multiply_adds(model, (1, 3, resolution, resolution))}
        if measure_latency:
            x = torch.randn(1, 3, resolution, resolution)
            threads = torch.get_num_threads()
            torch.set_num_threads(latency_threads)
            try:
                times = time_call(make_eval_step(model, x), torch.device("cpu"), warmup=2, repeats=latency_repeats)
            finally:
                torch.set_num_threads(threads)
            row["latency_ms"] = 1000 * float(np.min(times))
        rows.append(row)
    return pd.DataFrame(rows)


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
