"""reports/README.md: every executed notebook with how it was made, and every figure with its provenance."""
import json

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
