"""MobileNetV2's own design choices (notebook 06): the paper's Figure 6 ablations (linear vs
ReLU6 bottleneck; shortcut between bottlenecks, between expansions, or none), the expansion
ratio sweep and the width x resolution trade-off, with the sentences that report them.

Runs come from the shared results store (``mnv2lib.runs.api.ensure_runs``); the summaries
reuse the ablation's helpers (``summarize``, ``model_differences``, ``histories_frame``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..engine.measure import count_parameters, make_eval_step, multiply_adds, time_call
from ..models import build_model
from ..utils.progress import progress
from .ablation import METRICS, model_differences, summarize
from .work_sizes import work_sizes

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
    """The plan for a profile (``mnv2lib.analysis.work_sizes``): smoke seconds, quick ~15 CPU minutes, full
    all of it; the profile's own width is never trained twice."""
    sizes, seeds, width = work_sizes(profile, "design"), tuple(profile.seeds), profile.width_mult
    pick = {"profile": seeds, "first": seeds[:1]}
    return DesignPlan(pick[sizes["figure6_seeds"]], pick[sizes["sweep_seeds"]], tuple(sizes["expand_ratios"]),
                      tuple(w for w in sizes["widths"] if w != width), tuple(sizes["cost_widths"]),
                      tuple(sizes["resolutions"]), sizes["latency_repeats"])


def figure6_configs() -> list[dict]:
    """Model overrides of the Figure 6 comparisons, the shared baseline first."""
    return [dict(o) for o in FIGURE6_OVERRIDES.values()]


def sweep_configs(plan: DesignPlan) -> list[dict]:
    """Model overrides of the expansion-ratio and width sweeps (the baseline is trained by Figure 6)."""
    return [{"expand_ratio": t} for t in plan.expand_ratios] + [{"width_mult": w} for w in plan.widths]


def planned_runs(plan: DesignPlan) -> int:
    """Runs the plan asks for, the baseline included (finished ones are read back, not retrained)."""
    return len(figure6_configs()) * len(plan.figure6_seeds) + len(sweep_configs(plan)) * len(plan.sweep_seeds)


def shortcut_table(profile, num_classes: int = 10) -> pd.DataFrame:
    """For the profile's model, each shortcut placement: how many shortcuts, and how many channels
    the joined tensors have (thin bottlenecks vs wide expansions)."""
    from ..runs.spec import model_config_for

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
    from ..runs.store import records_to_frame, valid_records

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
    """Summary over seeds per variant and, per metric, each variant's difference to the baseline with an
    interval from one model of the four variants with seed blocks (``ablation.model_differences``): with 2
    seeds it has 3 degrees of freedom where a per-pair interval had 1 (and spanned 30 pp)."""
    runs = figure6_runs(frame)
    summary = summarize(runs, confidence)
    diffs = {metric: model_differences(runs, metric, confidence=confidence) for metric in METRICS
             if runs[metric].notna().any()}
    return summary, diffs


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def verdict(row) -> str:
    """Whether a difference (alternative - paper's choice) agrees with the paper."""
    if row["seeds"] < 2 or math.isnan(row["ci_low"]):
        return "a single seed, so no confidence interval: indicative only"
    if row["ci_high"] < 0:
        return "the interval excludes zero: **agrees with the paper**"
    if row["ci_low"] > 0:
        return "the interval excludes zero in the other direction: **contradicts the paper** at this budget"
    return "the interval includes zero: **not resolved** at this budget"


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


