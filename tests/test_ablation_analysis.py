import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mnv2lib.analysis import ablation as A
from mnv2lib.analysis.prose import ablation as prose
from mnv2lib.runs.spec import ablation_configs
from mnv2lib.figures import ablation as F
from mnv2lib.figures.common import FigureContext


def _runs(seeds=(0, 1, 2)):
    """A results table with known structure: each improvement adds a fixed amount plus seed noise."""
    rng = np.random.default_rng(0)
    effect = {"mish": 0.01, "triplet": 0.02, "cnsn": -0.005}
    rows = []
    for overrides in ablation_configs():
        parts = [k for k, on in A.FACTORS.items() if A.factor_on(overrides, on)]
        label = "+".join(parts) or "baseline"
        for s in seeds:
            seed_shift = 0.01 * s
            rows.append({"label": label, "seed": s, "activation": overrides.get("activation", "relu6"),
                         "attention": overrides.get("attention"), "cnsn": overrides.get("cnsn"),
                         "clean_accuracy": 0.6 + sum(effect[p] for p in parts) + seed_shift + rng.normal(0, 0.002),
                         "mean_corruption_accuracy": 0.4 + seed_shift + rng.normal(0, 0.002),
                         "parameters": 1000 + 10 * len(parts), "multiply_adds": 1e6, "train_seconds": 10.0,
                         "train_images_per_s": 100.0 - len(parts), "latency_ms_batch1": 1.0 + len(parts),
                         "wall_seconds": 60.0 + len(parts),
                         **{f: f in parts for f in A.FACTORS}})  # the factor columns of ablation.with_factors
    return pd.DataFrame(rows)


def test_ablation_configs_are_the_full_factorial():
    configs = ablation_configs()
    assert len(configs) == 8 and configs[0] == {}
    assert len({tuple(sorted(c.items())) for c in configs}) == 8
    assert configs[-1] == {"activation": "mish", "attention": "triplet", "cnsn": "cnsn"}


def test_summary_and_confidence_intervals_match_scipy():
    runs = _runs()
    summary = A.summarize(runs)
    assert list(summary["label"])[:1] == ["baseline"] and list(summary["label"])[-1] == "mish+triplet+cnsn"
    base = runs[runs.label == "baseline"]["clean_accuracy"]
    row = summary.set_index("label").loc["baseline"]
    low, high = stats.t.interval(0.95, len(base) - 1, loc=base.mean(), scale=stats.sem(base))
    assert row["clean_accuracy_mean"] == pytest.approx(base.mean())
    assert row["clean_accuracy_ci_low"] == pytest.approx(low) and row["clean_accuracy_ci_high"] == pytest.approx(high)


def test_paired_differences_remove_the_seed_effect():
    runs = _runs()
    diffs = A.paired_differences(runs, "clean_accuracy").set_index("label")
    assert diffs.loc["triplet", "mean_difference"] == pytest.approx(0.02, abs=0.004)
    assert diffs.loc["triplet", "significant"]  # the seed shift is shared, so the paired CI is narrow
    wide = runs.pivot_table(index="seed", columns="label", values="clean_accuracy")
    d = wide["mish"] - wide["baseline"]
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert diffs.loc["mish", "ci_low"] == pytest.approx(low) and diffs.loc["mish", "ci_high"] == pytest.approx(high)
    with pytest.raises(ValueError, match="baseline"):
        A.paired_differences(runs, baseline="nothing")


def test_single_seed_has_no_interval():
    diffs = A.paired_differences(_runs(seeds=(0,)))
    assert diffs["ci_low"].isna().all() and not diffs["significant"].any()


def test_factorial_effects_recover_the_built_in_effects():
    effects = A.factorial_effects(_runs())
    clean = effects[effects["metric"] == "clean_accuracy"].set_index("term")
    assert clean.loc["mish", "effect"] == pytest.approx(0.01, abs=0.003)
    assert clean.loc["triplet", "effect"] == pytest.approx(0.02, abs=0.003)
    assert clean.loc["cnsn", "effect"] == pytest.approx(-0.005, abs=0.003)
    assert not clean.loc["mish:triplet", "significant"]  # the effects were built to add up
    # the seed offsets (0.01 per seed) go to the block, not to the residual
    assert clean["residual_sd"].iloc[0] < 0.004


def test_model_differences_pool_the_variance_of_the_whole_design():
    runs = _runs(seeds=(0, 1))
    pooled = A.model_differences(runs).set_index("label")
    paired = A.paired_differences(runs).set_index("label")
    assert pooled.loc["mish", "mean_difference"] == pytest.approx(paired.loc["mish", "mean_difference"])
    assert pooled["df_resid"].iloc[0] == 7  # 16 runs - 8 variants - 1 seed block; a per-pair interval has 1
    width = lambda f: (f["ci_high"] - f["ci_low"]).mean()  # noqa: E731
    assert width(pooled) < width(paired) / 3
    with pytest.raises(ValueError, match="baseline: got 'nothing'"):
        A.model_differences(runs, baseline="nothing")


def test_description_is_built_from_the_numbers():
    runs = _runs()
    summary = A.summarize(runs)
    diffs = {m: A.paired_differences(runs, m) for m in A.METRICS}
    text = prose.describe(summary, diffs, "synthetic", "smoke")
    base = summary.set_index("label").loc["baseline"]
    assert f"{100 * base['clean_accuracy_mean']:.1f}%" in text
    best = diffs["clean_accuracy"].set_index("label")["mean_difference"].idxmax()
    assert f"**{best}**" in text and "synthetic" in text
    # 8 variants x 3 seeds; parts per variant 0, 1, 1, 1, 2, 2, 2, 3 -> 24 * 60 s + 3 * 12 s
    assert f"The 24 runs took {(24 * 60 + 36) / 60:.1f} min of wall time" in text
    effects = A.factorial_effects(runs)
    text = prose.describe_factorial(effects)
    assert "triplet +2.0 pp" in text and "Not distinguishable from zero: " in text and "seed(s) per variant" in text


def test_record_tables():
    records = [{"label": "baseline", "seed": 0, "corruption_accuracy": {"fog": {"1": 0.5, "2": 0.3}},
                "history": [{"epoch": 1, "test_accuracy": 0.2}, {"epoch": 2, "test_accuracy": 0.4}]},
               {"label": "mish", "seed": 0, "corruption_accuracy": {"fog": {"1": 0.7, "2": 0.5}}, "history": []}]
    table = A.corruption_table(records)
    assert table.loc["fog", "baseline"] == pytest.approx(0.4) and table.loc["fog", "mish"] == pytest.approx(0.6)
    assert A.severity_table(records).loc[2, "mish"] == pytest.approx(0.5)
    assert len(A.histories_frame(records)) == 2


def test_figures_render(tmp_path):
    runs = _runs()
    summary = A.summarize(runs)
    diffs = {m: A.paired_differences(runs, m) for m in A.METRICS}
    ctx = FigureContext("synthetic", "smoke", (0, 1, 2))
    figs = [F.make_ablation_accuracy_figure(runs, summary, ctx), F.make_paired_difference_figure(diffs, ctx),
            F.make_factorial_effects_figure(A.factorial_effects(runs), ctx),
            F.make_accuracy_vs_cost_figure(summary, "latency_ms_batch1", "clean_accuracy", ctx)]
    for i, fig in enumerate(figs):
        assert any("synthetic" in t.get_text() for t in fig.texts)  # provenance on the figure
        path = tmp_path / f"{i}.png"
        fig.savefig(path)
        assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="cost: got 'speed'"):
        F.make_accuracy_vs_cost_figure(summary, "speed")
    ax = figs[3].axes[0]
    assert "latency" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
