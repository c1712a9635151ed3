"""Records written before the package moved into layer folders (commit 3c2cfbd) stay valid: the same runs
get the same keys, and a stored record is read back, never trained again."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from mnv2lib.engine.train import TrainConfig
from mnv2lib.runs import profiles, runner, spec
from mnv2lib.runs.store import ResultsStore

DATA = Path(__file__).parent / "data"


# The quick profile's recipe at 3c2cfbd. Issue #29's fair recipe search may move the profile to another recipe
# (a deliberate change of every quick run); the layout must not change any key by itself.
QUICK_TRAIN_3C2CFBD = dict(epochs=2, batch_size=64, lr=0.05, eval_batch_size=500, channels_last=True,
                           zero_init_residual=True, augment=False)


def test_run_keys_are_those_of_the_old_layout():
    golden = json.loads((DATA / "run_keys_3c2cfbd.json").read_text())
    assert len(golden) == 66
    for entry, key in golden.items():
        name, overrides = entry.split("|", 1)
        profile = profiles.get_profile(name)
        if profiles.base_profile_name(name) == "quick":  # the rung of the 3c2cfbd recipe
            old = dataclasses.replace(profiles.PROFILES["quick"], train=TrainConfig(**QUICK_TRAIN_3C2CFBD))
            factor = int(name.rsplit("_x", 1)[1]) if "_x" in name else 1
            profile = profiles.budget_rung(old, factor) if factor > 1 else old
        identity = {"name": "cifar10", "train_size": profile.train_size or 50000,
                    "test_size": profile.test_size or 5000, "classes": 10}
        config = spec.model_config_for(json.loads(overrides), profile, 10)
        assert spec.run_key(config, profile, identity, 0) == key, entry


def test_a_record_written_before_the_move_is_read_not_retrained(tmp_path, monkeypatch):
    shutil.copytree(DATA / "store_3c2cfbd", tmp_path / "store")
    store = ResultsStore(tmp_path / "store" / "results", tmp_path / "store" / "runs")
    monkeypatch.setattr(runner, "train_model", lambda *a, **k: pytest.fail("a stored run was trained again"))
    monkeypatch.setattr(runner, "measure_config_costs", lambda *a, **k: {})
    profile = profiles.get_profile("smoke")
    dataset = runner.load_profile_dataset(profile, "synthetic")
    config = spec.model_config_for({"activation": "mish"}, profile, len(dataset.classes))
    record = runner.run_experiment(config, profile, dataset, 0, store, show_progress=False)
    assert record["key"] == "02d5b20e5c3a8725" and record["status"] == "finished"
    assert record["git_commit"] == "3c2cfbd" and 0 <= record["clean_accuracy"] <= 1


def test_the_store_exports_one_csv_row_per_run_and_each_runs_history(tmp_path):
    import pandas as pd

    from mnv2lib.runs.store import export_results
    from mnv2lib.workbook import cli

    shutil.copytree(DATA / "store_3c2cfbd", tmp_path / "store")
    store = ResultsStore(tmp_path / "store" / "results", tmp_path / "store" / "runs")
    path = export_results(store, tmp_path / "results.csv")
    table = pd.read_csv(path)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["key"] == "02d5b20e5c3a8725" and row["config.activation"] == "mish" and row["seed"] == 0
    assert row["git_commit"] == "3c2cfbd" and row["profile"] == "smoke" and row["status"] == "finished"
    assert {"clean_accuracy", "mean_corruption_accuracy", "parameters", "multiply_adds", "train_seconds",
            "latency_ms_batch1", "corruption.contrast", "config.width_mult", "dataset"} <= set(table.columns)
    history = pd.read_csv(store.run_dir(row["key"]) / "history.csv")
    assert list(history["epoch"]) == [1] and "test_accuracy" in history
    with pytest.raises(SystemExit) as exit_info:  # the command line refuses a folder as its output
        cli.main(["export", "--output", str(tmp_path)])
    assert exit_info.value.code == 2
