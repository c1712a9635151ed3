"""The 2^k ablation: summaries over seeds, each variant's difference from the baseline and the factorial
effects (main effects and interactions) with intervals from one model of the whole design
(``mnv2lib.analysis.factorial``), and the budget ladder."""
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
# factor name -> the build_model overrides that switch it on (the runs' IMPROVEMENTS)
FACTORS = {"mish": {"activation": "mish"}, "triplet": {"attention": "triplet"}, "cnsn": {"cnsn": "cnsn"}}
_OFF = (None, "relu6")  # a factor's setting when it is off (the baseline's activation, no module)


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


def factor_on(model_config: dict, overrides: dict) -> bool:
    """Whether a run's model config has a factor switched on (every override of the factor set)."""
    return all(model_config.get(k) == v for k, v in overrides.items())


def with_factors(table: pd.DataFrame, records: list[dict], factors: dict | None = None) -> pd.DataFrame:
    """``table`` (one row per run, with its ``key``) with a True/False column per factor."""
    factors = FACTORS if factors is None else factors
    configs = {r["key"]: r["model_config"] for r in records}
    out = table.copy()
    for name, overrides in factors.items():
        out[name] = [factor_on(configs[k], overrides) for k in out["key"]]
    return out


def factorial_effects(table: pd.DataFrame, factors=None, metrics=None, confidence: float = 0.95) -> pd.DataFrame:
    """Main effects and interactions of ``factors`` (columns of ``table``, see :func:`with_factors`) for each
    metric, from one OLS model of the whole design with seed blocks (``factorial.fit_factorial``)."""
    from .factorial import fit_factorial

    factors = list(FACTORS if factors is None else factors)
    frames = [fit_factorial(table, factors, metric, confidence=confidence)
              for metric in (metrics or METRICS) if metric in table and table[metric].notna().any()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def alone_and_main(effects: pd.DataFrame) -> pd.DataFrame:
    """Each improvement's effect alone against its main effect, and the interactions between them
    (``factorial.alone_and_main`` of a :func:`factorial_effects` table)."""
    from .factorial import alone_and_main as split

    return split(effects)


def model_differences(table: pd.DataFrame, metric: str = "clean_accuracy", baseline: str = "baseline",
                      confidence: float = 0.95) -> pd.DataFrame:
    """Per variant, its difference from the baseline with an interval from the whole design's residual
    variance (variant and seed as factors), the same columns as :func:`paired_differences`."""
    from .factorial import differences_from_reference

    return differences_from_reference(table, "label", metric, baseline, confidence=confidence)


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


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


def curves_frame(records: list[dict]) -> pd.DataFrame:
    """The learning curves' points (validation accuracy at evenly spaced steps) of every run that has them,
    long format with label and seed; empty for runs trained without (``TrainConfig.curve_points``)."""
    return pd.DataFrame([{**point, "label": r["label"], "seed": r["seed"]}
                         for r in records for point in r.get("curve") or []])


def histories_frame(records: list[dict]) -> pd.DataFrame:
    """Per-epoch metrics of every run, long format with label and seed."""
    return pd.DataFrame([{**epoch, "label": r["label"], "seed": r["seed"]}
                         for r in records for epoch in r.get("history", [])])


# ---------------------------------------------------------------------------------------------
# the budget ladder: does each improvement's effect survive more training?

def images_seen(record: dict) -> int:
    """Training images a run saw: full batches per epoch (the loader drops the last partial one) x epochs."""
    train = record["profile"]["train"]
    return record["dataset"]["train_size"] // train["batch_size"] * train["batch_size"] * train["epochs"]


def _rung_key(record: dict) -> tuple:
    """Runs of one rung share the profile, the dataset and every model setting but the three factors."""
    config = {k: v for k, v in record["model_config"].items()
              if k not in {c for overrides in FACTORS.values() for c in overrides}}
    return record.get("profile_name"), record["dataset"]["name"], repr(sorted(config.items()))


def _single_factor(record: dict) -> str | None:
    """'baseline', the one improvement a run has alone, or None (pairs, triples, other settings)."""
    config = record["model_config"]
    on = [f for f, overrides in FACTORS.items() if factor_on(config, overrides)]
    off = all(config.get(column) in _OFF for f, overrides in FACTORS.items() if f not in on for column in overrides)
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


