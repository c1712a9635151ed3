"""The speed benchmark's report: every ratio it promises, computed from its own timings (not timed here)."""
import json
import math
from collections import Counter

import pytest
import torch
import torchvision

from mnv2lib.benchmarks import speed as bench
from mnv2lib.engine.measure import interleaved


def test_bench_reports_ratios_of_its_medians(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--threads", "1", "--repeats", "1", "--warmup", "1", "--train-batch", "8", "--eval-batch", "4",
                       "--no-compile",
                       "--variants", "baseline", "triplet", "torchvision", "baseline_unfused", "--output",
                       str(out)]) == 0
    result = json.loads(out.read_text())
    medians = result["median_seconds"]
    for key, numerator, denominator, mode in bench.RATIOS:
        if numerator in medians[mode] and denominator in medians[mode]:
            assert math.isclose(result[key], medians[mode][numerator] / medians[mode][denominator]), key
    for key in ("triplet_train_ratio", "triplet_eval_ratio", "baseline_vs_torchvision_train_ratio",
                "fused_norm_activation_train_ratio", "data_per_train_step_ratio"):
        assert result[key] > 0, key
    assert "mish_train_ratio" not in result  # not measured, so not reported
    assert result["config"]["train_batch"] == 8 and result["config"]["eval_batch"] == 4
    assert result["machine"]["threads"] == 1 and result["kernels"]["triplet_attention"] in ("mnv2:: operators (C)", "PyTorch ops")
    markdown = out.with_suffix(".md").read_text()
    assert "| data_per_train_step_ratio |" in markdown and bench.DATA in markdown
    if "cpu" in result["machine"]:  # Linux
        assert result["machine"]["vector_isa"] in ("avx512", "avx2", "other") and result["machine"]["cpu"] in markdown
    # the baseline against torchvision's model: no slower is the target (faster is fine: its ReLU6 skips a copy)
    for ratio, verdict in ((0.9, "<= 1.03 ok"), (1.05, "<= 1.03 MISSED")):
        result["baseline_vs_torchvision_train_ratio"] = ratio
        assert f"| baseline_vs_torchvision_train_ratio | {ratio:.3f} | {verdict} |" in bench.to_markdown(result)


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


@pytest.mark.parametrize("count,repeats", [(9, 9), (8, 54)])
def test_bench_varies_what_runs_before_each_variant(count, repeats):
    # a step's time depends on the step before it: the order must not pin one predecessor to a variant (the
    # bench's defaults: 9 training steps of 8 variants and the data step, 54 inference steps of 8 variants)
    names = [f"v{i}" for i in range(count)]
    orders = interleaved(names, repeats)
    assert all(sorted(order) == sorted(names) for order in orders)  # each variant once per repetition
    assert orders == interleaved(names, repeats)  # the same order in every run
    sequence = [name for order in orders for name in order]  # repetitions run back to back
    assert all(a != b for a, b in zip(sequence, sequence[1:]))
    for name in names:
        before = Counter(a for a, b in zip(sequence, sequence[1:]) if b == name)
        assert max(before.values()) <= repeats // 2, (name, before)
    assert interleaved([], 3) == [[], [], []]


def test_the_unfused_baseline_is_the_same_network_with_torchvisions_blocks():
    fused, plain = bench.build_variants(["baseline", "baseline_unfused"]).values()
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), plain.state_dict().values()))
    blocks = [type(m) for m in plain.modules() if isinstance(m, torchvision.ops.misc.Conv2dNormActivation)]
    assert blocks and set(blocks) == {torchvision.ops.misc.Conv2dNormActivation}
