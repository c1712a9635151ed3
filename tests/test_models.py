import json

import pytest
import torch
import torchvision
from torch import nn

from mnv2lib import ModelConfig, build_model
from mnv2lib import summary
from mnv2lib.layers import CNSN, Mish, SelfNorm, TripletAttention
from mnv2lib.models import InvertedResidual
from conftest import n_params


def test_mobilenet_v2_parameter_count_and_torchvision_parity():
    model = build_model()
    assert n_params(model) == 3_504_872
    reference = torchvision.models.mobilenet_v2()
    model.load_state_dict(reference.state_dict(), strict=True)
    model.eval(), reference.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kwargs", [dict(activation="mish"), dict(attention="triplet"),
                                    dict(activation="mish", attention="triplet", attention_position="block_output")])
def test_torchvision_weights_load_into_improved_models(kwargs):
    model = build_model(**kwargs)
    missing, unexpected = model.load_state_dict(torchvision.models.mobilenet_v2().state_dict(), strict=False)
    assert unexpected == []
    assert all(".attention." in key for key in missing)
    if "attention" not in kwargs:
        assert missing == []


@pytest.mark.parametrize("kernel,params", [(7, 3_509_972), (3, 3_505_892)])
def test_triplet_parameter_counts(kernel, params):
    model = build_model(attention="triplet", attention_kernel=kernel)
    assert n_params(model) == params
    assert sum(isinstance(m, TripletAttention) for m in model.modules()) == 17


@pytest.mark.parametrize("name,cls", [("mish", Mish), ("relu", nn.ReLU), ("silu", nn.SiLU),
                                      ("hardswish", nn.Hardswish), ("gelu", nn.GELU)])
def test_activation_replaces_every_relu6_and_projection_stays_linear(name, cls):
    model = build_model(activation=name)
    assert not any(isinstance(m, nn.ReLU6) for m in model.modules())
    # stem + head + (2 per t=1 block) + 3 per block with expansion... = every Conv2dNormActivation
    n_conv_norm_act = sum(type(m).__name__ == "Conv2dNormActivation" for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == n_conv_norm_act == 2 + 1 + 16 * 2
    for block in model.blocks:
        assert isinstance(block.conv[-1], nn.BatchNorm2d) and isinstance(block.conv[-2], nn.Conv2d)


def test_cifar_stem_strides():
    model = build_model(stem="cifar", num_classes=10)
    assert model.features[0][0].stride == (1, 1)
    strides = [b.stride for b in model.blocks]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]
    assert model.features(torch.randn(1, 3, 32, 32)).shape[-1] == 4
    imagenet = build_model(num_classes=10).eval()
    assert imagenet.features(torch.randn(1, 3, 32, 32)).shape[-1] == 1


@pytest.mark.parametrize("position", ["residual", "block_output", "after_depthwise"])
def test_attention_positions(position):
    model = build_model(attention="triplet", attention_position=position, num_classes=10, width_mult=0.5)
    block = model.blocks[2]  # 24 -> 24 with a shortcut, t = 6
    seen = []
    block.attention.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    x = torch.randn(2, 16, 8, 8)
    block.eval()
    out = block(x)
    assert seen == [{"residual": 16, "block_output": 16, "after_depthwise": 96}[position]]
    with torch.no_grad():  # order of operations
        branch = block.conv(x) if position != "after_depthwise" else None
        if position == "residual":
            torch.testing.assert_close(out, x + block.attention(branch))
        elif position == "block_output":
            torch.testing.assert_close(out, block.attention(x + branch))


@pytest.mark.parametrize("kwargs", [
    dict(attention="triplet", cnsn="cnsn"),
    dict(attention="triplet", attention_position="after_depthwise", cnsn="sn", cnsn_position="residual"),
    dict(attention="triplet", attention_position="block_output", shortcut="expansion"),
    dict(cnsn="sn", cnsn_position="pre"),
    dict(cnsn="cnsn", cnsn_position="identity"),
], ids=["residual-post", "after_depthwise-residual", "block_output-expansion", "cnsn-pre", "cnsn-identity"])
def test_blocks_let_modules_overwrite_only_the_blocks_own_tensors(kwargs):
    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar", **kwargs).eval()
    switches = [m for m in model.modules() if isinstance(m, (TripletAttention, SelfNorm, CNSN))]
    own = kwargs.get("cnsn_position", "post") in ("post", "residual")
    assert switches and all(m.inplace == (own or isinstance(m, TripletAttention)) for m in switches)
    inputs = {}

    def keep_input(block, args):
        inputs[block] = (args[0], args[0].clone())

    for block in model.blocks:
        block.register_forward_pre_hook(keep_input)
    x = torch.randn(3, 3, 32, 32)
    x_before = x.clone()
    with torch.no_grad():
        y = model(x)
        for m in switches:
            m.inplace = False
        y_out_of_place = model(x)
    assert torch.equal(y, y_out_of_place)
    assert torch.equal(x, x_before)
    for block, (seen, copy) in inputs.items():  # no block's input was overwritten
        assert torch.equal(seen, copy)


def test_grayscale_and_mobilenet_v1():
    for arch in ("mobilenet_v2", "mobilenet_v1"):
        model = build_model(arch=arch, in_channels=1, num_classes=10, stem="cifar")
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    v1 = build_model(arch="mobilenet_v1")
    assert n_params(v1) == 4_231_976
    assert summary(v1, (1, 3, 224, 224)).total_mult_adds == pytest.approx(568.7e6, rel=0.002)
    assert summary(build_model(), (1, 3, 224, 224)).total_mult_adds == pytest.approx(300.77e6, rel=0.01)
    v1_mish = build_model(arch="mobilenet_v1", activation="mish", width_mult=0.5)
    assert any(isinstance(m, Mish) for m in v1_mish.modules()) and n_params(v1_mish) < n_params(v1)


def test_config_round_trips_through_json():
    config = ModelConfig(num_classes=10, width_mult=0.5, activation="mish", attention="triplet",
                         attention_kernel=3, stem="cifar", cnsn="cnsn", cnsn_position="pre")
    assert ModelConfig.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["activation"] == "mish"
    assert build_model(config).config == config
    assert config.label == "mish+triplet+cnsn" and ModelConfig().label == "baseline"


@pytest.mark.parametrize("field,value", [
    ("arch", "resnet50"), ("activation", "swish"), ("attention", "cbam"), ("attention_position", "head"),
    ("width_mult", 0), ("width_mult", -1.0), ("num_classes", 0), ("attention_kernel", 4),
    ("attention_kernel", 0), ("stem", "tiny"), ("in_channels", 0), ("cnsn", "bn"),
])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"{field}: got {value!r}.*allowed"):
        build_model(**{field: value})


def test_unknown_config_field_and_v1_options():
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({"arch": "mobilenet_v2", "widht_mult": 1.0})
    with pytest.raises(ValueError, match="attention: got 'triplet'.*mobilenet_v1"):
        build_model(arch="mobilenet_v1", attention="triplet")


def test_bad_forward_input():
    model = build_model(num_classes=10)
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="input channels: got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="input channels: got 4"):
        build_model(arch="mobilenet_v1")(torch.randn(1, 4, 32, 32))


def test_summary_helper():
    stats = summary(build_model(num_classes=10, width_mult=0.5, stem="cifar"), (1, 3, 32, 32))
    assert stats.total_params == n_params(build_model(num_classes=10, width_mult=0.5, stem="cifar"))
    assert "InvertedResidual" in str(stats)


def test_block_is_injectable():
    calls = []

    class CountingBlock(InvertedResidual):
        def __init__(self, *args, **kwargs):
            calls.append(args[:3])
            super().__init__(*args, **kwargs)

    from mnv2lib.models import MobileNetV2

    MobileNetV2(num_classes=10, block=CountingBlock)
    assert len(calls) == 17


def test_each_family_defaults_to_its_papers_activation():
    from mnv2lib.models import ModelConfig

    assert ModelConfig().activation == "relu6"
    assert ModelConfig(arch="mobilenet_v4_conv_small").activation == "relu"
    assert ModelConfig(arch="mobilenet_v4_hybrid_large").activation == "gelu"
    assert ModelConfig(arch="mobilenet_v1").activation == "relu"
    assert ModelConfig(arch="mobilenet_v4_conv_small", activation="relu6").activation == "relu6"
    v4 = build_model(arch="mobilenet_v4_conv_small", num_classes=10)
    assert any(isinstance(m, torch.nn.ReLU) for m in v4.modules())
    assert not any(isinstance(m, torch.nn.ReLU6) for m in v4.modules())
    assert ModelConfig(arch="mobilenet_v4_conv_small").label == "mobilenet_v4_conv_small:baseline"
    # the default V2 config keeps its key (run records are found again)
    assert "activation" in ModelConfig().to_dict() and ModelConfig().to_dict()["activation"] == "relu6"


def test_config_and_factory_import_the_registry_not_each_other():
    import ast

    from mnv2lib.utils import paths

    for name, other in (("config", "factory"), ("factory", "config")):
        tree = ast.parse((paths.PROJECT_ROOT / "mnv2lib" / "models" / f"{name}.py").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "registry" in imported
        if name == "config":
            assert other not in imported
