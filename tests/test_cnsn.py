import pytest
import torch
import torchvision

from mnv2lib import build_model
from mnv2lib.layers.cnsn import CNSN, CrossNorm, CrossNormSchedule, SelfNorm, channel_stats, random_box, record_cnsn
from conftest import randomized


def stats(x):
    n = x.shape[2] * x.shape[3]
    return x.mean((2, 3)), (x.var((2, 3), unbiased=n > 1) + 1e-5).sqrt()


def active(module):
    module.train()
    module.active = True
    return module


def test_channel_stats_match_the_definition():
    x = torch.randn(3, 4, 5, 6) * 3 + 1
    mean, std = channel_stats(x, 1e-5)
    ref_mean, ref_std = stats(x)
    torch.testing.assert_close(mean.flatten(2).squeeze(-1), ref_mean)
    torch.testing.assert_close(std.flatten(2).squeeze(-1), ref_std)


def test_two_instance_takes_the_partners_statistics():
    x = torch.randn(8, 5, 7, 7) * torch.rand(8, 5, 1, 1) * 4 + torch.randn(8, 5, 1, 1) * 3
    cn = active(CrossNorm("2-instance", "neither", generator=torch.Generator().manual_seed(1)))
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    y = cn(x)
    mean_x, std_x = stats(x)
    mean_y, std_y = stats(y)
    torch.testing.assert_close(mean_y, mean_x[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std_y, std_x[perm], atol=1e-4, rtol=1e-4)
    # and the normalized content is the sample's own
    torch.testing.assert_close((y - mean_y[..., None, None]) / std_y[..., None, None],
                               (x - mean_x[..., None, None]) / std_x[..., None, None], atol=1e-4, rtol=1e-4)


def test_one_instance_permutes_a_samples_own_statistics():
    x = torch.randn(4, 6, 8, 8) * torch.arange(1, 7).view(1, 6, 1, 1) + torch.arange(6).view(1, 6, 1, 1)
    y = active(CrossNorm("1-instance", "neither"))(x)
    mean_x, std_x = stats(x)
    mean_y, std_y = stats(y)
    for b in range(4):
        torch.testing.assert_close(mean_y[b].sort().values, mean_x[b].sort().values, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(std_y[b].sort().values, std_x[b].sort().values, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mean_y, mean_x, atol=1e-3)  # something moved


def test_content_crop_leaves_pixels_outside_the_box_unchanged():
    x = torch.randn(4, 3, 16, 16)
    cn = active(CrossNorm("2-instance", "content", generator=torch.Generator().manual_seed(3)))
    y = cn(x)
    changed = (y - x).abs().amax((0, 1)) > 1e-6
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    assert changed.any() and not changed.all()
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    box = torch.zeros_like(changed)
    box[top:bottom, left:right] = True
    assert not (changed & ~box).any()
    assert (bottom - top) * (right - left) / 256 > 0.1


def test_style_crop_takes_statistics_from_a_box_of_the_partner():
    x = torch.randn(6, 4, 12, 12) + torch.linspace(-3, 3, 12).view(1, 1, 1, 12)
    g = torch.Generator().manual_seed(5)
    y = active(CrossNorm("2-instance", "style", generator=g))(x)
    replay = torch.Generator().manual_seed(5)
    top, left, bottom, right = random_box(12, 12, replay)
    perm = torch.randperm(6, generator=replay)
    mean_box, std_box = stats(x[:, :, top:bottom, left:right])
    mean_y, std_y = stats(y)
    torch.testing.assert_close(mean_y, mean_box[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(std_y, std_box[perm], atol=1e-4, rtol=1e-4)


def test_random_box_area_and_tiny_maps():
    g = torch.Generator().manual_seed(0)
    for h, w in [(32, 32), (4, 4), (2, 2), (1, 1), (1, 7)]:
        for _ in range(50):
            top, left, bottom, right = random_box(h, w, g)
            assert 0 <= top < bottom <= h and 0 <= left < right <= w
            assert (bottom - top) * (right - left) / (h * w) > 0.1


@pytest.mark.parametrize("crop", ["neither", "style", "content", "both"])
@pytest.mark.parametrize("mode", ["2-instance", "1-instance"])
def test_identity_unless_training_and_active(mode, crop):
    x = torch.randn(4, 3, 8, 8)
    cn = CrossNorm(mode, crop)
    cn.train()
    assert cn(x) is x  # not switched on
    cn.eval()
    cn.active = True
    assert cn(x) is x and not cn.active  # eval: identity, and the switch resets
    y = active(cn)(x)
    assert y.shape == x.shape and not torch.equal(y, x) and not cn.active


def test_edge_cases_never_nan():
    for shape in [(1, 4, 6, 6), (4, 4, 1, 1), (3, 2, 1, 5)]:
        x = torch.randn(*shape)
        for mode in ("2-instance", "1-instance"):
            for crop in ("neither", "both"):
                assert torch.isfinite(active(CrossNorm(mode, crop))(x)).all(), (shape, mode, crop)
        sn = SelfNorm(shape[1], two_gates=True).train()
        assert torch.isfinite(sn(x)).all()
    x1 = torch.randn(1, 4, 6, 6)
    assert torch.equal(active(CrossNorm("2-instance"))(x1), x1)  # batch of one: no partner, identity
    for dtype in (torch.float16, torch.bfloat16):
        x = (torch.randn(4, 8, 6, 6) * 3).to(dtype)
        y = active(CrossNorm("2-instance", "both"))(x)
        z = CNSN(None, SelfNorm(8, two_gates=True).to(dtype)).train()(x)
        assert y.dtype == dtype and z.dtype == dtype
        assert torch.isfinite(y).all() and torch.isfinite(z).all()


def test_selfnorm_parameters_gradients_and_semantics():
    sn1, sn2 = SelfNorm(16), SelfNorm(16, two_gates=True)
    assert sum(p.numel() for p in sn1.parameters()) == 4 * 16
    assert sum(p.numel() for p in sn2.parameters()) == 8 * 16
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    (sn1(x).sum() + sn2(x).square().sum()).backward()
    for p in list(sn1.parameters()) + list(sn2.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0
    sn2.eval()
    with torch.no_grad():  # straightforward reference of the two-gate form
        xd = x.detach()
        mean = xd.mean((2, 3))
        std = (xd.var((2, 3)) + 1e-12).sqrt()
        s = torch.stack([mean, std], -1)
        g = torch.sigmoid(sn2.g_bn(sn2.g_fc(s))).squeeze(-1)[..., None, None]
        f = torch.sigmoid(sn2.f_bn(sn2.f_fc(s))).squeeze(-1)[..., None, None]
        ref = g * (xd - mean[..., None, None]) + f * mean[..., None, None]
        torch.testing.assert_close(sn2(xd), ref, atol=1e-5, rtol=1e-5)
        sn1.eval()
        g1 = torch.sigmoid(sn1.g_bn(sn1.g_fc(s))).squeeze(-1)[..., None, None]
        torch.testing.assert_close(sn1(xd), xd * g1, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="SelfNorm input channels"):
        sn1(torch.randn(2, 3, 4, 4))


def test_eval_output_independent_of_batch_and_seed():
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar", cnsn="cnsn").eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        full = model(x)
        torch.manual_seed(123)
        model.crossnorm_schedule.seed(99)
        parts = torch.cat([model(x[:2]), model(x[2:3]), model(x[3:])])
    torch.testing.assert_close(full, parts, atol=1e-5, rtol=1e-5)


def test_schedule_fraction_and_active_count():
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar", cnsn="cn", cn_prob=0.3, active_num=3)
    schedule = model.crossnorm_schedule
    assert len(schedule.modules) == 17
    schedule.seed(0)
    draws = [schedule.step() for _ in range(4000)]
    fired = [d for d in draws if d]
    assert abs(len(fired) / len(draws) - 0.3) < 0.03
    assert all(len(d) == 3 and len(set(d)) == 3 for d in fired)
    schedule.seed(0)
    assert [schedule.step() for _ in range(50)] == draws[:50]  # seeded: reproducible


def test_schedule_runs_once_per_training_forward_and_modules_fire():
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar", cnsn="cn", cn_prob=1.0, active_num=2)
    schedule = model.crossnorm_schedule
    schedule.keep_history = True
    calls = []
    for m in schedule.modules:
        m.register_forward_hook(lambda mod, i, o: calls.append(not torch.equal(i[0], o)))
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert len(schedule.history) == 1 and len(schedule.history[0]) == 2
    assert sum(calls) == 2
    model.eval()
    model(torch.randn(4, 3, 32, 32))
    assert len(schedule.history) == 1


@pytest.mark.parametrize("position", ["post", "pre", "residual", "identity"])
@pytest.mark.parametrize("kind", ["cn", "sn", "cnsn"])
def test_positions_kinds_and_torchvision_names(position, kind):
    model = build_model(cnsn=kind, cnsn_position=position)
    cnsn_modules = [m for m in model.modules() if isinstance(m, CNSN)]
    assert len(cnsn_modules) == (10 if position == "identity" else 17)
    assert all((m.crossnorm is not None) == (kind != "sn") and (m.selfnorm is not None) == (kind != "cn")
               for m in cnsn_modules)
    missing, unexpected = model.load_state_dict(torchvision.models.mobilenet_v2().state_dict(), strict=False)
    assert unexpected == [] and all(".cnsn." in k for k in missing)
    assert (missing == []) == (kind == "cn")
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()


def test_cnsn_bad_options():
    with pytest.raises(ValueError, match="crossnorm_mode: got '3-instance'"):
        CrossNorm("3-instance")
    with pytest.raises(ValueError, match="crossnorm_crop: got 'all'"):
        CrossNorm(crop="all")
    with pytest.raises(ValueError, match="cnsn_position: got 'head'"):
        build_model(cnsn="cnsn", cnsn_position="head")
    with pytest.raises(ValueError, match="cn_prob: got 1.5"):
        build_model(cnsn="cnsn", cn_prob=1.5)
    with pytest.raises(ValueError, match=r"active_num: got 18; allowed values are 1..17"):
        build_model(cnsn="cn", active_num=18)
    with pytest.raises(ValueError, match="active_num: got 11; allowed values are 1..10"):
        build_model(cnsn="cn", cnsn_position="identity", active_num=11)
    with pytest.raises(ValueError, match="4-D"):
        SelfNorm(3)(torch.randn(2, 3, 4))


def test_recording_mode():
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar", cnsn="cnsn", cn_prob=1.0, active_num=17)
    model.train()
    with record_cnsn(model) as recorded:
        model(torch.randn(4, 3, 32, 32))
    assert len(recorded) == 17
    first = next(iter(recorded.values()))
    for key in ("input_mean", "input_std", "crossnorm_mean", "crossnorm_std", "selfnorm_mean", "selfnorm_std",
                "gate_g"):
        assert first[key].shape[0] == 4
    assert not torch.allclose(first["input_mean"], first["crossnorm_mean"])  # CrossNorm was on


# ---- the C kernels (float32 CPU) against the PyTorch formulation ----------------------------------

@pytest.fixture
def eager():
    """Run a block of code with the PyTorch formulation instead of the C kernels."""
    from mnv2lib.layers.activations import set_kernel_backend

    class Switch:
        def __enter__(self):
            set_kernel_backend("eager")

        def __exit__(self, *exc):
            set_kernel_backend("auto")

    yield Switch()
    set_kernel_backend("auto")


def test_native_kernels_available_on_cpu():
    from mnv2lib import ops

    assert ops.available("cnsn")


@pytest.mark.parametrize("two_gates", [False, True])
@pytest.mark.parametrize("shape", [(4, 16, 5, 5), (3, 8, 1, 1), (1, 6, 4, 4), (2, 12, 32, 32), (5, 3, 1, 7),
                                   (6, 160, 4, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_selfnorm_kernels_match_pytorch(two_gates, shape, channels_last, eager):
    """The kernels against the PyTorch formulation run in float64 (BatchNorm1d over a few samples
    amplifies float32 rounding, of the PyTorch float32 path as much as of the kernels); the fast
    module also on channels_last input (the NHWC kernels)."""
    import copy

    layout = torch.channels_last if channels_last else torch.contiguous_format

    fast = randomized(SelfNorm(shape[1], two_gates=two_gates))
    ref = copy.deepcopy(fast).double()
    x = torch.randn(*shape) * torch.rand(shape[0], shape[1], 1, 1) * 3 + 1
    for training in (True, False):
        fast.train(training)
        ref.train(training)
        x1, x2 = x.clone(memory_format=layout).requires_grad_(), x.double().requires_grad_()
        y1 = fast(x1)
        assert y1.is_contiguous(memory_format=layout)
        with eager:
            y2 = ref(x2)
        torch.testing.assert_close(y1, y2.float(), atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(y1)
        y1.backward(grad)
        with eager:
            y2.backward(grad.double())
        torch.testing.assert_close(x1.grad, x2.grad.float(), atol=1e-5, rtol=1e-4)
        for (name, p1), (_, p2) in zip(fast.named_parameters(), ref.named_parameters()):
            assert (p1.grad.double() - p2.grad).norm() <= 5e-3 * p2.grad.norm() + 1e-6, name
            p1.grad = p2.grad = None
        for (name, b1), (_, b2) in zip(fast.named_buffers(), ref.named_buffers()):
            torch.testing.assert_close(b1.double(), b2.double(), atol=1e-6, rtol=1e-5, msg=name)
    with torch.inference_mode():  # the one-kernel inference path
        fast.eval()
        ref.eval()
        y1 = fast(x.contiguous(memory_format=layout))
        assert y1.is_contiguous(memory_format=layout)
        with eager:
            y2 = ref(x.double())
        torch.testing.assert_close(y1, y2.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_stats_gradient_matches_float64(channels_last):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(3, 5, 6, 7) * 2 + 1).contiguous(memory_format=layout).requires_grad_()
    mean, std = channel_stats(x, 1e-5)
    d_mean, d_std = torch.randn_like(mean), torch.randn_like(std)
    (gx,) = torch.autograd.grad((mean * d_mean).sum() + (std * d_std).sum(), x)
    x64 = x.detach().double().requires_grad_()
    ref_mean, ref_std = stats(x64)
    (g64,) = torch.autograd.grad((ref_mean * d_mean.double().flatten(2).squeeze(-1)).sum()
                                 + (ref_std * d_std.double().flatten(2).squeeze(-1)).sum(), x64)
    torch.testing.assert_close(gx, g64.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std.flatten(1), ref_std.float(), atol=1e-6, rtol=1e-6)


def test_selfnorm_layouts_and_recording(eager):
    import copy

    fast = randomized(SelfNorm(8, two_gates=True))
    ref = copy.deepcopy(fast)
    x = torch.randn(4, 8, 6, 6)
    y = fast(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    with eager:
        torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    module = CNSN(None, fast).train()
    with record_cnsn(torch.nn.Sequential(module)) as recorded:
        module(x)
    gates = recorded["0"]
    assert gates["gate_g"].shape == (4, 8) and gates["gate_f"].shape == (4, 8)


@pytest.mark.parametrize("channels_last", [False, True])
def test_crossnorm_with_kernels_matches_pytorch(channels_last, eager):
    layout = torch.channels_last if channels_last else torch.contiguous_format
    for mode in ("2-instance", "1-instance"):
        for crop in ("neither", "style", "content", "both"):
            a = CrossNorm(mode, crop, generator=torch.Generator().manual_seed(3))
            b = CrossNorm(mode, crop, generator=torch.Generator().manual_seed(3))
            x1 = torch.randn(6, 5, 9, 9).contiguous(memory_format=layout).requires_grad_()
            x2 = x1.detach().contiguous().requires_grad_()
            y1 = active(a)(x1)
            with eager:
                y2 = active(b)(x2)
            torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
            grad = torch.randn_like(y1)
            y1.backward(grad)
            with eager:
                y2.backward(grad)
            torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_selfnorm_inference_kernel_follows_parameter_changes(eager):
    import copy

    fast = randomized(SelfNorm(6, two_gates=True)).eval()
    x = torch.randn(3, 6, 5, 5)

    def check():
        ref = copy.deepcopy(fast)
        with torch.inference_mode():
            y = fast(x)
            with eager:
                torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)

    check()
    with torch.no_grad():
        fast.g_bn.running_var.mul_(2.0)  # in place
        fast.f_fc.weight = torch.nn.Parameter(torch.randn(6, 1, 2))  # replaced
        fast.g_bn.running_mean.data = torch.randn(6)  # storage swapped
    check()
    fast.g_bn.eps = 0.5
    fast.eps = 1e-3
    check()


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("two_gates", [False, True])
def test_selfnorm_running_statistics_follow_batchnorm1d(momentum, two_gates):
    """The gates' running averages, batch count included, as nn.BatchNorm1d keeps them fed the same gate
    inputs; momentum None is the cumulative average (the native path and the PyTorch path alike)."""
    sn = randomized(SelfNorm(6, two_gates=two_gates)).train()
    refs = {}
    for name in ("g", "f") if two_gates else ("g",):
        bn = getattr(sn, f"{name}_bn")
        bn.momentum = momentum
        refs[name] = torch.nn.BatchNorm1d(6, momentum=momentum)
        refs[name].load_state_dict(bn.state_dict())
    for _ in range(3):
        x = torch.randn(4, 6, 5, 5) * 2 + 1
        sn(x)
        mean, std = channel_stats(x, sn.eps)
        stats = torch.cat((mean, std), dim=-1).flatten(2)
        with torch.no_grad():
            for name, ref in refs.items():
                ref(getattr(sn, f"{name}_fc")(stats))
    for name, ref in refs.items():
        bn = getattr(sn, f"{name}_bn")
        assert int(bn.num_batches_tracked) == 3
        torch.testing.assert_close(bn.running_mean, ref.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(bn.running_var, ref.running_var, atol=1e-5, rtol=1e-5)


def test_swa_update_bn_recalibrates_cnsn_models():
    """torch.optim.swa_utils.update_bn (momentum None: cumulative averages) on a model with SelfNorm."""
    from torch.optim.swa_utils import update_bn

    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar", cnsn="cnsn")
    batches = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    update_bn(batches, model)
    selfnorms = [m for m in model.modules() if isinstance(m, SelfNorm)]
    assert selfnorms and all(int(m.g_bn.num_batches_tracked) == len(batches) for m in selfnorms)
    assert all(m.g_bn.momentum == 0.1 for m in selfnorms)  # restored by update_bn
    assert all(torch.isfinite(m.g_bn.running_var).all() for m in selfnorms)
