"""The budget ladder (notebook 04): seed-paired effects per training budget, from whatever rungs exist."""
import math

import pytest

from mnv2lib.analysis import ablation as A
from mnv2lib.analysis.prose import ablation as prose
from mnv2lib.runs.spec import IMPROVEMENTS, model_config_for
from mnv2lib.runs.profiles import PROFILES
from mnv2lib.figures import ablation as F
from mnv2lib.figures.common import FigureContext


def _record(profile, overrides, seed, clean, corruption=None, status="finished", train_size=None):
    profile = PROFILES[profile] if isinstance(profile, str) else profile
    config = model_config_for(overrides, profile, 10)
    return {"key": f"{profile.name}-{config.label}-{seed}", "status": status, "seed": seed, "label": config.label,
            "profile": profile.to_dict(), "profile_name": profile.name, "model_config": config.to_dict(),
            "dataset": {"name": "cifar10", "train_size": train_size or profile.train_size or 50000},
            "clean_accuracy": clean, "mean_corruption_accuracy": clean - 0.05 if corruption is None else corruption}


def _rung(profile, effects, seeds, base=0.5):
    records = [_record(profile, {}, s, base + 0.01 * s) for s in seeds]
    for name, effect in effects.items():
        records += [_record(profile, IMPROVEMENTS[name], s, base + 0.01 * s + effect + 0.001 * s) for s in seeds]
    return records


def test_ladder_pairs_by_seed_and_orders_rungs_by_budget():
    records = (_rung("quick", {"mish": 0.03, "triplet": -0.02, "cnsn": -0.10}, seeds=(0, 1))
               + _rung("quick_x2", {"mish": 0.02, "triplet": 0.01}, seeds=(0,)))  # a partial upper rung
    # a pair (not a single improvement) and a failed run never enter the ladder
    records.append(_record("quick", {**IMPROVEMENTS["mish"], **IMPROVEMENTS["cnsn"]}, 0, 0.9))
    records.append(_record("quick", IMPROVEMENTS["cnsn"], 2, 0.9, status="failed"))
    ladder = A.budget_ladder(records)
    clean = ladder[ladder["metric"] == "clean_accuracy"].set_index(["improvement", "profile"])
    assert clean.loc[("mish", "quick"), "effect"] == pytest.approx(0.03 + 0.0005)  # mean of seed diffs
    assert clean.loc[("mish", "quick"), "seeds"] == 2 and not math.isnan(clean.loc[("mish", "quick"), "ci_low"])
    assert clean.loc[("triplet", "quick_x2"), "effect"] == pytest.approx(0.01)
    assert math.isnan(clean.loc[("triplet", "quick_x2"), "ci_low"])  # one seed: no interval
    assert ("cnsn", "quick_x2") not in clean.index  # that rung lacks it: skipped, not invented
    budgets = dict(zip(ladder["profile"], ladder["images_seen"]))
    assert budgets["quick_x2"] == pytest.approx(2 * budgets["quick"], rel=0.01)  # full batches only
    text = prose.describe_ladder(ladder)
    assert "**triplet**, clean accuracy" in text and "changes sign" in text.split("**triplet**, clean")[1].split("\n")[0]
    fig = F.make_budget_ladder_figure(ladder, FigureContext("test data", "quick+quick_x2"))
    assert len(fig.axes) == 2


def test_ladder_of_a_store_without_a_baseline_is_empty_and_says_so():
    records = [_record("quick", IMPROVEMENTS["mish"], 0, 0.5)]
    ladder = A.budget_ladder(records)
    assert ladder.empty
    assert "make ladder" in prose.describe_ladder(ladder)


def test_ladder_records_keep_only_default_settings_of_known_profiles():
    from mnv2lib.runs.api import ladder_records

    keep = _record("quick", {}, 0, 0.5)
    design = _record("quick", {"shortcut": "none"}, 0, 0.5)           # a design study's run
    other_width = _record("quick", {"width_mult": 0.35}, 0, 0.5)       # not the profile's default width
    unknown = {**_record("quick", {}, 0, 0.5), "profile_name": "my-own"}
    kept = ladder_records([keep, design, other_width, unknown], dataset_name="cifar10")
    assert [r["key"] for r in kept] == [keep["key"]]
    assert ladder_records([keep], dataset_name="synthetic") == []


def test_the_ladder_trains_its_rungs_side_by_side_as_make_reports_does(monkeypatch):
    """`make ladder` used to train one run after the other (ensure_runs): hours more on 2 cores."""
    from mnv2lib.runs import api

    calls = []
    monkeypatch.setattr(api, "load_profile_dataset", lambda profile, dataset: _FakeData())
    monkeypatch.setattr(api, "plan_runs", lambda requests, profile, data: [(r.overrides, r.seeds) for r in requests])
    monkeypatch.setattr(api, "train_runs", lambda runs, profile, data, store, workers, show_progress: calls.append(
        (profile.name, len(runs), workers)) or [])
    monkeypatch.setattr(api, "local_workers", lambda profile: 2)
    api.train_ladder("synthetic", factors=(8, 16), store=object(), show_progress=False)
    assert calls == [("quick", 4, 2), ("quick_x8", 4, 2), ("quick_x16", 4, 2)]
    calls.clear()
    api.train_ladder("synthetic", factors=(8,), store=object(), show_progress=False, workers=1)
    assert calls == [("quick", 4, 1), ("quick_x8", 4, 1)]


def test_a_failed_run_does_not_stop_the_later_rungs(monkeypatch):
    from mnv2lib.runs import api
    from mnv2lib.runs.executors import GridError

    trained, read = [], []

    def train_runs(runs, profile, data, store, workers, show_progress):
        trained.append(profile.name)
        if profile.name == "quick_x2":
            raise GridError("1 of 4 run(s) did not finish: k (cnsn): non-finite loss")
        return [{"key": profile.name}]

    monkeypatch.setattr(api, "load_profile_dataset", lambda profile, dataset: _FakeData())
    monkeypatch.setattr(api, "plan_runs", lambda requests, profile, data: [])
    monkeypatch.setattr(api, "train_runs", train_runs)
    monkeypatch.setattr(api, "stored_runs", lambda configs, rung, *a: read.append(rung.name) or [])
    monkeypatch.setattr(api, "local_workers", lambda profile: 2)
    with pytest.raises(GridError, match=r"except: quick_x2: 1 of 4 run\(s\) did not finish: k \(cnsn\)"):
        api.train_ladder("synthetic", factors=(2, 4, 8), store=object(), show_progress=False)
    assert trained == ["quick", "quick_x2", "quick_x4", "quick_x8"] and read == ["quick_x2"]


class _FakeData:
    classes = tuple(range(10))
