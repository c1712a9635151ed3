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


def _noise(row) -> str:
    """Whether ``row``'s interval excludes zero; with no interval (one seed: no residual to estimate
    the noise from) it says that instead of calling a difference noise."""
    if math.isnan(row["ci_low"]):
        return "no interval with one run per part"
    return "its interval excludes zero" if row["significant"] else "within the noise"


def _verdict(group: pd.DataFrame) -> str:
    """Which part carries an improvement's clean effect: the official form's difference, the part
    that comes closest to it, and the part that gains most (or loses least)."""
    clean = group[group["metric"] == "clean_accuracy"].set_index("part")
    if clean.empty:
        return ""
    official = [p for p in clean.index if "(official" in p]
    others = clean.drop(index=official)
    out = []
    if official:
        row = clean.loc[official[0]]
        out.append(f"{official[0]} changes clean accuracy by {_pp(row['difference'])}{_interval(row)} "
                   f"({_noise(row)})")
        if len(others):
            closest = (others["difference"] - row["difference"]).abs().idxmin()
            out.append(f"of the other parts, {closest} comes closest to that ({_pp(others.loc[closest, 'difference'])})")
    if len(others):
        best = others["difference"].idxmax()
        noise = _noise(others.loc[best])
        out.append(f"{best} {'gains most' if others.loc[best, 'difference'] > 0 else 'loses least'} "
                   f"({_pp(others.loc[best, 'difference'])}{'' if noise.startswith('its') else ', ' + noise})")
    return "; ".join(out)


def describe_decomposition(table: pd.DataFrame, untrained: list[str] = ()) -> str:
    """Per improvement: which part carries its clean effect (:func:`_verdict`), the parts whose interval
    excludes zero, and every part's difference from the baseline (clean, corruption, training accuracy);
    then the ``untrained`` parts, which ``make decomposition`` trains."""
    parts = [p for p in untrained if p != BASELINE]
    later = (f"\n\nNot in the results store yet: {', '.join(parts)}. `make decomposition` trains every part "
             "(side by side, like `make reports`); this section then shows them." if parts else "")
    if BASELINE in untrained:
        return ("The baseline is not in the results store yet, and every part is measured against it: the run "
                "plan trains it." + later)
    if table.empty:
        return "No part of any improvement is in the results store yet: the run plan trains them." + later
    lines = []
    base = table[(table["part"] == BASELINE) & (table["metric"] == "clean_accuracy")]
    if not base.empty:
        intervals = ("with 95% intervals from one model of all these runs (parts and seeds as factors)"
                     if table["ci_low"].notna().any() else
                     "without intervals: with one run per part there is no residual to estimate the noise from")
        lines.append(f"The baseline reaches {100 * base['mean'].iloc[0]:.1f}% clean accuracy "
                     f"({int(base['seeds'].iloc[0])} run(s)); differences below are part minus baseline {intervals}.")
    for improvement, group in table[table["part"] != BASELINE].groupby("improvement", sort=False):
        details = []
        for part, rows in group.groupby("part", sort=False):
            by_metric = rows.set_index("metric")
            values = ", ".join(f"{_METRIC_NAMES[m]} {_pp(by_metric.loc[m, 'difference'])}{_interval(by_metric.loc[m])}"
                               for m in _METRIC_NAMES if m in by_metric.index)
            details.append(f"  - {part}{' (a deviation from the official code)' if rows['deviation'].iloc[0] else ''}: "
                           f"{values}")
        clear = {part: [_METRIC_NAMES[m] for m in rows.loc[rows["significant"], "metric"]]
                 for part, rows in group.groupby("part", sort=False)}
        clear = [f"{part} ({', '.join(metrics)})" for part, metrics in clear.items() if metrics]
        verdict = _verdict(group)
        lines.append(f"- **{improvement}**: " + (verdict + ". " if verdict else "")
                     + (f"Intervals that exclude zero: {'; '.join(clear)}." if clear else
                        "No interval excludes zero at this budget and seed count." if group["ci_low"].notna().any()
                        else ""))
        lines += details
    return "\n".join(lines) + later
