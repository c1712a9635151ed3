"""The sentences of notebook 04's recipe selection, generated from the search's records (computation:
``mnv2lib.analysis.recipes``)."""
from __future__ import annotations

import pandas as pd

from ..recipes import best_recipes, shared_recipe, variant_columns


def _seeds(values) -> str:
    values = list(values)
    return f"seed{'s' if len(values) != 1 else ''} {', '.join(map(str, values))}"


def describe_recipe_selection(table: pd.DataFrame, effects: pd.DataFrame, current: str | None = None,
                              lead: dict | None = None) -> str:
    """Which recipe the shared criterion picks, how far the current one is from it (``lead``:
    ``recipes.paired_lead`` of the pick over the current recipe), each variant's own best, what flip
    test-time augmentation adds, and the improvements' effects under each choice."""
    if table.empty:
        return ("No record of the recipe search yet: `python -m mnv2lib.benchmarks.recipes` trains the baseline and "
                "each single improvement under every recipe of its grid on a validation split (about 35 min on 2 "
                "cores), and this section reads its records.")
    shared, best = shared_recipe(table), best_recipes(table)
    counts = table["seeds"].astype(int)
    fewest = int(counts.min())
    seeded = (f"{fewest} seed(s) each" if counts.nunique() == 1 else
              "seeds: " + ", ".join(f"{r} {n}" for r, n in counts.items() if n != fewest) + f", the others {fewest}")
    ranked_on = table.attrs.get("ranked_on") or ()
    ranked = (f", compared on {_seeds(ranked_on)}, which every recipe has" if ranked_on and counts.nunique() > 1
              else "")
    lines = [f"{len(table)} recipes x {len(variant_columns(table))} variants ({seeded}; a seed also draws its own "
             f"validation split), scored on images held out of the training set{ranked}. The shared criterion (mean "
             f"over the variants) picks **{shared}** ({100 * table.loc[shared, 'mean']:.1f}%)."]
    if len(table) > 1:
        runner_up = table["mean"].drop(shared).idxmax()
        lead_pp = table.loc[shared, "mean"] - table.loc[runner_up, "mean"]
        spread = table["mean_sd"].dropna()
        noise = (f"; between seeds the criterion itself moves by a standard deviation of up to "
                 f"{100 * spread.max():.1f} pp (the recipes with two or more seeds)" if not spread.empty else "")
        lines.append(f"Its lead over {runner_up} is {100 * lead_pp:.1f} pp{noise}.")
    if current is None:
        lines.append("The profile's recipe is none of the searched ones: its effects are not compared here.")
    elif current != shared:
        below = table.loc[shared, "mean"] - table.loc[current, "mean"]
        if lead is None or lead["seeds"] < 2:
            verdict = (", and with one seed shared by the two recipes nobody knows whether that is more than the "
                       "noise.")
        else:
            interval = (f"{100 * lead['difference']:+.1f} pp [{100 * lead['ci_low']:+.1f}, {100 * lead['ci_high']:+.1f}]"
                        f" (95%)")
            verdict = (f"; seed by seed over the {lead['seeds']} seeds both have, {shared} minus {current} is {interval}, " +
                       ("an interval that excludes zero." if lead["ci_low"] > 0 else
                        "an interval that includes zero: the search does not separate them."))
        lines.append(f"The profile's recipe ({current}) scores {100 * table.loc[current, 'mean']:.1f}%, "
                     f"{100 * below:.1f} pp below" + verdict)
    else:
        lines.append("That is the profile's recipe.")
    lines.append("Each variant's own best: " + ", ".join(
        f"{v} {best[v]} ({100 * table.loc[best[v], v]:.1f}%)" for v in best) + ".")
    gain = table["mean_flip"] - table["mean"]
    lines.append(f"Flip test-time augmentation (twice the evaluation cost, not used in the ablation) adds "
                 f"{100 * gain.mean():+.1f} pp on average ({100 * gain.min():+.1f} to {100 * gain.max():+.1f}).")
    if not effects.empty:
        parts = []
        for improvement, row in effects.iterrows():
            if "current" in row and current != shared:
                under = f"{100 * row['current']:+.1f} pp under {current}, {100 * row['shared']:+.1f} pp under {shared}"
            else:
                under = f"{100 * row['shared']:+.1f} pp under {shared}"
            parts.append(f"{improvement} {under}, {100 * row['per_variant']:+.1f} pp each at its own best")
        lines.append("Validation effects against the baseline: " + "; ".join(parts) + ".")
    if fewest < 2:
        lines.append(("With one seed per cell" if counts.max() < 2 else "For the recipes with one seed") +
                     ", a lead smaller than the seed-to-seed spread of the ablation (its residual standard deviation, "
                     "below) is not resolved, and the winner's own score is biased upward by having been chosen on "
                     "the same images.")
    return " ".join(lines)
