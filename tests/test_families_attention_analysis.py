import ipywidgets as w
import pytest
import torch
from torch import nn

from mnv2lib import build_model
from mnv2lib.analysis import attention as T
from mnv2lib.analysis import families as FA
from mnv2lib.analysis.prose import attention as attention_prose
from mnv2lib.analysis.prose import families as families_prose
from mnv2lib.figures import attention as FT
from mnv2lib.figures import families as FF
from mnv2lib.figures.common import FigureContext
from mnv2lib.workbook.widgets import figure_view

CTX = FigureContext("synthetic", "smoke", (0,))


def test_table3_memory_matches_the_paper_peaks():
    memory = FA.memory_comparison({"MobileNetV1": {"arch": "mobilenet_v1"}, "MobileNetV2": {}})
    # paper: 1600K for V1 (112x112x64 at fp16) and 400K for V2 (112x112x16)
    assert memory.loc["max", "MobileNetV1"] == pytest.approx(112 * 112 * 64 * 2 / 1000)
    assert memory.loc["max", "MobileNetV2"] == pytest.approx(112 * 112 * 16 * 2 / 1000)
    v2 = FA.materialized_memory(build_model(), 224)
    assert v2.loc[7, "channels"] == 320 and v2.loc[14, "channels"] == 96
    assert "4.0x less" in families_prose.describe_memory(memory)


def test_cost_table_and_description():
    costs = FA.cost_table({"MobileNetV1": {"arch": "mobilenet_v1"}, "MobileNetV2": {}}, resolution=64,
                          latency_repeats=1)
    c = costs.set_index("model")
    assert c.loc["MobileNetV2", "parameters"] == 3_504_872
    assert c.loc["MobileNetV1", "multiply_adds"] > c.loc["MobileNetV2", "multiply_adds"]
    assert (c["latency_ms"] > 0).all()
    assert "MobileNetV2 needs" in families_prose.describe_costs(costs)
    fig = FF.make_cost_tradeoff_figure(costs, "parameters", CTX)
    assert fig.axes[0].get_xscale() == "log"


def test_family_results_match_records_to_members():
    members = {"MobileNetV1": {"arch": "mobilenet_v1"}, "MobileNetV2": {},
               "MobileNetV2 + Mish + TA + CNSN": {"activation": "mish", "attention": "triplet", "cnsn": "cnsn"}}
    base = {"arch": "mobilenet_v2", "activation": "relu6", "attention": None, "cnsn": None}
    records = [
        {"model_config": {**base, "arch": "mobilenet_v1"}, "seed": 0, "clean_accuracy": 0.5, "costs": {}},
        {"model_config": base, "seed": 0, "clean_accuracy": 0.6, "costs": {}},
        {"model_config": {**base, "activation": "mish"}, "seed": 0, "clean_accuracy": 0.7, "costs": {}},
        {"model_config": {**base, "activation": "mish", "attention": "triplet", "cnsn": "cnsn"}, "seed": 0,
         "clean_accuracy": 0.8, "costs": {}},
    ]
    results = FA.family_results(records, members).set_index("model")["clean_accuracy"]
    assert results.to_dict() == {"MobileNetV1": 0.5, "MobileNetV2": 0.6, "MobileNetV2 + Mish + TA + CNSN": 0.8}


@pytest.fixture(scope="module")
def ta_model():
    torch.manual_seed(0)
    return build_model(num_classes=10, width_mult=0.25, stem="cifar", attention="triplet").eval()


def test_attention_maps_and_heatmaps(ta_model):
    x = torch.randn(3, 3, 32, 32)
    maps = T.attention_maps(ta_model, x)
    assert len(maps) == 17 and "features.1" in maps
    gates = maps["features.2"]
    heat = T.branch_heatmap(gates, "channel_width")
    # channel-width gate varies along W only: every row of its heatmap is the same
    assert torch.allclose(heat, heat[:, :1, :].expand_as(heat))
    combined = T.branch_heatmap(gates, "combined")
    manual = sum(g.mean(1).expand_as(combined) for g in gates.values()) / 3
    torch.testing.assert_close(combined, manual)
    assert T.branch_heatmap(gates, "spatial", size=(32, 32)).shape == (3, 32, 32)
    with pytest.raises(ValueError, match="branch: got 'diagonal'"):
        T.branch_heatmap(gates, "diagonal")
    with pytest.raises(ValueError, match="no Triplet Attention"):
        T.attention_maps(build_model(num_classes=10, width_mult=0.25, stem="cifar"), x)
    summary = T.attention_summary(maps)
    assert set(summary["branch"]) == {"channel_width", "height_channel", "spatial"}
    assert "most selective" in attention_prose.describe_attention(summary)


def test_grad_cam_against_a_manual_computation(ta_model):
    x = torch.randn(2, 3, 32, 32)
    cams, targets = T.grad_cam(ta_model, x)
    assert cams.shape == (2, 32, 32) and cams.min() >= 0 and cams.max() <= 1
    feats = ta_model.features(x)
    feats.retain_grad()
    logits = ta_model.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(feats, 1), 1))
    logits.gather(1, logits.argmax(1, keepdim=True)).sum().backward()
    cam = torch.relu((feats.grad.mean((2, 3), keepdim=True) * feats).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)[:, 0].detach()
    cam = (cam - cam.flatten(1).min(1).values[:, None, None]) / (
        cam.flatten(1).max(1).values - cam.flatten(1).min(1).values)[:, None, None]
    torch.testing.assert_close(cams, cam, atol=1e-5, rtol=1e-4)
    assert torch.equal(targets, logits.argmax(1))


def test_top_region_overlap():
    a = torch.zeros(1, 10, 10)
    a[0, :2] = 1  # top 20% = first two rows
    assert T.top_region_overlap(a, a).item() == 1.0
    b = torch.zeros(1, 10, 10)
    b[0, -2:] = 1
    assert T.top_region_overlap(a, b).item() == 0.0


def test_attention_figures_and_widget(ta_model):
    images = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    maps = T.attention_maps(ta_model, images.float() / 255)
    block = list(maps)[3]
    fig = FT.make_attention_overlay_figure(images[0], maps[block], block, 0, CTX, "cat")
    assert len(fig.axes) >= 8
    fig2 = FT.make_attention_blocks_figure(images, maps, "spatial", CTX, ["a", "b"])
    assert len(fig2.axes) == 2 * 10
    cams = {"m": torch.rand(2, 32, 32), "n": torch.rand(2, 32, 32)}
    fig3 = FT.make_gradcam_figure(images, cams, {"m": ["a", "b"], "n": ["a", "a"]}, ["a", "b"], CTX)
    assert fig3.axes[5].title.get_color() == "red" and fig3.axes[4].title.get_color() == "green"
    view = figure_view(lambda image, block, branch: FT.make_attention_detail_figure(images[image], maps, block,
                                                                                     branch, image, CTX),
                       {"image": w.IntSlider(min=0, max=1, value=0), "block": w.Dropdown(options=list(maps)),
                        "branch": w.Dropdown(options=["spatial", "channel_width"], value="spatial")})
    view.show()
    first = view.last_figure
    view.controls["branch"].value = "channel_width"
    assert view.renders == 2 and view.last_figure is not first
    assert "channel-width" in view.last_figure.axes[1].get_title()
    static = figure_view(lambda image: FT.make_attention_detail_figure(images[image], maps, block, "spatial"),
                         {"image": w.IntSlider(min=0, max=1, value=1)}, interactive=False)
    static.show()
    static.controls["image"].value = 0
    assert static.renders == 1  # not interactive: rendered once, controls not wired
