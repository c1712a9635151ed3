"""The fast Mish, Triplet Attention and CNSN on CUDA: the same results as the straightforward
references, and as the CPU (where the C kernels run). Skipped without a GPU."""
import copy

import pytest
import torch
from torch import nn

from mnv2lib import build_model
from mnv2lib.layers.activations import Mish, mish
from mnv2lib.layers.attention import TripletAttention, TripletAttentionReference
from mnv2lib.layers.cnsn import CrossNorm, SelfNorm, channel_stats

from kernel_checks import assert_same_training_step
from conftest import randomized

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_mish_on_cuda():
    x = torch.linspace(-30, 30, 100001, device=CUDA, requires_grad=True)
    y = mish(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    ref = x.detach().clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(nn.functional.mish(ref).sum(), ref)
    torch.testing.assert_close(y, nn.functional.mish(ref.detach()), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-6)
    z = torch.randn(8, 16, 5, 5, device=CUDA)
    expected = nn.functional.mish(z)
    with torch.inference_mode():
        assert Mish(inplace=True)(z) is z
    torch.testing.assert_close(z, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("no_spatial", [False, True])
@pytest.mark.parametrize("shape", [(4, 16, 8, 8), (3, 5, 7, 11), (2, 160, 4, 4)])
def test_triplet_attention_on_cuda(no_spatial, shape):
    fast = randomized(TripletAttention(7, no_spatial)).to(CUDA)
    ref = TripletAttentionReference(7, no_spatial).to(CUDA)
    ref.load_state_dict(fast.state_dict())
    cpu = copy.deepcopy(fast).cpu()
    x = torch.randn(*shape, device=CUDA)
    for training in (True, False):
        for m in (fast, ref, cpu):
            m.train(training)
        assert_same_training_step(fast, ref, x, atol=1e-4, rtol=1e-4, param_tol=1e-3, buffer_tol=1e-4)
    cpu.load_state_dict(fast.state_dict())  # the running statistics moved in training
    with torch.inference_mode():  # and the CPU C kernels give the same
        torch.testing.assert_close(fast(x).cpu(), cpu(x.cpu()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("two_gates", [False, True])
def test_selfnorm_and_crossnorm_on_cuda(two_gates):
    sn = randomized(SelfNorm(12, two_gates=two_gates))
    cpu = copy.deepcopy(sn)
    sn = sn.to(CUDA)
    x = torch.randn(4, 12, 9, 9) * 2 + 1
    for training in (True, False):
        sn.train(training)
        cpu.train(training)
        x1 = x.to(CUDA).requires_grad_()
        x2 = x.clone().requires_grad_()
        y1, y2 = sn(x1), cpu(x2)
        torch.testing.assert_close(y1.cpu(), y2, atol=1e-4, rtol=1e-4)
        grad = torch.randn_like(y2)
        y1.backward(grad.to(CUDA))
        y2.backward(grad)
        torch.testing.assert_close(x1.grad.cpu(), x2.grad, atol=1e-4, rtol=1e-4)
    mean, std = channel_stats(x.to(CUDA), 1e-5)
    ref_mean, ref_std = channel_stats(x, 1e-5)
    torch.testing.assert_close(mean.cpu(), ref_mean)
    torch.testing.assert_close(std.cpu(), ref_std)
    cn_gpu = CrossNorm("2-instance", generator=torch.Generator().manual_seed(1)).train()
    cn_cpu = CrossNorm("2-instance", generator=torch.Generator().manual_seed(1)).train()
    cn_gpu.active = cn_cpu.active = True
    torch.testing.assert_close(cn_gpu(x.to(CUDA)).cpu(), cn_cpu(x), atol=1e-4, rtol=1e-4)


def test_improved_model_trains_the_same_on_cuda_and_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full float32 convolutions
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar", activation="mish", attention="triplet",
                        cnsn="sn", dropout=0.0)
    gpu = copy.deepcopy(model).to(CUDA)
    x = torch.randn(8, 3, 32, 32)
    for m in (model, gpu):
        m.train()
    loss_cpu = model(x).square().mean()
    loss_gpu = gpu(x.to(CUDA)).square().mean()
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, atol=1e-4, rtol=1e-3)
    loss_cpu.backward()
    loss_gpu.backward()
    # As one vector: where two values of a pooled row are within rounding of each other, float32
    # rounding on either device decides which one the max (and its gradient) picks.
    g_cpu = torch.cat([p.grad.flatten() for p in model.parameters()])
    g_gpu = torch.cat([p.grad.flatten() for p in gpu.parameters()]).cpu()
    assert (g_gpu - g_cpu).norm() <= 1e-2 * g_cpu.norm()
    model.eval()
    gpu.eval()
    with torch.inference_mode():
        torch.testing.assert_close(gpu(x.to(CUDA)).cpu(), model(x), atol=1e-4, rtol=1e-3)
