"""Every notebook runs end to end in the smoke profile on the synthetic dataset (papermill).

The runs write into a temporary reports folder (``MNV2_REPORTS_DIR``, inherited by the
papermill kernel), so they never overwrite real reports; the notebooks share it, so a model
trained by one notebook is reused by the next, as in ``make reports``.
"""
import json
import time

import pytest

from mnv2lib.reports import NOTEBOOK_SEQUENCE, execute_notebook

# figures each notebook must write
EXPECTED_FIGURES = {
    "01_activation_study": ["activation_curves", "manifold_figure1", "manifold_metrics", "gradient_norms_init",
                            "activation_quantiles", "layer_distribution"],
    "02_triplet_attention": ["branches_one_block", "blocks_spatial", "blocks_combined", "gradcam"],
    "03_cnsn_distributions": ["shift_mean", "shift_std", "distributions_example", "crossnorm_modes", "coverage",
                              "selfnorm_gates"],
    "04_ablations": ["accuracy", "paired_differences", "accuracy_vs_train_time", "corruption_accuracy_vs_latency",
                     "corruption_heatmap", "learning_curves", "budget_ladder"],
    "05_mobilenet_families": ["cost_latency", "cost_parameters", "memory_table3", "accuracy_vs_madds"],
    "06_mobilenetv2_design": ["figure6_curves", "figure6_accuracy", "tradeoff_madds", "tradeoff_latency",
                              "width_resolution_cost"],
    "07_deployment": ["int8_drop_activations", "int8_drop_improvements", "latency_runtimes"],
}


def test_every_notebook_in_the_sequence_is_tested():
    assert list(EXPECTED_FIGURES) == list(NOTEBOOK_SEQUENCE)


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
