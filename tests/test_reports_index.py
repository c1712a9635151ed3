"""reports/README.md: every executed notebook with how it was made, and every figure with its provenance."""
import json
import os
import time

from mnv2lib.utils import paths
from mnv2lib.workbook import report as reports


def test_index_lists_every_executed_notebook_and_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "REPORTS_DIR", tmp_path)
    monkeypatch.setattr(paths, "FIGURES_DIR", tmp_path / "figures")
    monkeypatch.setattr(paths, "EXECUTED_NOTEBOOKS_DIR", tmp_path / "notebooks")
    (tmp_path / "notebooks").mkdir()
    # an earlier full run executed 01 and 04; this run re-executes 04 only
    for name in ("01_activation_study", "04_ablations"):
        (tmp_path / "notebooks" / f"{name}.ipynb").write_text("{}")
    reports.record_timing("01_activation_study", 300.0, "quick", "cifar10")
    reports.record_timing("04_ablations", 1500.0, "quick", "cifar10")
    reports.record_timing("04_ablations", 90.0, "smoke", "synthetic")
    figure = tmp_path / "figures" / "04_ablations" / "accuracy.json"
    figure.parent.mkdir(parents=True)
    figure.write_text(json.dumps({"notebook": "04_ablations", "name": "accuracy", "caption": "Clean accuracy.",
                                  "dataset": "synthetic", "profile": "smoke", "seeds": [0, 1], "date": "2026-11-30"}))
    index = reports.write_index(["04_ablations"], [], "smoke", "synthetic", 90.0).read_text()
    assert "Last `make reports` run: 04_ablations (profile `smoke`" in index and "in 1.5 min" in index
    assert "| [01_activation_study](notebooks/01_activation_study.ipynb) | quick | cifar10 | 5.0 min |" in index
    assert "| [04_ablations](notebooks/04_ablations.ipynb) | smoke | synthetic | 1.5 min |" in index
    assert "| 02_triplet_attention | not executed |" in index
    assert "![accuracy](figures/04_ablations/accuracy.png)" in index and "Clean accuracy." in index
    assert "*Dataset: synthetic; profile: smoke; seed(s): [0, 1]" in index


def test_notebooks_that_time_nothing_run_together_and_the_others_alone_in_order():
    names = ["01_activation_study", "03_cnsn_distributions", "05_mobilenet_families", "04_ablations",
             "07_deployment"]
    assert reports.notebook_groups(names, 2) == [["01_activation_study", "03_cnsn_distributions", "04_ablations"],
                                                 ["05_mobilenet_families"], ["07_deployment"]]
    assert reports.notebook_groups(names, 1) == [[n] for n in names]
    assert reports.notebook_groups(["07_deployment", "02_triplet_attention"], 2) == [["07_deployment"],
                                                                                   ["02_triplet_attention"]]


def fake_notebook(name, parameters, threads=None):
    """Stands in for a kernel in a worker process: 1 s of work, then what it saw."""
    start = time.time()
    time.sleep(1.0)
    reason = "cell 3 (ZeroDivisionError: division by zero)" if parameters.get("fail") else None
    return name, time.time() - start, reason, os.getpid(), threads, start


def test_a_group_runs_side_by_side_in_workers_each_to_its_end():
    group = ["01_activation_study", "02_triplet_attention"]
    outcomes = reports._execute_group(group, {group[0]: {"fail": True}, group[1]: {}}, execute=fake_notebook)
    assert [o[0] for o in outcomes] == group  # the group's order
    assert outcomes[0][2].startswith("cell 3") and outcomes[1][2] is None  # the other ran to its end
    pids = {o[3] for o in outcomes}
    assert os.getpid() not in pids
    if reports.notebook_workers() > 1:
        assert len(pids) == 2 and abs(outcomes[0][5] - outcomes[1][5]) < 0.9  # together, not one after the other
        assert all(o[4] == max(1, os.cpu_count() // 2) for o in outcomes)  # one kernel per core
    alone = reports._execute_group(["04_ablations"], {"04_ablations": {}}, execute=fake_notebook)
    assert alone[0][3] == os.getpid()  # a group of one runs here


def test_the_plan_trains_the_reference_families_last(monkeypatch):
    """Their runs are the shortest: trained last, the workers side by side run out of work together."""
    from mnv2lib.workbook import plan

    trained = []
    monkeypatch.setattr(plan, "train_runs", lambda runs, *a, **k: trained.extend(runs) or [])
    plan.train_plan("smoke", "synthetic", 0, show_progress=False)
    archs = [run.model_config.arch for run in trained]
    families = [i for i, a in enumerate(archs) if a != "mobilenet_v2"]
    assert families and families == list(range(len(archs) - len(families), len(archs)))
    assert len({run.key for run in trained}) == len(trained)  # each run once
