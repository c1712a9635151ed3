"""The 2^3 ablation: summaries over seeds, paired differences against the baseline with
confidence intervals, main effects, and the sentences that report them."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

METRICS = {
    "clean_accuracy": "clean accuracy",
    "mean_corruption_accuracy": "mean corruption accuracy",
}
COSTS = ["parameters", "multiply_adds", "train_seconds", "train_memory_MiB", "train_images_per_s",
         "latency_ms_batch1", "latency_ms_batch64"]
FACTORS = {"mish": ("activation", "mish"), "triplet": ("attention", "triplet"), "cnsn": ("cnsn", "cnsn")}


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float, float]:
    """Mean and two-sided t confidence interval; NaN bounds when there is a single value."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def variant_order(labels) -> list[str]:
    """baseline, single improvements, pairs, all three."""
    return sorted(set(labels), key=lambda s: (0 if s == "baseline" else s.count("+") + 1, s))


def summarize(df: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """One row per variant: seeds, mean/std/CI of each accuracy metric, and the cost columns."""
    rows = []
    for label, group in df.groupby("label"):
        row = {"label": label, "seeds": len(group)}
        for metric in METRICS:
            values = group[metric].dropna().to_numpy()
            if len(values):
                mean, low, high = _t_interval(values, confidence)
                row.update({f"{metric}_mean": mean, f"{metric}_std": float(values.std(ddof=1)) if len(values) > 1
                            else math.nan, f"{metric}_ci_low": low, f"{metric}_ci_high": high})
        for cost in COSTS:
            if cost in group:
                row[cost] = float(group[cost].mean())
        if "wall_seconds" in group:  # the whole variant, every seed: what the ablation cost to run
            row["wall_seconds_total"] = float(group["wall_seconds"].sum(min_count=1))
        rows.append(row)
    out = pd.DataFrame(rows)
    order = variant_order(out["label"])
    return out.set_index("label").loc[order].reset_index()


def paired_differences(df: pd.DataFrame, metric: str = "clean_accuracy", baseline: str = "baseline",
                       confidence: float = 0.95) -> pd.DataFrame:
    """Per variant, the seed-paired difference ``variant - baseline`` with a t confidence interval."""
    wide = df.pivot_table(index="seed", columns="label", values=metric)
    if baseline not in wide:
        raise ValueError(f"baseline: got {baseline!r}; allowed values are the labels {sorted(wide.columns)}")
    rows = []
    for label in variant_order(wide.columns):
        if label == baseline:
            continue
        diffs = (wide[label] - wide[baseline]).dropna().to_numpy()
        if len(diffs) == 0:
            continue
        mean, low, high = _t_interval(diffs, confidence)
        rows.append({"label": label, "metric": metric, "seeds": len(diffs), "mean_difference": mean,
                     "ci_low": low, "ci_high": high,
                     "significant": bool(not math.isnan(low) and (low > 0 or high < 0))})
    return pd.DataFrame(rows)


def main_effects(df: pd.DataFrame, metric: str = "clean_accuracy") -> pd.DataFrame:
    """Factorial main effect of each improvement: mean over runs with it minus mean over runs without."""
    rows = []
    for factor, (column, value) in FACTORS.items():
        with_it = df[df[column] == value][metric].dropna()
        without = df[df[column] != value][metric].dropna()
        if len(with_it) and len(without):
            rows.append({"factor": factor, "metric": metric, "effect": float(with_it.mean() - without.mean()),
                         "runs_with": len(with_it), "runs_without": len(without)})
    return pd.DataFrame(rows)


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


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


def corruption_table(records: list[dict]) -> pd.DataFrame:
    """Accuracy per corruption (rows) and variant (columns), mean over severities and seeds."""
    rows = []
    for r in records:
        for corruption, per_severity in (r.get("corruption_accuracy") or {}).items():
            for severity, acc in per_severity.items():
                rows.append({"label": r["label"], "corruption": corruption, "severity": int(severity),
                             "accuracy": acc})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.pivot_table(index="corruption", columns="label", values="accuracy", aggfunc="mean")


def severity_table(records: list[dict]) -> pd.DataFrame:
    """Accuracy per severity (rows) and variant (columns), mean over corruptions and seeds."""
    rows = [{"label": r["label"], "severity": int(s), "accuracy": acc}
            for r in records for per in (r.get("corruption_accuracy") or {}).values() for s, acc in per.items()]
    frame = pd.DataFrame(rows)
    return frame if frame.empty else frame.pivot_table(index="severity", columns="label", values="accuracy")


def histories_frame(records: list[dict]) -> pd.DataFrame:
    """Per-epoch metrics of every run, long format with label and seed."""
    return pd.DataFrame([{**epoch, "label": r["label"], "seed": r["seed"]}
                         for r in records for epoch in r.get("history", [])])


def describe_main_effects(effects: pd.DataFrame) -> str:
    """One sentence per improvement from the main-effects table (columns effect_clean, effect_corruption)."""
    lines = []
    for _, row in effects.iterrows():
        lines.append(f"- **{row['factor']}**: main effect {_pp(row['effect_clean'])} on clean accuracy and "
                     f"{_pp(row['effect_corruption'])} on mean corruption accuracy "
                     f"({int(row['runs_with_clean'])} runs with, {int(row['runs_without_clean'])} without).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the budget ladder: does each improvement's effect survive more training?

def images_seen(record: dict) -> int:
    """Training images a run saw: full batches per epoch (the loader drops the last partial one) x epochs."""
    train = record["profile"]["train"]
    return record["dataset"]["train_size"] // train["batch_size"] * train["batch_size"] * train["epochs"]


def _rung_key(record: dict) -> tuple:
    """Runs of one rung share the profile, the dataset and every model setting but the three factors."""
    config = {k: v for k, v in record["model_config"].items() if k not in {c for c, _ in FACTORS.values()}}
    return record.get("profile_name"), record["dataset"]["name"], repr(sorted(config.items()))


def _single_factor(record: dict) -> str | None:
    """'baseline', the one improvement a run has alone, or None (pairs, triples, other settings)."""
    config = record["model_config"]
    on = [f for f, (column, value) in FACTORS.items() if config.get(column) == value]
    off = all(config.get(column) in (None, "relu6") for f, (column, _) in FACTORS.items() if f not in on)
    if not off or len(on) > 1:
        return None
    return on[0] if on else "baseline"


def budget_ladder(records: list[dict], confidence: float = 0.95) -> pd.DataFrame:
    """Per improvement, rung (profile) and metric: the seed-paired effect ``improvement alone - baseline``
    with a t-interval over seeds (NaN bounds with one seed), and the rung's training budget in images.
    Rungs are the profiles present among the finished records; a rung without a baseline is skipped."""
    groups: dict[tuple, dict[str, dict[int, dict]]] = {}
    for r in records:
        if r.get("status") != "finished" or r.get("profile") is None:
            continue
        factor = _single_factor(r)
        if factor is not None:
            groups.setdefault(_rung_key(r), {}).setdefault(factor, {})[r["seed"]] = r
    rows = []
    for (profile, dataset, _), by_factor in groups.items():
        base = by_factor.get("baseline")
        if not base:
            continue
        budget = images_seen(next(iter(base.values())))
        for factor in FACTORS:
            runs = by_factor.get(factor, {})
            seeds = sorted(set(runs) & set(base))
            for metric in METRICS:
                diffs = np.array([runs[s][metric] - base[s][metric] for s in seeds
                                  if runs[s].get(metric) is not None and base[s].get(metric) is not None])
                if len(diffs) == 0:
                    continue
                mean, low, high = _t_interval(diffs, confidence)
                rows.append({"improvement": factor, "profile": profile, "dataset": dataset, "metric": metric,
                             "images_seen": budget, "seeds": len(diffs), "effect": mean, "ci_low": low,
                             "ci_high": high, "baseline": float(np.mean([base[s][metric] for s in seeds]))})
    columns = ["improvement", "profile", "dataset", "metric", "images_seen", "seeds", "effect", "ci_low", "ci_high",
               "baseline"]
    return pd.DataFrame(rows, columns=columns).sort_values(["metric", "improvement", "images_seen"],
                                                           ignore_index=True)


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
