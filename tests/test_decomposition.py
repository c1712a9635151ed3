"""Notebook 04's decomposition (mnv2lib.analysis.decomposition): each part of an improvement against the
baseline, from a store that holds only some of the parts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mnv2lib.analysis import decomposition as D
from mnv2lib.analysis.prose import decomposition as prose
from mnv2lib.models import ModelConfig

EFFECTS = {"baseline": 0.0, "CrossNorm only": 0.0, "SelfNorm only": -0.15, "CNSN after the add (official)": -0.17}


def _records(parts, seeds=(0, 1)):
    rng = np.random.default_rng(0)
    records = []
    for part in parts:
        overrides = {} if part == "baseline" else D.PARTS[part][1]
        config = ModelConfig(width_mult=0.5, stem="cifar_lite", num_classes=10, **overrides).to_dict()
        for s in seeds:
            clean = 0.5 + EFFECTS.get(part, 0.0) + 0.01 * s + rng.normal(0, 0.002)
            records.append({"key": f"{part}-{s}", "seed": s, "model_config": config, "clean_accuracy": clean,
                            "mean_corruption_accuracy": clean - 0.02, "history": [{"train_accuracy": clean - 0.05}]})
    return records


def test_parts_present_are_compared_and_missing_ones_left_out():
    plan = {"parts": ("CrossNorm only", "SelfNorm only", "CNSN after the add (official)", "CNSN before the add"),
            "seeds": (0, 1)}
    table = D.decomposition_table(_records(["baseline", "CrossNorm only", "SelfNorm only",
                                            "CNSN after the add (official)"]), plan)
    clean = table[table["metric"] == "clean_accuracy"].set_index("part")
    assert "CNSN before the add" not in clean.index  # not in the store: no row, nothing invented
    assert clean.loc["SelfNorm only", "difference"] == pytest.approx(-0.15, abs=0.005)
    assert clean.loc["SelfNorm only", "significant"] and not clean.loc["CrossNorm only", "significant"]
    text = prose.describe_decomposition(table)
    assert "CNSN after the add (official) changes clean accuracy by -16.8 pp [" in text
    assert "(its interval excludes zero); of the other parts, SelfNorm only comes closest to that (-15.0 pp)" in text
    assert "CrossNorm only gains most (+0.1 pp, within the noise)" in text
    assert "SelfNorm only (clean, under corruption, training accuracy)" in text and "CrossNorm only (" not in text


def test_a_store_without_the_baseline_gives_an_empty_table_and_says_so():
    plan = {"parts": ("SelfNorm only",), "seeds": (0, 1)}
    table = D.decomposition_table(_records(["SelfNorm only"]), plan)
    assert table.empty
    assert "No part" in prose.describe_decomposition(table)


def test_each_config_is_recognised_as_its_part_only():
    parts = tuple(D.PARTS)
    for name, (_, overrides, _) in D.PARTS.items():
        config = ModelConfig(**overrides).to_dict()
        assert D.part_of(config, parts) == name
    assert D.part_of(ModelConfig().to_dict(), parts) == "baseline"
    assert D.part_of(ModelConfig(activation="mish", cnsn="cnsn").to_dict(), parts) is None  # a pair: no part


def test_a_whole_store_can_be_passed_other_studies_runs_are_not_the_baseline():
    from mnv2lib.runs.profiles import PROFILES

    plan = D.decomposition_plan(PROFILES["quick"])
    shape = dict(width_mult=0.5, stem="cifar_lite", num_classes=10)
    others = [ModelConfig(**{**shape, "width_mult": 0.25}), ModelConfig(**shape, shortcut="none"),
              ModelConfig(**shape, expand_ratio=2.0), ModelConfig(**shape, bottleneck_activation="relu6"),
              ModelConfig(**shape, arch="mobilenet_v1", activation="relu"), ModelConfig(**shape, activation="relu")]
    for config in others:
        assert D.part_of(config.to_dict(), plan["parts"], plan["shape"]) is None, config.label()
    assert D.part_of(ModelConfig(**shape).to_dict(), plan["parts"], plan["shape"]) == "baseline"
    assert D.part_of(ModelConfig(**shape, cnsn="sn").to_dict(), plan["parts"], plan["shape"]) == "SelfNorm only"
    store = _records(["baseline", "SelfNorm only"]) + [
        {"key": "w", "seed": 0, "model_config": others[0].to_dict(), "clean_accuracy": 0.1,
         "mean_corruption_accuracy": 0.1, "history": [{"train_accuracy": 0.1}]}]
    clean = D.decomposition_table(store, plan).query("metric == 'clean_accuracy'").set_index("part")
    assert clean.loc["baseline", "mean"] == pytest.approx(0.505, abs=0.005)  # the width-0.25 run left out


def test_every_part_builds():
    for _, overrides, _ in D.PARTS.values():
        ModelConfig(stem="cifar_lite", **overrides)


def test_parts_not_in_the_store_are_named_with_the_command_that_trains_them():
    plan = D.every_part({"parts": ("CrossNorm only",), "seeds": (0, 1)})
    assert plan["parts"] == tuple(D.PARTS) and plan["seeds"] == (0, 1)
    records = _records(["baseline", "CrossNorm only", "SelfNorm only"])
    table = D.decomposition_table(records, plan)
    untrained = D.untrained_parts(records, plan)
    assert "CrossNorm only" not in untrained and "SelfNorm only" not in untrained and D.BASELINE not in untrained
    assert "Triplet Attention on the block output" in untrained and "CNSN before the add" in untrained
    text = prose.describe_decomposition(table, untrained)
    assert "Not in the results store yet: " in text and "`make decomposition`" in text
    assert "Triplet Attention on the block output" in text.split("Not in the results store yet")[1]
    assert "Not in the results store" not in prose.describe_decomposition(table, [])


def test_quick_trains_cnsns_parts_and_make_decomposition_every_part(tmp_path, monkeypatch):
    from mnv2lib.runs.profiles import PROFILES
    from mnv2lib.workbook import cli

    quick = D.decomposition_plan(PROFILES["quick"])
    assert set(quick["parts"]) == {"CNSN after the add (official)", "CrossNorm only", "SelfNorm only",
                                   "CNSN before the add"} and quick["seeds"] == PROFILES["quick"].seeds
    trained = []
    monkeypatch.setenv("MNV2_REPORTS_DIR", str(tmp_path))
    monkeypatch.setattr(cli, "train_side_by_side", lambda configs, profile, dataset, seeds: trained.append(
        (configs, profile, dataset, seeds)) or [])
    cli.main(["decomposition", "--profile", "quick", "--dataset", "synthetic"])
    (configs, profile, dataset, seeds), = trained
    assert configs == D.part_configs(D.every_part(quick)) and seeds == (0, 1) and profile == "quick"
    if not torch.cuda.is_available():  # a GPU profile on a CPU machine: refused before anything loads
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["decomposition", "--profile", "gpu"])
        assert exit_info.value.code == 2 and len(trained) == 1


def test_stored_runs_reads_what_the_store_holds_and_trains_nothing(tmp_path):
    from mnv2lib.runs import api
    from mnv2lib.runs.store import ResultsStore

    store = ResultsStore(tmp_path / "results", tmp_path / "runs")
    trained, = api.ensure_runs([{}], "smoke", "synthetic", seeds=(0,), store=store, show_progress=False)
    before = sorted(tmp_path.rglob("*"))
    found = api.stored_runs([{}, {"activation": "mish"}], "smoke", "synthetic", seeds=(0, 1), store=store)
    assert [r["key"] for r in found] == [trained["key"]]  # mish and seed 1 are not in the store
    assert sorted(tmp_path.rglob("*")) == before  # and were not trained


def test_parts_without_the_baseline_are_not_called_untrained():
    plan = D.every_part({"parts": ("CrossNorm only",), "seeds": (0, 1)})
    records = _records(["CrossNorm only", "SelfNorm only"])
    table = D.decomposition_table(records, plan)
    untrained = D.untrained_parts(records, plan)
    assert table.empty and untrained[0] == D.BASELINE
    assert "CrossNorm only" not in untrained and "SelfNorm only" not in untrained
    text = prose.describe_decomposition(table, untrained)
    assert text.startswith("The baseline is not in the results store yet") and "No part" not in text
    assert "CrossNorm only" not in text.split("Not in the results store yet")[1]
    # another seed's records are not this plan's
    assert D.untrained_parts(_records(["baseline"]), {**plan, "seeds": (5,)})[0] == D.BASELINE


def test_one_run_per_part_gives_no_intervals_and_says_so_instead_of_noise():
    plan = {"parts": ("CrossNorm only", "SelfNorm only", "CNSN after the add (official)"), "seeds": (0,)}
    table = D.decomposition_table(_records(["baseline", *plan["parts"]], seeds=(0,)), plan)
    assert table["ci_low"].isna().all()
    text = prose.describe_decomposition(table)
    assert "without intervals" in text and "no interval with one run per part" in text
    assert "within the noise" not in text and "No interval excludes zero" not in text and "95%" not in text


def test_a_metric_some_runs_lack_is_compared_where_measured_only():
    plan = {"parts": ("CrossNorm only", "SelfNorm only"), "seeds": (0, 1)}
    records = _records(["baseline", "CrossNorm only", "SelfNorm only"])
    for r in records:
        if r["key"].startswith("SelfNorm"):
            r["history"] = [{}]  # no training accuracy
        if r["key"] == "baseline-1":
            r["mean_corruption_accuracy"] = None
    table = D.decomposition_table(records, plan)
    train = table[table["metric"] == "train_accuracy"].set_index("part")
    assert "SelfNorm only" not in train.index and train.loc["CrossNorm only", "seeds"] == 2  # no made-up 0.0
    corruption = table[table["metric"] == "mean_corruption_accuracy"].set_index("part")
    assert corruption.loc["baseline", "seeds"] == 1 and corruption.loc["CrossNorm only", "seeds"] == 2
    for r in records:
        if r["key"].startswith("baseline"):
            r["mean_corruption_accuracy"] = None
    assert "mean_corruption_accuracy" not in set(D.decomposition_table(records, plan)["metric"])  # no crash
