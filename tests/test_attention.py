import copy
import warnings

import pytest
import torch

from mnv2lib.layers import attention as attention_module
from mnv2lib.layers.activations import set_kernel_backend
from mnv2lib.layers.attention import TripletAttention, TripletAttentionReference, record_attention, zpool

from kernel_checks import assert_same_training_step


@pytest.fixture(params=["auto", "eager"])
def backend(request):
    """"auto": the C kernels on float32 CPU tensors; "eager": the PyTorch formulation."""
    set_kernel_backend(request.param)
    yield request.param
    set_kernel_backend("auto")


def _pair(kernel_size=7, no_spatial=False):
    fast = TripletAttention(kernel_size, no_spatial)
    ref = TripletAttentionReference(kernel_size, no_spatial)
    with torch.no_grad():  # non-trivial BN affine parameters, so a mix-up of branches shows
        for p in fast.parameters():
            p.normal_()
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@pytest.mark.parametrize("kernel_size,params", [(7, 300), (3, 60)])
def test_parameter_count(kernel_size, params):
    assert sum(p.numel() for p in TripletAttention(kernel_size).parameters()) == params
    assert sum(p.numel() for p in TripletAttention(kernel_size, no_spatial=True).parameters()) == params // 3 * 2


def test_zpool_is_max_then_mean():
    x = torch.randn(2, 3, 4, 5)
    z = zpool(x, 1)
    assert z.shape == (2, 2, 4, 5)
    torch.testing.assert_close(z[:, 0], x.max(1).values)
    torch.testing.assert_close(z[:, 1], x.mean(1))


def _naive_triplet(module, x):
    """Loop-free but deliberately literal: each branch rotates, pools, convolves, gates, rotates back."""
    outs = []
    for gate, perm in ((module.channel_width, (0, 2, 1, 3)), (module.height_channel, (0, 3, 2, 1))):
        rotated = x.permute(*perm)
        pooled = torch.cat([rotated.max(1, keepdim=True).values, rotated.mean(1, keepdim=True)], 1)
        scale = torch.sigmoid(gate.bn(gate.conv(pooled)))
        outs.append((rotated * scale).permute(*perm))
    if module.spatial is not None:
        pooled = torch.cat([x.max(1, keepdim=True).values, x.mean(1, keepdim=True)], 1)
        outs.append(x * torch.sigmoid(module.spatial.bn(module.spatial.conv(pooled))))
    return sum(outs) / len(outs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 5, 7, 11)])
def test_matches_reference_values_and_gradients(training, no_spatial, shape, backend):
    fast, ref = _pair(7, no_spatial)
    fast.train(training)
    ref.train(training)
    x1 = torch.randn(*shape, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = fast(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p1), (_, p2) in zip(fast.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-4, rtol=1e-4, msg=name)
    ref.eval()
    torch.testing.assert_close(ref(x2), _naive_triplet(ref, x2.detach()), atol=1e-5, rtol=1e-5)


def test_record_keeps_sigmoid_maps_without_changing_output():
    fast, _ = _pair()
    fast.eval()
    x = torch.randn(2, 6, 9, 10)
    plain = fast(x)
    with record_attention(torch.nn.Sequential(fast)) as maps:
        recorded_out = fast(x)
    torch.testing.assert_close(plain, recorded_out)
    gates = maps["0"]
    assert gates["channel_width"].shape == (2, 6, 1, 10)
    assert gates["height_channel"].shape == (2, 6, 9, 1)
    assert gates["spatial"].shape == (2, 1, 9, 10)
    assert all(((g >= 0) & (g <= 1)).all() and g.std() > 0 for g in gates.values())
    torch.testing.assert_close(x * sum(gates.values()) / 3, plain)
    assert not fast.record and fast.recorded == {}


@pytest.mark.parametrize("k", [0, 2, 4, -3, 2.5])
def test_bad_kernel_size(k):
    with pytest.raises(ValueError, match="attention_kernel"):
        TripletAttention(k)


def test_bad_input_rank():
    with pytest.raises(ValueError, match="4-D"):
        TripletAttention()(torch.randn(2, 3, 4))


def test_native_kernels_available_on_cpu():
    """The C kernels build on this machine (they need a C compiler with OpenMP, like torch.compile)."""
    from mnv2lib import ops

    assert ops.available("triplet_attention")


@pytest.mark.parametrize("kernel_size", [3, 5, 7, 9])
@pytest.mark.parametrize("shape", [(2, 40, 3, 9), (5, 3, 12, 2), (2, 160, 4, 4), (3, 12, 32, 32), (1, 6, 5, 5),
                                   (4, 1, 1, 6)])
def test_kernels_match_reference_on_many_shapes(kernel_size, shape):
    # narrow and wide planes (stored transposed or not), one channel, batch of one, every kernel size
    fast, ref = _pair(kernel_size)
    for training in (True, False):
        fast.train(training)
        ref.train(training)
        assert_same_training_step(fast, ref, torch.randn(*shape))


@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("kernel_size", [3, 7])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 24, 7, 5), (2, 8, 12, 20), (2, 96, 4, 4)])
def test_channels_last_input_matches_reference(shape, kernel_size, no_spatial):
    # NHWC memory is read in place with the branches rotated (see _NHWC_LANES): values, gradients,
    # BN statistics, recorded gates and the inference kernel must be those of the NCHW formulation
    fast, ref = _pair(kernel_size, no_spatial)
    x = torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    fast.train()
    ref.train()
    assert_same_training_step(fast, ref, x)
    assert fast(x).is_contiguous(memory_format=torch.channels_last)
    ref(x)  # the same BN statistics update on both
    fast.eval()
    ref.eval()
    with torch.inference_mode():
        y = fast(x)
        torch.testing.assert_close(y, ref(x.contiguous()), atol=1e-5, rtol=1e-5)
        assert y.is_contiguous(memory_format=torch.channels_last)
    with record_attention(torch.nn.Sequential(fast)) as maps:
        fast(x)
    expected = {name: g for name, g in ref.gates(x.contiguous()).items()}
    assert list(maps["0"]) == list(expected)
    for name, gate in expected.items():
        torch.testing.assert_close(maps["0"][name], gate, atol=1e-6, rtol=1e-5, msg=name)


def test_a_channels_last_module_matches_reference():
    # model.to(memory_format=torch.channels_last) gives the branches' (1, 2, k, k) conv weights other strides,
    # which the operators read without a contiguous copy
    fast, ref = _pair(7)
    fast.to(memory_format=torch.channels_last)
    assert not fast.channel_width.conv.weight.is_contiguous()
    x = torch.randn(3, 16, 8, 12)
    for layout in (torch.contiguous_format, torch.channels_last):
        fast.train()
        ref.train()
        assert_same_training_step(fast, ref, x.contiguous(memory_format=layout))
        fast.eval()
        ref.eval()
        with torch.inference_mode():
            torch.testing.assert_close(fast(x.contiguous(memory_format=layout)), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("no_spatial", [False, True])
def test_tied_maxima_share_the_gradient_like_amax(no_spatial):
    # after ReLU6 (and rounding) many values of a row or column are equal: amax spreads the
    # gradient of a max evenly over them, and so must the kernels
    fast, ref = _pair(7, no_spatial)
    x = torch.nn.functional.relu6(3 * torch.randn(4, 24, 8, 8)).round()
    for training in (True, False):
        fast.train(training)
        ref.train(training)
        assert_same_training_step(fast, ref, x)


@pytest.mark.parametrize("no_spatial", [False, True])
def test_inference_kernel_follows_parameter_changes(no_spatial):
    fast, ref = _pair(7, no_spatial)
    fast.eval()
    ref.eval()
    x = torch.randn(3, 8, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # in place (same storage) and replaced (new tensors)
        fast.height_channel.bn.running_var.mul_(3.0)
        fast.channel_width.conv.weight.add_(0.5)
        fast.height_channel.bn.weight = torch.nn.Parameter(torch.full((1,), 2.0))
        fast.height_channel.bn.running_mean = torch.full((1,), 0.25)
    ref.load_state_dict(fast.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # storage swapped behind the module's back, eps changed, a round trip of dtypes
        fast.channel_width.bn.running_mean.data = torch.full((1,), -0.5)
        fast.height_channel.conv.weight.data = fast.height_channel.conv.weight.data * 2
    for gate in fast._branches():
        gate.bn.eps = 1e-3
    fast.double().float()
    ref.load_state_dict(fast.state_dict())
    for gate in ref._branches():
        gate.bn.eps = 1e-3
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    clone = copy.deepcopy(fast)  # modules stay copyable (no native handles on them)
    with torch.inference_mode():
        torch.testing.assert_close(clone(x), ref(x), atol=1e-5, rtol=1e-5)


def test_layouts_and_dtypes():
    fast, ref = _pair()
    x = torch.randn(2, 8, 6, 10)
    cl = x.contiguous(memory_format=torch.channels_last)
    y = fast(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast(x[:, :, :, ::2]), ref(x[:, :, :, ::2]), atol=1e-5, rtol=1e-5)  # strided
    fast64, ref64 = fast.double(), ref.double()
    x64 = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast64(x64), ref64(x64))
    fast64.eval()
    assert torch.autograd.gradcheck(fast64, (x64,))


def test_unavailable_compiler_falls_back_to_pytorch(monkeypatch):
    from mnv2lib.ops import build, kernels

    def broken(*args):
        raise RuntimeError("no C compiler")

    monkeypatch.setattr(build, "build", broken)
    monkeypatch.setattr(kernels, "_libraries", {})
    monkeypatch.setattr(kernels, "_failed", set())
    fast, ref = _pair()
    x = torch.randn(2, 4, 6, 6)
    with pytest.warns(RuntimeWarning, match="PyTorch implementation"):
        torch.testing.assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-5)
    assert kernels.get("triplet_attention") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once
        assert_same_training_step(fast, ref, torch.randn(2, 4, 6, 6))


def test_squeeze_excitation_is_mobilenetv3s():
    from torchvision.models._utils import _make_divisible
    from torchvision.ops import SqueezeExcitation as TorchvisionSE

    from mnv2lib.layers.attention import create_attention

    for channels in (16, 40, 96):
        ours = create_attention("se", channels, kernel_size=7)  # kernel_size: Triplet Attention's, ignored
        squeeze = _make_divisible(channels // 4, 8)  # as torchvision's MobileNetV3 sizes it
        reference = TorchvisionSE(channels, squeeze, scale_activation=torch.nn.Hardsigmoid)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
        reference.load_state_dict(ours.state_dict())
        x = torch.randn(2, channels, 5, 5)
        torch.testing.assert_close(ours(x), reference(x))
    with pytest.raises(ValueError, match="attention channels: got 0"):
        create_attention("se", 0)


def test_attention_factories_receive_the_channel_count():
    from mnv2lib import build_model
    from mnv2lib.layers.attention import SqueezeExcitation

    model = build_model(num_classes=10, width_mult=0.25, stem="cifar", attention="se")
    for block in model.blocks:
        assert isinstance(block.attention, SqueezeExcitation)
        assert block.attention.fc1.in_channels == block.out_channels
    depthwise = build_model(num_classes=10, width_mult=0.25, stem="cifar", attention="se",
                            attention_position="after_depthwise")
    assert all(b.attention.fc1.in_channels == b.hidden_dim for b in depthwise.blocks)
    depthwise.train()
    depthwise(torch.randn(2, 3, 16, 16)).sum().backward()
