"""Feature extraction in timm's convention and torchvision's detection and segmentation heads over the
workbook's backbones (mnv2lib.models.features, mnv2lib.models.heads)."""
from __future__ import annotations

import pytest
import torch

from mnv2lib import build_model
from mnv2lib.models.features import features_only
from mnv2lib.models.heads import build_deeplabv3, build_lraspp, build_ssdlite

VARIANTS = [
    dict(arch="mobilenet_v2"),
    dict(arch="mobilenet_v2", activation="mish", attention="triplet", cnsn="cnsn", width_mult=0.5),
    dict(arch="mobilenet_v2", shortcut="expansion", width_mult=0.5),
    dict(arch="mobilenet_v1", activation="mish", width_mult=0.5),
    dict(arch="mobilenet_v4_conv_small", activation="mish"),
    dict(arch="mobilenet_v4_hybrid_medium", width_mult=0.5),
]


def _intermediates(model, x) -> dict[str, torch.Tensor]:
    """The classification model's own tensors: every module of ``features`` and every expansion conv."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if name.startswith("features.") and (name.count(".") == 1 or name.endswith(".conv.0")):
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out)))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("overrides", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_features_are_the_classification_models_own_tensors(overrides):
    torch.manual_seed(0)
    model = build_model(**overrides).eval()
    x = torch.randn(2, 3, 96, 96)
    expected = _intermediates(model, x)
    extractor = features_only(model, out_indices=None).eval()
    maps = extractor(x)
    assert len(maps) == len(extractor.feature_info) == 5
    for info, got in zip(extractor.feature_info, maps):
        torch.testing.assert_close(got, expected[info["module"]], rtol=0, atol=0)
        assert got.shape[1] == info["num_chs"] and 96 // got.shape[-1] == info["reduction"]
    assert [i["reduction"] for i in extractor.feature_info] == [2, 4, 8, 16, 32]


def test_mobilenetv2_stages_match_timms_and_the_head_and_expansion_taps():
    model = build_model(features_only=True)
    assert [i["num_chs"] for i in model.feature_info] == [16, 24, 32, 96, 320]  # timm's mobilenetv2_100
    classifier = build_model().eval()
    x = torch.randn(1, 3, 64, 64)
    expected = _intermediates(classifier, x)
    extractor = features_only(classifier, out_indices=(5,), taps=(14,)).eval()
    assert [i["module"] for i in extractor.feature_info] == ["features.14.conv.0", "features.18"]
    expansion, last = extractor(x)
    torch.testing.assert_close(expansion, expected["features.14.conv.0"], rtol=0, atol=0)
    torch.testing.assert_close(last, expected["features.18"], rtol=0, atol=0)


def test_a_classification_checkpoint_loads_into_the_extractor():
    state = build_model(activation="mish", attention="triplet").state_dict()
    extractor = build_model(activation="mish", attention="triplet", features_only=True)
    missing, unexpected = extractor.load_state_dict(state, strict=False)
    assert missing == [] and {k.split(".")[0] for k in unexpected} == {"classifier", "features"}
    assert all(k.startswith(("classifier.", "features.18.")) for k in unexpected)  # the unused 1x1 head conv


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1", "mobilenet_v4_conv_small",
                                  "mobilenet_v4_hybrid_medium"])
@pytest.mark.parametrize("output_stride", [8, 16])
def test_output_stride_dilates_the_later_stages(arch, output_stride):
    model = build_model(arch=arch, features_only=True, output_stride=output_stride, width_mult=0.5).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 128, 128))
    expected = [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    assert [i["reduction"] for i in model.feature_info] == expected
    assert [128 // m.shape[-1] for m in maps] == expected
    dilated = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.dilation[0] > 1]
    assert dilated and all(m.stride == (1, 1) for m in dilated)


@pytest.mark.parametrize("kwargs, message", [
    (dict(features_only=True, out_indices=(7,)), r"out_indices: got \(7,\); allowed: distinct integers from \(0, 1"),
    (dict(features_only=True, out_indices=(1, 1)), "out_indices: got"),
    (dict(features_only=True, out_indices=3), "out_indices: got 3"),
    (dict(features_only=True, output_stride=4), r"output_stride: got 4; allowed values are \(8, 16, 32\)"),
    (dict(out_indices=(1,)), "allowed only with features_only=True"),
    (dict(features_only="yes"), "features_only: got 'yes'"),
])
def test_bad_feature_arguments_name_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_model(**kwargs)


def test_ssdlite_trains_and_detects_over_an_improved_backbone():
    torch.manual_seed(0)
    detector = build_ssdlite(num_classes=5, width_mult=0.35, activation="mish", attention="triplet", cnsn="cnsn")
    images = [torch.rand(3, 320, 320) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 200.0, 220.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[50.0, 60.0, 120.0, 300.0]]), "labels": torch.tensor([3])}]
    losses = detector.train()(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in detector.backbone.parameters() if p.requires_grad)
    with torch.no_grad():
        detections = detector.eval()(images[:1])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_ssdlite_on_mobilenetv2_reads_the_expansion_of_layer_15_and_the_last_layer():
    detector = build_ssdlite()
    assert [i["module"] for i in detector.backbone.body.feature_info] == ["features.14.conv.0", "features.18"]
    assert [i["num_chs"] for i in detector.backbone.body.feature_info] == [576, 1280]


def test_ssdlite_refuses_a_backbone_without_output_stride_32():
    with pytest.raises(ValueError, match="SSDLite needs maps at output stride 16 and 32"):
        build_ssdlite(stem="cifar")


@pytest.mark.parametrize("build", [build_deeplabv3, build_lraspp])
def test_segmentation_heads_train_over_an_improved_backbone(build):
    torch.manual_seed(0)
    segmenter = build(num_classes=4, width_mult=0.35, activation="mish", attention="triplet").train()
    images = torch.randn(2, 3, 96, 96)
    out = segmenter(images)["out"]
    assert out.shape == (2, 4, 96, 96)
    torch.nn.functional.cross_entropy(out, torch.randint(0, 4, (2, 96, 96))).backward()
    assert all(p.grad is not None for p in segmenter.parameters() if p.requires_grad)


def test_deeplabv3_reads_the_second_last_map_at_output_stride_16():
    segmenter = build_deeplabv3()
    info = segmenter.backbone.body.feature_info
    assert [(i["num_chs"], i["reduction"]) for i in info] == [(320, 16)]
    with pytest.raises(ValueError, match="backbone: got features_only or num_classes"):
        build_deeplabv3(features_only=True)
