"""The speed benchmark's report: every ratio it promises, computed from its own timings (not timed here)."""
import json
import math
from collections import Counter

import pytest

from mnv2lib import bench


def test_bench_reports_ratios_of_its_medians(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--threads", "1", "--repeats", "1", "--warmup", "1", "--train-batch", "8", "--eval-batch", "4",
                       "--no-compile",
                       "--variants", "baseline", "triplet", "torchvision", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["median_seconds"]
    for key, numerator, denominator, mode in bench.RATIOS:
        if numerator in medians[mode] and denominator in medians[mode]:
            assert math.isclose(result[key], medians[mode][numerator] / medians[mode][denominator]), key
    for key in ("triplet_train_ratio", "triplet_eval_ratio", "baseline_vs_torchvision_train_ratio",
                "data_per_train_step_ratio"):
        assert result[key] > 0, key
    assert "mish_train_ratio" not in result  # not measured, so not reported
    assert result["config"]["train_batch"] == 8 and result["config"]["eval_batch"] == 4
    assert result["machine"]["threads"] == 1 and result["kernels"]["triplet_attention"] in ("mnv2:: operators (C)", "PyTorch ops")
    markdown = out.with_suffix(".md").read_text()
    assert "| data_per_train_step_ratio |" in markdown and bench.DATA in markdown
    if "cpu" in result["machine"]:  # Linux
        assert result["machine"]["vector_isa"] in ("avx512", "avx2", "other") and result["machine"]["cpu"] in markdown


def test_bench_rounds_report_the_median_ratio_and_its_range(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--threads", "1", "--repeats", "1", "--warmup", "1", "--train-batch", "8", "--eval-batch", "4",
                       "--no-compile", "--rounds", "3", "--variants", "baseline", "triplet", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["rounds"] == 3
    for key, per_round in result["ratio_rounds"].items():
        assert len(per_round) == 3
        assert math.isclose(result[key], sorted(per_round)[1]), key  # the median of three
    assert set(result["ratio_rounds"]) == {"triplet_train_ratio", "triplet_eval_ratio", "data_per_train_step_ratio"}
    spread = result["ratio_rounds"]["triplet_eval_ratio"]
    assert f"[{min(spread):.3f}-{max(spread):.3f}]" in out.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match=r"rounds: got 0; allowed values are integers >= 1"):
        bench.run(rounds=0)


def test_bench_names_the_cpu_and_its_vector_width(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    first = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n"
    cpuinfo.write_text(first + "\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert bench.cpu_description(str(cpuinfo)) == {"cpu": "AMD EPYC 7B13", "vector_isa": "avx2"}
    cpuinfo.write_text(first.replace("avx2 fma", "avx2 fma avx512f avx512bw"))
    assert bench.cpu_description(str(cpuinfo))["vector_isa"] == "avx512"
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert bench.cpu_description(str(cpuinfo)) == {"cpu": "unknown", "vector_isa": "other"}
    assert bench.cpu_description(str(tmp_path / "missing")) == {}


def test_bench_gives_every_variant_every_place_in_the_order_equally_often():
    names = ["torchvision", "baseline", "triplet", bench.DATA]
    orders = bench.interleaved(names, 8)
    assert all(sorted(order) == sorted(names) for order in orders)  # each variant once per repetition
    for place in range(len(names)):
        assert Counter(order[place] for order in orders) == {name: 2 for name in names}
