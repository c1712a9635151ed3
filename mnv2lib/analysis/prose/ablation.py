"""The sentences of notebook prose about ablation, generated from the numbers (computation: ``mnv2lib.analysis.ablation``)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..ablation import METRICS, _pp


def describe(summary: pd.DataFrame, diffs: dict[str, pd.DataFrame], dataset: str, profile: str) -> str:
    """Markdown sentences stating the results, built only from the numbers passed in."""
    base = summary.set_index("label").loc["baseline"]
    lines = [f"**Results on {dataset}, profile `{profile}`, {int(base['seeds'])} seed(s) per variant.**", ""]
    lines.append(f"- The baseline reaches {100 * base['clean_accuracy_mean']:.1f}% clean accuracy and "
                 f"{100 * base.get('mean_corruption_accuracy_mean', math.nan):.1f}% mean corruption accuracy.")
    for metric, frame in diffs.items():
        if frame.empty:
            continue
        best = frame.loc[frame["mean_difference"].idxmax()]
        worst = frame.loc[frame["mean_difference"].idxmin()]
        sig = frame[frame["significant"]]
        ci = (lambda r: "" if math.isnan(r["ci_low"]) else f" (95% CI {_pp(r['ci_low'])} to {_pp(r['ci_high'])})")
        lines.append(f"- {METRICS.get(metric, metric).capitalize()}: the largest gain over the baseline is "
                     f"**{best['label']}** at {_pp(best['mean_difference'])}{ci(best)}; the smallest is "
                     f"**{worst['label']}** at {_pp(worst['mean_difference'])}{ci(worst)}. "
                     + (f"{len(sig)} of {len(frame)} differences have a confidence interval that excludes zero"
                        + (f" ({', '.join(sig['label'])})." if len(sig) else ".")
                        if not frame["ci_low"].isna().all() else
                        "With a single seed there are no confidence intervals; treat differences as indicative."))
    costly = summary.set_index("label")
    if "train_images_per_s" in costly and costly["train_images_per_s"].notna().all():
        slowest = costly["train_images_per_s"].idxmin()
        lines.append(f"- Training throughput ranges from {costly['train_images_per_s'].min():.0f} img/s "
                     f"({slowest}) to {costly['train_images_per_s'].max():.0f} img/s "
                     f"({costly['train_images_per_s'].idxmax()}) on the measuring machine.")
    if "wall_seconds_total" in costly and costly["wall_seconds_total"].notna().all():
        lines.append(f"- The {int(costly['seeds'].sum())} runs took {costly['wall_seconds_total'].sum() / 60:.1f} min "
                     "of wall time in all, each from start to finish as recorded when it ran (training, corruption "
                     "evaluation, cost measurement).")
    if "parameters" in costly and costly["parameters"].notna().all():
        lines.append(f"- Parameters: baseline {costly.loc['baseline', 'parameters'] / 1e6:.3f}M; the largest "
                     f"variant ({costly['parameters'].idxmax()}) adds "
                     f"{(costly['parameters'].max() - costly.loc['baseline', 'parameters']) / 1e3:.1f}k.")
    return "\n".join(lines)


def describe_factorial(effects: pd.DataFrame, effect_size: float = 0.05) -> str:
    """Which terms of the factorial model are distinguishable from zero, per metric, and how many seeds a
    ``effect_size`` effect needs at this run-to-run spread."""
    from ..factorial import seeds_needed

    lines = []
    for metric, frame in effects.groupby("metric", sort=False):
        name = METRICS.get(metric, metric)
        parts = [f"{row['term'].replace(':', ' x ')} {_pp(row['effect'])} ({_pp(row['ci_low'])} to {_pp(row['ci_high'])})"
                 for _, row in frame.iterrows() if row["significant"]]
        unclear = [row["term"].replace(":", " x ") for _, row in frame.iterrows() if not row["significant"]]
        sd, df, runs = frame["residual_sd"].iloc[0], int(frame["df_resid"].iloc[0]), int(frame["runs"].iloc[0])
        k = int(frame["order"].eq(1).sum())
        need = seeds_needed(sd, k, effect=effect_size)
        lines.append(f"- **{name.capitalize()}** ({runs} runs, {df} residual degrees of freedom, run-to-run spread "
                     f"{100 * sd:.1f} pp): "
                     + (f"effects whose 95% interval excludes zero: {'; '.join(parts)}. " if parts else
                        "no effect's 95% interval excludes zero. ")
                     + (f"Not distinguishable from zero: {', '.join(unclear)}. " if unclear else "")
                     + (f"At this spread, a {100 * effect_size:.0f} pp effect needs {need} seed(s) per variant to be "
                        "told from zero." if need else
                        f"At this spread, a {100 * effect_size:.0f} pp effect needs more than 100 seeds."))
    return "\n".join(lines)


def describe_alone_and_main(table: pd.DataFrame, gap: float = 0.01) -> str:
    """Markdown: per metric, each improvement's effect alone against its main effect, and the interaction
    terms that make up the difference where it is at least ``gap`` (``factorial.alone_and_main``)."""
    if table.empty:
        return ""
    lines = []
    for metric, frame in table.groupby("metric", sort=False):
        items = []
        for _, row in frame.iterrows():
            interval = ("" if pd.isna(row.get("alone_ci_low", float("nan"))) else
                        f" [{_pp(row['alone_ci_low'])}, {_pp(row['alone_ci_high'])}]")
            text = (f"**{row['factor']}** alone {_pp(row['alone'])}{interval}, averaged over the others' settings "
                    f"(main effect) {_pp(row['main'])}")
            if abs(row["main"] - row["alone"]) >= gap and row["shares"]:
                ordered = sorted(row["shares"], key=lambda s: -abs(s[1]))
                shares = ", ".join(f"{term.replace(':', ' x ')} {_pp(share)}"
                                   f"{' (interval excludes zero)' if significant else ''}"
                                   for term, share, significant in ordered)
                if any(significant for _, _, significant in ordered):
                    text += "; the difference is its interactions, their shares of main minus alone: " + shares
                else:
                    text += ("; the interaction terms that make up the difference (" + shares + ") each have an "
                             "interval that includes zero: the difference is not resolved from the noise")
            items.append(text)
        lines.append(f"- {METRICS.get(metric, metric).capitalize()}: " + "; ".join(items) + ".")
    if (table["order"] < table["factor"].groupby(table["metric"]).transform("count")).any():
        lines.append("- (The model leaves out the highest interactions here, so 'alone' is its prediction "
                     "without them.)")
    return "\n".join(lines)


def describe_ladder(ladder: pd.DataFrame) -> str:
    """Markdown: per improvement and metric, the effect at each rung, and whether it changes sign or size."""
    if ladder.empty:
        return ("No rung of the budget ladder has both a baseline and a single-improvement run yet "
                "(`make ladder` trains them).")
    rungs = ladder.drop_duplicates("profile").sort_values("images_seen")
    lines = ["**Rungs present:** " + ", ".join(
        f"`{p}` ({n:,} images seen, baseline {100 * b:.1f}% clean)" for p, n, b in zip(
            rungs["profile"], rungs["images_seen"],
            [ladder[(ladder["profile"] == p) & (ladder["metric"] == "clean_accuracy")]["baseline"].mean()
             for p in rungs["profile"]])) + ".", ""]
    for (factor, metric), group in ladder.groupby(["improvement", "metric"], sort=False):
        group = group.sort_values("images_seen")
        steps = ", ".join(f"{_pp(e)} at {n:,}" + (f" ({s} seeds)" if s > 1 else " (1 seed)")
                          for e, n, s in zip(group["effect"], group["images_seen"], group["seeds"]))
        first, last = group.iloc[0], group.iloc[-1]
        if len(group) < 2:
            verdict = "only one rung: nothing to compare yet"
        elif np.sign(first["effect"]) != np.sign(last["effect"]) and abs(first["effect"]) > 0.005 \
                and abs(last["effect"]) > 0.005:
            verdict = (f"**changes sign** from the smallest to the largest budget ({_pp(first['effect'])} -> "
                       f"{_pp(last['effect'])})")
        elif abs(last["effect"]) > 1.5 * abs(first["effect"]) + 0.005:
            verdict = f"**grows** with the budget ({_pp(first['effect'])} -> {_pp(last['effect'])})"
        elif abs(last["effect"]) < abs(first["effect"]) / 1.5 - 0.005:
            verdict = f"**shrinks** with the budget ({_pp(first['effect'])} -> {_pp(last['effect'])})"
        else:
            verdict = f"keeps its sign and size ({_pp(first['effect'])} -> {_pp(last['effect'])})"
        lines.append(f"- **{factor}**, {METRICS[metric]}: {steps} images seen; {verdict}.")
    return "\n".join(lines)
