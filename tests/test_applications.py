"""Notebook 08's measurements (mnv2lib.analysis.applications): the variants under torchvision's heads,
timed side by side, in eager PyTorch and ONNX Runtime, with the prose and figure built from the numbers."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from conftest import png_bytes
from mnv2lib.analysis import applications as A
from mnv2lib.analysis.prose import applications as prose
from mnv2lib.figures import applications as F
from mnv2lib.figures.common import FigureContext


@pytest.fixture(scope="module")
def table():
    rows = A.measure_head("ssdlite", ("baseline", "triplet"), 128, repeats=1, onnx=True, width_mult=0.35)
    rows += A.measure_head("deeplabv3", ("baseline", "triplet"), 96, repeats=1, onnx=False, width_mult=0.35)
    return pd.DataFrame(rows)


def test_every_network_is_measured_in_both_runtimes_where_planned(table):
    ssd = table[table["head"] == "ssdlite"].set_index("variant")
    assert (ssd["latency_ms_onnx"] > 0).all() and (ssd["latency_ms_eager"] > 0).all()
    assert table[table["head"] == "deeplabv3"]["latency_ms_onnx"].isna().all()
    # Triplet Attention adds its gates' parameters and multiply-adds, nothing else changes the largest layer
    assert ssd.loc["triplet", "parameters"] > ssd.loc["baseline", "parameters"]
    assert ssd.loc["triplet", "multiply_adds"] > ssd.loc["baseline", "multiply_adds"]
    assert ssd.loc["triplet", "largest_layer_MB"] == pytest.approx(ssd.loc["baseline", "largest_layer_MB"])


def test_relative_costs_growth_prose_and_figure(table):
    relative = A.relative_costs(table)
    base = relative[relative["variant"] == "baseline"]
    assert (base["multiply_adds"] == 1.0).all()
    growth = A.triplet_growth(table)
    assert (growth["extra_multiply_adds_M"] > 0).all()
    text = prose.describe_costs(table, relative)
    assert "**SSDLite at 128x128**" in text and "ONNX Runtime" in text
    assert "grow with the number of pixels" in prose.describe_triplet_growth(growth)
    # the paper's rows need its width and resolution: none here, and the text says so
    assert A.paper_comparison(table).empty and "nothing to compare" in prose.describe_paper_comparison(
        A.paper_comparison(table))
    png_bytes(F.make_relative_cost_figure(relative, context=FigureContext("none", "smoke")))
    with pytest.raises(ValueError, match="metrics: got"):
        F.make_relative_cost_figure(relative, ("speed",))


def test_the_paper_comparison_reads_the_baseline_at_the_papers_settings():
    table = pd.DataFrame([{"head": "ssdlite", "variant": "baseline", "resolution": 320, "width_mult": 1.0,
                           "parameters": 4.66e6, "multiply_adds": 0.87e9}])
    row = A.paper_comparison(table).iloc[0]
    assert row["paper_parameters_M"] == 4.3 and math.isclose(row["parameters_M"], 4.66)
    assert "+8%" in prose.describe_paper_comparison(A.paper_comparison(table))
    with pytest.raises(ValueError, match="head: got 'yolo'"):
        A.network("yolo", {})
