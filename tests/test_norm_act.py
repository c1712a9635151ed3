"""The fused training BatchNorm2d + ReLU6 or Mish (``mnv2::batch_norm_act``) against PyTorch's modules, and the
block that uses it (``mnv2lib.layers.norm_act.Conv2dNormActivation``)."""
import copy

import pytest
import torch
from torch import nn
from torchvision.ops import misc

from mnv2lib import build_model, ops
from mnv2lib.layers.activations import Mish, ReLU6, mish_reference
from mnv2lib.layers.norm_act import Conv2dNormActivation, fused_activation

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.fixture(autouse=True)
def _operators_defined():
    assert ops.available("batch_norm_act")  # (defines the operators, as a block's first call does)


def _bn(channels: int, seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 4.0)  # both kinks of ReLU6 are crossed
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _fused(x, bn, activation="relu6"):
    return torch.ops.mnv2.batch_norm_act(x, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                         bn.num_batches_tracked, bn.momentum, bn.eps, activation)[0]


REFERENCE = {"relu6": nn.functional.relu6, "mish": mish_reference}


@pytest.mark.parametrize("activation", ["relu6", "mish"])
@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("shape", [(8, 16, 9, 7), (3, 5, 1, 1), (1, 24, 4, 4), (2, 3, 1, 2)])
def test_operator_matches_batchnorm_then_activation_in_float64(shape, memory_format, activation):
    x = (torch.randn(*shape) * 2 + 0.5).contiguous(memory_format=memory_format)
    grad = torch.randn(*shape).contiguous(memory_format=memory_format)
    ref_bn, bn = _bn(shape[1]).double(), _bn(shape[1])
    xr, xf = x.double().requires_grad_(), x.clone().requires_grad_()
    yr = REFERENCE[activation](ref_bn(xr))
    yf = _fused(xf, bn, activation)
    yr.backward(grad.double())
    yf.backward(grad)
    assert yf.dtype == torch.float32 and yf.stride() == x.stride()
    torch.testing.assert_close(yf, yr.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad, xr.grad.float(), atol=1e-4, rtol=1e-4)
    for p, q in [(bn.weight.grad, ref_bn.weight.grad), (bn.bias.grad, ref_bn.bias.grad),
                 (bn.running_mean, ref_bn.running_mean), (bn.running_var, ref_bn.running_var)]:
        torch.testing.assert_close(p, q.float(), atol=1e-4, rtol=1e-5)
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1


def test_the_mask_is_relu6s_own_at_the_kinks():
    # values whose normalized form is exactly 0 and 6 (weight 1, bias 0 or 6 on a symmetric batch): ReLU6's
    # gradient there is 0, as hardtanh_backward's
    x = torch.tensor([-1.0, 0.0, 1.0, 0.0]).view(4, 1, 1, 1)
    for bias in (0.0, 6.0):
        ref_bn, bn = nn.BatchNorm2d(1), nn.BatchNorm2d(1)
        for m in (ref_bn, bn):
            nn.init.constant_(m.bias, bias)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        nn.functional.relu6(ref_bn(xr)).backward(torch.ones_like(x))
        _fused(xf, bn).backward(torch.ones_like(x))
        torch.testing.assert_close(xf.grad, xr.grad)
        torch.testing.assert_close(bn.bias.grad, ref_bn.bias.grad)


def test_bad_input_to_the_operator_raises_a_clear_error():
    bn = _bn(4)
    with pytest.raises(ValueError, match=r"weight must have shape \(5,\)"):
        _fused(torch.randn(2, 5, 3, 3), bn)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        _fused(torch.randn(1, 4, 1, 1), bn)
    with pytest.raises(ValueError, match="float32 CPU tensor; got torch.float64"):
        _fused(torch.randn(2, 4, 3, 3).double(), bn)
    with pytest.raises(ValueError, match=r"activation must be one of \('relu6', 'mish'\); got 'relu'"):
        _fused(torch.randn(2, 4, 3, 3), bn, "relu")
    counts = torch.zeros(())
    before = bn.running_mean.clone()
    with pytest.raises(ValueError, match="count must be an int64 CPU tensor"):
        torch.ops.mnv2.batch_norm_act(torch.randn(2, 4, 3, 3), bn.weight, bn.bias, bn.running_mean,
                                      bn.running_var, counts, 0.1, 1e-5, "relu6")
    assert torch.equal(bn.running_mean, before)


def _blocks(activation=ReLU6):
    torch.manual_seed(0)
    ours = Conv2dNormActivation(6, 12, kernel_size=3, norm_layer=nn.BatchNorm2d, activation_layer=activation)
    theirs = misc.Conv2dNormActivation(6, 12, kernel_size=3, norm_layer=nn.BatchNorm2d,
                                       activation_layer=nn.ReLU6 if activation is ReLU6 else activation)
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad():
        for m in (ours[1], theirs[1]):
            m.bias.fill_(1.0)
    return ours, theirs


@pytest.mark.parametrize("activation", [ReLU6, Mish])
@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_block_trains_as_torchvisions_and_uses_the_operator(memory_format, activation):
    ours, theirs = _blocks(activation)
    assert repr(ours) == repr(theirs) and isinstance(ours, misc.Conv2dNormActivation)
    x = torch.randn(4, 6, 8, 8).contiguous(memory_format=memory_format)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        y = ours(x)
        y.square().sum().backward()
    names = {e.key for e in profile.key_averages()}
    assert {"mnv2::batch_norm_act", "mnv2::batch_norm_act_backward"} <= names
    assert not {"aten::native_batch_norm", "aten::hardtanh_backward", "mnv2::mish_backward"} & names
    ops.set_kernel_backend("eager")  # torchvision's block with PyTorch's BatchNorm and activation
    try:
        y_theirs = theirs(x)
    finally:
        ops.set_kernel_backend("auto")
    y_theirs.square().sum().backward()
    torch.testing.assert_close(y, y_theirs, atol=1e-5, rtol=1e-5)
    assert y.stride() == y_theirs.stride()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-4, msg=name)
    for (name, b), c in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(b, c[1], atol=1e-5, rtol=1e-5, msg=name)


def test_block_outputs_equal_torchvisions_in_training_and_inference():
    ours, theirs = _blocks()
    x = torch.randn(4, 6, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    ours.eval(), theirs.eval()
    theirs.load_state_dict(ours.state_dict())  # (running statistics equal to float rounding above)
    assert torch.equal(ours(x), theirs(x))  # inference: torchvision's own path


def test_block_keeps_pytorchs_path_where_it_must():
    ours, _ = _blocks()
    x = torch.randn(4, 6, 8, 8)
    assert fused_activation(ours[1], ours[2], ours[0](x)) == "relu6"
    assert fused_activation(ours[1], Mish(), x) == "mish"
    seen = []
    handle = ours[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert fused_activation(ours[1], ours[2], x) is None  # a hook must see the activation: no fusion
    ours(x)
    handle.remove()
    assert seen == [torch.Size([4, 12, 8, 8])]
    with torch.no_grad():
        assert fused_activation(ours[1], ours[2], x) is None
    assert fused_activation(ours[1], ours[2], x.double()) is None
    assert fused_activation(ours[1], nn.ReLU(), x) is None
    assert fused_activation(ours[1], nn.Mish(), x) is None  # (torch's Mish computes another formula)
    assert fused_activation(nn.BatchNorm2d(6, momentum=None), ours[2], x) is None
    assert fused_activation(ours[1], ours[2], torch.randn(1, 6, 1, 1)) is None  # nn.BatchNorm2d's own error
    ops.set_kernel_backend("eager")
    try:
        assert fused_activation(ours[1], ours[2], x) is None
    finally:
        ops.set_kernel_backend("auto")


@pytest.mark.parametrize("activation", ["relu6", "mish"])
def test_mobilenet_v2_gradients_are_as_accurate_as_pytorchs(activation):
    # both float32 paths against the same network in float64 (the same dropout mask in each): the fused one
    # must be no less accurate than PyTorch's
    torch.manual_seed(0)
    fused = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", activation=activation)
    fused = fused.to(memory_format=torch.channels_last)
    plain, exact = copy.deepcopy(fused), copy.deepcopy(fused).double()
    x = torch.randn(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    for model, backend, dtype in ((fused, "auto", torch.float32), (plain, "eager", torch.float32),
                                  (exact, "eager", torch.float64)):
        ops.set_kernel_backend(backend)
        try:
            torch.manual_seed(1)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        finally:
            ops.set_kernel_backend("auto")
        used = "mnv2::batch_norm_act_backward" in {e.key for e in profile.key_averages()}
        assert used == (model is fused)

    def error(model):  # per layer type, relative to the largest gradient of its kind
        errors = []
        for kind in ("conv", "norm"):
            pairs = [(p.grad.double(), q.grad) for (name, p), q in zip(model.named_parameters(), exact.parameters())
                     if (p.dim() > 1) == (kind == "conv")]
            errors.append(max((a - b).abs().max().item() for a, b in pairs) / max(b.abs().max().item()
                                                                                  for _, b in pairs))
        return max(errors)

    assert error(fused) <= 2 * error(plain) + 1e-6, (error(fused), error(plain))
    for (name, a), b in zip(fused.named_buffers(), plain.buffers()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
