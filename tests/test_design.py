"""MobileNetV2's design options (bottleneck activation, shortcut placement, expansion ratio,
pretrained weights) and the design study's analysis and figures (notebook 06)."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from torch import nn

from mnv2lib import ModelConfig, build_model
from mnv2lib.utils import paths
from mnv2lib.analysis import design as D
from mnv2lib.analysis.prose import design as prose
from mnv2lib.figures import design as F
from mnv2lib.figures.common import FigureContext
from mnv2lib.layers import Mish, TripletAttention
from mnv2lib.layers.cnsn import CNSN
from mnv2lib.models import MobileNetV2
from mnv2lib.models import pretrained as P
from mnv2lib.models.mobilenetv2 import INVERTED_RESIDUAL_SETTING, mobilenet_v2_block
from torchvision.models._utils import _make_divisible
from conftest import n_params, png_bytes

SMALL = dict(num_classes=10, width_mult=0.25, stem="cifar_lite")
TABLE_PAIRS = [2, 4, 5, 7, 8, 9, 11, 12, 14, 15]  # blocks with stride 1 and as many input as output channels


def hand_count(expand_ratio=None, width_mult=1.0, num_classes=1000):
    """MobileNetV2's parameters from the table: conv weights, BN scale and shift, the classifier."""
    c_in = _make_divisible(32 * width_mult, 8)
    last = _make_divisible(1280 * max(1.0, width_mult), 8)
    total = 3 * c_in * 9 + 2 * c_in
    for t, c, n, _ in INVERTED_RESIDUAL_SETTING:
        t = expand_ratio if expand_ratio is not None else t
        c_out = _make_divisible(c * width_mult, 8)
        for _ in range(n):
            h = int(round(c_in * t))
            if t != 1:
                total += c_in * h + 2 * h          # expansion 1x1 + BN
            total += h * 9 + 2 * h                 # depthwise 3x3 + BN
            total += h * c_out + 2 * c_out         # projection 1x1 + BN
            c_in = c_out
    total += c_in * last + 2 * last                # head 1x1 + BN
    return total + last * num_classes + num_classes


# --- model options ------------------------------------------------------------------------------

def test_defaults_keep_torchvision_parity_and_config_dict():
    # the explicit defaults build the default model, whose torchvision parity tests/test_models.py checks
    model = build_model(bottleneck_activation=None, shortcut="bottleneck", expand_ratio=None, pretrained=None)
    assert model.config == build_model().config
    assert n_params(model) == 3_504_872 == hand_count()
    model.load_state_dict(torchvision.models.mobilenet_v2().state_dict(), strict=True)
    # run keys hash ModelConfig.to_dict(): the new options stay out of it at their defaults
    keys = set(ModelConfig().to_dict())
    assert not keys & {"bottleneck_activation", "shortcut", "expand_ratio", "pretrained"}
    assert {"shortcut", "expand_ratio"} <= set(ModelConfig(shortcut="none", expand_ratio=4).to_dict())
    assert [b for b, _, _ in model.shortcuts()] == TABLE_PAIRS


@pytest.mark.parametrize("kwargs", [dict(bottleneck_activation="relu6"), dict(shortcut="expansion"),
                                    dict(shortcut="none")])
def test_options_without_new_weights_keep_parameters_and_load_torchvision(kwargs):
    model = build_model(**kwargs)
    assert n_params(model) == 3_504_872
    model.load_state_dict(torchvision.models.mobilenet_v2().state_dict(), strict=True)


@pytest.mark.parametrize("t", [1, 2, 4, 8, 2.5])
def test_expand_ratio_changes_hidden_widths_and_parameters(t):
    model = build_model(expand_ratio=t)
    assert n_params(model) == hand_count(expand_ratio=t)
    for block in model.blocks:
        inp = block.conv[0][0].in_channels
        depthwise = block.conv[-3][0]
        assert depthwise.groups == depthwise.out_channels == block.hidden_dim == int(round(inp * t))
        assert block.has_expansion == (t != 1)
        assert (type(block.conv[0]).__name__ == "Conv2dNormActivation" and block.conv[0][0].groups == 1) \
            == (t != 1)
    assert n_params(build_model(expand_ratio=4, width_mult=0.5, num_classes=10)) == \
        hand_count(expand_ratio=4, width_mult=0.5, num_classes=10)


def test_bottleneck_activation_placement():
    model = build_model(bottleneck_activation="relu6", **SMALL).eval()
    relu6 = sum(isinstance(m, nn.ReLU6) for m in model.modules())
    assert relu6 == 2 + 1 + 16 * 2 + 17  # the usual ones + one after every projection
    block = model.blocks[2]  # a block with the bottleneck shortcut
    assert block.use_res_connect and isinstance(block.bottleneck_activation, nn.ReLU6)
    assert isinstance(block.conv[-1], nn.BatchNorm2d)  # conv keeps torchvision's layout
    x = torch.randn(2, block.conv[0][0].in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), x + nn.functional.relu6(block.conv(x)))  # act after BN, before add
        first = model.blocks[1]  # no shortcut: the bottleneck itself is non-linear
        y = first(torch.randn(2, first.conv[0][0].in_channels, 8, 8))
        assert y.min() >= 0 and y.max() <= 6
    mish = build_model(bottleneck_activation="mish", activation="silu", **SMALL)
    assert sum(isinstance(m, Mish) for m in mish.modules()) == 17
    assert sum(isinstance(m, nn.SiLU) for m in mish.modules()) == 2 + 1 + 16 * 2
    linear = build_model(**SMALL)
    assert all(b.bottleneck_activation is None for b in linear.blocks)


def _same_shape_blocks(model):
    """Indices of the blocks with stride 1 and as many input as output channels, read off their convs."""
    return [j for j, b in enumerate(model.blocks)
            if b.conv[-3][0].stride == (1, 1) and b.conv[-2].out_channels == b.conv[0][0].in_channels]


def _stage_layers(block):
    """(expansion or None, the rest of the branch) from a block's own modules."""
    expansion = block.conv[0] if block.has_expansion else None
    rest = block.conv[1:] if block.has_expansion else block.conv
    return expansion, rest


def _reference_chain(model, x, shortcut):
    """The network written out as a plain chain of layers, with each shortcut placement added by hand.

    bottleneck: b_j = b_{j-1} + P(D(E(b_{j-1}))) for blocks with stride 1 and equal widths;
    expansion:  e_{j+1} = E_{j+1}(b_j) + e_j for the same blocks j; none: no addition at all.
    """
    blocks = model.blocks
    same = [j in _same_shape_blocks(model) for j in range(len(blocks))]
    b = model.features[0](x)
    previous_e = None
    for j, block in enumerate(blocks):
        expansion, rest = _stage_layers(block)
        e = expansion(b) if expansion is not None else b
        if shortcut == "expansion" and j > 0 and same[j - 1] and previous_e.shape == e.shape:
            e = e + previous_e
        previous_e = e
        out = rest(e)
        if shortcut == "bottleneck" and same[j]:
            out = out + b
        b = out
    b = model.features[-1](b)
    return model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(b, 1), 1))


@pytest.mark.parametrize("shortcut", ["bottleneck", "expansion", "none"])
def test_shortcut_semantics_against_a_plain_chain(shortcut):
    model = build_model(shortcut=shortcut, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_chain(model, x, shortcut), atol=1e-5, rtol=1e-5)
    pairs = _same_shape_blocks(model)
    # at width 0.25 the first block is 8 -> 8 channels: a bottleneck shortcut, but its "expanded" tensor
    # (t = 1: its input, 8 channels) cannot join block 1's (48 channels): no expansion shortcut there
    assert pairs == [0] + TABLE_PAIRS
    expected = {"bottleneck": [(j, j, "bottleneck") for j in pairs],
                "expansion": [(j, j + 1, "expansion") for j in TABLE_PAIRS], "none": []}[shortcut]
    assert model.shortcuts() == expected
    if shortcut != "none":
        wide = build_model(shortcut=shortcut, num_classes=10).shortcuts()
        assert [(a, b) for a, b, _ in wide] == [(j, j + (shortcut == "expansion")) for j in TABLE_PAIRS]


def test_shortcut_placements_differ_with_the_same_weights():
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    state = build_model(**SMALL).state_dict()
    for shortcut in ("bottleneck", "expansion", "none"):
        model = build_model(shortcut=shortcut, **SMALL).eval()
        model.load_state_dict(state)
        with torch.no_grad():
            outputs[shortcut] = model(x)
    assert not torch.allclose(outputs["bottleneck"], outputs["expansion"])
    assert not torch.allclose(outputs["bottleneck"], outputs["none"])


def test_none_has_no_residual_add():
    model = build_model(shortcut="none", **SMALL).eval()
    assert not any(b.use_res_connect or b.sends_expansion or b.receives_expansion for b in model.blocks)
    block = model.blocks[2]
    x = torch.randn(2, block.conv[0][0].in_channels, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), block.conv(x))


def test_expansion_shortcut_where_widths_differ_or_no_block_follows():
    def shortcuts(setting):
        return MobileNetV2(num_classes=10, inverted_residual_setting=setting,
                           block=mobilenet_v2_block(shortcut="expansion")).shortcuts()

    assert shortcuts([[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 1, 1]]) == [(2, 3, "expansion")]
    # block 2 expands 24 -> 144 channels, block 3 24 -> 72: different widths, identity shortcuts only -> none
    assert shortcuts([[1, 16, 1, 1], [6, 24, 2, 1], [3, 32, 1, 1]]) == []
    # the last block has no expansion layer after it
    assert shortcuts([[1, 16, 1, 1], [6, 24, 2, 1]]) == []
    model = MobileNetV2(num_classes=10, inverted_residual_setting=[[1, 16, 1, 1], [6, 24, 2, 1], [3, 32, 1, 1]],
                        block=mobilenet_v2_block(shortcut="expansion"))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_receiving_block_needs_the_carried_tensor():
    model = build_model(shortcut="expansion", **SMALL).eval()
    receiver = model.blocks[3]
    assert receiver.receives_expansion
    with pytest.raises(ValueError, match="expanded: got None"):
        receiver(torch.randn(1, receiver.conv[0][0].in_channels, 8, 8))
    with pytest.raises(ValueError, match="expanded: got a tensor"):
        model.blocks[1](torch.randn(1, 8, 8, 8), expanded=torch.zeros(1))
    # slices of features keep the carrying container
    assert type(model.features[1:]).__name__ == "Features"


IMPROVED = [
    dict(activation="mish", attention="triplet", cnsn="cnsn"),
    dict(activation="mish", attention="triplet", attention_position="after_depthwise", cnsn="cnsn",
         cnsn_position="pre"),
    dict(attention="triplet", attention_position="block_output", cnsn="sn", cnsn_position="residual"),
    dict(activation="mish", cnsn="cnsn", cnsn_position="identity"),
]
DESIGNS = [dict(), dict(bottleneck_activation="relu6", expand_ratio=4), dict(bottleneck_activation="mish")]
COMBOS = [(s, e, d) for s in ("bottleneck", "expansion", "none") for i, e in enumerate(IMPROVED)
          for j, d in enumerate(DESIGNS) if (i + j) % 2 == 0 or e.get("cnsn_position") == "identity"]


@pytest.mark.parametrize("shortcut,extra,design", COMBOS)
def test_options_compose_with_mish_attention_cnsn(shortcut, extra, design):
    if shortcut == "none" and extra.get("cnsn_position") == "identity":
        with pytest.raises(ValueError, match="cnsn_position: got 'identity'.*allowed"):
            build_model(shortcut=shortcut, **extra, **design, **SMALL)
        return
    model = build_model(shortcut=shortcut, **extra, **design, **SMALL).train()
    if extra.get("cnsn_position") == "identity":
        with_cnsn = [b for b in model.blocks if b.cnsn is not None]
        receivers = [to for _, to, _ in model.shortcuts()]  # the block where each shortcut is added
        assert [i for i, b in enumerate(model.blocks) if b.cnsn is not None] == receivers
        if shortcut == "expansion":  # on the carried expanded tensor
            assert all(b.cnsn.selfnorm.channels == b.hidden_dim for b in with_cnsn)
            assert receivers == ([1] if design.get("expand_ratio") else []) + [j + 1 for j in TABLE_PAIRS]
    out = model(torch.randn(3, 3, 32, 32))
    out.sum().backward()
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    assert all(p.grad is not None for p in model.parameters())
    if extra.get("attention"):
        assert sum(isinstance(m, TripletAttention) for m in model.modules()) == 17
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_identity_cnsn_on_the_expanded_tensor():
    model = build_model(shortcut="expansion", cnsn="sn", cnsn_position="identity", **SMALL).eval()
    receiver = model.blocks[3]
    seen = []
    receiver.cnsn.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    model(torch.randn(1, 3, 32, 32))
    assert seen == [receiver.hidden_dim] and isinstance(receiver.cnsn, CNSN)


@pytest.mark.parametrize("field,value", [
    ("bottleneck_activation", "swish"), ("bottleneck_activation", "linear"), ("shortcut", "wide"),
    ("shortcut", None), ("expand_ratio", 0), ("expand_ratio", -2), ("expand_ratio", "6"), ("expand_ratio", True),
    ("pretrained", "cifar10"), ("pretrained", True),
])
def test_bad_design_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}: got {value!r}.*allowed"):
        build_model(**{field: value})


def test_mobilenet_v1_rejects_the_v2_options():
    for field, value in [("shortcut", "none"), ("bottleneck_activation", "relu6"), ("expand_ratio", 4.0),
                         ("pretrained", "imagenet")]:
        with pytest.raises(ValueError, match=rf"{field}: got {value!r}; mobilenet_v1 does not support"):
            build_model(arch="mobilenet_v1", **{field: value})


def test_labels_and_round_trip():
    assert ModelConfig(bottleneck_activation="relu6").label == "bottleneck=relu6"
    assert ModelConfig(shortcut="none").label == "shortcut=none"
    assert ModelConfig(shortcut="expansion").label == "shortcut=expansion"
    assert ModelConfig(expand_ratio=4).label == "t=4" and ModelConfig(expand_ratio=2.5).label == "t=2.5"
    assert ModelConfig(activation="mish", shortcut="none", expand_ratio=8).label == "mish+shortcut=none+t=8"
    assert ModelConfig(pretrained="imagenet").label == "pretrained=imagenet"
    assert ModelConfig(expand_ratio=4) == ModelConfig(expand_ratio=4.0)
    assert ModelConfig(expand_ratio=4).to_json() == ModelConfig(expand_ratio=4.0).to_json()
    config = ModelConfig(bottleneck_activation="mish", shortcut="expansion", expand_ratio=3, num_classes=10)
    assert ModelConfig.from_json(config.to_json()) == config
    assert D.run_label(config.to_dict(), 1.0) == "bottleneck=mish+shortcut=expansion+t=3"
    assert D.run_label(ModelConfig(width_mult=0.75).to_dict(), 0.5) == "w=0.75"
    assert D.run_label(ModelConfig(width_mult=0.5).to_dict(), 0.5) == "baseline"
    assert D.run_label(ModelConfig(width_mult=1.0, expand_ratio=2).to_dict(), 0.5) == "t=2+w=1"


# --- pretrained weights -------------------------------------------------------------------------

@pytest.fixture
def offline_dirs(tmp_path, monkeypatch):
    """An isolated data folder, an empty project data/ and torch hub, downloads off."""
    external, local, hub = tmp_path / "external", tmp_path / "local", tmp_path / "hub"
    for d in (external, local, hub):
        d.mkdir()
    monkeypatch.setenv(paths.DATA_ENV_VAR, str(external))
    monkeypatch.setattr(paths, "DATA_DIR", local)
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setenv(P.OFFLINE_ENV_VAR, "1")
    return external, local


def _write_weights(folder, state):
    (folder / "pretrained").mkdir(exist_ok=True)
    path = folder / "pretrained" / P.weights_file_name("imagenet")
    torch.save(state, path)
    return path


def test_pretrained_loads_a_self_written_state_dict(offline_dirs):
    external, _ = offline_dirs
    torch.manual_seed(3)
    reference = torchvision.models.mobilenet_v2().eval()
    with torch.no_grad():  # non-trivial BN statistics, so that loading them is checked too
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = _write_weights(external, reference.state_dict())
    model = build_model(pretrained="imagenet").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    assert model.pretrained_report["file"] == str(path) and model.pretrained_report["new_parameters"] == []
    assert model.base_parameter_names == {n for n, _ in model.named_parameters()}

    variant = build_model(pretrained="imagenet", num_classes=10, stem="cifar", attention="triplet",
                          shortcut="expansion", bottleneck_activation="relu6", activation="mish")
    state = variant.state_dict()
    for key, value in reference.state_dict().items():
        if not key.startswith("classifier."):
            torch.testing.assert_close(state[key], value)
    new = set(variant.pretrained_report["new_parameters"])
    assert new == {n for n, _ in variant.named_parameters() if ".attention." in n or n.startswith("classifier.")}
    assert variant.base_parameter_names.isdisjoint(new) and variant.pretrained_report["classifier_reinitialized"]
    # a wrapped checkpoint is accepted too
    torch.save({"state_dict": reference.state_dict()}, path)
    assert build_model(pretrained="imagenet1k_v2").pretrained_report["loaded_tensors"] == len(reference.state_dict())


def test_pretrained_missing_file_says_where_to_put_it(offline_dirs):
    external, local = offline_dirs
    with pytest.raises(P.PretrainedWeightsNotFound, match="place the file at") as info:
        build_model(pretrained="imagenet", num_classes=10)
    message = str(info.value)
    assert str(local / "pretrained" / P.weights_file_name("imagenet")) in message
    assert "MNV2_OFFLINE=1" in message and P.weights_url("imagenet") in message
    assert isinstance(info.value, FileNotFoundError)


def test_pretrained_checks_shapes_before_looking_for_the_file(offline_dirs):
    for kwargs, named in [(dict(width_mult=0.5), "width_mult=0.5"), (dict(expand_ratio=4), "expand_ratio=4.0"),
                          (dict(in_channels=1), "in_channels=1")]:
        with pytest.raises(ValueError, match=rf"pretrained: got 'imagenet' for .*{named}.*do not match.*Allowed"):
            build_model(pretrained="imagenet", **kwargs)


def test_fine_tuning_gives_new_modules_their_learning_rate(offline_dirs):
    from mnv2lib.engine.train import TrainConfig, _make_optimizer

    external, _ = offline_dirs
    _write_weights(external, torchvision.models.mobilenet_v2().state_dict())
    model = build_model(pretrained="imagenet", num_classes=10, attention="triplet")
    optimizer, scheduler = _make_optimizer(model, TrainConfig(lr=0.1, new_module_lr_mult=10.0,
                                                              schedule="cosine"), steps_per_epoch=10)
    ids = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        names = {ids[id(p)] for p in group["params"]}
        new = {n not in model.base_parameter_names for n in names}
        assert len(new) == 1
        assert group["lr"] == pytest.approx(0.1 * (10.0 if new.pop() else 1.0))
    counted = sum(len(g["params"]) for g in optimizer.param_groups if g["lr"] == pytest.approx(1.0))
    assert counted == len(model.pretrained_report["new_parameters"])


# --- analysis -----------------------------------------------------------------------------------

def _record(overrides, seed, acc, corr=None, costs=None, width=0.5, epochs=3):
    config = ModelConfig(**{"width_mult": width, "stem": "cifar_lite", "num_classes": 10, **overrides})
    history = [{"epoch": e + 1, "test_accuracy": acc * (e + 1) / epochs, "train_loss": 2.0 / (e + 1),
                "train_accuracy": acc, "test_loss": 1.0} for e in range(epochs)]
    return {"key": f"{config.label}-{config.width_mult}-{seed}", "label": config.label, "status": "finished",
            "seed": seed, "profile_name": "quick", "dataset": {"name": "synthetic", "description": "synthetic"},
            "model_config": config.to_dict(), "clean_accuracy": acc,
            "mean_corruption_accuracy": corr if corr is not None else acc - 0.1, "train_seconds": 60.0,
            "costs": costs or {"parameters": 1e6, "multiply_adds": 10e6, "latency_ms_batch1": 5.0},
            "history": history}


def _figure6_records(diffs_by_seed):
    """Baseline accuracies 0.70 and 0.72 (seeds 0, 1); each variant = baseline + the given per-seed diffs."""
    base = {0: 0.70, 1: 0.72, 2: 0.71}
    records = []
    for seed in range(len(next(iter(diffs_by_seed.values())))):
        records.append(_record({}, seed, base[seed]))
        for label, diffs in diffs_by_seed.items():
            records.append(_record(D.FIGURE6_OVERRIDES[label], seed, base[seed] + diffs[seed]))
    return records


def test_design_plans_fit_the_budgets():
    from mnv2lib.runs.profiles import PROFILES

    smoke, quick, full = (D.design_plan(PROFILES[n]) for n in ("smoke", "quick", "full"))
    # new runs beyond the baseline, which notebook 04 trains anyway
    new = {n: D.planned_runs(p) - len(p.figure6_seeds) for n, p in [("smoke", smoke), ("quick", quick)]}
    assert new["quick"] <= 10 and new["smoke"] <= 8
    assert len(quick.figure6_seeds) >= 2 and quick.sweep_seeds == PROFILES["quick"].seeds[:1]
    assert PROFILES["quick"].width_mult not in quick.widths and 32 in quick.resolutions
    assert D.sweep_configs(quick) == [{"expand_ratio": 2}, {"expand_ratio": 4}, {"width_mult": 0.25}]
    assert D.figure6_configs()[0] == {} and len(D.figure6_configs()) == 4
    assert set(full.expand_ratios) >= {2, 4, 6, 8} and full.sweep_seeds == PROFILES["full"].seeds
    for overrides in D.figure6_configs() + D.sweep_configs(quick):
        ModelConfig(**overrides)  # every planned config is valid
    # a budget-ladder rung does its base profile's work (it used to get the full plan)
    assert D.design_plan(PROFILES["quick_x2"]).expand_ratios == quick.expand_ratios


def test_figure6_summary_and_sentences():
    per_seed = {"bottleneck=relu6": [-0.020, -0.022], "shortcut=expansion": [0.000, 0.002],
                "shortcut=none": [0.020, 0.021]}
    records = _figure6_records(per_seed)
    frame = D.design_frame(records, 0.5)
    assert set(frame["label"]) == {"baseline", "bottleneck=relu6", "shortcut=expansion", "shortcut=none"}
    summary, diffs = D.figure6_summary(frame)
    clean = diffs["clean_accuracy"].set_index("label")
    assert clean.loc["bottleneck=relu6", "mean_difference"] == pytest.approx(-0.021)
    # the interval pools the residual of the whole 4 variants x 2 seeds design (variant + seed, 3 dof), not
    # the one pair's spread (1 dof): by hand, from the two-way table's residuals
    table = np.array([[0.70, 0.72]] + [[0.70 + d[0], 0.72 + d[1]] for d in per_seed.values()])
    residual = table - table.mean(1, keepdims=True) - table.mean(0, keepdims=True) + table.mean()
    sigma = math.sqrt((residual ** 2).sum() / 3)
    half = 3.182446305 * sigma * math.sqrt(1 / 2 + 1 / 2)  # t(0.975, 3 dof); two means of 2 seeds each
    assert clean.loc["bottleneck=relu6", "ci_low"] == pytest.approx(-0.021 - half, rel=1e-6)
    assert clean.loc["bottleneck=relu6", "df_resid"] == 3
    assert summary.set_index("label").loc["baseline", "clean_accuracy_mean"] == pytest.approx(0.71)
    text = prose.describe_figure6(summary, diffs, "synthetic", "quick")
    assert "71.0% clean accuracy" in text and "-2.1 pp" in text
    relu6, expansion, none = (next(l for l in text.splitlines() if key in l) for key in
                              ("ReLU6 in the bottleneck", "between expansions", "no residual"))
    assert "agrees with the paper" in relu6
    assert "not resolved" in expansion
    assert "contradicts the paper" in none
    single = D.design_frame(_figure6_records({"bottleneck=relu6": [-0.02]}), 0.5)
    s, d = D.figure6_summary(single)
    assert "indicative only" in prose.describe_figure6(s, d, "synthetic", "quick")
    assert set(D.figure6_runs(frame, "bottleneck")["label"]) == {"baseline", "bottleneck=relu6"}
    with pytest.raises(ValueError, match="panel: got 'width'"):
        D.figure6_runs(frame, "width")


def _sweep_records():
    madds = {None: 12e6, 2: 5e6, 4: 9e6}
    records = [_record({}, s, 0.70 + 0.01 * s, costs={"parameters": 7e5, "multiply_adds": 12e6,
                                                      "latency_ms_batch1": 4.0}) for s in (0, 1)]
    records += [_record({"expand_ratio": t}, 0, acc, costs={"parameters": 3e5 * t, "multiply_adds": madds[t],
                                                            "latency_ms_batch1": 2.0 + t / 2})
                for t, acc in [(2, 0.66), (4, 0.72)]]
    records += [_record({}, 0, acc, width=w, costs={"parameters": 1e6 * w, "multiply_adds": 20e6 * w * w,
                                                    "latency_ms_batch1": 8 * w})
                for w, acc in [(0.25, 0.60), (0.75, 0.74)]]
    records.append(_record({"shortcut": "none"}, 0, 0.5))  # not part of the sweeps
    return records


def test_tradeoff_table_and_pareto_front():
    frame = D.design_frame(_sweep_records(), 0.5)
    table = D.tradeoff_table(frame, 0.5, seeds=(0,))
    t = table[table["knob"] == "expand_ratio"]
    w = table[table["knob"] == "width_mult"]
    assert t["label"].tolist() == ["t=2", "t=4", "baseline"] and t["table_t"].tolist() == [False, False, True]
    assert w["label"].tolist() == ["w=0.25", "baseline", "w=0.75"] and w["value"].tolist() == [0.25, 0.5, 0.75]
    assert "shortcut=none" not in set(table["label"])
    assert (table["seeds"] == 1).all()  # restricted to the sweep seed, the baseline too
    assert table.set_index(["knob", "label"]).loc[("expand_ratio", "baseline"), "clean_accuracy_mean"] == 0.70
    # the Pareto front against a brute-force check
    rng = np.random.default_rng(0)
    points = pd.DataFrame({"multiply_adds": rng.integers(1, 20, 40), "clean_accuracy_mean": rng.random(40)})
    front = D.pareto_front(points)
    for i, row in points.iterrows():
        better = points[(points["multiply_adds"] <= row["multiply_adds"])
                        & (points["clean_accuracy_mean"] >= row["clean_accuracy_mean"])
                        & ((points["multiply_adds"] < row["multiply_adds"])
                           | (points["clean_accuracy_mean"] > row["clean_accuracy_mean"]))]
        assert front[i] == better.empty
    text = prose.describe_tradeoffs(table, "synthetic", "quick", (0,))
    assert "from **t=2** to **baseline (table t)** multiply-adds grow 2.4x (5.0M to 12.0M)" in text
    assert "from **w=0.25** to **baseline (w=0.5)** multiply-adds grow 9.6x (1.2M to 12.0M)" in text
    assert "Pareto front: t=2, t=4." in text and "seed 0" in text


def test_resolution_cost_grid_scales_with_resolution_squared():
    grid = D.resolution_cost_grid((0.25, 0.5), (32, 64, 128), num_classes=10, latency_repeats=1,
                                  show_progress=False)
    assert len(grid) == 6 and (grid["latency_ms"] > 0).all()
    for width, g in grid.groupby("width_mult"):
        g = g.set_index("resolution")["multiply_adds"]
        # a r^2 + c: every feature map scales with the side (all strides divide 32); the classifier
        # and the per-channel counts do not
        assert g[128] - g[64] == 4 * (g[64] - g[32])
        model = build_model(num_classes=10, width_mult=width, stem="cifar_lite")
        assert (grid.loc[grid["width_mult"] == width, "parameters"] == n_params(model)).all()
    grid = grid[grid["resolution"] < 128]
    text = prose.describe_cost_grid(grid, 32)
    g = grid.set_index(["width_mult", "resolution"])
    ratio = g.loc[(0.5, 32), "multiply_adds"] / g.loc[(0.25, 32), "multiply_adds"]
    assert f"width 0.25 -> 0.5 multiplies multiply-adds by {ratio:.1f}x" in text
    assert "resolution squared: 4.00x" in text and "correlate at r =" in text
    no_latency = D.resolution_cost_grid((0.25,), (24, 32), latency_repeats=1, measure_latency=False,
                                        show_progress=False)
    assert "latency_ms" not in no_latency and "latency" not in prose.describe_cost_grid(no_latency, 32)


# --- figures ------------------------------------------------------------------------------------

CONTEXT = FigureContext(dataset="synthetic", profile="smoke", seeds=(0, 1))


def test_figure6_figures():
    from mnv2lib.analysis.ablation import histories_frame

    records = _figure6_records({"bottleneck=relu6": [-0.02, -0.03], "shortcut=expansion": [-0.01, 0.01],
                                "shortcut=none": [0.02, 0.03]})
    frame = D.design_frame(records, 0.5)
    histories = histories_frame(records)
    fig = F.make_figure6_curves_figure(histories, context=CONTEXT)
    a, b = fig.axes
    assert len(a.get_lines()) == 2 and len(b.get_lines()) == 3
    assert a.get_ylabel() == "test accuracy (%)" and "seeds: 0, 1" not in a.get_title()
    assert any("ReLU6 in the bottleneck" in t.get_text() for t in a.get_legend().get_texts())
    np.testing.assert_allclose(a.get_lines()[0].get_ydata()[-1], 71.0)
    assert png_bytes(fig)[:4] == b"\x89PNG"
    loss = F.make_figure6_curves_figure(histories, "train_loss", CONTEXT)
    assert loss.axes[0].get_ylabel() == "training loss"
    summary, _ = D.figure6_summary(frame)
    fig = F.make_figure6_accuracy_figure(frame, summary, "clean_accuracy", CONTEXT)
    a, b = fig.axes[:2]
    assert [t.get_text() for t in a.get_yticklabels()] == list(D.FIGURE6["bottleneck"].values())
    assert len(b.patches) == 3 and b.get_xlabel().startswith("final clean accuracy (%)")
    assert len(png_bytes(fig)) > 1000
    with pytest.raises(ValueError, match="metric: got 'top5'"):
        F.make_figure6_accuracy_figure(frame, summary, "top5")
    with pytest.raises(ValueError, match="y: got 'acc'"):
        F.make_figure6_curves_figure(histories, "acc")


def test_tradeoff_and_cost_grid_figures():
    table = D.tradeoff_table(D.design_frame(_sweep_records(), 0.5), 0.5, seeds=(0,))
    fig = F.make_tradeoff_figure(table, "multiply_adds", "clean_accuracy", CONTEXT)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "multiply-adds per image (M)" and ax.get_ylabel() == "clean accuracy (%)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"expansion ratio t", "width multiplier", "Pareto front"} <= set(legend)
    assert any(t.startswith("MobileNetV2 as published") for t in legend)
    assert {t.get_text() for t in ax.texts} == {"t=2", "t=4", "w=0.25", "w=0.75"}
    assert len(png_bytes(fig)) > 1000
    with pytest.raises(ValueError, match="cost: got 'watts'"):
        F.make_tradeoff_figure(table, "watts")
    grid = pd.DataFrame([{"width_mult": w, "resolution": r, "multiply_adds": 1e6 * w * r, "latency_ms": w * r / 10}
                         for w in (0.25, 0.5) for r in (24, 32, 40)])
    fig = F.make_cost_grid_figure(grid, 32, CONTEXT)
    heatmaps = [ax for ax in fig.axes if ax.get_xlabel() == "input side (pixels)"]
    assert len(heatmaps) == 2 and len(heatmaps[0].patches) == 1  # the frame around the native column
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == ["24", "32\n(trained)", "40"]
    assert len(png_bytes(fig)) > 1000


def test_tradeoff_widget_rerenders():
    import ipywidgets as w

    from mnv2lib.workbook.widgets import figure_view

    table = D.tradeoff_table(D.design_frame(_sweep_records(), 0.5), 0.5, seeds=(0,))
    cost = w.Dropdown(options=list(F.COST_LABELS), value="multiply_adds")
    view = figure_view(lambda cost: F.make_tradeoff_figure(table, cost, "clean_accuracy", CONTEXT),
                       {"cost": cost}, interactive=True)
    view.render()
    cost.value = "latency_ms_batch1"
    assert view.renders == 2 and view.last_figure.axes[0].get_xlabel() == "latency at batch 1 (ms)"
