import pytest
import torch

from mnv2lib.layers.attention import TripletAttention, TripletAttentionReference, record_attention, zpool


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
def test_matches_reference_values_and_gradients(training, no_spatial, shape):
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
