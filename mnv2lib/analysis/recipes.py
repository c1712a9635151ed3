"""The fair recipe search's tables (records: ``python -m mnv2lib.benchmarks.recipes``; notebook 04).

A recipe is chosen for the whole ablation by the mean validation accuracy of the baseline and each single
improvement (the shared recipe), never by one variant's; each variant's own best recipe is kept beside it,
and the improvements' effects are given under both, as the issue of a recipe tuned for one variant asks.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..utils import paths

BASELINE = "baseline"


def load_recipe_records(directory: str | Path | None = None) -> list[dict]:
    """Every record of the recipe search in ``directory`` (default ``reports/recipes/``) that has a variant
    (the baseline-only records of earlier searches are skipped)."""
    directory = Path(directory) if directory is not None else paths.RECIPES_DIR
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))] if directory.is_dir() else []
    return [r for r in records if "variant" in r]


def _frame(records: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: r[k] for k in ("variant", "recipe", "seed", "validation_accuracy",
                                             "validation_accuracy_flip", "train_cpu_seconds")} for r in records])


def _complete_variants(frame: pd.DataFrame) -> list[str]:
    """The variants every recipe has (a recipe missing one cannot win by skipping a hard one)."""
    plain = frame.pivot_table(index="recipe", columns="variant", values="validation_accuracy", aggfunc="mean")
    return [v for v in plain.columns if plain[v].notna().all()]


def criterion_by_seed(records: list[dict]) -> pd.DataFrame:
    """Recipes x seeds: the shared criterion (mean validation accuracy over the variants every recipe
    has) per seed, NaN where a recipe lacks that seed or one of the variants in it."""
    if not records:
        return pd.DataFrame()
    frame = _frame(records)
    complete = _complete_variants(frame)
    cells = frame[frame["variant"].isin(complete)].pivot_table(index=["recipe", "seed"], columns="variant",
                                                               values="validation_accuracy")
    return cells.dropna().mean(axis=1).unstack("seed")


def recipe_selection(records: list[dict]) -> pd.DataFrame:
    """One row per recipe: each variant's validation accuracy, their mean (the shared criterion) and the
    same with flip test-time augmentation, all on the seeds every recipe has (a seed also draws its own
    validation split: a recipe with an extra, harder or easier seed would not be compared like with like;
    ``table.attrs["ranked_on"]`` names them); the criterion's standard deviation over all of a recipe's
    seeds (NaN with one), the mean CPU seconds of a run and the seeds; sorted best first by the criterion.
    Only variants every recipe has are averaged."""
    if not records:
        return pd.DataFrame()
    frame = _frame(records)
    complete = _complete_variants(frame)
    by_seed = criterion_by_seed(records)
    common = [int(s) for s in by_seed.columns if by_seed[s].notna().all()]
    ranked = frame[frame["seed"].isin(common)] if common else frame
    plain = ranked.pivot_table(index="recipe", columns="variant", values="validation_accuracy", aggfunc="mean")
    flip = ranked.pivot_table(index="recipe", columns="variant", values="validation_accuracy_flip", aggfunc="mean")
    table = plain[complete].copy()
    table["mean"] = plain[complete].mean(axis=1)
    table["mean_flip"] = flip[complete].mean(axis=1)
    table["mean_sd"] = by_seed.std(axis=1)  # pandas skips NaN: the spread over the seeds a recipe has
    grouped = frame.groupby("recipe")
    table["cpu_seconds"] = grouped["train_cpu_seconds"].mean()
    table["seeds"] = grouped["seed"].nunique()
    table = table.sort_values("mean", ascending=False)
    table.attrs["ranked_on"] = tuple(common)
    return table


def paired_lead(records: list[dict], better: str | None, other: str | None, confidence: float = 0.95) -> dict | None:
    """``better``'s criterion minus ``other``'s on the seeds both have (paired: a seed's validation split
    is the same for both), with a t interval when there are two or more; None when either is None or
    they are the same recipe."""
    import math

    from scipy import stats

    if better is None or other is None or better == other:
        return None
    by_seed = criterion_by_seed(records)
    if better not in by_seed.index or other not in by_seed.index:
        return None
    diffs = (by_seed.loc[better] - by_seed.loc[other]).dropna()
    n, mean = len(diffs), float(diffs.mean()) if len(diffs) else math.nan
    if n < 2:
        return {"difference": mean, "ci_low": math.nan, "ci_high": math.nan, "seeds": n}
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    return {"difference": mean, "ci_low": mean - half, "ci_high": mean + half, "seeds": n}


def variant_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("mean", "mean_flip", "mean_sd", "cpu_seconds", "seeds")]


def shared_recipe(table: pd.DataFrame) -> str:
    """The recipe with the best mean validation accuracy over the variants."""
    return str(table["mean"].idxmax())


def best_recipes(table: pd.DataFrame) -> dict[str, str]:
    """Each variant's own best recipe."""
    return {v: str(table[v].idxmax()) for v in variant_columns(table)}


# The first round's records predate their ``train_size`` field: they trained the quick profile's 20,000
# images (reports/recipes/README.md).
FIRST_ROUND_TRAIN_SIZE = 20_000


def current_recipe(records: list[dict], train: dict, train_size: int | None) -> str | None:
    """The name of the searched recipe whose training settings are ``train`` (a profile's
    ``TrainConfig.to_dict()``; evaluation-only settings aside) on ``train_size`` distinct images (a
    profile's; None: the whole training set, which no searched recipe used), or None if the search has none."""
    def settings(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("curve_points", "eval_batch_size")}

    for r in records:
        if (settings(r.get("train", {})) == settings(train)
                and r.get("train_size", FIRST_ROUND_TRAIN_SIZE) == train_size):
            return r["recipe"]
    return None


def effects_by_recipe(table: pd.DataFrame, current: str | None = None) -> pd.DataFrame:
    """Each improvement's validation effect (improvement minus baseline) under the ``current`` recipe,
    the shared recipe, and each at its own best recipe against the baseline at its own."""
    if table.empty or BASELINE not in table.columns:
        return pd.DataFrame()
    shared, best = shared_recipe(table), best_recipes(table)
    rows = []
    for variant in variant_columns(table):
        if variant == BASELINE:
            continue
        row = {"improvement": variant,
               "shared": table.loc[shared, variant] - table.loc[shared, BASELINE],
               "per_variant": table.loc[best[variant], variant] - table.loc[best[BASELINE], BASELINE],
               "own_recipe": best[variant]}
        if current is not None and current in table.index:
            row = {"improvement": variant, "current": table.loc[current, variant] - table.loc[current, BASELINE],
                   **{k: v for k, v in row.items() if k != "improvement"}}
        rows.append(row)
    return pd.DataFrame(rows).set_index("improvement")
