"""Notebook 03's analysis (mnv2lib.analysis.cnsn) and figures (mnv2lib.figures.cnsn)."""
import sys
import types

import ipywidgets as w
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from scipy.stats import spearmanr, wasserstein_distance

from mnv2lib import build_model
from mnv2lib.analysis import cnsn as A
from mnv2lib.analysis.prose import cnsn as prose
from mnv2lib.figures import cnsn as F
from mnv2lib.figures.common import FigureContext
from mnv2lib.layers.cnsn import record_cnsn
from mnv2lib.workbook.widgets import figure_view
from conftest import png_bytes

CTX = FigureContext(dataset="synthetic test data", profile="smoke", seeds=(0,))
VARIANTS = tuple(A.CROSSNORM_VARIANTS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(num_classes=10, width_mult=0.25, stem="cifar", cnsn="cnsn")
    for module in m.modules():  # non-trivial SelfNorm gates and feature maps (not zero-initialized BN)
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def stats(model):
    g = torch.Generator().manual_seed(1)
    frames = [A.feature_statistics(model, torch.randn(12, 3, 32, 32, generator=g), "train", variants=VARIANTS),
              A.feature_statistics(model, torch.randn(12, 3, 32, 32, generator=g), "clean")]
    for corruption, scale in (("gaussian_noise", 0.6), ("contrast", -0.15)):
        for severity in (1, 2, 3):
            x = torch.randn(12, 3, 32, 32, generator=g) * (1 + scale * severity) + 0.2 * severity
            frames.append(A.feature_statistics(model, x, corruption, severity))
    return A.concat_statistics(frames)


def channel_counts(model):
    with record_cnsn(model) as rec:
        model(torch.zeros(1, 3, 32, 32))
    return {name.removesuffix(".cnsn"): r["input_mean"].shape[1] for name, r in rec.items()}


# --------------------------------------------------------------------------------------------
# statistics


def test_feature_statistics_match_record_cnsn(model):
    x = torch.randn(5, 3, 32, 32)
    frame = A.feature_statistics(model, x, "clean", batch_size=2)  # batches must not matter with CrossNorm off
    with record_cnsn(model) as rec:
        model(x)
    counts = channel_counts(model)
    assert len(frame) == 5 * sum(counts.values())
    assert list(frame.columns) == list(A.ID_COLUMNS) + list(A.STAT_COLUMNS)
    assert frame["block"].min() == 1 and frame["block"].max() == 17
    for name, r in rec.items():
        layer = name.removesuffix(".cnsn")
        rows = frame[frame["layer"] == layer].sort_values(["sample", "channel"])
        for column, key in (("mean", "input_mean"), ("std", "input_std"), ("gate", "gate_g"),
                            ("selfnorm_mean", "selfnorm_mean"), ("selfnorm_std", "selfnorm_std")):
            np.testing.assert_allclose(rows[column].to_numpy().reshape(5, -1), r[key].numpy(), rtol=1e-4, atol=1e-5)


def test_module_by_module_response_matches_the_model_forward(model):
    x = torch.randn(4, 3, 32, 32)
    frame = A.feature_statistics(model, x, "clean")
    inputs = A.capture_cnsn_inputs(model, x)
    modules = A.cnsn_modules(model)
    assert list(inputs) == list(modules) == [f"features.{i}" for i in range(1, 18)]
    for name in ("features.2", "features.11"):
        r = A.cnsn_response(modules[name], inputs[name])
        rows = frame[frame["layer"] == name].sort_values(["sample", "channel"])
        for column in A.STAT_COLUMNS:
            np.testing.assert_allclose(rows[column].to_numpy().reshape(4, -1), r[column].numpy(), rtol=1e-4, atol=1e-5)


def test_two_instance_keeps_each_channels_set_of_statistics(stats):
    train = stats[stats["source"] == "train"]
    for layer in ("features.1", "features.9", "features.17"):
        rows = train[train["layer"] == layer]
        for column in ("mean", "std"):
            off = rows[rows["crossnorm"] == "off"].pivot(index="channel", columns="sample", values=column).to_numpy()
            two = rows[rows["crossnorm"] == "2-instance"].pivot(index="channel", columns="sample",
                                                                values=column).to_numpy()
            # std: exact up to CrossNorm's eps (1e-5 added to the variances)
            np.testing.assert_allclose(np.sort(two, 1), np.sort(off, 1), rtol=1e-3 if column == "mean" else 0.1,
                                       atol=1e-6)
            assert (np.abs(two - off) > 0.1 * off.std(1, keepdims=True)).any()  # but the images did swap


def test_one_instance_permutes_the_channels_of_each_image(stats):
    train = stats[stats["source"] == "train"]
    rows = train[train["layer"] == "features.4"]
    for column in ("mean", "std"):
        off = rows[rows["crossnorm"] == "off"].pivot(index="sample", columns="channel", values=column).to_numpy()
        one = rows[rows["crossnorm"] == "1-instance"].pivot(index="sample", columns="channel", values=column).to_numpy()
        np.testing.assert_allclose(np.sort(one, 1), np.sort(off, 1), rtol=1e-3 if column == "mean" else 0.1,
                                   atol=1e-6)
        assert np.abs(one - off).max() > 1e-2 * np.abs(off).max()


def test_gates_of_crossnorm_rows_follow_selfnorm_definition(model, stats):
    """gate = sigmoid(BN_eval(w0 * mean + w1 * std)) of the statistics entering SelfNorm (1-instance rows)."""
    layer = "features.6"
    sn = dict(model.named_modules())[f"{layer}.cnsn"].selfnorm
    rows = stats[(stats["layer"] == layer) & (stats["crossnorm"] == "1-instance")]
    c = rows["channel"].to_numpy()
    wgt = sn.g_fc.weight.detach()[:, 0, :].numpy()
    bn = sn.g_bn
    y = wgt[c, 0] * rows["mean"].to_numpy() + wgt[c, 1] * rows["std"].to_numpy()
    y = (y - bn.running_mean.numpy()[c]) / np.sqrt(bn.running_var.numpy()[c] + bn.eps)
    y = y * bn.weight.detach().numpy()[c] + bn.bias.detach().numpy()[c]
    np.testing.assert_allclose(rows["gate"].to_numpy(), 1 / (1 + np.exp(-y)), atol=1e-3)


def test_crossnorm_variants_are_seeded(model):
    x = torch.randn(6, 3, 32, 32)
    a = A.feature_statistics(model, x, "train", variants=("2-instance, both crops",), seed=3)
    b = A.feature_statistics(model, x, "train", variants=("2-instance, both crops",), seed=3)
    c = A.feature_statistics(model, x, "train", variants=("2-instance, both crops",), seed=4)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["mean"], c["mean"])
    with pytest.raises(ValueError, match="variants"):
        A.feature_statistics(model, x, "train", variants=("3-instance",))


def test_model_without_cnsn_is_rejected():
    with pytest.raises(ValueError, match="CNSN"):
        A.cnsn_modules(build_model(num_classes=10, width_mult=0.25, stem="cifar"))


def test_cn_only_model_has_nan_gates():
    m = build_model(num_classes=10, width_mult=0.25, stem="cifar", cnsn="cn").eval()
    frame = A.feature_statistics(m, torch.randn(3, 3, 32, 32), "clean")
    assert frame["gate"].isna().all()
    np.testing.assert_allclose(frame["selfnorm_mean"], frame["mean"])


def test_normalize_images():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    x = A.normalize_images(images, (0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    torch.testing.assert_close(x[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_layer_options(stats):
    options = A.layer_options(stats)
    assert options[0] == ("block 1 (features.1)", "features.1") and len(options) == 17


# --------------------------------------------------------------------------------------------
# distances, coverage, gates against straightforward references


def test_wasserstein_rows_match_scipy():
    rng = np.random.default_rng(0)
    for n, m in ((7, 7), (5, 12), (9, 4)):
        a, b = rng.normal(size=(6, n)), rng.normal(1, 2, size=(6, m))
        expected = [wasserstein_distance(a[i], b[i]) for i in range(6)]
        np.testing.assert_allclose(A.wasserstein_rows(a, b), expected, rtol=1e-10, atol=1e-12)
    x = rng.normal(size=(3, 8))
    np.testing.assert_allclose(A.wasserstein_rows(x, x + 2.5), 2.5)


def _toy_frame(rng, sources, layers=("features.1", "features.2"), channels=3, samples=6):
    rows = []
    for li, layer in enumerate(layers):
        for source, severity, crossnorm, shift in sources:
            for s in range(samples):
                for c in range(channels):
                    rows.append({"layer": layer, "block": li + 1, "source": source, "severity": severity,
                                 "crossnorm": crossnorm, "sample": s, "channel": c,
                                 "mean": rng.normal(shift + c, 1 + c), "std": rng.gamma(2 + shift),
                                 "gate": 1 / (1 + np.exp(-rng.normal(shift))),
                                 "selfnorm_mean": rng.normal(), "selfnorm_std": rng.gamma(2)})
    frame = pd.DataFrame(rows)
    for col in ("layer", "source"):
        frame[col] = pd.Categorical(frame[col], categories=list(dict.fromkeys(frame[col])))
    frame["crossnorm"] = pd.Categorical(frame["crossnorm"], categories=list(A.CROSSNORM_VARIANTS))
    return frame


TOY_SOURCES = [("train", 0, "off", 0.0), ("train", 0, "1-instance", 0.5), ("clean", 0, "off", 0.0),
               ("fog", 1, "off", 0.5), ("fog", 2, "off", 1.5), ("blur", 1, "off", -0.3), ("blur", 2, "off", -0.6)]


def test_statistic_shift_matches_loop_reference():
    frame = _toy_frame(np.random.default_rng(1), TOY_SOURCES)
    shift = A.statistic_shift(frame, statistics=("mean", "std"))
    assert set(shift["source"]) == {"train", "fog", "blur"}  # CrossNorm rows and the reference left out
    off = frame[frame["crossnorm"] == "off"]
    for _, row in shift.iterrows():
        sel = off[off["layer"] == row["layer"]]
        ref = sel[sel["source"] == "clean"]
        src = sel[(sel["source"] == row["source"]) & (sel["severity"] == row["severity"])]
        dists, shifts = [], []
        for c in range(3):
            r = ref[ref["channel"] == c][row["statistic"]].to_numpy()
            v = src[src["channel"] == c][row["statistic"]].to_numpy()
            sd = r.std(ddof=1)
            dists.append(wasserstein_distance(v, r) / sd)
            shifts.append(abs(v.mean() - r.mean()) / sd)
        assert row["distance"] == pytest.approx(np.mean(dists), rel=1e-5)
        assert row["abs_shift"] == pytest.approx(np.mean(shifts), rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        A.statistic_shift(frame, reference="nope")


def test_coverage_matches_loop_reference():
    frame = _toy_frame(np.random.default_rng(2), TOY_SOURCES)
    cov = A.coverage(frame)
    assert set(cov["crossnorm"]) == {"off", "1-instance"} and "train" not in set(cov["source"])
    train = frame[frame["source"] == "train"]
    for _, row in cov.iterrows():
        pool = train[(train["layer"] == row["layer"]) & train["crossnorm"].isin(["off", row["crossnorm"]])]
        test = frame[(frame["layer"] == row["layer"]) & (frame["source"] == row["source"])
                     & (frame["severity"] == row["severity"]) & (frame["crossnorm"] == "off")]
        inside = []
        for _, t in test.iterrows():
            p = pool[pool["channel"] == t["channel"]]
            inside.append(p["mean"].min() <= t["mean"] <= p["mean"].max()
                          and p["std"].min() <= t["std"] <= p["std"].max())
        assert row["covered"] == pytest.approx(np.mean(inside))
    # widening the training range can only increase coverage
    merged = cov.pivot_table(index=["layer", "source", "severity"], columns="crossnorm", values="covered")
    assert (merged["1-instance"] >= merged["off"] - 1e-12).all()


def test_coverage_of_two_instance_equals_no_crossnorm(stats):
    cov = A.coverage(stats, variants=("off", "2-instance"))
    merged = cov.pivot_table(index=["layer", "source", "severity"], columns="crossnorm", values="covered")
    # the same set of (mean, std) per channel, up to CrossNorm's eps on the stds of nearly constant maps
    assert (merged["2-instance"] - merged["off"]).abs().mean() < 0.03
    assert "2-instance" in prose.summarize_coverage(A.coverage(stats))


def test_gate_response_matches_loop_reference():
    frame = _toy_frame(np.random.default_rng(3), TOY_SOURCES)
    response = A.gate_response(frame)
    off = frame[frame["crossnorm"] == "off"]
    for _, row in response.iterrows():
        sel = off[off["layer"] == row["layer"]]
        ref = sel[sel["source"] == "clean"].groupby("channel")["gate"].mean()
        src = sel[(sel["source"] == row["source"]) & (sel["severity"] == row["severity"])]
        src = src.groupby("channel")["gate"].mean()
        assert row["gate_change"] == pytest.approx((src - ref).abs().mean())
        assert row["gate_shift"] == pytest.approx((src - ref).mean())
    clean = response[response["source"] == "clean"]
    assert (clean["gate_change"] == 0).all()


def _response(changes: dict[str, list[float]], blocks=(1, 2)) -> pd.DataFrame:
    rows = [{"layer": f"features.{b}", "block": b, "source": c, "severity": s + 1, "mean_gate": 0.5,
             "gate_change": v * b, "gate_shift": v} for c, vals in changes.items() for b in blocks
            for s, v in enumerate(vals)]
    rows += [{"layer": f"features.{b}", "block": b, "source": "clean", "severity": 0, "mean_gate": 0.5,
              "gate_change": 0.0, "gate_shift": 0.0} for b in blocks]
    return pd.DataFrame(rows)


def test_gate_severity_correlation():
    response = _response({"fog": [0.01, 0.02, 0.04], "blur": [0.03, 0.02, 0.01], "snow": [0.01, 0.03, 0.02]})
    corr = A.gate_severity_correlation(response).set_index("source")
    assert corr.loc["fog", "rho"] == pytest.approx(1.0) and corr.loc["blur", "rho"] == pytest.approx(-1.0)
    assert corr.loc["snow", "rho"] == pytest.approx(spearmanr([1, 2, 3], [0.01, 0.03, 0.02]).statistic)
    assert corr.loc["fog", "positive_layers"] == 1.0 and corr.loc["blur", "positive_layers"] == 0.0
    text = prose.summarize_gates(response, corr.reset_index())
    assert "0.33" in text or "0.17" in text  # the mean rho (1 - 1 + 0.5) / 3 = 0.17
    assert "**fog**" in text
    single = A.gate_severity_correlation(_response({"fog": [0.01]}))
    assert single["rho"].isna().all()
    assert "single severity" in prose.summarize_gates(_response({"fog": [0.01]}), single)


def test_gate_shift_correlation_and_summaries(stats):
    shift = A.statistic_shift(stats)
    response = A.gate_response(stats)
    rho = A.gate_shift_correlation(response, shift)
    merged = response[~response["source"].isin(["train", "clean"])].merge(
        shift[shift["statistic"] == "mean"], on=["layer", "source", "severity"])
    assert rho == pytest.approx(spearmanr(merged["gate_change"], merged["distance"]).statistic)
    text = prose.summarize_shift(shift)
    per = shift[(shift["statistic"] == "mean") & shift["source"].isin(["gaussian_noise", "contrast"])]
    assert f"{per['distance'].mean():.2f}" in text
    worst = per.groupby("source")["distance"].mean().idxmax()
    assert f"most under **{worst}**" in text
    assert "training images sit" in text
    train = shift[(shift["statistic"] == "mean") & (shift["source"] == "train")]["distance"].mean()
    ratio = per["distance"].groupby(per["source"]).mean().mean() / train
    assert (f"{ratio:.1f} times as far" if ratio >= 1 else f"({ratio:.2f} times as far)") in text
    corr = A.gate_severity_correlation(response)
    assert len(corr) == 2 and corr["severities"].eq(3).all()
    assert "Spearman" in prose.summarize_gates(response, corr, rho)
    assert "hardly related" in prose.summarize_gates(response, corr, 0.1)
    assert "move more where" in prose.summarize_gates(response, corr, 0.5)
    assert "move less where" in prose.summarize_gates(response, corr, -0.5)


def test_summaries_without_corruptions():
    frame = _toy_frame(np.random.default_rng(4), TOY_SOURCES[:3])
    assert "No corrupted" in prose.summarize_shift(A.statistic_shift(frame))
    assert "No corrupted" in prose.summarize_coverage(A.coverage(frame))
    response = A.gate_response(frame)
    assert "No corrupted" in prose.summarize_gates(response, A.gate_severity_correlation(response))


def test_collect_statistics_with_a_stub_corruption_module(model, monkeypatch):
    calls = []

    def load_corrupted_test_set(dataset, corruption, severity, size):
        calls.append((corruption, severity, size))
        return dataset.test_images[:size].flip(-1), dataset.test_labels[:size]

    stub = types.SimpleNamespace(CORRUPTIONS=("fog", "blur"), load_corrupted_test_set=load_corrupted_test_set)
    monkeypatch.setitem(sys.modules, "mnv2lib.engine.corruptions", stub)
    import mnv2lib.engine

    monkeypatch.setattr(mnv2lib.engine, "corruptions", stub, raising=False)
    g = torch.Generator().manual_seed(0)
    dataset = types.SimpleNamespace(
        train_images=torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_labels=torch.zeros(20, dtype=torch.long),
        test_images=torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=g),
        test_labels=torch.zeros(10, dtype=torch.long), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    profile = types.SimpleNamespace(name="smoke", corruptions=None, severities=(2, 4), corruption_test_size=8)
    plan = A.study_plan(profile)
    assert plan == {"images": 32, "corruptions": ("fog", "blur"), "severities": (2, 4), "set_size": 8}
    plan["images"] = 6
    frame = A.collect_statistics(model, dataset, plan, seed=0, show_progress=False, variants=("off", "1-instance"))
    assert calls == [("fog", 2, 8), ("fog", 4, 8), ("blur", 2, 8), ("blur", 4, 8)]
    assert A.corruption_order(frame) == ["fog", "blur"]
    channels = sum(channel_counts(model).values())
    assert len(frame) == 6 * channels * (2 + 1 + 4)  # train x 2 variants, clean, 4 corrupted sets
    # the clean rows are the first test images
    expected = A.feature_statistics(model, A.normalize_images(dataset.test_images[:6], dataset.mean, dataset.std),
                                    "clean")
    got = frame[frame["source"] == "clean"]
    np.testing.assert_allclose(got["mean"].to_numpy(), expected["mean"].to_numpy(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# figures and widget


def test_distribution_figure(stats):
    fig = F.make_distribution_figure(stats, "features.5", "contrast", 2, "1-instance", CTX)
    assert isinstance(fig, Figure)
    axes = fig.axes
    assert len(axes) == 6
    assert "entering SelfNorm" in axes[0].get_xlabel() and "after SelfNorm" in axes[3].get_xlabel()
    labels = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert labels == ["train", "clean test", "contrast, severity 2", "train + CrossNorm (1-instance)"]
    assert "severity 2" in fig._suptitle.get_text() and "Block 5" in fig._suptitle.get_text()
    assert any("profile: smoke" in t.get_text() for t in fig.texts)
    png_bytes(fig)
    off = F.make_distribution_figure(stats, "features.5", "contrast", 2, "off", CTX)
    assert len(off.axes[0].get_legend().get_texts()) == 3
    with pytest.raises(ValueError, match="severity"):
        F.make_distribution_figure(stats, "features.5", "contrast", 5)
    with pytest.raises(ValueError, match="corruption"):
        F.make_distribution_figure(stats, "features.5", "snow", 1)


def test_signed_log_axis_for_heavy_tails():
    np.testing.assert_allclose(F.signed_log([-99, 0, 9]), [-2, 0, 1])
    fig = Figure()
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    wide = {"a": rng.normal(size=500), "b": rng.normal(scale=1000, size=500)}
    assert F._histograms(ax, wide, {"a": "red", "b": "blue"}, signed_log_above=20)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert "0" in labels and "$10^{2}$" in labels and "$-10^{2}$" in labels
    heights = [p.get_path().vertices[:, 1].max() for p in ax.patches]
    assert all(0 < h <= 1 for h in heights)  # fractions of values per bin
    ax2 = Figure().subplots()
    assert not F._histograms(ax2, {"a": rng.normal(size=500)}, {"a": "red"}, signed_log_above=20)


def test_crossnorm_figure(stats):
    fig = F.make_crossnorm_figure(stats, "features.3", CTX)
    assert len(fig.axes) == 3
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0] == "train, no CrossNorm" and "1-instance" in labels and labels[-1] == "clean test"
    png_bytes(fig)


def test_shift_coverage_and_gate_figures(stats):
    shift, cov, response = A.statistic_shift(stats), A.coverage(stats), A.gate_response(stats)
    fig = F.make_shift_figure(shift, "mean", None, CTX)
    assert "severity 3" in fig.axes[0].get_title(loc="left")
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["train (reference)", "gaussian_noise", "contrast"]
    png_bytes(fig)
    assert "severity 1" in F.make_shift_figure(shift, "std", 1).axes[0].get_title(loc="left")
    fig = F.make_coverage_figure(cov, CTX)
    assert len(fig.axes[0].get_lines()) == len(VARIANTS) + 1  # one per variant + clean reference
    assert fig.axes[0].get_ylabel() == "test statistics inside the training range (%)"
    png_bytes(fig)
    fig = F.make_gate_response_figure(response, shift, "mean", CTX)
    rho = A.gate_shift_correlation(response, shift)
    assert any(f"rho = {rho:.2f}" in a.get_title(loc="left") for a in fig.axes)
    png_bytes(fig)
    assert len(F.make_gate_response_figure(response).axes) == 3  # two panels + colour bar


def test_distribution_widget_rerenders(stats):
    view = figure_view(lambda layer, crossnorm, corruption, severity: F.make_distribution_figure(
        stats, layer, corruption, severity, crossnorm, CTX),
        {"layer": w.Dropdown(options=A.layer_options(stats), value="features.2"),
         "crossnorm": w.Dropdown(options=[v for v in VARIANTS if v != "off"], value="2-instance"),
         "corruption": w.Dropdown(options=A.corruption_order(stats), value="gaussian_noise"),
         "severity": w.IntSlider(min=1, max=3, value=1)})
    view.show()
    assert view.renders == 1 and "severity 1" in view.last_figure._suptitle.get_text()
    view.controls["severity"].value = 3
    assert view.renders == 2 and "severity 3" in view.last_figure._suptitle.get_text()
    view.controls["layer"].value = "features.12"
    assert view.renders == 3 and "Block 12" in view.last_figure._suptitle.get_text()
    view.controls["crossnorm"].value = "2-instance, style crop"
    labels = [t.get_text() for t in view.last_figure.axes[0].get_legend().get_texts()]
    assert view.renders == 4 and labels[-1] == "train + CrossNorm (2-instance, style crop)"
    view.controls["corruption"].value = "contrast"
    assert view.renders == 5 and "contrast" in view.last_figure._suptitle.get_text()


# --------------------------------------------------------------------------------------------
# notebook helpers


def test_variant_label_and_describe_model(model):
    assert A.variant_label("2-instance", "both") == "2-instance, both crops"
    assert A.variant_label("1-instance", "neither") == "1-instance"
    with pytest.raises(ValueError, match="mode, crop"):
        A.variant_label("1-instance", "style")
    text = prose.describe_model(model, {"clean_accuracy": 0.8123, "mean_corruption_accuracy": 0.6049})
    assert "**17 CNSN modules**" in text and "81.2%" in text and "60.5%" in text
    assert "2-instance, both crops" in text and "probability 0.25 in 2" in text


def test_describe_statistics(stats):
    text = prose.describe_statistics(stats)
    assert f"{len(stats):,}" in text and "17 CNSN layers" in text and "layers, 12 images per set" in text
    assert "2 corruptions (gaussian_noise, contrast) at severities 1, 2, 3" in text
    assert "5 CrossNorm variants" in text


def test_pick_example():
    shift = pd.DataFrame([
        {"layer": "features.1", "source": "fog", "severity": 1, "statistic": "mean", "distance": 1.0},
        {"layer": "features.2", "source": "fog", "severity": 1, "statistic": "mean", "distance": 3.0},
        {"layer": "features.1", "source": "fog", "severity": 2, "statistic": "mean", "distance": 4.0},
        {"layer": "features.2", "source": "fog", "severity": 2, "statistic": "mean", "distance": 2.0},
        {"layer": "features.1", "source": "blur", "severity": 1, "statistic": "mean", "distance": 0.5},
        {"layer": "features.1", "source": "blur", "severity": 2, "statistic": "mean", "distance": 0.7},
        {"layer": "features.1", "source": "train", "severity": 0, "statistic": "mean", "distance": 9.0},
    ])
    assert A.pick_example(shift) == {"layer": "features.1", "corruption": "fog", "severity": 2}


def test_summarize_selfnorm_effect():
    rows = []
    for layer, (before, after) in {"features.1": (2.0, 1.0), "features.2": (4.0, 5.0)}.items():
        for stat, value in (("mean", before), ("selfnorm_mean", after), ("std", 1.0), ("selfnorm_std", 0.5)):
            rows.append({"layer": layer, "source": "fog", "severity": 1, "statistic": stat, "distance": value})
    text = prose.summarize_selfnorm_effect(pd.DataFrame(rows))
    assert "means is 3.00 clean-spread units entering SelfNorm and 3.00 leaving it (+0%)" in text
    assert "reduces it in 50%" in text
    assert "stds is 1.00" in text and "0.50 leaving it (-50%)" in text and "reduces it in 100%" in text
