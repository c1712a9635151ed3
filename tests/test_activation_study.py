"""Notebook 01's analysis and figures: derivatives against closed forms, the spiral experiment,
gradient norms at initialization, activation-output distributions, figures and widgets."""
import math
from types import SimpleNamespace

import ipywidgets as w
import numpy as np
import pytest
import torch
from torch import nn

from mnv2lib import build_model
from mnv2lib.analysis import activations as A
from mnv2lib.analysis.prose import activations as prose
from mnv2lib.figures import activations as F
from mnv2lib.figures.common import FigureContext
from mnv2lib.layers.activations import mish, mish_reference
from mnv2lib.workbook.widgets import figure_view
from conftest import png_bytes

CTX = FigureContext("synthetic", "smoke", (0, 1))
POINTS = torch.tensor([-7.0, -3.5, -2.0, -1.0, -0.3, 0.4, 1.0, 2.5, 5.0, 6.5, 9.0], dtype=torch.float64)


# --- closed forms -------------------------------------------------------------------------------

def _mish_closed(x):
    sp = torch.log1p(torch.exp(x))
    t, s = torch.tanh(sp), torch.sigmoid(x)
    d1 = t + x * s * (1 - t ** 2)
    d2 = 2 * (1 - t ** 2) * s + x * (1 - t ** 2) * s * ((1 - s) - 2 * t * s)
    return x * t, d1, d2


def _silu_closed(x):
    s = torch.sigmoid(x)
    return x * s, s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _hardswish_closed(x):
    inside = (x > -3) & (x < 3)
    f = torch.where(x <= -3, 0 * x, torch.where(x >= 3, x, x * (x + 3) / 6))
    d1 = torch.where(x <= -3, 0 * x, torch.where(x >= 3, 1 + 0 * x, (2 * x + 3) / 6))
    return f, d1, torch.where(inside, 1 / 3 + 0 * x, 0 * x)


def _relu6_closed(x):
    return x.clamp(0, 6), ((x > 0) & (x < 6)).double(), 0 * x


def _relu_closed(x):
    return x.clamp_min(0), (x > 0).double(), 0 * x


CLOSED = {"mish": _mish_closed, "silu": _silu_closed, "hardswish": _hardswish_closed, "relu6": _relu6_closed,
          "relu": _relu_closed, "identity": lambda x: (x, 1 + 0 * x, 0 * x)}


@pytest.mark.parametrize("name", list(CLOSED))
def test_autograd_derivatives_match_closed_forms(name):
    f, d1, d2 = A.derivatives(name, POINTS)
    ef, ed1, ed2 = CLOSED[name](POINTS)
    torch.testing.assert_close(f, ef, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(d1, ed1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(d2, ed2, atol=1e-10, rtol=1e-10)


def test_fast_mish_first_derivative_matches_the_reference_and_is_once_differentiable():
    x = POINTS.clone().requires_grad_()
    (g_fast,) = torch.autograd.grad(mish(x).sum(), x, create_graph=True)
    _, d1, _ = A.derivatives("mish", POINTS)
    torch.testing.assert_close(g_fast.detach(), d1, atol=1e-10, rtol=1e-10)
    # float64 takes the PyTorch path; the float32 native operator is differentiable once only,
    # which is why the study differentiates mish_reference twice
    from mnv2lib import ops
    if not ops.available("mish"):
        pytest.skip("the native Mish operator is not built here")
    x32 = POINTS.float().requires_grad_()
    (g32,) = torch.autograd.grad(mish(x32).sum(), x32, create_graph=True)
    with pytest.raises(RuntimeError, match="mish_backward"):
        torch.autograd.grad(g32.sum(), x32)
    assert A.REFERENCE_ACTIVATIONS["mish"] is mish_reference


def test_curves_properties_and_description():
    curves = A.activation_curves(low=-6, high=8, points=1401)
    assert set(curves) == set(A.CURVE_ACTIVATIONS)
    props = A.curve_properties(curves)
    assert props.loc["mish", "minimum"] == pytest.approx(-0.30884, abs=1e-4)
    assert props.loc["mish", "x_of_minimum"] == pytest.approx(-1.1924, abs=0.01)
    assert props.loc["relu", "zero_gradient_fraction"] == pytest.approx(6 / 14, abs=2e-3)   # x <= 0
    assert props.loc["relu6", "zero_gradient_fraction"] == pytest.approx(8 / 14, abs=2e-3)  # x <= 0, x >= 6
    assert props.loc["relu6", "monotone"] and not props.loc["mish", "monotone"]
    assert props.loc["hardswish", "max_abs_second"] == pytest.approx(1 / 3)
    text = prose.describe_activations(curves)
    assert "**Mish**" in text and "minimum -0.309 at x = -1.19" in text
    assert "zero gradient on 43% of [-6, 8]" in text  # ReLU
    with pytest.raises(ValueError, match="activation: got 'tanh'"):
        A.activation_curves(["tanh"])


# --- the spiral experiment ----------------------------------------------------------------------

def test_manifold_transform_and_invertibility_against_definitions():
    x, position = A.spiral(200)
    assert x.shape == (200, 2) and position[0] == 0 and position[-1] == 1
    t = A.random_embedding(2, seed=3)
    torch.testing.assert_close(A.manifold_transform(x, "identity", t), x)  # T^+ T = I
    # n = 2 and ReLU: the Jacobian has rank 2 exactly where both coordinates of Tx are positive
    both_active = ((x @ t.T) > 0).all(1)
    assert torch.equal(A.locally_invertible(x, "relu", t), both_active)
    # the closed-form smallest singular value against torch.linalg.svdvals
    for act, n in (("mish", 5), ("relu6", 3), ("relu", 15)):
        t = A.random_embedding(n, seed=n)
        _, slope, _ = A.derivatives(act, x @ t.T)
        smallest = torch.linalg.svdvals(slope[:, :, None] * t[None])[:, -1]
        expected = smallest >= 0.01 * torch.linalg.svdvals(t)[-1]
        assert torch.equal(A.locally_invertible(x, act, t, 0.01), expected)


def test_readout_error_definition():
    x, _ = A.spiral(100)
    affine = x @ torch.tensor([[2.0, 1.0], [-1.0, 0.5]], dtype=torch.float64) + 3.0
    assert A.readout_error(x, affine) == pytest.approx(0.0, abs=1e-12)
    assert A.readout_error(x, torch.ones_like(x)) == pytest.approx(1.0)
    half = torch.cat([x[:, :1], torch.zeros(100, 1, dtype=torch.float64)], 1)  # x2 lost
    expected = float(((x[:, 1] - x[:, 1].mean()) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert A.readout_error(x, half) == pytest.approx(expected, rel=0.05)  # x2 barely linear in x1


@pytest.fixture(scope="module")
def experiment():
    return A.manifold_experiment(draws=3, points=300)


def test_manifold_experiment_numbers(experiment):
    m = experiment["metrics"].set_index(["activation", "n"])
    assert len(m) == len(A.MANIFOLD_ACTIVATIONS) * len(A.MANIFOLD_DIMS)
    assert (m.loc["identity", "kept"] == 1).all() and (m.loc["identity", "readout_error"] < 1e-10).all()
    # the paper's point: ReLU keeps much less of the spiral at n = 2 than at n = 30
    assert m.loc[("relu", 2), "kept"] < 0.6 < m.loc[("relu", 30), "kept"] == pytest.approx(1.0, abs=0.01)
    assert m.loc[("relu", 2), "readout_error"] > m.loc[("relu", 30), "readout_error"]
    # the numbers of the first draw are the ones printed on the panels
    x = experiment["points"]
    t = A.random_embedding(3, 0 + 1000 * 3 + 0)
    assert m.loc[("relu6", 3), "kept_shown"] == pytest.approx(float(A.locally_invertible(x, "relu6", t).double().mean()))
    torch.testing.assert_close(experiment["outputs"][("relu6", 3)], A.manifold_transform(x, "relu6", t))
    with pytest.raises(ValueError, match="dims: got"):
        A.manifold_experiment(dims=[1, 2], draws=1)


def test_describe_manifold_is_built_from_the_numbers(experiment):
    text = prose.describe_manifold(experiment)
    m = experiment["metrics"].set_index(["activation", "n"])
    assert f"ReLU keeps {100 * m.loc[('relu', 2), 'kept']:.0f}%" in text
    assert f"Mish keeps {100 * m.loc[('mish', 2), 'kept']:.0f}%" in text
    assert "At **n = 30**" in text and "linear" in text


# --- datasets, layers, gradient norms -----------------------------------------------------------

def fake_dataset(n_train=64, n_test=48, classes=10):
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        name="fake", description="fake images", classes=[str(i) for i in range(classes)],
        train_images=torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g),
        train_labels=torch.randint(0, classes, (n_train,), generator=g),
        test_images=torch.randint(0, 256, (n_test, 3, 32, 32), dtype=torch.uint8, generator=g),
        test_labels=torch.randint(0, classes, (n_test,), generator=g),
        mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


def test_image_batch_normalizes_and_is_reproducible():
    ds = fake_dataset()
    x, y = A.image_batch(ds, "train", 8, seed=5)
    index = torch.randperm(64, generator=torch.Generator().manual_seed(5))[:8]
    expected = (ds.train_images[index].float() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) \
        / torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, expected)
    assert torch.equal(y, ds.train_labels[index])
    x2, _ = A.image_batch(ds, "train", 8, seed=5)
    assert torch.equal(x, x2)
    with pytest.raises(ValueError, match="split: got 'val'"):
        A.image_batch(ds, "val")


def test_work_sizes_cover_every_profile():
    from mnv2lib.runs.profiles import PROFILES

    for name in PROFILES:
        assert A.work_sizes(name)["gradient_seeds"] >= 2
    with pytest.raises(ValueError, match="profile: got 'huge'"):
        A.work_sizes("huge")


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model(num_classes=10, width_mult=0.25, stem="cifar_lite")


def test_conv_layers_in_depth_order(small_model):
    layers = A.conv_layers(small_model)
    assert len(layers) == 52  # stem + block 1 (depthwise, project) + 16 x 3 + head
    convs = [m for m in small_model.modules() if isinstance(m, nn.Conv2d)]
    assert [c for _, c, _ in layers] == convs
    kinds = [k for _, _, k in layers]
    assert kinds[:6] == ["conv", "depthwise", "project", "expand", "depthwise", "project"] and kinds[-1] == "conv"
    labels = A.layer_labels(small_model, [n for n, _, _ in layers], kinds)
    assert labels[0] == "stem" and labels[-1] == "head" and labels[3] == "b2 expand"


def test_layer_gradient_norms_match_a_manual_backward(small_model):
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    torch.manual_seed(1)
    table = A.layer_gradient_norms(small_model, x, y)
    torch.manual_seed(1)
    small_model.zero_grad()
    nn.functional.cross_entropy(small_model(x), y).backward()
    manual = [float(m.weight.grad.norm()) for m in small_model.modules() if isinstance(m, nn.Conv2d)]
    small_model.zero_grad(set_to_none=True)
    np.testing.assert_allclose(table["grad_norm"], manual, rtol=1e-5)
    assert list(table["depth"]) == list(range(52))


@pytest.fixture(scope="module")
def gradient_setup():
    from mnv2lib.models import ModelConfig

    torch.manual_seed(0)
    configs = {a: ModelConfig(num_classes=10, width_mult=0.25, stem="cifar_lite", activation=a)
               for a in ("relu6", "mish")}
    batches = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(2)]
    return configs, batches, A.init_gradient_norms(configs, batches, seeds=[0, 1], show_progress=False)


def test_init_gradient_norms_seeds_and_description(gradient_setup):
    configs, batches, norms = gradient_setup
    assert len(norms) == 2 * 2 * 52 and set(norms["model"]) == {"relu6", "mish"}
    again = A.init_gradient_norms({"relu6": configs["relu6"]}, batches[:1], seeds=[0], show_progress=False)
    first = norms[(norms["model"] == "relu6") & (norms["seed"] == 0)]
    np.testing.assert_allclose(first["grad_norm"].to_numpy(), again["grad_norm"].to_numpy(), rtol=1e-6)
    ratios = A.first_last_ratios(norms).set_index(["model", "seed"])["ratio"]
    assert ratios[("relu6", 0)] == pytest.approx(first["grad_norm"].iloc[0] / first["grad_norm"].iloc[-1])
    text = prose.describe_gradient_norms(norms)
    median = ratios.loc["mish"].median()
    assert f"ratio first/last conv layer is {median:.3g}" in text and "**Mish**" in text
    assert "of 52 layers" in text
    with pytest.raises(ValueError, match="one batch per seed"):
        A.init_gradient_norms(configs, batches[:1], seeds=[0, 1], show_progress=False)


def test_gradient_study_uses_the_profile_network():
    norms = A.gradient_study(fake_dataset(), "smoke", activations=("relu6",), show_progress=False)
    sizes = A.work_sizes("smoke")
    assert norms["seed"].nunique() == sizes["gradient_seeds"] and norms["depth"].nunique() == 52


# --- activation distributions -------------------------------------------------------------------

def _manual_outputs(model, x):
    outputs = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: outputs.__setitem__(n, out.detach().clone()))
             for n, m in A.activation_modules(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return outputs


@pytest.mark.parametrize("activation", ["relu6", "mish"])
def test_record_activations_matches_manual_hooks(activation):
    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", activation=activation)
    model.train()
    model(torch.randn(8, 3, 32, 32))  # give BatchNorm non-trivial running statistics
    x = torch.randn(10, 3, 32, 32)
    records = A.record_activations(model, x, samples=500, batch_size=4)  # chunks of 4, 4, 2
    manual = _manual_outputs(model, x)
    assert list(records) == list(manual) and len(records) == 35
    for name, r in records.items():
        y = manual[name].double()
        assert r["count"] == y.numel()
        assert r["fraction_negative"] == pytest.approx(float((y < 0).double().mean()))
        assert r["fraction_zero"] == pytest.approx(float((y == 0).double().mean()))
        assert r["fraction_six"] == pytest.approx(float((y == 6).double().mean()))
        assert r["mean"] == pytest.approx(float(y.mean()), rel=1e-6, abs=1e-9)
        assert r["std"] == pytest.approx(float(y.std(unbiased=False)), rel=1e-4, abs=1e-7)
        assert r["min"] == pytest.approx(float(y.min()), abs=1e-6) and r["max"] == pytest.approx(float(y.max()))
        assert len(r["sample"]) == 500
        assert torch.isin(r["sample"], y.float().flatten()).all()
    first = records[next(iter(records))]
    assert first["label"] == "stem" and records[list(records)[-1]]["label"] == "head"
    if activation == "relu6":
        assert all(r["fraction_negative"] == 0 for r in records.values())
    else:
        assert all(r["fraction_negative"] > 0 for r in records.values())
        assert min(r["min"] for r in records.values()) >= -0.3089


@pytest.fixture(scope="module")
def distribution_records():
    torch.manual_seed(0)
    models = {a: build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", activation=a).eval()
              for a in ("relu6", "mish")}
    return A.distribution_study(models, fake_dataset(), "smoke", show_progress=False)


def test_distribution_summary_and_description(distribution_records):
    records = distribution_records
    summary = A.distribution_summary(records)
    assert len(summary) == 70 and {"q01", "q50", "q99"} <= set(summary.columns)
    row = summary[(summary["model"] == "mish") & (summary["depth"] == 3)].iloc[0]
    sample = records["mish"][row["layer"]]["sample"].double()
    assert row["q25"] == pytest.approx(float(torch.quantile(sample, 0.25)))
    text = prose.describe_distributions(summary)
    relu6 = summary[summary["model"] == "relu6"]
    assert f"exactly zero for a median {100 * relu6['fraction_zero'].median():.0f}%" in text
    assert "**Mish** (35 activation layers): negative" in text


# --- figures and widgets ------------------------------------------------------------------------

def _texts(fig) -> str:
    return " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))


def test_curves_figure_and_widget():
    curves = A.activation_curves()
    fig = F.make_activation_curves_figure(curves, ["relu6", "mish"], CTX)
    assert len(fig.axes) == 3 and len(fig.axes[0].get_lines()) == 2 + 2  # two curves + the zero axes
    assert fig.axes[2].get_ylabel() == "f''(x)" and "profile: smoke" in _texts(fig)
    png_bytes(fig)
    control = w.SelectMultiple(options=list(curves), value=("relu6",))
    view = figure_view(lambda names: F.make_activation_curves_figure(curves, names, CTX), {"names": control})
    view.show()
    assert view.renders == 1
    control.value = ("relu6", "mish", "silu")
    assert view.renders == 2
    assert [l.get_label() for l in view.last_figure.axes[0].get_lines()][:3] == ["ReLU6", "Mish", "SiLU"]
    with pytest.raises(ValueError, match="names: got"):
        F.make_activation_curves_figure(curves, [], CTX)


def test_manifold_figures_and_widget(experiment):
    fig = F.make_manifold_figure(experiment, context=CTX)
    panels = [ax for ax in fig.axes if ax.collections]
    assert len(panels) == 1 + len(A.MANIFOLD_ACTIVATIONS) * len(A.MANIFOLD_DIMS)
    m = experiment["metrics"].set_index(["activation", "n"])
    assert f"kept {100 * m.loc[('relu', 2), 'kept_shown']:.0f}%" in _texts(fig)
    png_bytes(fig)
    metrics_fig = F.make_manifold_metrics_figure(experiment, CTX)
    assert metrics_fig.axes[0].get_xscale() == "log" and len(metrics_fig.axes[0].get_lines()) == 4
    png_bytes(metrics_fig)
    control = w.Dropdown(options=list(A.MANIFOLD_DIMS), value=2)
    view = figure_view(lambda n: F.make_manifold_dimension_figure(experiment, n, context=CTX), {"n": control})
    view.show()
    control.value = 15
    assert view.renders == 2 and view.last_figure.axes[1].get_title() == "identity (linear), n = 15"
    with pytest.raises(ValueError, match="n: got 4"):
        F.make_manifold_dimension_figure(experiment, 4)


def test_gradient_figure(gradient_setup):
    norms = gradient_setup[2]
    fig = F.make_gradient_norms_figure(norms, CTX)
    assert len(fig.axes) == 2 and fig.axes[0].get_yscale() == "log"
    assert fig.axes[1].get_ylabel() == "Mish / ReLU6"
    assert fig.axes[1].get_xticklabels()[0].get_text() == "stem"
    png_bytes(fig)


def test_distribution_figures_and_layer_widget(distribution_records):
    records = distribution_records
    summary = A.distribution_summary(records)
    fig = F.make_activation_quantiles_figure(summary, CTX)
    assert len(fig.axes) == 4 and fig.axes[0].get_yscale() == "symlog"
    png_bytes(fig)
    layers = list(records["relu6"])
    control = w.Dropdown(options=layers, value=layers[0])
    view = figure_view(lambda layer: F.make_layer_distribution_figure(records, layer, CTX), {"layer": control})
    view.show()
    assert layers[0] in view.last_figure.axes[0].get_title(loc="left")
    control.value = layers[5]
    assert view.renders == 2 and layers[5] in view.last_figure.axes[0].get_title(loc="left")
    png_bytes(view.last_figure)
    with pytest.raises(ValueError, match="layer: got 'nope'"):
        F.make_layer_distribution_figure(records, "nope")
    assert not math.isnan(summary["q50"].sum())


def test_summarize_study_reports_the_numbers(experiment, gradient_setup):
    norms = gradient_setup[2]
    text = prose.summarize_study(experiment, norms, accuracies={"relu6": 0.5, "mish": 0.625})
    m = experiment["metrics"].set_index(["activation", "n"])
    assert f"At n = 2, ReLU keeps {100 * m.loc[('relu', 2), 'kept']:.0f}%" in text
    assert f"Mish keeps {100 * m.loc[('mish', 2), 'kept']:.0f}%" in text
    ratio = A.first_last_ratios(norms).groupby("model")["ratio"].median()["relu6"]
    assert f"first/last conv layer is ReLU6 {ratio:.3g}" in text
    assert "ReLU6 50.0%, Mish 62.5%" in text
    assert "Trained activations" not in text


def test_seeds_of_gives_plain_ints():
    import pandas as pd

    seeds = A.seeds_of(pd.DataFrame({"seed": np.array([3, 1, 3], dtype=np.int64)}))
    assert seeds == (1, 3) and all(type(s) is int for s in seeds)
