"""Issue 31, native operators and layers: no input crashes a kernel, no number is silently wrong.

Three tables, one row per case:

- ``CRASHES``: inputs that killed the process (segfaults through stack arrays sized by k, C or H, empty
  tensors, a division by an empty plane's size), and empty tensors to the Mish operators beside them.
  Each row runs in its own interpreter, so that a regression fails its row instead of taking the suite
  down; the code asserts the right result and prints ``OK``.
- ``ERRORS``: arguments that were accepted silently or failed deep inside torch: each must raise the
  given error type with a message naming the field (and what is allowed).
- the tests after them: results that were silently wrong (Mish at large inputs, SelfNorm in float64,
  statistics of an empty map, infinite inputs) and the transforms (``torch.jit.script``, ``torch.func``,
  forward-mode AD, a channels_last slice's gradient).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F

from mnv2lib import ops
from mnv2lib.layers import CNSN, CrossNorm, Mish, SelfNorm, TripletAttention, mish
from mnv2lib.layers.attention import TripletAttentionReference
from mnv2lib.layers.cnsn import channel_stats
from mnv2lib.models import ModelConfig

from conftest import build_shallow_v2


@pytest.fixture(autouse=True)
def _operators_defined():
    # the C++ operators are defined when their library loads (as a module's first call does)
    assert all(ops.available(name) for name in ops.kernels.LIBRARIES)

# ---- crashes: each row in its own interpreter ----------------------------------------------------------

# Shared by every row: the operators' arguments of a Triplet Attention module, a float64 PyTorch reference
# (the modules' own PyTorch path with the native kernels off) and a comparison.
_PRELUDE = """
import torch
from mnv2lib import ops
from mnv2lib.layers import SelfNorm, TripletAttention
from mnv2lib.layers.cnsn import channel_stats
assert all(ops.available(n) for n in ops.kernels.LIBRARIES)
torch.manual_seed(0)

def randomized(m):
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m

def ta_args(m):
    b = (m.channel_width, m.height_channel, m.spatial)
    return ([g.conv.weight for g in b] + [g.bn.weight for g in b] + [g.bn.bias for g in b]
            + [g.bn.running_mean for g in b] + [g.bn.running_var for g in b])

def ta_counts(m):
    return [g.bn.num_batches_tracked for g in (m.channel_width, m.height_channel, m.spatial)]

def reference(m, x, train=False):
    # float64 copy of module m, PyTorch path
    import copy
    r = copy.deepcopy(m).double().train(train)
    ops.set_kernel_backend("eager")
    try:
        return r(x.double())
    finally:
        ops.set_kernel_backend("auto")

def close(a, b, tol=1e-4):
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol)

def cropped(m, k):
    # the float64 Triplet Attention of kernel size k with the central k x k taps of m's weights: on maps of
    # at most (k + 1) / 2 rows and columns every other tap only ever meets the zero padding, so it is the same
    # function (the reference for huge kernels, whose PyTorch convolution would need gigabytes)
    r = TripletAttention(k).double().train(m.training)
    c = (m.kernel_size - k) // 2
    state = {name: (t[..., c:c + k, c:c + k] if name.endswith("conv.weight") else t)
             for name, t in m.state_dict().items()}
    r.load_state_dict(state)
    return r, c
"""

_EMPTY_TA_INFERENCE = """
m = randomized(TripletAttention(3)).eval()
for shape in [(2, 0, 5, 5), (2, 3, 0, 5), (2, 3, 5, 0), (0, 3, 5, 5)]:
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape).contiguous(memory_format=fmt)
        out = torch.ops.mnv2.triplet_attention_inference(x, *ta_args(m), 1e-5)
        assert out.shape == x.shape, (shape, out.shape)
        with torch.no_grad():
            torch.ops.mnv2.triplet_attention_inference_(x, *ta_args(m), 1e-5)
print("OK")
"""

_EMPTY_TA_TRAINING = """
m = randomized(TripletAttention(3)).train()
for shape in [(2, 3, 5, 0), (2, 0, 5, 5), (2, 3, 0, 5), (0, 3, 5, 5)]:
    stats = [t.clone() for t in ta_args(m)[9:]] + [c.clone() for c in ta_counts(m)]
    x = torch.randn(shape, requires_grad=True)
    out = torch.ops.mnv2.triplet_attention(x, *ta_args(m), *ta_counts(m), True, 1e-5, 0.1)[0]
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert all(float(p.grad.abs().sum()) == 0 for p in m.parameters())
    m.zero_grad()
    # aten's batch_norm on an empty input: the running statistics stay as they were
    assert all(torch.equal(a, b) for a, b in zip(ta_args(m)[9:] + ta_counts(m), stats)), shape
print("OK")
"""

_EMPTY_MODULES = """
for shape in [(2, 0, 5, 5), (2, 3, 0, 5), (2, 3, 5, 0), (0, 3, 5, 5)]:
    for train in (False, True):
        for m in (TripletAttention(3), SelfNorm(shape[1]) if shape[1] else None):
            if m is None:
                continue
            m.train(train)
            before = {k: v.clone() for k, v in m.state_dict().items()}
            x = torch.randn(shape, requires_grad=True)
            y = m(x)
            assert y.shape == x.shape
            y.sum().backward()
            assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items()), (type(m), shape)
print("OK")
"""

_TA_KERNEL_601_INFERENCE = """
m = randomized(TripletAttention(601)).eval()
ref, _ = cropped(m, 11)
for fmt in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(1, 3, 5, 6).contiguous(memory_format=fmt)
    with torch.no_grad():
        out = torch.ops.mnv2.triplet_attention_inference(x, *ta_args(m), 1e-5)
        close(out, reference(ref, x))
print("OK")
"""

_TA_KERNEL_1201_TRAINING = """
m = randomized(TripletAttention(1201)).train()
for fmt in (torch.contiguous_format, torch.channels_last):
    ref, c = cropped(m, 11)
    x = torch.randn(2, 3, 5, 6).contiguous(memory_format=fmt).requires_grad_()
    xr = x.detach().double().requires_grad_()
    y = m(x)
    ops.set_kernel_backend("eager")
    yr = ref(xr)
    ops.set_kernel_backend("auto")
    close(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    close(x.grad, xr.grad, 1e-3)
    for (name, p), pr in zip(m.named_parameters(), ref.parameters()):
        if name.endswith("conv.weight"):  # the central taps, and nothing elsewhere
            close(p.grad[..., c:c + 11, c:c + 11], pr.grad, 1e-3)
            p.grad[..., c:c + 11, c:c + 11] = 0
            assert float(p.grad.abs().max()) == 0
        else:
            close(p.grad, pr.grad, 1e-3)
    m.zero_grad()
print("OK")
"""

_CHANNEL_STATS_MILLION_CHANNELS = """
C = 1 << 20
x = torch.randn(1, C, 2, 2).contiguous(memory_format=torch.channels_last)
mean, std = torch.ops.mnv2.channel_stats(x, 1e-5)
v, m = torch.var_mean(x.double(), dim=(2, 3))
close(mean, m)
close(std, (v + 1e-5).sqrt())
print("OK")
"""

_SELFNORM_MILLION_CHANNELS = """
C = 1 << 20
x = torch.randn(2, C, 2, 2).contiguous(memory_format=torch.channels_last)
m = SelfNorm(C)
for train in (False, True):
    m.train(train)
    xg = x.clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        y = m(xg)
        if train:
            y.sum().backward()
    close(y, reference(m.eval() if not train else m, x, train), 1e-3)
print("OK")
"""

_SELFNORM_INFERENCE_EMPTY_PLANE = """
m = SelfNorm(3).eval()
gates = (m.g_fc.weight, m.g_bn.weight, m.g_bn.bias, m.g_bn.running_mean, m.g_bn.running_var)
for shape in [(2, 3, 0, 4), (2, 3, 4, 0), (0, 3, 4, 4)]:
    x = torch.randn(shape)
    out = torch.ops.mnv2.selfnorm_inference(x, *gates, 1e-5, None, None, None, None, None, 0.0, 1e-12)
    assert out.shape == x.shape
    with torch.no_grad():
        torch.ops.mnv2.selfnorm_inference_(x, *gates, 1e-5, None, None, None, None, None, 0.0, 1e-12)
    # training operator: an empty result, running statistics untouched
    before = [m.g_bn.running_mean.clone(), m.g_bn.running_var.clone()]
    xg = torch.randn(shape, requires_grad=True)
    y = torch.ops.mnv2.selfnorm(xg, *gates, m.g_bn.num_batches_tracked, True, 1e-5, 1e-12, 0.1)[0]
    y.sum().backward()
    assert y.shape == x.shape and xg.grad.shape == x.shape
    assert torch.equal(m.g_bn.running_mean, before[0]) and torch.equal(m.g_bn.running_var, before[1])
print("OK")
"""

_MISH_EMPTY = """
for x in (torch.empty(0), torch.empty(2, 0, 3, 3), torch.empty(2, 3, 3, 0).contiguous(memory_format=torch.channels_last)):
    assert torch.ops.mnv2.mish(x).shape == x.shape
    assert torch.ops.mnv2.mish_backward(x, torch.empty_like(x)).shape == x.shape
    torch.ops.mnv2.mish_(x)
print("OK")
"""

_TA_TALL_NARROW_BACKWARD = """
# the training backward kept an array of H floats on the stack for maps narrower than 16 (12 MB here)
m = randomized(TripletAttention(3)).train()
x = torch.randn(1, 1, 3 << 20, 3, requires_grad=True)
y = m(x)
y.backward(torch.randn_like(y))
assert torch.isfinite(x.grad).all()
print("OK")
"""

CRASHES = {
    "triplet_attention_inference: zero channels, height, width or batch": _EMPTY_TA_INFERENCE,
    "triplet_attention (training): empty x, forward and backward": _EMPTY_TA_TRAINING,
    "TripletAttention and SelfNorm modules: empty x": _EMPTY_MODULES,
    "triplet_attention_inference: kernel size 601": _TA_KERNEL_601_INFERENCE,
    "triplet_attention (training): kernel size 1201, with backward": _TA_KERNEL_1201_TRAINING,
    "channel_stats: channels_last with a million channels": _CHANNEL_STATS_MILLION_CHANNELS,
    "SelfNorm: channels_last with a million channels": _SELFNORM_MILLION_CHANNELS,
    "selfnorm_inference and selfnorm: an empty plane": _SELFNORM_INFERENCE_EMPTY_PLANE,
    "mish operators: empty tensors": _MISH_EMPTY,
    "triplet_attention_backward: three million rows of 3": _TA_TALL_NARROW_BACKWARD,
}


def _run(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("case", list(CRASHES))
def test_input_that_crashed_a_kernel_now_gives_the_right_result(case):
    result = _run(_PRELUDE + textwrap.dedent(CRASHES[case]))
    killed = -result.returncode if result.returncode < 0 else None
    assert killed is None, f"{case}: killed by {signal.Signals(killed).name}\n{result.stderr[-3000:]}"
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), f"{case}:\n{result.stderr[-3000:]}"


# ---- clear errors --------------------------------------------------------------------------------------

ERRORS = [
    # (case, call, error type, words the message must contain)
    ("TripletAttention(kernel_size=True)", lambda: TripletAttention(kernel_size=True), ValueError,
     ["kernel_size", "got True", "odd integers"]),
    ("TripletAttention(kernel_size=4)", lambda: TripletAttention(kernel_size=4), ValueError,
     ["kernel_size", "odd integers"]),
    ("TripletAttention(kernel_size=0)", lambda: TripletAttention(kernel_size=0), ValueError, ["kernel_size"]),
    ("TripletAttention(kernel_size=-3)", lambda: TripletAttention(kernel_size=-3), ValueError, ["kernel_size"]),
    ("TripletAttention(kernel_size=3.0)", lambda: TripletAttention(kernel_size=3.0), ValueError, ["kernel_size"]),
    ("ModelConfig(attention_kernel=601)", lambda: ModelConfig(attention="triplet", attention_kernel=601), ValueError,
     ["attention_kernel", "got 601", "from 1 to 31"]),
    ("ModelConfig(attention_kernel=True)", lambda: ModelConfig(attention="triplet", attention_kernel=True), ValueError,
     ["attention_kernel", "got True"]),
    ("SelfNorm(0)", lambda: SelfNorm(0), ValueError, ["SelfNorm channels", "got 0", "integers >= 1"]),
    ("SelfNorm(-2)", lambda: SelfNorm(-2), ValueError, ["SelfNorm channels"]),
    ("SelfNorm(True)", lambda: SelfNorm(True), ValueError, ["SelfNorm channels", "got True"]),
    ("SelfNorm(4.0)", lambda: SelfNorm(4.0), ValueError, ["SelfNorm channels"]),
]


@pytest.mark.parametrize("case,call,error,words", ERRORS, ids=[row[0] for row in ERRORS])
def test_bad_argument_is_a_clear_error(case, call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{case}: {info.value}"


def test_kernel_backend_typo_in_the_environment_is_refused_by_name():
    result = _run("import mnv2lib", env={"MNV2_KERNEL_BACKEND": "eagr"}, timeout=120)
    assert result.returncode == 1
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ValueError: MNV2_KERNEL_BACKEND: got 'eagr'"), message
    assert "'auto', 'compiled', 'eager'" in message
    for value, expected in (("eager", "eager"), ("", "auto")):
        result = _run("import mnv2lib.ops as o; print(o.kernel_backend())", env={"MNV2_KERNEL_BACKEND": value},
                      timeout=120)
        assert result.stdout.strip() == expected, result.stderr[-2000:]


def test_accepted_kernel_sizes_and_channels():
    import numpy as np
    assert TripletAttention(kernel_size=np.int64(5)).kernel_size == 5
    assert ModelConfig(attention="triplet", attention_kernel=31).attention_kernel == 31
    assert SelfNorm(np.int64(4)).channels == 4


# ---- silently wrong numbers ----------------------------------------------------------------------------

MISH_EXTREMES = [-float("inf"), -3.4e38, -1e30, -1e10, -200.0, -100.0, -90.0, -88.0, -87.3, -87.0, -50.0, -20.0,
                 -1.0, -1e-30, 0.0, 1e-30, 1.0, 15.0, 19.9, 20.0, 20.1, 40.0, 1e10, 1e14, 1e16, 1e18, 4e20, 1.5e21,
                 1e30, 3.4e38, float("inf"), float("nan")]


@pytest.fixture(params=["auto", "eager"])
def backend(request):
    ops.set_kernel_backend(request.param)
    yield request.param
    ops.set_kernel_backend("auto")


@pytest.mark.parametrize("inplace", [False, True])
def test_mish_matches_f_mish_over_the_whole_float32_range(backend, inplace):
    # three copies: the vector loop and the scalar tail both see every value
    x = torch.tensor(MISH_EXTREMES * 3).view(3, len(MISH_EXTREMES))
    xg, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, yr = mish(xg), F.mish(xr)
    torch.testing.assert_close(y, yr, equal_nan=True)
    y.backward(torch.ones_like(y))
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(xg.grad, xr.grad, equal_nan=True)
    if inplace:
        with torch.no_grad():
            z = x.clone()
            Mish(inplace=True)(z)
        torch.testing.assert_close(z, yr.detach(), equal_nan=True)


@pytest.mark.parametrize("two_gates", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_selfnorm_float64_is_exact(two_gates, training):
    torch.manual_seed(0)
    m = SelfNorm(3, two_gates=two_gates).double().train(training)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))
    mean, std = channel_stats(x.detach(), 1e-12)
    var, ref_mean = torch.var_mean(x.detach(), dim=(2, 3), keepdim=True)
    assert mean.dtype == std.dtype == torch.float64
    torch.testing.assert_close(mean, ref_mean, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(std, (var + 1e-12).sqrt(), atol=1e-14, rtol=1e-14)


@pytest.mark.parametrize("shape", [(2, 3, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_channel_stats_of_an_empty_map_are_nan_as_torch_std(shape, memory_format, backend):
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    mean, std = channel_stats(x, 1e-5)
    assert mean.shape == std.shape == (2, 3, 1, 1)
    assert mean.isnan().all() and std.isnan().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of the degrees of freedom
        assert torch.std(x, dim=(2, 3)).isnan().all()  # the semantics taken
    if backend == "auto":
        m, s = torch.ops.mnv2.channel_stats(x, 1e-5)
        assert m.isnan().all() and s.isnan().all()
    one = torch.randn(2, 3, 1, 1)
    assert torch.equal(channel_stats(one, 1e-5)[1], torch.full((2, 3, 1, 1), 1e-5).sqrt())  # (documented: not NaN)


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_triplet_attention_non_finite_input_matches_the_documented_semantics(value, backend):
    """docs/native-operators.md: x * (g_cw + g_hc + g_s) / 3 (both paths) equals the reference's sum of per-branch
    products for finite x; at an infinite element, where a gate is exactly 0 the reference has inf * 0 = NaN
    and TripletAttention the infinity. Elsewhere they agree, NaN for NaN."""
    torch.manual_seed(3)
    for trial in range(20):
        fast = TripletAttention(3).eval()
        ref = TripletAttentionReference(3).eval()
        with torch.no_grad():
            for p in fast.parameters():
                p.normal_(0, 3)  # gates that saturate to exactly 0 or 1
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(2, 3, 4, 5)
        x[trial % 2, trial % 3, trial % 4, trial % 5] = value
        with torch.no_grad():
            y, yr = fast(x), ref(x)
        differ = ~((y == yr) | (y.isnan() & yr.isnan()) | torch.isclose(y, yr, atol=1e-5, rtol=1e-4))
        assert (yr[differ].isnan() & y[differ].isinf() & x[differ].isinf()).all()


# ---- transforms: scripting, torch.func, forward AD, a channels_last slice --------------------------------

_SCRIPTABLE = {
    "Mish": lambda: Mish(inplace=True),
    "TripletAttention": lambda: TripletAttention(3),
    "TripletAttention(no_spatial)": lambda: TripletAttention(3, no_spatial=True),
    "TripletAttentionReference": lambda: TripletAttentionReference(3),
    "SelfNorm": lambda: SelfNorm(4),
    "SelfNorm(two_gates)": lambda: SelfNorm(4, two_gates=True),
    "CNSN": lambda: CNSN(CrossNorm(), SelfNorm(4)),
}


@pytest.mark.parametrize("name", list(_SCRIPTABLE))
def test_torch_jit_script_of_the_layers_runs_their_pytorch_path(name):
    module = _SCRIPTABLE[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch 2.10+: scripting is deprecated
        scripted = torch.jit.script(module)
    x = torch.randn(3, 4, 5, 6)
    torch.testing.assert_close(scripted(x.clone()), module(x.clone()), atol=1e-5, rtol=1e-5)
    assert "mnv2::" not in str(scripted.inlined_graph)
    if name != "Mish":  # (Mish takes any shape)
        with pytest.raises(Exception, match="4-D tensor"):
            scripted(torch.randn(3, 4, 5))


def test_scripted_crossnorm_refuses_to_exchange_in_training():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(CrossNorm().train())
    x = torch.randn(2, 4, 5, 5)
    assert scripted(x) is x or torch.equal(scripted(x), x)
    scripted.active = True
    with pytest.raises(Exception, match="CrossNorm: a scripted module cannot exchange"):
        scripted(x)


def _model():
    torch.manual_seed(0)
    model = build_shallow_v2(num_classes=10, width_mult=0.5, stem="cifar", activation="mish", attention="triplet",
                             cnsn="sn")
    return model.eval()


def test_vmap_over_the_whole_model_takes_the_pytorch_path():
    model = _model()
    x = torch.randn(3, 2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*performance drop.*")  # no per-sample fallback for mnv2::
        out = torch.func.vmap(model)(x)
    with torch.no_grad():
        expected = torch.stack([model(xi) for xi in x])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_grad_and_jacrev_through_the_native_layers_match_autograd():
    model = _model()
    x = torch.randn(2, 3, 16, 16)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())

    def loss(p, xb):
        return torch.func.functional_call(model, (p, buffers), (xb,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    model.zero_grad()
    model(x).square().sum().backward()  # the native operators' own backward
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-3, msg=name)
    # (eval: in training BatchNorm writes its running statistics, which torch.func refuses for any model;
    # torch.func.replace_all_batch_norm_modules_ is its answer)
    for module in (Mish(), TripletAttention(3).eval(), SelfNorm(4).eval()):
        xs = torch.randn(2, 4, 5, 6)
        jac = torch.func.jacrev(module)(xs)
        assert jac.shape == (2, 4, 5, 6, 2, 4, 5, 6)
        xg = xs.clone().requires_grad_()
        module(xg)[1, 2, 3, 4].backward()
        torch.testing.assert_close(jac[1, 2, 3, 4], xg.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("make", [Mish, lambda: TripletAttention(3), lambda: SelfNorm(4)],
                         ids=["mish", "triplet", "selfnorm"])
def test_forward_mode_ad_and_jvp_take_the_pytorch_path(make):
    import torch.autograd.forward_ad as fwAD
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)  # (torch's own, in make_dual)
    x, t, v = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    for training in (False, True):
        module = make().train(training)
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(module(fwAD.make_dual(x, t))).tangent
        if not training:  # (torch.func refuses BatchNorm's running-statistics update in training)
            torch.testing.assert_close(torch.func.jvp(module, (x,), (t,))[1], tangent, atol=1e-5, rtol=1e-4)
        # <v, J t> = <J^T v, t>, J^T v from the native operators' backward
        xg = x.clone().requires_grad_()
        module(xg).backward(v)
        torch.testing.assert_close((v * tangent).sum(), (xg.grad * t).sum(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [Mish, lambda: TripletAttention(3), lambda: SelfNorm(8)],
                         ids=["mish", "triplet", "selfnorm"])
@pytest.mark.parametrize("batch", [1, 2])
def test_backward_of_a_channels_last_slice(make, batch):
    """x[:, :, 2:3, :] of a channels_last tensor of batch 1: its gradient comes with other strides in the
    size-1 dimensions, which the operators refused."""
    torch.manual_seed(0)
    module = make().train()
    base = torch.randn(batch, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    grads = []
    for backend in ("auto", "eager"):
        ops.set_kernel_backend(backend)
        try:
            leaf = base.clone().requires_grad_()
            y = module(leaf[:, :, 2:3, :])
            y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
            grads.append(leaf.grad)
        finally:
            ops.set_kernel_backend("auto")
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("k", [1, 9, 33])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_triplet_attention_any_kernel_size_matches_float64(k, memory_format):
    """The paths that replaced stack arrays sized by k: k outside 3, 5, 7 (corr_any), and above GRADW_MAX_K
    (gradw_rows)."""
    torch.manual_seed(k)
    fast = TripletAttention(k).train()
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0, 0.5)
    ref = TripletAttention(k).double().train()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 6, 9, 20).contiguous(memory_format=memory_format)
    xg, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y = fast(xg)
    ops.set_kernel_backend("eager")
    try:
        yr = ref(xr)
    finally:
        ops.set_kernel_backend("auto")
    torch.testing.assert_close(y, yr.float(), atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    torch.testing.assert_close(xg.grad, xr.grad.float(), atol=1e-4, rtol=1e-3)
    for (name, p), pr in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, pr.grad.float(), atol=1e-3, rtol=1e-3, msg=name)
    fast.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x.double()).float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("channels", [40, 1500])
def test_channels_last_statistics_in_channel_blocks_match_float64(channels):
    """Channel counts other than 8-32 go NHWC_BLOCK (1024) channels at a time."""
    torch.manual_seed(0)
    x = torch.randn(3, channels, 5, 4).contiguous(memory_format=torch.channels_last)
    mean, std = torch.ops.mnv2.channel_stats(x, 1e-5)
    var, ref = torch.var_mean(x.double(), dim=(2, 3))
    torch.testing.assert_close(mean, ref.float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std, (var + 1e-5).sqrt().float(), atol=1e-6, rtol=1e-5)
    m = SelfNorm(channels).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
        y = m(x)
    ops.set_kernel_backend("eager")
    try:
        with torch.no_grad():
            expected = m.double()(x.double())
    finally:
        ops.set_kernel_backend("auto")
    torch.testing.assert_close(y, expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v1", "mobilenet_v4_conv_small"])
def test_scripting_a_network_names_what_works(arch):
    from mnv2lib import build_model

    model = build_model(arch=arch, num_classes=10).eval()
    with pytest.raises(TypeError, match=r"torch.jit.script: MobileNetV\d cannot be scripted; allowed: torch.jit.trace"):
        torch.jit.script(model)
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(traced(x), model(x))
