"""The mnv2:: operators (mnv2lib.ops): registration (opcheck), gradients, layouts, bad input, the
kernel cache's safety, and what compile, export, the profiler and the FLOP counter see."""
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mnv2lib
from mnv2lib import build_model, ops
from mnv2lib.layers import CNSN, CrossNorm, Mish, SelfNorm, TripletAttention
from mnv2lib.layers.attention import TripletAttentionReference
from mnv2lib.engine.measure import multiply_adds
from mnv2lib.ops import build, kernels

from conftest import build_shallow_v2

ROOT = Path(mnv2lib.__file__).resolve().parent.parent
LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _randomized(module):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        for name, b in module.named_buffers():
            if b.dtype.is_floating_point:
                b.uniform_(0.5, 1.5)
    return module


@pytest.fixture(autouse=True)
def _cpp_operators_defined():
    # the C++ operators are defined when their library loads, as a module's first call does
    assert all(ops.available(name) for name in kernels.LIBRARIES)


def _triplet_args(x, module, training):
    branches = (module.channel_width, module.height_channel, module.spatial)
    bns = [b.bn for b in branches]
    return (x, *[b.conv.weight for b in branches], *[bn.weight for bn in bns], *[bn.bias for bn in bns],
            *[bn.running_mean for bn in bns], *[bn.running_var for bn in bns])


# ---- registration: schema, fake, autograd, aot dispatch -----------------------------------------

@pytest.mark.parametrize("memory_format", LAYOUTS)
def test_opcheck_every_operator(memory_format):
    x = torch.randn(3, 6, 5, 4).contiguous(memory_format=memory_format)
    checks = []
    checks.append((torch.ops.mnv2.mish, (x.clone().requires_grad_(),)))
    checks.append((torch.ops.mnv2.mish_backward, (x, torch.randn_like(x))))
    checks.append((torch.ops.mnv2.mish_, (x.clone(),)))
    ta = _randomized(TripletAttention(3))
    for training in (True, False):
        args = [t.detach().clone().requires_grad_(t.is_floating_point() and i < 10)
                for i, t in enumerate(_triplet_args(x, ta, training))]
        counts = [b.bn.num_batches_tracked.clone() for b in (ta.channel_width, ta.height_channel, ta.spatial)]
        checks.append((torch.ops.mnv2.triplet_attention, (*args, *counts, training, 1e-5, 0.1)))
    for op in (torch.ops.mnv2.triplet_attention_inference, torch.ops.mnv2.triplet_attention_inference_):
        checks.append((op, (x.clone(), *[t.detach() for t in _triplet_args(x, ta, False)[1:]], 1e-5)))
    checks.append((torch.ops.mnv2.channel_stats, (x.clone().requires_grad_(), 1e-5)))
    mean, std = torch.ops.mnv2.channel_stats(x, 1e-5)
    checks.append((torch.ops.mnv2.channel_stats_backward, (x, mean, std, torch.randn_like(mean),
                                                           torch.randn_like(std))))
    sn = _randomized(SelfNorm(6))
    params = [t.detach().clone().requires_grad_() for t in (sn.g_fc.weight, sn.g_bn.weight, sn.g_bn.bias)]
    for training in (True, False):
        checks.append((torch.ops.mnv2.selfnorm, (x.clone().requires_grad_(), *params, sn.g_bn.running_mean.clone(),
                                                 sn.g_bn.running_var.clone(), sn.g_bn.num_batches_tracked.clone(),
                                                 training, 1e-5, 1e-12, 0.1)))
    for op in (torch.ops.mnv2.selfnorm_inference, torch.ops.mnv2.selfnorm_inference_):
        checks.append((op, (x.clone(), sn.g_fc.weight.detach(), sn.g_bn.weight.detach(), sn.g_bn.bias.detach(),
                            sn.g_bn.running_mean, sn.g_bn.running_var, 1e-5, None, None, None, None, None, 0.0,
                            1e-12)))
    bn = _randomized(torch.nn.BatchNorm2d(6))
    for activation in ("relu6", "mish"):
        checks.append((torch.ops.mnv2.batch_norm_act, (x.clone().requires_grad_(), bn.weight, bn.bias,
                                                       bn.running_mean.clone(), bn.running_var.clone(),
                                                       bn.num_batches_tracked.clone(), 0.1, 1e-5, activation)))
        _, mean, invstd = torch.ops.mnv2.batch_norm_act(x, bn.weight, bn.bias, bn.running_mean.clone(),
                                                        bn.running_var.clone(), bn.num_batches_tracked.clone(), 0.1,
                                                        1e-5, activation)
        checks.append((torch.ops.mnv2.batch_norm_act_backward, (torch.randn_like(x), x, bn.weight.detach(),
                                                                bn.bias.detach(), mean, invstd, activation)))
    for op, args in checks:
        torch.library.opcheck(op, args)


def test_an_operator_without_a_backward_formula_refuses_gradients_loudly():
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.ops.mnv2.mish_backward(x, torch.randn(2, 3, 4, 4))
    with pytest.raises(RuntimeError, match="mnv2::mish_backward.*not implemented"):
        y.sum().backward()
    with pytest.raises(RuntimeError, match="mnv2::mish_ writes its input and is not differentiable"):
        torch.ops.mnv2.mish_(x)


def test_mutating_operators_bump_the_version_of_what_they_write():
    ta = TripletAttention(3)
    buffers = [b for name, b in ta.named_buffers() if "running" in name or "num_batches" in name]
    before = [t._version for t in buffers]
    ta(torch.randn(2, 4, 5, 5, requires_grad=True))  # training: the running statistics are written
    assert len(buffers) == 9 and all(t._version > v for t, v in zip(buffers, before))
    sn = SelfNorm(4)
    buffers = [sn.g_bn.running_mean, sn.g_bn.running_var, sn.g_bn.num_batches_tracked]
    before = [t._version for t in buffers]
    sn(torch.randn(2, 4, 5, 5, requires_grad=True))
    assert all(t._version > v for t, v in zip(buffers, before))
    w, y = torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 3, 4, 4)
    z = w * y  # saves y for its backward
    with torch.no_grad():
        torch.ops.mnv2.mish_(y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("kind", ["triplet", "selfnorm", "selfnorm_two_gates"])
def test_inplace_inference_operators_write_the_functional_result_over_x(kind, memory_format):
    torch.manual_seed(2)
    x = (torch.randn(3, 8, 7, 5) * 2).contiguous(memory_format=memory_format)
    module = _randomized({"triplet": lambda: TripletAttention(3), "selfnorm": lambda: SelfNorm(8),
                          "selfnorm_two_gates": lambda: SelfNorm(8, two_gates=True)}[kind]()).eval()
    with torch.no_grad():
        expected = module(x)  # the functional operator: x untouched
        before = x.clone()
        torch.testing.assert_close(x, before, atol=0, rtol=0)
        module.inplace = True
        version = x._version
        out = module(x)
    assert out is x
    assert x._version > version  # autograd sees the write
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not torch.equal(x, before)
    with torch.enable_grad():  # autograd never overwrites its input
        module.train()
        y = x.clone()
        z = module(y)
        assert z is not y


# ---- values and gradients against float64 references, NCHW and channels_last --------------------

def _grads(module, x):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    grad = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    y.backward(grad)
    return y.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("memory_format", LAYOUTS)
@pytest.mark.parametrize("kind", ["mish", "triplet", "selfnorm"])
@pytest.mark.parametrize("training", [True, False])
def test_native_matches_float64_pytorch_path(kind, memory_format, training):
    torch.manual_seed(1)
    x = (torch.randn(4, 8, 6, 5) * 2).contiguous(memory_format=memory_format)
    make = {"mish": Mish, "triplet": lambda: TripletAttention(3), "selfnorm": lambda: SelfNorm(8)}[kind]
    fast = _randomized(make()).train(training)
    ref = _randomized(make()).double().train(training)
    y, gx, gp = _grads(fast, x)
    with _eager():
        y64, gx64, gp64 = _grads(ref, x.double())
    torch.testing.assert_close(y, y64.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gx64.float(), atol=1e-4, rtol=1e-3)
    for a, b in zip(gp, gp64):
        torch.testing.assert_close(a, b.float(), atol=1e-3, rtol=1e-3)
    for (name, a), (_, b) in zip(fast.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b.to(a.dtype), atol=1e-5, rtol=1e-4, msg=name)
    assert y.is_contiguous(memory_format=memory_format)


class _eager:
    def __enter__(self):
        ops.set_kernel_backend("eager")

    def __exit__(self, *exc):
        ops.set_kernel_backend("auto")


# ---- bad input: a clear error, never a crash ------------------------------------------------------

def test_bad_input_to_an_operator_raises_a_clear_error():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="float32 CPU tensor; got torch.float64"):
        torch.ops.mnv2.mish(x.double())
    with pytest.raises(ValueError, match="contiguous or channels_last"):
        torch.ops.mnv2.mish(x[..., ::2])
    with pytest.raises(ValueError, match=r"grad must have shape \(2, 4, 5, 5\)"):
        torch.ops.mnv2.mish_backward(x, torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="must be 4-D"):
        torch.ops.mnv2.channel_stats(torch.randn(2, 4, 5), 1e-5)
    ta = TripletAttention(3)
    args = list(_triplet_args(x, ta, False))
    args[1] = torch.randn(1, 3, 3, 3)
    with pytest.raises(ValueError, match=r"w_cw must have shape \(1, 2, 3, 3\); got \(1, 3, 3, 3\)"):
        torch.ops.mnv2.triplet_attention_inference(*args, 1e-5)
    sn = SelfNorm(4)
    with pytest.raises(ValueError, match=r"fc must have shape \(5, 1, 2\)"):
        torch.ops.mnv2.selfnorm(torch.randn(2, 5, 3, 3), sn.g_fc.weight, sn.g_bn.weight, sn.g_bn.bias,
                                sn.g_bn.running_mean, sn.g_bn.running_var, sn.g_bn.num_batches_tracked, True, 1e-5,
                                1e-12, 0.1)
    # a bad batch count is refused before any running statistic is written
    args = list(_triplet_args(x, ta, True))
    counts = [torch.zeros((), dtype=torch.long), torch.zeros(()), torch.zeros((), dtype=torch.long)]
    before = [t.clone() for t in args[10:16]]
    with pytest.raises(ValueError, match=r"count_hc must be an int64 CPU tensor.*got torch.float32"):
        torch.ops.mnv2.triplet_attention(*args, *counts, True, 1e-5, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(args[10:16], before)) and int(counts[0]) == 0


# ---- compile, export, profiler, FLOPs ------------------------------------------------------------

@pytest.mark.parametrize("module", [Mish(), TripletAttention(), SelfNorm(8), CNSN(CrossNorm(crop="both"), SelfNorm(8))],
                         ids=["mish", "triplet", "selfnorm", "cnsn"])
def test_modules_trace_without_graph_breaks(module):
    x = torch.randn(4, 8, 6, 6)
    for training in (True, False):
        module.train(training)
        if isinstance(module, CNSN):
            module.crossnorm.active = True
        explanation = torch._dynamo.explain(module)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        graph_ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
        if not isinstance(module, CNSN):
            assert any(name.startswith("mnv2.") for name in graph_ops), graph_ops


def _tiny_model(**overrides):
    """Mish + Triplet Attention + CNSN in a whole MobileNetV2 (stem, blocks, head) of three stages: dynamo
    traces it in a fraction of the 17 blocks' time."""
    torch.manual_seed(0)
    return build_shallow_v2(num_classes=10, width_mult=0.25, stem="cifar", activation="mish", attention="triplet",
                            cnsn="cnsn", **overrides)


def test_whole_model_compiles_in_one_graph_and_matches_eager():
    # training: fullgraph through dynamo, the fake kernels and AOT autograd with the operators ("aot_eager":
    # inductor's code generation would add a minute and test torch, not this project); inference: dynamo
    x = torch.randn(4, 3, 16, 16)
    eager_model = _tiny_model(dropout=0.0, cn_prob=0.0)
    compiled_model = _tiny_model(dropout=0.0, cn_prob=0.0)
    for training, backend in ((True, "aot_eager"), (False, "eager")):
        eager_model.train(training)
        compiled_model.train(training)
        compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
        y, yc = eager_model(x), compiled(x)
        torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
        if training:
            y.sum().backward()
            yc.sum().backward()
            for (name, a), (_, b) in zip(eager_model.named_parameters(), compiled_model.named_parameters()):
                torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4, msg=name)
            for (name, a), (_, b) in zip(eager_model.named_buffers(), compiled_model.named_buffers()):
                torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    # CrossNorm switched on in every step: still one graph (random draws are tensor ops, blended with where)
    explanation = torch._dynamo.explain(_tiny_model(cn_prob=1.0).train())(x)
    assert explanation.break_reasons == []


def test_inference_with_the_inplace_operators_compiles_in_one_graph():
    model = _tiny_model().eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        explanation = torch._dynamo.explain(model)(x)
        graph_ops = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert {"mnv2.triplet_attention_inference_", "mnv2.selfnorm_inference_"} <= graph_ops
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # functionalizes the mutations
        torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(compiled(x), expected, atol=1e-6, rtol=1e-5)


def test_export_of_the_eval_model_holds_standard_operators_only():
    model = _tiny_model().eval()
    x = torch.randn(2, 3, 16, 16)
    exported = torch.export.export(model, (x,))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not any("mnv2" in t for t in targets), targets
    assert not any("var_mean" in t or "as_strided" in t for t in targets), targets
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_profiler_names_the_operators():
    model = _tiny_model(cn_prob=1.0, crossnorm_crop="neither").train()  # (crops are strided: PyTorch ops)
    x = torch.randn(2, 3, 16, 16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        model(x).sum().backward()
    names = {e.key for e in profile.key_averages()}
    # (Mish after a BatchNorm trains inside mnv2::batch_norm_act)
    for op in ("mnv2::batch_norm_act", "mnv2::batch_norm_act_backward", "mnv2::triplet_attention", "mnv2::triplet_attention_backward",
               "mnv2::selfnorm", "mnv2::selfnorm_backward", "mnv2::channel_stats", "mnv2::channel_stats_backward"):
        assert op in names, sorted(n for n in names if n.startswith("mnv2"))


def test_flop_counts_do_not_depend_on_the_implementation():
    model = build_model(num_classes=10, width_mult=0.25, stem="cifar_lite", attention="triplet").eval()
    size = (1, 3, 16, 16)
    native = multiply_adds(model, size)
    with _eager():
        reference = multiply_adds(model, size)
    assert native == reference > multiply_adds(build_model(num_classes=10, width_mult=0.25, stem="cifar_lite"), size)


# ---- no global state, a safe kernel cache --------------------------------------------------------

def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
                          timeout=300)


def test_importing_the_library_installs_no_global_hooks():
    result = _run("""
        import torch
        from torch.nn.modules import module
        names = ["_global_module_registration_hooks", "_global_parameter_registration_hooks",
                 "_global_buffer_registration_hooks", "_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks", "_global_forward_hooks_always_called"]
        before = {n: dict(getattr(module, n)) for n in names if hasattr(module, n)}
        import mnv2lib, mnv2lib.models, mnv2lib.layers
        mnv2lib.build_model(activation="mish", attention="triplet", cnsn="cnsn")
        after = {n: dict(getattr(module, n)) for n in names if hasattr(module, n)}
        assert before == after and "_global_module_registration_hooks" in before, (before, after)
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_every_kernel_source_compiles_without_warnings(tmp_path):
    # each library as this machine builds it (its C kernels for -march=native and its C++ operators, with
    # -Wall -Wextra; the build keeps what the compilers said), and no source left out of a library
    for name in kernels.LIBRARIES:
        log = build.warnings_log(build.build(name))
        assert log.exists(), f"{log} is missing: delete the library beside it to have it rebuilt"
        assert log.read_text() == "", f"building the {name} library warned:\n{log.read_text()}"
    built = {p for name in kernels.LIBRARIES for p in build.sources(name)}
    assert built == set(build.SOURCE_DIR.glob("*.c")) | set(build.SOURCE_DIR.glob("*.cpp"))
    # on x86-64 also the C kernels for the vector width the native build lacks (AVX2 or AVX-512) with -Werror:
    # users' CPUs have or lack 64-byte vectors, and GCC warns differently (-Wpsabi)
    if os.uname().machine == "x86_64":
        native = subprocess.run([os.environ.get("CC", "cc"), "-march=native", "-dM", "-E", "-x", "c", os.devnull],
                                capture_output=True, text=True, check=True).stdout
        other = "-march=x86-64-v3" if "__AVX512F__" in native else "-march=x86-64-v4"
        for name in kernels.LIBRARIES:
            build.compile_kernels(name, tmp_path / f"{name}.o", ("-Werror", other))


def _fresh_kernels(monkeypatch, cache: Path):
    monkeypatch.setenv("MNV2_KERNEL_CACHE", str(cache))
    monkeypatch.setattr(kernels, "_libraries", {})
    monkeypatch.setattr(kernels, "_failed", set())


def test_a_cache_directory_others_can_write_is_refused(tmp_path, monkeypatch):
    planted = tmp_path / "shared-cache"
    planted.mkdir()
    planted.chmod(0o777)
    _fresh_kernels(monkeypatch, planted)
    x, module = torch.randn(2, 4, 6, 6), TripletAttention()
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        y = module(x)  # the PyTorch path
    ref = TripletAttentionReference()
    ref.load_state_dict(module.state_dict())
    torch.testing.assert_close(y, ref(x), atol=1e-5, rtol=1e-5)
    assert list(planted.iterdir()) == []  # nothing built or loaded from there


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to give a folder away")
def test_a_cache_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 12345, 12345)
    _fresh_kernels(monkeypatch, foreign)
    with pytest.warns(RuntimeWarning, match="owned by uid 12345"):
        assert not ops.available("mish")


def test_default_cache_is_private_and_in_the_users_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MNV2_KERNEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_dir() == tmp_path / "xdg" / "mnv2lib"
    assert stat.S_IMODE(os.stat(build.private_cache_dir()).st_mode) == 0o700


def test_a_truncated_library_is_detected_and_rebuilt_without_crashing(tmp_path):
    cache = tmp_path / "cache"
    code = """
        import warnings, torch
        warnings.simplefilter("always")
        from mnv2lib import ops
        assert ops.available("mish")  # builds (or checks) and loads the library, defining its operators
        x = torch.randn(1000)
        torch.testing.assert_close(torch.ops.mnv2.mish(x), torch.nn.functional.mish(x))
        print("ok")
    """
    # a cache holding this process's verified library (a copy: building it again would cost 15 s)
    cache.mkdir(mode=0o700)
    built = kernels.get("mish")
    for path in (built, built.with_name(built.name + ".sha256")):
        (cache / path.name).write_bytes(path.read_bytes())
        (cache / path.name).chmod(0o700)
    library = cache / built.name
    data = library.read_bytes()
    library.write_bytes(data[: len(data) // 2])  # a truncated file: mapping it would raise SIGBUS
    result = _run(code, {"MNV2_KERNEL_CACHE": str(cache)})
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-2000:])
    assert "does not match its checksum" in result.stderr
    assert library.read_bytes() == data or len(library.read_bytes()) > len(data) // 2  # rebuilt
