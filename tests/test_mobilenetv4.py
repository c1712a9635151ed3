import json

import pytest
import timm
import torch
from torch import nn
from torchvision.ops.misc import SqueezeExcitation

from mnv2lib import ModelConfig, build_model
from mnv2lib import summary
from mnv2lib.models import arch_names, convert_timm_state_dict
from mnv2lib.models import mobilenetv4 as V4
from conftest import n_params

# ours, timm's name, timm 1.0.31's parameter count for 1000 classes
PAPER_VARIANTS = [
    (V4.mobilenet_v4_small, "mobilenetv4_conv_small", 3_774_024),
    (V4.mobilenet_v4_medium, "mobilenetv4_conv_medium", 9_715_512),
    (V4.mobilenet_v4_large, "mobilenetv4_conv_large", 32_590_864),
    (V4.mobilenet_v4_hybrid_medium, "mobilenetv4_hybrid_medium", 11_074_648),
    (V4.mobilenet_v4_hybrid_large, "mobilenetv4_hybrid_large", 37_764_624),
]
ARCHS = ["mobilenet_v4_conv_small", "mobilenet_v4_conv_medium", "mobilenet_v4_conv_large",
         "mobilenet_v4_hybrid_medium", "mobilenet_v4_hybrid_large", "mobilenet_v4_nano"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Small inputs: intra-op threads gain nothing here and spin badly on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def timm_model(name):
    return timm.create_model(name, pretrained=False)


def randomize_and_calibrate(model, size=64):
    """Random BN affines and layer scales of order 1 (timm's 1e-5 layer scales would hide a wrong
    mapping of the hybrids' blocks), then BN statistics from one batch, so that the eval-mode output
    depends on the input and on every block."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (name.endswith("weight") and p.dim() == 1):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative: the statistics of the one batch
        model.train()(torch.randn(4, 3, size, size, generator=g))
    return model.eval()


@pytest.mark.parametrize("ours,timm_name,params", PAPER_VARIANTS, ids=[v[1] for v in PAPER_VARIANTS])
def test_parameter_counts_and_timm_weights_give_the_same_outputs(ours, timm_name, params):
    reference = timm_model(timm_name)
    model = ours()
    assert n_params(reference) == params
    assert n_params(model) == params
    randomize_and_calibrate(reference)
    state = convert_timm_state_dict(reference.state_dict())
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():  # 32x32: the smallest input, a 1x1 map (and 1x1 keys) at the end
        small = torch.randn(2, 3, 32, 32)
        expected_small, got_small = reference(small), model(small)
        assert got_small.shape == (2, 1000)
        torch.testing.assert_close(got_small, expected_small, rtol=0, atol=1e-4 * expected_small.abs().max().item())
        x = torch.randn(2, 3, 64, 64)
        expected = reference(x)
        got = model(x)
    tolerance = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=tolerance)
    # the comparison is sensitive: the two images differ, and so does a wrongly mapped tensor
    assert (expected[0] - expected[1]).abs().max() > 100 * tolerance
    wrong = dict(state)
    mqa = [k[:-len("attn.key.weight")] for k in state if k.endswith("attn.key.weight")]
    if mqa:  # keys and values swapped in the first Mobile MQA
        wrong[mqa[0] + "attn.key.weight"] = state[mqa[0] + "attn.value.weight"]
        wrong[mqa[0] + "attn.value.weight"] = state[mqa[0] + "attn.key.weight"]
    else:    # the stem's BN scale halved
        wrong["features.0.1.weight"] = state["features.0.1.weight"] / 2
    model.load_state_dict(wrong, strict=True)
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 100 * tolerance


@pytest.mark.parametrize("ours,timm_name,width", [
    (V4.mobilenet_v4_small, "mobilenetv4_conv_small_050", 0.5),
    (V4.mobilenet_v4_hybrid_medium, "mobilenetv4_hybrid_medium_075", 0.75)])
def test_width_mult_is_timms_channel_multiplier(ours, timm_name, width):
    reference = timm_model(timm_name)
    model = ours(width_mult=width)
    assert n_params(model) == n_params(reference) < n_params(ours())
    model.load_state_dict(convert_timm_state_dict(reference.state_dict()), strict=True)
    assert model.features[0][0].out_channels == 32  # the stem is kept below width 1, as timm does


@pytest.mark.parametrize("ours,timm_name", [(V4.mobilenet_v4_small, "mobilenetv4_conv_small"),
                                            (V4.mobilenet_v4_hybrid_medium, "mobilenetv4_hybrid_medium")])
def test_multiply_adds_equal_timms(ours, timm_name):
    # strides, kernels and the key/value downsampling in the right places. torchinfo counts convs,
    # linears and (some) plain BatchNorm2d layers; timm's fused BN + activation layers it leaves out.
    def conv_and_linear_mult_adds(model):
        info = summary(model, (1, 3, 160, 160), depth=10)
        return sum(layer.macs for layer in info.summary_list if layer.class_name in ("Conv2d", "Linear")), info

    got, info = conv_and_linear_mult_adds(ours())
    assert got == conv_and_linear_mult_adds(timm_model(timm_name))[0]
    assert got > 0.99 * info.total_mult_adds


def test_convert_rejects_keys_it_does_not_know():
    with pytest.raises(ValueError, match="state_dict: got key 'fc.weight'"):
        convert_timm_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="in a uib block"):
        convert_timm_state_dict({"blocks.1.0.pw_exp.conv.weight": torch.zeros(1),
                                 "blocks.1.0.dw_end.conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not a timm MobileNetV4 block"):
        convert_timm_state_dict({"blocks.1.0.mystery.weight": torch.zeros(1)})


def test_mobile_mqa_matches_per_head_attention_with_shared_keys_and_values():
    torch.manual_seed(0)
    attn = V4.MobileMQA(16, num_heads=3, key_dim=8, kv_stride=2).eval()
    with torch.no_grad():
        for m in attn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 2)
        x = torch.randn(2, 16, 5, 7)
        got = attn(x)
        k = attn.key(attn.key_down(x)).flatten(2)      # (B, d, P): one key head for all query heads
        v = attn.value(attn.value_down(x)).flatten(2)
        q = attn.query(x).flatten(2)                    # (B, heads * d, HW)
        heads = []
        for h in range(3):
            qh = q[:, 8 * h:8 * (h + 1)]
            weights = torch.softmax(qh.transpose(1, 2) @ k / 8 ** 0.5, dim=-1)  # (B, HW, P)
            heads.append((weights @ v.transpose(1, 2)).transpose(1, 2))          # (B, d, HW)
        expected = attn.out(torch.cat(heads, 1).reshape(2, 24, 5, 7))
    assert k.shape[-1] == 3 * 4  # 5x7 keys downsampled to 3x4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_blocks_follow_the_paper():
    model = V4.mobilenet_v4_medium()
    blocks = {type(b).__name__ for stage in model.features[1:] for b in stage}
    assert blocks == {"FusedIB", "UniversalInvertedBottleneck", "Conv2dNormActivation"}
    uibs = [b for b in model.modules() if isinstance(b, V4.UniversalInvertedBottleneck)]
    shapes = {(b.start_dw is not None, b.middle_dw is not None) for b in uibs}
    assert shapes == {(True, True), (True, False), (False, False)}  # ExtraDW, ConvNext, FFN (no IB in conv-M)
    for block in uibs + [model.features[1][0]]:
        assert len(block.project) == 2  # conv + BN: linear bottleneck (no activation)
        first = block.start_dw if getattr(block, "start_dw", None) is not None else block.expand
        strided = any(m.stride != (1, 1) for m in block.modules() if isinstance(m, nn.Conv2d))
        assert block.use_res_connect == (not strided and first[0].in_channels == block.project[0].out_channels)
    assert sum(b.use_res_connect for b in uibs) == len(uibs) - 3  # all but the first UIB of stages 2-4
    block = uibs[1].eval()  # a residual block adds its input: with a zeroed projection BN it is the identity
    with torch.no_grad():
        nn.init.zeros_(block.project[1].weight)
        x = torch.randn(1, block.expand[0].in_channels, 8, 8)
        torch.testing.assert_close(block(x), x)
    extra_dw = model.features[2][0]
    assert len(extra_dw.start_dw) == 2 and extra_dw.middle_dw[0].stride == (2, 2)  # linear start dw, strided middle
    assert not any(isinstance(m, V4.LayerScale2d) for m in model.modules())
    # IB: only the middle dw conv (conv-S)
    assert any(b.start_dw is None and b.middle_dw is not None
               for b in V4.mobilenet_v4_small().modules() if isinstance(b, V4.UniversalInvertedBottleneck))


def test_hybrid_blocks_have_layer_scale_and_shared_key_value_projections():
    model = V4.mobilenet_v4_hybrid_medium()
    mqa = [m for m in model.modules() if isinstance(m, V4.MobileMQABlock)]
    uibs = [m for m in model.modules() if isinstance(m, V4.UniversalInvertedBottleneck)]
    assert len(mqa) == 8
    assert [m.attn.kv_stride for m in mqa] == [2] * 4 + [1] * 4
    for block in mqa:
        assert block.attn.query.out_channels == 4 * 64 and block.attn.key.out_channels == 64
        assert block.attn.value.out_channels == 64
    for block in mqa + uibs:
        assert torch.all(block.layer_scale.gamma == 1e-5)
    assert not any(isinstance(m, nn.GELU) for m in model.modules())
    assert any(isinstance(m, nn.GELU) for m in V4.mobilenet_v4_hybrid_large().modules())


@pytest.mark.parametrize("build", [V4.mobilenet_v4_small, V4.mobilenet_v4_hybrid_medium, V4.mobilenet_v4_nano])
def test_grayscale_32x32_inputs(build):  # (every paper variant sees 32x32 RGB in the timm comparison)
    model = build(in_channels=1, num_classes=7).eval()
    assert model.features[0][0].in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_512x512_input_through_downsampled_mqa():
    model = V4.mobilenet_v4_hybrid_medium(num_classes=5).eval()
    first = next(m for m in model.modules() if isinstance(m, V4.MobileMQA))
    seen = []
    first.key_down.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[-2:], o.shape[-2:])))
    model.features.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        assert model(torch.randn(1, 3, 512, 512)).shape == (1, 5)
    assert seen == [((32, 32), (16, 16)), (1, 960, 16, 16)]  # 1024 queries attend to 256 keys


@pytest.mark.parametrize("stem,side", [("imagenet", 1), ("cifar_lite", 2), ("cifar", 4)])
def test_nano_stems_for_32x32(stem, side):
    model = V4.mobilenet_v4_nano(num_classes=10, stem=stem).eval()
    assert model.features[0][0].stride == ((2, 2) if stem == "imagenet" else (1, 1))
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 384, side, side)
    if stem == "cifar":
        assert n_params(model) == 544_794


def test_nano_trains():
    model = V4.mobilenet_v4_nano(num_classes=10).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.features[1][0].expand[0].weight.grad.abs().sum() > 0


def test_custom_knobs():
    base = V4.mobilenet_v4_custom(num_classes=10, base_channels=16, block_counts=(1, 1, 2, 3), head_hidden=256)
    assert [len(stage) for stage in base.features[1:]] == [1, 1, 2, 3, 1]
    assert base.last_channel == 256 and base.classifier[1].in_features == 256
    assert not any(isinstance(m, (V4.MobileMQABlock, V4.LayerScale2d)) for m in base.modules())
    hybrid = V4.mobilenet_v4_custom(num_classes=10, base_channels=16, block_counts=(1, 1, 2, 3), head_hidden=256,
                                    num_heads=2, key_dim=16, se_ratio=0.25, expansion=3, dropout=0.3)
    kinds = [[type(b).__name__[0] for b in stage] for stage in hybrid.features[3:5]]
    assert kinds == [["U", "M", "U"], ["U", "U", "M", "U"]]  # MQA before every second UIB from the end
    assert sum(isinstance(m, SqueezeExcitation) for m in hybrid.modules()) == 1 + 1 + 2 + 3
    assert hybrid.features[2][0].expand[0].out_channels == 3 * 24  # 1.5 * 16 input channels, expansion 3
    assert hybrid.classifier[0].p == 0.3
    with torch.no_grad():
        assert hybrid.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    assert n_params(V4.mobilenet_v4_custom(block_counts=(1, 2, 8, 10))) > n_params(V4.mobilenet_v4_custom())


def test_bad_inputs_raise_value_errors_naming_the_field():
    model = V4.mobilenet_v4_nano(in_channels=1, num_classes=10).eval()
    with pytest.raises(ValueError, match="MobileNetV4 input: got a 3-D tensor"):
        model(torch.randn(1, 32, 32))
    with pytest.raises(ValueError, match="in_channels"):
        model(torch.randn(1, 3, 32, 32))
    for kwargs, field in [(dict(stem="tiny"), "stem"), (dict(width_mult=0), "width_mult"),
                          (dict(in_channels=0), "in_channels"), (dict(num_classes=1.5), "num_classes"),
                          (dict(dropout=1.0), "dropout"), (dict(se_ratio=-0.1), "se_ratio"),
                          (dict(expand_ratio=0), "expand_ratio"), (dict(activation="swish2"), "activation")]:
        with pytest.raises(ValueError, match=f"^{field}: got"):
            V4.mobilenet_v4_small(**kwargs)
    for kwargs, field in [(dict(block_counts=(1, 2, 3)), "block_counts"),
                          (dict(block_counts=(1, 0, 1, 1)), "block_counts"), (dict(num_heads=-1), "num_heads"),
                          (dict(base_channels=0), "base_channels"),
                          (dict(head_hidden=0), "head_hidden"), (dict(expansion=0), "expansion")]:
        with pytest.raises(ValueError, match=f"^{field}: got"):
            V4.mobilenet_v4_custom(**kwargs)
    with pytest.raises(ValueError, match="^stride: got 2 for a UIB without depthwise convs"):
        V4.UniversalInvertedBottleneck(8, 8, 2, 2.0, start_dw=0, middle_dw=0)


def test_build_model_integration():
    assert set(ARCHS) | {"mobilenet_v4_custom"} <= set(arch_names())
    model = build_model(arch="mobilenet_v4_conv_small", num_classes=10, in_channels=1, width_mult=0.5,
                        dropout=0.1, activation="hardswish", stem="cifar")
    assert isinstance(model, V4.MobileNetV4) and model.config.arch == "mobilenet_v4_conv_small"
    assert n_params(model) == n_params(V4.mobilenet_v4_small(in_channels=1, num_classes=10, width_mult=0.5))
    assert model.classifier[0].p == 0.1 and model.features[0][0].stride == (1, 1)
    assert model.features[1][0][0].stride == (1, 1)  # the first stride-2 block too ("cifar")
    assert any(isinstance(m, nn.Hardswish) for m in model.modules())
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    t3 = build_model(arch="mobilenet_v4_conv_medium", expand_ratio=3)
    assert t3.features[2][1].expand[0].out_channels == 3 * 80


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("option,value", [("attention", "triplet"), ("cnsn", "cnsn"), ("shortcut", "none"),
                                          ("pretrained", "imagenet"), ("bottleneck_activation", "relu")])
def test_build_model_rejects_options_that_do_not_apply(arch, option, value):
    with pytest.raises(ValueError, match=f"^{option}: got .*{arch} does not support"):
        build_model(arch=arch, **{option: value})


def test_extra_options():
    with pytest.raises(ValueError, match="^extra: got .*takes no extra options"):
        build_model(arch="mobilenet_v4_nano", extra={"num_heads": 2})
    with pytest.raises(ValueError, match=r"^extra: got unknown option\(s\) \['heads'\]"):
        build_model(arch="mobilenet_v4_custom", extra={"heads": 2})
    config = ModelConfig(arch="mobilenet_v4_custom", num_classes=10, stem="cifar",
                         extra={"base_channels": 16, "num_heads": 2, "block_counts": [1, 1, 2, 2], "se_ratio": 0.25})
    config = ModelConfig.from_json(config.to_json())  # block_counts as a JSON list
    model = build_model(config)
    assert sum(isinstance(m, V4.MobileMQABlock) for m in model.modules()) == 2
    assert n_params(model) == n_params(V4.mobilenet_v4_custom(num_classes=10, base_channels=16, num_heads=2,
                                                              block_counts=(1, 1, 2, 2), se_ratio=0.25))
    assert json.loads(config.to_json())["extra"]["num_heads"] == 2
