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


def recipe_selection(records: list[dict]) -> pd.DataFrame:
    """One row per recipe: each variant's validation accuracy (mean over seeds), their mean (the shared
    criterion), the same with flip test-time augmentation, the criterion's standard deviation over seeds
    (NaN with one seed), the mean CPU seconds of a run and the seeds;
    sorted best first by the shared criterion. Only variants every recipe has are averaged, so a recipe
    missing a variant cannot win by skipping a hard one."""
    if not records:
        return pd.DataFrame()
    frame = pd.DataFrame([{k: r[k] for k in ("variant", "recipe", "seed", "validation_accuracy",
                                              "validation_accuracy_flip", "train_cpu_seconds")} for r in records])
    plain = frame.pivot_table(index="recipe", columns="variant", values="validation_accuracy", aggfunc="mean")
    flip = frame.pivot_table(index="recipe", columns="variant", values="validation_accuracy_flip", aggfunc="mean")
    complete = [v for v in plain.columns if plain[v].notna().all()]
    table = plain[complete].copy()
    table["mean"] = plain[complete].mean(axis=1)
    table["mean_flip"] = flip[complete].mean(axis=1)
    # the criterion per seed (mean over the same variants), and its spread where a recipe has 2+ seeds
    per_seed = frame[frame["variant"].isin(complete)].pivot_table(index=["recipe", "seed"], columns="variant",
                                                                  values="validation_accuracy")
    table["mean_sd"] = per_seed.dropna().mean(axis=1).groupby("recipe").std()
    grouped = frame.groupby("recipe")
    table["cpu_seconds"] = grouped["train_cpu_seconds"].mean()
    table["seeds"] = grouped["seed"].nunique()
    return table.sort_values("mean", ascending=False)


def variant_columns(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in ("mean", "mean_flip", "mean_sd", "cpu_seconds", "seeds")]


def shared_recipe(table: pd.DataFrame) -> str:
    """The recipe with the best mean validation accuracy over the variants."""
    return str(table["mean"].idxmax())


def best_recipes(table: pd.DataFrame) -> dict[str, str]:
    """Each variant's own best recipe."""
    return {v: str(table[v].idxmax()) for v in variant_columns(table)}


def current_recipe(records: list[dict], train: dict) -> str | None:
    """The name of the searched recipe whose training settings are ``train`` (a profile's
    ``TrainConfig.to_dict()``; evaluation-only settings aside), or None if the search has none."""
    def settings(d: dict) -> dict:
        return {k: v for k, v in d.items() if k not in ("curve_points", "eval_batch_size")}

    for r in records:
        if settings(r.get("train", {})) == settings(train):
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
