import copy

import pytest
import torch
from torch import nn

from mnv2lib.layers import activations
from mnv2lib.layers.activations import Mish, ReLU6, create_activation, mish, mish_reference, set_mish_backend


@pytest.fixture(params=["compiled", "eager"])
def backend(request):
    set_mish_backend(request.param)
    yield request.param
    set_mish_backend("auto")


def test_mish_matches_torch_value_and_gradient(backend):
    x = torch.linspace(-30, 30, 20001).requires_grad_()
    y = mish(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = nn.functional.mish(x_ref)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    # the C kernel's backward is the analytic derivative; the PyTorch path (x * n / (n + 2) as standard
    # ops, for export) is differentiated by autograd, whose terms cancel to ~1e-5 near the guard at x = 20
    tol = 1e-6 if backend == "compiled" else 1e-5
    torch.testing.assert_close(gx, g_ref, atol=tol, rtol=tol)


def test_mish_gradcheck_float64(backend):
    x = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_()
    assert torch.autograd.gradcheck(mish, (x,), eps=1e-6, atol=1e-7)
    torch.testing.assert_close(mish(x), mish_reference(x), atol=1e-12, rtol=1e-12)


def test_mish_is_finite_for_huge_inputs_and_low_precision(backend):
    x = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4]).requires_grad_()
    y = mish(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(y).all() and torch.isfinite(g).all()
    assert y[-1].item() == pytest.approx(1e4) and g[-1].item() == pytest.approx(1.0)
    assert abs(y[0].item()) < 1e-6 and abs(g[0].item()) < 1e-6
    for dtype in (torch.float16, torch.bfloat16):
        xl = torch.tensor([-1e4, -5.0, -1.0, 0.5, 3.0, 1e4]).to(dtype).requires_grad_()
        yl = mish(xl)
        (gl,) = torch.autograd.grad(yl.sum(), xl)
        assert yl.dtype == dtype and gl.dtype == dtype
        assert torch.isfinite(yl).all() and torch.isfinite(gl).all()
        torch.testing.assert_close(yl.float(), nn.functional.mish(xl.detach().float()), atol=2e-2, rtol=1e-2)


def test_mish_handles_layouts(backend):
    x = torch.randn(2, 8, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    y = mish(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, nn.functional.mish(x.detach()))
    strided = torch.randn(6, 10)[:, ::2]  # not dense
    torch.testing.assert_close(mish(strided), nn.functional.mish(strided))
    grad_out = torch.randn(2, 8, 5, 5)  # gradient in another layout than the input
    (g,) = torch.autograd.grad(y, x, grad_out)
    ref = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(nn.functional.mish(ref), ref, grad_out)
    torch.testing.assert_close(g, g_ref)


def test_mish_saves_only_its_input():
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        Mish()(x)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nn.functional.mish(x * 1.0)
    assert len(saved) >= 1  # (PyTorch's own also keeps only its input: the point is ours is not worse)


def test_build_failure_falls_back_to_pytorch(monkeypatch):
    from mnv2lib.ops import build, kernels

    set_mish_backend("auto")

    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(build, "build", broken)
    monkeypatch.setattr(kernels, "_libraries", {})
    x = torch.randn(100)
    with pytest.warns(RuntimeWarning, match="PyTorch implementation"):
        y = mish(x)
    torch.testing.assert_close(y, nn.functional.mish(x))
    set_mish_backend("auto")


def test_unknown_activation_and_backend_names():
    with pytest.raises(ValueError, match=r"activation: got 'swish'.*allowed values"):
        create_activation("swish")
    with pytest.raises(ValueError, match="mish backend"):
        set_mish_backend("fast")


@pytest.mark.parametrize("name,cls", [("relu6", nn.ReLU6), ("relu", nn.ReLU), ("mish", Mish), ("silu", nn.SiLU),
                                      ("hardswish", nn.Hardswish), ("gelu", nn.GELU)])
def test_activation_registry(name, cls):
    assert isinstance(create_activation(name), cls)


def test_inplace_inference_mish():
    """Mish(inplace=True), as Conv2dNormActivation builds it, overwrites its input where no autograd
    graph is recorded (like torchvision's in-place ReLU6), and never where one is."""
    module = Mish(inplace=True)
    x = torch.cat([torch.linspace(-100, 100, 20001), torch.randn(64 * 96 * 8 * 8)])
    ref = nn.functional.mish(x)
    with torch.inference_mode():
        a = x.clone()
        assert module(a) is a
        torch.testing.assert_close(a, ref, atol=1e-6, rtol=1e-6)
    b = x.clone()
    version = b._version
    with torch.no_grad():
        assert module(b) is b
    assert b._version > version  # autograd sees the write
    torch.testing.assert_close(b, ref, atol=1e-6, rtol=1e-6)
    c = torch.randn(40, 30)[:, ::2]  # strided, not dense: a new tensor
    with torch.no_grad():
        torch.testing.assert_close(module(c), nn.functional.mish(c), atol=1e-6, rtol=1e-6)
    d = x.clone().requires_grad_()
    y = module(d)  # training: the input is what backward needs
    assert y is not d and torch.equal(d.detach(), x)
    (g,) = torch.autograd.grad(y.sum(), d)
    ref_d = x.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(nn.functional.mish(ref_d).sum(), ref_d)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)
    cl = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    expected = nn.functional.mish(cl)
    with torch.inference_mode():
        torch.testing.assert_close(module(cl), expected)
    for dtype in (torch.float64, torch.bfloat16):  # other dtypes: the compiled/eager kernels, in place
        e = torch.randn(100, dtype=dtype)
        expected = nn.functional.mish(e.float())
        with torch.no_grad():
            assert module(e) is e
        torch.testing.assert_close(e.float(), expected, atol=2e-2 if dtype == torch.bfloat16 else 1e-6, rtol=1e-2)


def test_relu6_trains_exactly_as_torch_relu6():
    """The in-place ReLU6 with its own autograd (no copy) gives torch's values and gradients bit for bit,
    the kinks at 0 and 6 included, and a few SGD steps of a MobileNetV2 land on the same weights."""
    from mnv2lib.models import ModelConfig, build_model

    x = torch.cat([torch.tensor([-1.0, 0.0, 3.0, 6.0, 7.0]), torch.randn(1000) * 5])
    grad = torch.randn_like(x)
    outputs, grads = [], []
    for module in (nn.ReLU6(inplace=True), ReLU6(inplace=True)):
        leaf = x.clone().requires_grad_()
        y = module(leaf * 1.0)  # (in place on a non-leaf, as after a BatchNorm)
        y.backward(grad)
        outputs.append(y.detach())
        grads.append(leaf.grad)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    assert grads[1][:5].tolist() == [0.0, 0.0, grad[2].item(), 0.0, 0.0]

    def train(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            torch.manual_seed(step)
            images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
        return model.state_dict()

    torch.manual_seed(0)
    fast = build_model(ModelConfig(num_classes=10, width_mult=0.25, stem="cifar_lite"))
    assert any(type(m) is ReLU6 for m in fast.modules())
    reference = copy.deepcopy(fast)
    for parent in reference.modules():
        for name, child in parent.named_children():
            if type(child) is ReLU6:
                setattr(parent, name, nn.ReLU6(inplace=True))
    assert not any(type(m) is ReLU6 for m in reference.modules())
    fast_state, reference_state = train(fast), train(reference)
    assert all(torch.equal(fast_state[k], reference_state[k]) for k in reference_state)


def test_relu6_takes_torchs_path_where_no_graph_or_a_leaf():
    with torch.no_grad():
        x = torch.tensor([-1.0, 7.0])
        assert ReLU6(inplace=True)(x) is x and x.tolist() == [0.0, 6.0]
    leaf = torch.tensor([-1.0, 7.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        ReLU6(inplace=True)(leaf)  # torch's own error, as nn.ReLU6(inplace=True) raises
    assert ReLU6()(leaf).tolist() == [0.0, 6.0]
