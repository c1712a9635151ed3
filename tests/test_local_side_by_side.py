"""The local executor trains runs side by side in processes (no Ray): the same records as one at a time,
costs measured afterwards, alone."""
from __future__ import annotations

from mnv2lib.runs import executors, profiles, runner
from mnv2lib.runs.spec import ablation_configs, plan_runs, RunRequest
from mnv2lib.runs.store import ResultsStore

SMOKE = profiles.get_profile("smoke")


def _comparable(record: dict) -> dict:
    return {k: record[k] for k in ("key", "status", "clean_accuracy", "mean_corruption_accuracy", "history")
            if k != "history"} | {"losses": [h["train_loss"] for h in record["history"]]}


def test_side_by_side_runs_equal_one_at_a_time_and_carry_their_costs(tmp_path, monkeypatch):
    dataset = runner.load_profile_dataset(SMOKE, "synthetic")
    runs = plan_runs([RunRequest(o, (0,)) for o in ablation_configs(factors="mish,cnsn")[:3]], SMOKE, dataset)
    parallel = executors.train_runs(runs, SMOKE, dataset, ResultsStore(tmp_path / "a" / "results", tmp_path / "a" / "runs"),
                                    executor="local", workers=2, threads=1, show_progress=False)
    sequential = executors.train_runs(runs, SMOKE, dataset, ResultsStore(tmp_path / "b" / "results",
                                                                          tmp_path / "b" / "runs"),
                                      executor="local", threads=1, show_progress=False)
    assert [_comparable(r) for r in parallel] == [_comparable(r) for r in sequential]
    assert all(r["costs"].get("parameters") for r in parallel)  # measured afterwards, in this process


def test_make_reports_trains_one_run_per_core_on_a_cpu(monkeypatch):
    monkeypatch.setattr(executors.os, "cpu_count", lambda: 2)
    assert executors.local_workers("quick") == 2
    assert executors.local_workers("quick", "ray") is None
