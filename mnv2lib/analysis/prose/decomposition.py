"""The sentences of notebook 04's decomposition, generated from the numbers (computation:
``mnv2lib.analysis.decomposition``)."""
from __future__ import annotations

import math

import pandas as pd

from ..decomposition import BASELINE

_METRIC_NAMES = {"clean_accuracy": "clean", "mean_corruption_accuracy": "under corruption",
                 "train_accuracy": "training accuracy"}


def _pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


def _interval(row) -> str:
    if math.isnan(row["ci_low"]):
        return ""
    return f" [{_pp(row['ci_low'])}, {_pp(row['ci_high'])}]"


def describe_decomposition(table: pd.DataFrame, untrained: list[str] = ()) -> str:
    """Per improvement: every part's difference from the baseline (clean, corruption, training accuracy),
    the part with the largest clean change, and the parts whose interval excludes zero; then the
    ``untrained`` parts, which ``make decomposition`` trains."""
    later = (f"\n\nNot in the results store yet: {', '.join(untrained)}. `make decomposition` trains every part "
             "(side by side, like `make reports`); this section then shows them." if untrained else "")
    if table.empty:
        return "No part of any improvement is in the results store yet: the run plan trains them." + later
    lines = []
    base = table[(table["part"] == BASELINE) & (table["metric"] == "clean_accuracy")]
    if not base.empty:
        lines.append(f"The baseline reaches {100 * base['mean'].iloc[0]:.1f}% clean accuracy "
                     f"({int(base['seeds'].iloc[0])} run(s)); differences below are part minus baseline with 95% "
                     "intervals from one model of all these runs (parts and seeds as factors).")
    for improvement, group in table[table["part"] != BASELINE].groupby("improvement", sort=False):
        parts = []
        for part, rows in group.groupby("part", sort=False):
            by_metric = rows.set_index("metric")
            values = ", ".join(f"{_METRIC_NAMES[m]} {_pp(by_metric.loc[m, 'difference'])}{_interval(by_metric.loc[m])}"
                               for m in _METRIC_NAMES if m in by_metric.index)
            parts.append(f"{part}{' (a deviation from the official code)' if rows['deviation'].iloc[0] else ''}: "
                         f"{values}")
        clean = group[group["metric"] == "clean_accuracy"]
        worst = clean.loc[clean["difference"].idxmin()] if not clean.empty else None
        clear = [f"{r['part']} ({_METRIC_NAMES[r['metric']]})" for _, r in group.iterrows() if r["significant"]]
        summary = ""
        if worst is not None:
            summary = (f" The largest clean change is {worst['part']}'s ({_pp(worst['difference'])}"
                       f"{', its interval excludes zero' if worst['significant'] else ', within the noise'}).")
        summary += (f" Intervals that exclude zero: {'; '.join(clear)}." if clear else
                    " No interval excludes zero at this budget and seed count.")
        lines.append(f"- **{improvement}**: " + "; ".join(parts) + "." + summary)
    return "\n".join(lines) + later
