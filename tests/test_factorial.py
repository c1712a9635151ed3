"""The factorial model of the ablation (mnv2lib.analysis.factorial) recovers known effects from a synthetic
2^k table, with intervals from the whole design."""
from __future__ import annotations

import numpy as np
import pytest

from mnv2lib.analysis.factorial import fit_factorial, seeds_needed, simulate_design

FACTORS = ["mish", "triplet", "cnsn"]
TRUTH = {"mish": 0.04, "triplet": -0.01, "cnsn": -0.15, "mish:cnsn": 0.03}


def test_known_effects_are_recovered_within_their_intervals():
    table = simulate_design(FACTORS, TRUTH, seeds=6, noise_sd=0.01, seed_sd=0.02, rng=1)
    # 99.9% intervals: six 95% intervals would all cover the truth only three times in four
    fit = fit_factorial(table, FACTORS, "y", order=2, confidence=0.999).set_index("term")
    for term in ["mish", "triplet", "cnsn", "mish:triplet", "mish:cnsn", "triplet:cnsn"]:
        truth = TRUTH.get(term, 0.0)
        assert fit.loc[term, "ci_low"] <= truth <= fit.loc[term, "ci_high"], (term, fit.loc[term].to_dict())
    assert fit.loc["cnsn", "significant"] and fit.loc["mish", "significant"]
    assert not fit.loc["triplet:cnsn", "significant"]
    # the seed block absorbs the per-seed offsets: the residual spread is the within-seed noise
    assert 0.005 < fit["residual_sd"].iloc[0] < 0.02


def test_a_main_effect_is_the_difference_of_means_in_a_balanced_design():
    table = simulate_design(FACTORS, TRUTH, seeds=3, noise_sd=0.02, rng=2)
    fit = fit_factorial(table, FACTORS, "y").set_index("term")
    for f in FACTORS:
        expected = table[table[f] == 1]["y"].mean() - table[table[f] == 0]["y"].mean()
        assert fit.loc[f, "effect"] == pytest.approx(expected, abs=1e-12)


def test_the_interaction_order_leaves_residual_degrees_of_freedom():
    one_seed = simulate_design(FACTORS, TRUTH, seeds=1, noise_sd=0.01)
    fit = fit_factorial(one_seed, FACTORS, "y")
    assert fit["order"].max() == 2 and fit["df_resid"].iloc[0] == 1
    with pytest.raises(ValueError, match="no residual degrees of freedom"):
        fit_factorial(one_seed, FACTORS, "y", order=3)


def test_bad_tables_name_the_column():
    table = simulate_design(FACTORS, TRUTH, seeds=2, noise_sd=0.01)
    with pytest.raises(ValueError, match=r"factors: got \['eca'\]"):
        fit_factorial(table, ["eca"], "y")
    with pytest.raises(ValueError, match="mish: got levels"):
        fit_factorial(table.assign(mish=table["mish"] * 2), FACTORS, "y")


def test_seeds_needed_shrinks_with_the_spread_and_matches_the_simulation():
    assert seeds_needed(0.01, 3) < seeds_needed(0.05, 3) < seeds_needed(0.10, 3)
    seeds = seeds_needed(0.04, 3, effect=0.05)
    rng = np.random.default_rng(0)
    hits = 0
    for i in range(40):  # with that many seeds, a true 5 pp effect is found most of the time
        table = simulate_design(FACTORS, {"mish": 0.05}, seeds=seeds, noise_sd=0.04, rng=int(rng.integers(1e9)))
        hits += bool(fit_factorial(table, FACTORS, "y", order=2).set_index("term").loc["mish", "significant"])
    assert hits >= 20
    assert seeds_needed(1.0, 3, max_seeds=5) is None


def test_an_effect_alone_is_the_cell_difference_and_its_gap_to_the_main_effect_the_interactions():
    from mnv2lib.analysis.factorial import alone_and_main
    from mnv2lib.analysis.prose.ablation import describe_alone_and_main

    truth = {"mish": 0.04, "triplet": 0.02, "cnsn": -0.15, "mish:triplet": -0.06}
    table = simulate_design(FACTORS, truth, seeds=3, noise_sd=0.01, rng=4)
    fit = fit_factorial(table, FACTORS, "y")
    assert fit["order"].max() == 3  # every interaction: the model reproduces the cell means
    split = alone_and_main(fit).set_index("factor")
    off = {f: 0 for f in FACTORS}

    def cell(**on):
        rows = table[np.logical_and.reduce([table[f] == v for f, v in {**off, **on}.items()])]
        return rows["y"].mean()

    for factor in FACTORS:
        assert split.loc[factor, "alone"] == pytest.approx(cell(**{factor: 1}) - cell(), abs=1e-9)
        assert split.loc[factor, "main"] == pytest.approx(
            split.loc[factor, "alone"] + sum(share for _, share, _ in split.loc[factor, "shares"]), abs=1e-12)
    # triplet helps alone and loses on average: its interaction with mish (-0.06) makes the difference
    assert split.loc["triplet", "alone"] > 0.005 and split.loc["triplet", "main"] < split.loc["triplet", "alone"] - 0.02
    text = describe_alone_and_main(alone_and_main(fit))
    assert "**triplet** alone +" in text and "the difference is its interactions, their shares of main minus alone: mish x triplet -" in text
    # alone's interval is the cell contrast's in one model of every cell with seed blocks
    import statsmodels.formula.api as smf

    cells = table.assign(cell=table[FACTORS].astype(int).astype(str).agg("".join, axis=1))
    direct = smf.ols("y ~ C(cell, Treatment('000')) + C(seed)", data=cells).fit().conf_int()
    for i, factor in enumerate(FACTORS):
        code = "".join("1" if j == i else "0" for j in range(len(FACTORS)))
        low, high = direct.loc[f"C(cell, Treatment('000'))[T.{code}]"]
        assert (split.loc[factor, "alone_ci_low"], split.loc[factor, "alone_ci_high"]) == pytest.approx((low, high))
    assert "**triplet** alone +" in text and f"[{100 * split.loc['triplet', 'alone_ci_low']:+.1f} pp" in text


def test_a_gap_made_of_interactions_within_the_noise_is_called_unresolved():
    from mnv2lib.analysis.factorial import alone_and_main
    from mnv2lib.analysis.prose.ablation import describe_alone_and_main

    table = simulate_design(FACTORS, {"mish": 0.04, "mish:triplet": -0.03}, seeds=2, noise_sd=0.04, rng=1)
    split = alone_and_main(fit_factorial(table, FACTORS, "y"))
    row = split[(split["factor"] == "mish")].iloc[0]
    assert not any(significant for _, _, significant in row["shares"]) and abs(row["main"] - row["alone"]) >= 0.01
    text = describe_alone_and_main(split)
    assert "each have an interval that includes zero: the difference is not resolved from the noise" in text
    assert "the difference is its interactions" not in text.split("**mish**")[1].split("**")[0]
