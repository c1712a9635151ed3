"""Every notebook runs end to end in the smoke profile on the synthetic dataset (papermill).

The runs write into a temporary reports folder (``MNV2_REPORTS_DIR``, inherited by the
papermill kernel), so they never overwrite real reports; the notebooks share it, so a model
trained by one notebook is reused by the next, as in ``make reports``.
"""
import json
import time

import pytest

from mnv2lib.workbook.catalogue import NOTEBOOK_SEQUENCE
from mnv2lib.workbook.report import execute_notebook

# figures each notebook must write
EXPECTED_FIGURES = {
    "01_activation_study": ["activation_curves", "manifold_figure1", "manifold_metrics", "gradient_norms_init",
                            "activation_quantiles", "layer_distribution"],
    "02_triplet_attention": ["branches_one_block", "blocks_spatial", "blocks_combined", "gradcam"],
    "03_cnsn_distributions": ["shift_mean", "shift_std", "distributions_example", "crossnorm_modes", "coverage",
                              "selfnorm_gates"],
    "04_ablations": ["accuracy", "paired_differences", "factorial_effects", "decomposition", "accuracy_vs_train_time",
                     "corruption_accuracy_vs_latency",
                     "corruption_heatmap", "learning_curves", "budget_ladder"],
    "05_mobilenet_families": ["cost_latency", "cost_parameters", "memory_table3", "accuracy_vs_madds"],
    "06_mobilenetv2_design": ["figure6_curves", "figure6_accuracy", "tradeoff_madds", "tradeoff_latency",
                              "width_resolution_cost"],
    "07_deployment": ["int8_drop_activations", "int8_drop_improvements", "latency_runtimes"],
    "08_applications": ["relative_costs"],
}


def test_every_notebook_in_the_sequence_is_tested():
    assert list(EXPECTED_FIGURES) == list(NOTEBOOK_SEQUENCE)


@pytest.mark.parametrize("name", NOTEBOOK_SEQUENCE)
def test_notebooks_are_committed_valid_and_without_outputs(name):
    import nbformat

    from mnv2lib.utils import paths

    nb = nbformat.read(paths.NOTEBOOKS_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)  # cells without ids are an error in nbformat 5.x notebooks to come
    ids = [c.get("id") for c in nb.cells]
    assert None not in ids and len(set(ids)) == len(ids), "every cell needs its own id"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "committed without outputs"


def test_the_report_passes_each_notebook_only_the_parameters_it_declares():
    from mnv2lib.workbook.report import declared_parameters

    shared = {"profile": "quick", "dataset": "auto", "seed": 0, "interactive": False, "factors": "mish"}
    assert declared_parameters("04_ablations", shared) == shared
    assert declared_parameters("07_deployment", shared) == {k: v for k, v in shared.items() if k != "factors"}


# The run plan (python -m mnv2lib.experiments plan/run) is trained first, as `make reports` does; the
# notebooks executed after it must find every run they ask for: none may train (no record written).
_PLAN_SNAPSHOT: dict = {}


def _store_state(reports_dir):
    records = {p.name: p.stat().st_mtime_ns for p in (reports_dir / "results").glob("*.json")}
    return records, sorted(p.name for p in (reports_dir / "runs").glob("*") if p.is_dir())


@pytest.mark.slow
def test_the_run_plan_trains_what_the_notebooks_need(smoke_reports_dir):
    from mnv2lib.runs.store import ResultsStore
    from mnv2lib.workbook.plan import train_plan

    store = ResultsStore(smoke_reports_dir / "results", smoke_reports_dir / "runs")
    records = train_plan("smoke", "synthetic", 0, store=store, show_progress=False, executor="local")
    assert records and {r["status"] for r in records} == {"finished"}
    _PLAN_SNAPSHOT["state"] = _store_state(smoke_reports_dir)
    assert len(_PLAN_SNAPSHOT["state"][0]) == len(records)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED_FIGURES))
def test_notebook_runs_in_the_smoke_profile(name, smoke_reports_dir, monkeypatch):
    reports_dir = smoke_reports_dir
    monkeypatch.setenv("MNV2_REPORTS_DIR", str(reports_dir))
    started = time.time() - 1
    executed = execute_notebook(name, {"profile": "smoke", "dataset": "synthetic", "seed": 0, "interactive": False},
                                output_dir=reports_dir / "notebooks")
    folder = reports_dir / "figures" / name
    for figure in EXPECTED_FIGURES[name]:
        png = folder / f"{figure}.png"
        assert png.exists() and png.stat().st_mtime >= started, f"{name}: {figure}.png was not written"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000, png
        sidecar = json.loads(png.with_suffix(".json").read_text())
        assert sidecar["profile"] == "smoke" and sidecar["caption"]
    # every figure is displayed as an image in the executed notebook, never as "<Figure size ...>" text
    cells = json.loads(executed.read_text())["cells"]
    outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]
    texts = "".join("".join(o.get("data", {}).get("text/plain", "")) + "".join(o.get("text", ""))
                    for o in outputs)
    assert "<Figure size" not in texts
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= len(EXPECTED_FIGURES[name])


@pytest.mark.slow
def test_the_notebooks_trained_nothing_beyond_the_run_plan(smoke_reports_dir):
    if "state" not in _PLAN_SNAPSHOT:
        pytest.skip("runs only after test_the_run_plan_trains_what_the_notebooks_need and the notebooks")
    records, run_dirs = _store_state(smoke_reports_dir)
    planned_records, planned_dirs = _PLAN_SNAPSHOT["state"]
    new = sorted(set(records) - set(planned_records)) + [n for n in run_dirs if n not in planned_dirs]
    assert not new, f"the notebooks trained runs the plan (mnv2lib.notebook_plan) does not list: {new}"
    assert records == planned_records  # and rewrote none
