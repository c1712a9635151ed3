"""Effects of a 2^k factorial design run over several seeds, from one model of the whole design.

Each run is one cell (every factor on or off) and one seed. The model is ordinary least squares with the
factors coded -1 / +1, every interaction up to ``order``, and the seed as a block (each seed shares its
data order and initialisation stream across the cells), fitted by statsmodels. A term's *effect* is twice
its coefficient: for a main effect, the mean over the runs with the factor minus the mean over the runs
without it (the classical factorial effect); for an interaction, how much one factor's effect changes
when the other is switched on, halved (Box, Hunter & Hunter's convention). Intervals come from the
model's residual variance with its degrees of freedom, not from per-pair t-intervals with one.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
from scipy import stats


def coded(frame: pd.DataFrame, factors: list[str]) -> pd.DataFrame:
    """``frame`` with each factor column (bool or 0/1: on or off) recoded to -1 / +1."""
    missing = [f for f in factors if f not in frame]
    if missing:
        raise ValueError(f"factors: got {missing}, not columns of the table; allowed: {sorted(frame.columns)}")
    out = frame.copy()
    for f in factors:
        values = set(pd.unique(out[f].astype(int)))
        if not values <= {0, 1}:
            raise ValueError(f"{f}: got levels {sorted(values)}; allowed: on/off (True/False or 1/0)")
        out[f] = 2 * out[f].astype(int) - 1
    return out


def terms(factors: list[str], order: int) -> list[tuple[str, ...]]:
    """Main effects and interactions up to ``order`` factors, in the usual order."""
    return [c for k in range(1, order + 1) for c in itertools.combinations(factors, k)]


def fit_factorial(frame: pd.DataFrame, factors: list[str], metric: str, order: int | None = None,
                  block: str | None = "seed", confidence: float = 0.95) -> pd.DataFrame:
    """One row per term (``"mish"``, ``"mish:cnsn"``, ...): effect, its confidence interval, p-value, and the
    model's residual degrees of freedom and standard deviation. ``order`` None: as many interactions as
    the residual degrees of freedom allow (at least one left), up to all of them."""
    import statsmodels.formula.api as smf

    data = coded(frame.dropna(subset=[metric]), factors)
    if metric not in data:
        raise ValueError(f"metric: got {metric!r}; allowed: a column of the table")
    blocks = data[block].nunique() if block else 1
    cells = data.groupby(factors).ngroups
    if order is None:
        order = len(factors)
        while order > 1 and len(data) - (len(terms(factors, order)) + 1 + blocks - 1) < 1:
            order -= 1
    names = {f: f"x{i}" for i, f in enumerate(factors)}  # formula-safe names
    chosen = terms(factors, order)
    rhs = " + ".join(":".join(names[f] for f in t) for t in chosen)
    if block and blocks > 1:
        rhs += f" + C({block})"
    fitted = smf.ols(f"y ~ {rhs}", data=data.rename(columns={**names, metric: "y"})).fit()
    if fitted.df_resid < 1:
        raise ValueError(f"order: {order} leaves no residual degrees of freedom for {len(data)} runs in {cells} "
                         "cells; allowed: fewer interactions or more seeds")
    interval = fitted.conf_int(alpha=1 - confidence)
    rows = []
    for t in chosen:
        key = ":".join(names[f] for f in t)
        rows.append({"term": ":".join(t), "order": len(t), "metric": metric, "effect": 2 * fitted.params[key],
                     "ci_low": 2 * interval.loc[key, 0], "ci_high": 2 * interval.loc[key, 1],
                     "p_value": float(fitted.pvalues[key]), "df_resid": int(fitted.df_resid),
                     "residual_sd": math.sqrt(fitted.scale), "runs": len(data)})
    out = pd.DataFrame(rows)
    out["significant"] = (out["ci_low"] > 0) | (out["ci_high"] < 0)
    return out


def differences_from_reference(frame: pd.DataFrame, group: str, metric: str, reference: str,
                               block: str | None = "seed", confidence: float = 0.95) -> pd.DataFrame:
    """Each group's difference from ``reference`` in a model with the group and the block (seed) as factors:
    the residual variance is pooled over the whole design, so with 8 variants and 2 seeds an interval has
    7 degrees of freedom where a per-pair interval has 1. Columns: label, metric, seeds, mean_difference,
    ci_low, ci_high, significant (NaN bounds when no degree of freedom is left)."""
    import statsmodels.formula.api as smf

    data = frame.dropna(subset=[metric]).rename(columns={metric: "y", group: "g"})
    if reference not in set(data["g"]):
        raise ValueError(f"baseline: got {reference!r}; allowed values are the labels {sorted(set(data['g']))}")
    rhs = f"C(g, Treatment({reference!r}))"
    if block and data[block].nunique() > 1:
        rhs += f" + C({block})"
    fitted = smf.ols(f"y ~ {rhs}", data=data).fit()
    usable = fitted.df_resid >= 1
    interval = fitted.conf_int(alpha=1 - confidence) if usable else None
    rows = []
    for label in sorted(set(data["g"]) - {reference}, key=lambda s: (s.count("+"), s)):
        key = f"C(g, Treatment({reference!r}))[T.{label}]"
        low, high = (interval.loc[key, 0], interval.loc[key, 1]) if usable else (math.nan, math.nan)
        rows.append({"label": label, "metric": metric, "seeds": int((data["g"] == label).sum()),
                     "mean_difference": float(fitted.params[key]), "ci_low": float(low), "ci_high": float(high),
                     "significant": bool(usable and (low > 0 or high < 0)),
                     "df_resid": int(fitted.df_resid)})
    return pd.DataFrame(rows)


def seeds_needed(residual_sd: float, factors: int, effect: float = 0.05, confidence: float = 0.95,
                 order: int | None = None, max_seeds: int = 100) -> int | None:
    """The fewest seeds with which an effect of ``effect`` has a confidence interval that excludes zero
    (half-width below ``effect``) in a balanced 2^``factors`` design, given the run-to-run spread
    ``residual_sd``; None beyond ``max_seeds``."""
    if not (residual_sd >= 0 and math.isfinite(residual_sd)):
        raise ValueError(f"residual_sd: got {residual_sd!r}; allowed: a finite number >= 0")
    cells = 2 ** factors
    params = len(terms(list(range(factors)), order if order is not None else factors)) + 1
    for seeds in range(1, max_seeds + 1):
        runs = cells * seeds
        df = runs - params - (seeds - 1)
        if df < 1:
            continue
        half = stats.t.ppf(0.5 + confidence / 2, df) * 2 * residual_sd / math.sqrt(runs)
        if half < effect:
            return seeds
    return None


def alone_and_main(effects: pd.DataFrame) -> pd.DataFrame:
    """Per metric and factor of a :func:`fit_factorial` table: its main effect (averaged over the other
    factors' settings), its effect *alone* (every other factor off, as the model predicts it) and what
    separates the two, term by term. With the +-1 coding, alone = main - sum of the 2-factor terms that
    contain it + the 3-factor ones - ..., so main = alone + sum over those terms of (-1)^order x effect:
    ``shares`` lists (term, that share, whether the term's interval excludes zero). ``alone_ci_low`` /
    ``alone_ci_high``: alone's interval, from the terms' intervals as independent estimates (their
    half-widths added in quadrature), which they are in a balanced design with this coding; it is about
    twice the main effect's in a 2^3 design: a cell contrast rests on a quarter of the runs."""
    rows = []
    for metric, frame in effects.groupby("metric", sort=False):
        by_term = frame.set_index("term")
        for factor in frame.loc[frame["order"] == 1, "term"]:
            terms = [term for term, row in by_term.iterrows() if row["order"] > 1 and factor in term.split(":")]
            shares = [(term, (-1) ** int(by_term.loc[term, "order"]) * by_term.loc[term, "effect"],
                       bool(by_term.loc[term, "significant"])) for term in terms]
            main = float(by_term.loc[factor, "effect"])
            alone = main - sum(share for _, share, _ in shares)
            halves = (by_term.loc[[factor, *terms], "ci_high"] - by_term.loc[[factor, *terms], "effect"]).to_numpy()
            half = float(np.sqrt(np.sum(halves ** 2)))  # NaN when the model has no residual left
            rows.append({"metric": metric, "factor": factor, "main": main, "alone": alone,
                         "alone_ci_low": alone - half, "alone_ci_high": alone + half, "shares": shares,
                         "order": int(frame["order"].max())})
    return pd.DataFrame(rows, columns=["metric", "factor", "main", "alone", "alone_ci_low", "alone_ci_high", "shares",
                                       "order"])


def cell_means(frame: pd.DataFrame, factors: list[str], metric: str) -> pd.DataFrame:
    """Mean and run count of ``metric`` in every cell of the design (for the interaction plots)."""
    return frame.groupby(factors)[metric].agg(["mean", "count"]).reset_index()


def simulate_design(factors: list[str], effects: dict[str, float], seeds: int, noise_sd: float,
                    intercept: float = 0.5, seed_sd: float = 0.0, rng: int = 0) -> pd.DataFrame:
    """A synthetic balanced 2^k table with known effects (``{"a": 0.03, "a:b": -0.02}``): for tests and to
    show what the model recovers."""
    generator = np.random.default_rng(rng)
    offsets = generator.normal(0, seed_sd, seeds)
    rows = []
    for levels in itertools.product((0, 1), repeat=len(factors)):
        x = dict(zip(factors, (2 * v - 1 for v in levels)))
        for s in range(seeds):
            y = intercept + offsets[s] + generator.normal(0, noise_sd)
            for term, effect in effects.items():
                y += effect / 2 * math.prod(x[f] for f in term.split(":"))
            rows.append({**dict(zip(factors, levels)), "seed": s, "y": y})
    return pd.DataFrame(rows)
