"""Deployment (mnv2lib.deploy): exports to ONNX Runtime and ExecuTorch match PyTorch, with and without
torch.no_grad(); exported graphs are compact standard operators (the layers' export contract); the legacy
exporter exports correctly or raises; int8 models of both runtimes run; bad input is named."""
import collections
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from mnv2lib import build_model
from mnv2lib.engine import deploy as D
from mnv2lib.layers import SelfNorm

from conftest import build_shallow_v2

SMOKE = dict(width_mult=0.25, stem="cifar_lite", num_classes=10)
VARIANTS = {
    "v2": dict(SMOKE),
    "v2_mish": dict(SMOKE, activation="mish"),
    "v2_triplet": dict(SMOKE, attention="triplet"),
    "v2_cnsn": dict(SMOKE, cnsn="cnsn"),
    "v2_all": dict(SMOKE, activation="mish", attention="triplet", cnsn="cnsn"),
    "v1": dict(arch="mobilenet_v1", **SMOKE),
    "v4": dict(arch="mobilenet_v4_conv_small", num_classes=10),
}


def make_model(name: str, shallow: bool = False) -> nn.Module:
    """A smoke-sized model whose outputs are far from zero (random BN statistics and classifier), so
    that a 1e-4 tolerance means something; ``shallow``: a MobileNetV2 of three stages (conftest.py), whose
    XNNPACK lowering and ONNX export take a fraction of the 17 blocks' time (1-4 min a smoke network)."""
    torch.manual_seed(0)
    if shallow:
        assert name.startswith("v2"), name
        model = build_shallow_v2(**VARIANTS[name])
    else:
        model = build_model(**VARIANTS[name])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                if m.weight is not None:
                    m.weight.normal_(1.0, 0.2)
                    m.bias.normal_(0.0, 0.2)
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        linears[-1].weight.normal_(0, 1.0)
    return model.eval()


_ONNX = {}


def onnx_export(name, grad, tmp_path_factory):
    """(model, DeployedModel) of a variant exported by the dynamo exporter under the grad mode; cached."""
    if (name, grad) not in _ONNX:
        model = make_model(name, shallow=name.startswith("v2"))
        path = tmp_path_factory.mktemp("onnx") / f"{name}.onnx"
        with torch.set_grad_enabled(grad):
            _ONNX[(name, grad)] = model, D.export_onnx(model, path)
    return _ONNX[(name, grad)]


def check_against_pytorch(model, deployed, batch=4):
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = model(x)
    got = deployed(x)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.5  # a meaningful output, not near zero
    assert (got - expected).abs().max().item() <= D.PARITY_TOLERANCE


# Mish (whose export once broke under no_grad) in both grad modes, the other variants in one each
# (the suite's time budget: a Triplet or CNSN export takes ~14 s on the 2-core machine)
ONNX_CASES = [("v2_mish", True), ("v2_mish", False), ("v2_triplet", False), ("v2_cnsn", True),
              ("v2", True), ("v1", False), ("v4", True)]


@pytest.mark.parametrize("name,grad", ONNX_CASES, ids=[f"{n}-{'grad' if g else 'no_grad'}" for n, g in ONNX_CASES])
def test_onnx_export_matches_pytorch_with_standard_operators(name, grad, tmp_path_factory):
    model, deployed = onnx_export(name, grad, tmp_path_factory)
    check_against_pytorch(model, deployed)
    ops = D.onnx_op_counts(deployed.path)
    assert not [op for op in ops if "::" in op], f"custom-domain operators in the graph: {ops}"
    assert deployed.parity is not None and deployed.parity <= D.PARITY_TOLERANCE


def test_mish_exports_compactly(tmp_path_factory):
    """Mish's export adds elementwise operators only: no Gather/Reshape residue of as_strided views, and
    the same graph under no_grad as with grad."""
    _, base = onnx_export("v2", True, tmp_path_factory)
    _, mish = onnx_export("v2_mish", True, tmp_path_factory)
    _, mish_no_grad = onnx_export("v2_mish", False, tmp_path_factory)
    base_ops, mish_ops = D.onnx_op_counts(base.path), D.onnx_op_counts(mish.path)
    assert mish_ops == D.onnx_op_counts(mish_no_grad.path)
    for op in ("Gather", "Reshape", "Slice", "Expand", "Concat"):
        assert mish_ops.get(op, 0) == base_ops.get(op, 0), (op, mish_ops)
    activations = base_ops["Clip"]  # every ReLU6 of the baseline is a Mish in the variant
    # one sigmoid per Mish and no exponential: the bounded form that int8 observers can represent
    assert mish_ops.get("Sigmoid", 0) - base_ops.get("Sigmoid", 0) == activations and "Exp" not in mish_ops, mish_ops
    # no select: XNNPACK cannot delegate Where/Greater, and each one split the ExecuTorch graph
    assert mish_ops.get("Where", 0) == base_ops.get("Where", 0) and mish_ops.get("Greater", 0) == 0, mish_ops
    assert sum(mish_ops.values()) - sum(base_ops.values()) <= 8 * activations


def test_selfnorm_exports_without_var_mean(tmp_path_factory):
    """SelfNorm's statistics are Core ATen ops (ExecuTorch lowers them): no var_mean in the exported program."""
    model = make_model("v2_cnsn", shallow=True)
    program = torch.export.export(model, (torch.randn(1, 3, 32, 32),)).run_decompositions({})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "var_mean" in t], targets
    assert not [t for t in targets if not t.startswith("aten.") and "getitem" not in t], targets


def test_selfnorm_inference_exports_without_batch_norm():
    """In inference SelfNorm's gate BatchNorm is folded into its two taps: no BatchNorm without a convolution
    before it in the exported graph (for which PT2E int8 export searches conv-BN patterns, ~50 s a program),
    and the same outputs as the eager module (the C operator) and as the gates' BatchNorm modules."""
    torch.manual_seed(0)
    module = SelfNorm(8, two_gates=True).eval()
    with torch.no_grad():
        for bn in (module.g_bn, module.f_bn):
            bn.running_mean.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_(1.0, 0.3), bn.bias.normal_(0.0, 0.3)
    x = torch.randn(3, 8, 5, 5)
    program = torch.export.export(module, (x,)).run_decompositions({})
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [t for t in targets if "batch_norm" in t], targets
    with torch.no_grad():
        eager = module(x)
        mean, std = x.mean((2, 3)), x.flatten(2).var(-1, unbiased=True).add(module.eps).sqrt()
        gates = [torch.sigmoid(bn(fc(torch.stack((mean, std), -1)))).unsqueeze(-1)
                 for fc, bn in ((module.g_fc, module.g_bn), (module.f_fc, module.f_bn))]
        reference = gates[0] * (x - mean[..., None, None]) + gates[1] * mean[..., None, None]
    torch.testing.assert_close(program.module()(x), eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eager, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_legacy_exporter_exports_correctly_or_raises(grad, tmp_path):
    """The TorchScript tracer (dynamo=False) on every improvement at once: the file it writes computes the
    model (checked here on an input of another batch size with a fresh session), or it raises."""
    model = make_model("v2_all")
    path = tmp_path / "legacy.onnx"
    try:
        with torch.set_grad_enabled(grad):
            D.export_onnx(model, path, dynamo=False)
    except Exception as error:  # a loud failure is acceptable; a silent wrong file is not
        assert isinstance(error, (D.ExportMismatchError, RuntimeError, torch.jit.Error)), error
        return
    session = D.onnx_session(path)
    assert len(session.get_inputs()) == 1
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        expected = model(x)
    assert (got - expected).abs().max().item() <= D.PARITY_TOLERANCE


def test_a_wrong_export_is_caught():
    """The parity check fails on a file that does not compute the model (constant outputs, as a trace
    that missed the input would give) and on one that cannot take the input."""
    model = make_model("v1")
    constant = D.DeployedModel("onnxruntime", "fp32", lambda x: torch.zeros(x.shape[0], 10), 0)
    with pytest.raises(D.ExportMismatchError, match="max \\|diff\\|"):
        D.check_parity(constant, model, torch.randn(2, 3, 32, 32))

    def no_input(x):
        raise ValueError("the graph has no inputs")

    with pytest.raises(D.ExportMismatchError, match="cannot run"):
        D.check_parity(D.DeployedModel("onnxruntime", "fp32", no_input, 0), model, torch.randn(2, 3, 32, 32))


# XNNPACK lowering takes 8-80 s per model on the 2-core machine, so the suite lowers a shallow CNSN network
# (whose var_mean once failed to lower) and V1; MNV2_FULL_DEPLOY_TESTS=1 adds every improvement at once and V4
ET_CASES = [("v2_cnsn", False), ("v1", True)]
if os.environ.get("MNV2_FULL_DEPLOY_TESTS") == "1":
    ET_CASES += [("v2_all", True), ("v4", False)]


@pytest.mark.parametrize("name,grad", ET_CASES, ids=[f"{n}-{'grad' if g else 'no_grad'}" for n, g in ET_CASES])
def test_executorch_export_matches_pytorch(name, grad, tmp_path):
    """The model lowers to XNNPACK and its ExecuTorch program matches PyTorch."""
    model = make_model(name, shallow=name == "v2_cnsn")
    with torch.set_grad_enabled(grad):
        deployed = D.export_executorch(model, tmp_path / "model.pte")
    assert deployed.size_bytes == (tmp_path / "model.pte").stat().st_size > 0
    check_against_pytorch(model, deployed, batch=3)  # three calls of the batch-1 program


INT8_CASES = ["v2_cnsn"] + (["v1"] if os.environ.get("MNV2_FULL_DEPLOY_TESTS") == "1" else [])


@pytest.mark.parametrize("name", INT8_CASES)
def test_int8_models_of_both_runtimes_run(name, tmp_path):
    """(CNSN's int8 ExecuTorch program once failed at run time: XNNPACK's int8 mean over (H, W) returned a
    wrongly shaped tensor; SelfNorm's statistics are global average pooling now.) The bounded-batch test
    below quantizes MobileNetV2 for ExecuTorch too."""
    model = make_model(name, shallow=name.startswith("v2"))
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fp32 = D.export_onnx(model, tmp_path / "m.onnx")
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
    for int8 in (D.quantize_onnx(fp32.path, tmp_path / "m.int8.onnx", calibration),
                 D.quantize_executorch(model, calibration, tmp_path / "m.int8.pte")):
        assert int8.precision == "int8"
        assert 0 < int8.size_bytes < 0.75 * fp32.size_bytes  # int8 weights (SelfNorm's small vectors stay fp32)
        out = int8(x)
        assert out.shape == expected.shape and torch.isfinite(out).all()
        # quantized, not another model: close to fp32 relative to the logits' range
        assert (out - expected).abs().max() < 0.5 * expected.abs().max()
    assert D.latency_ms(fp32, repeats=3, warmup=1) > 0


def test_deploy_targets_records_failures_by_exception(tmp_path, monkeypatch):
    """A target that fails is returned as its exception, the others still deploy."""
    def broken(*args, **kwargs):
        raise D.DeployError("lowering failed on purpose")

    monkeypatch.setattr(D, "export_executorch", broken)
    out = D.deploy_targets(make_model("v1"), [torch.randn(4, 3, 32, 32)], tmp_path,
                           targets=[("pytorch", "fp32"), ("executorch", "fp32")])
    assert isinstance(out[("pytorch", "fp32")], D.DeployedModel)
    assert isinstance(out[("executorch", "fp32")], D.DeployError)


@pytest.mark.parametrize("kind,batch,calls", [("fixed_batch", 6, [4, 4]), ("max_batch", 9, [4, 4, 1]),
                                              ("max_batch", 3, [3])])
def test_programs_of_static_or_bounded_batch_split_the_input(kind, batch, calls):
    """A static-shape program gets padded pieces of its batch; a bounded one pieces up to its bound."""
    seen = []

    def run(x):
        seen.append(x.shape[0])
        return x.flatten(1)[:, :2] * 2

    deployed = D.DeployedModel("executorch", "fp32", run, 1, **{kind: 4})
    x = torch.randn(batch, 3, 2, 2)
    assert torch.equal(deployed(x), x.flatten(1)[:, :2] * 2)
    assert seen == calls


def test_executorch_program_with_a_bounded_dynamic_batch(tmp_path):
    """One fp32 program takes every batch from 1 to max_batch (batch-1 latency, the crossover batch and
    batched evaluation) within the parity tolerance. An int8 program with a dynamic batch is either
    consistent (a sample's output does not depend on its batch) or refused loudly: ExecuTorch 1.5's
    XNNPACK int8 programs of dynamic batch return wrong outputs for the first samples of a batch."""
    model = make_model("v2", shallow=True)
    fp32 = D.export_executorch(model, tmp_path / "m.pte", max_batch=4)
    assert fp32.max_batch == 4 and fp32.fixed_batch is None and fp32.parity <= D.PARITY_TOLERANCE
    for batch in (1, 3, 4, 6):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(x)
        assert (fp32(x) - expected).abs().max() <= D.PARITY_TOLERANCE
    reloaded = D.load_executorch(tmp_path / "m.pte", max_batch=4)
    assert torch.equal(reloaded(x), fp32(x))
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    try:
        int8 = D.quantize_executorch(model, calibration, tmp_path / "m.int8.pte", max_batch=4)
    except D.DeployError as error:
        assert "batch" in str(error) and "static shapes" in str(error)
    else:
        assert D.check_batch_consistency(int8, (3, 32, 32), 4) <= 1e-3


def test_exports_side_by_side_equal_the_serial_ones(tmp_path):
    """Two worker processes build the same files as one process; a target that fails in a worker is
    recorded by the name of its exception."""
    broken = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten()).eval()  # takes 2 channels, gets 3
    variants = {"v2": make_model("v2", shallow=True), "broken": broken}
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    targets = (("pytorch", "fp32"), ("onnxruntime", "fp32"))
    serial = D.build_deployments(variants, calibration, tmp_path / "serial", targets_of=lambda n: targets,
                                 workers=1, show_progress=False)
    parallel = D.build_deployments(variants, calibration, tmp_path / "parallel",
                                   targets_of=lambda n: targets, workers=2, show_progress=False)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert list(parallel["v2"]) == list(targets)
    for target in targets:
        assert torch.equal(serial["v2"][target](x), parallel["v2"][target](x)), target
    assert isinstance(serial["broken"][("onnxruntime", "fp32")], Exception)
    failure = parallel["broken"][("onnxruntime", "fp32")]
    assert isinstance(failure, D.BuildFailure) and failure.error_name and str(failure)


def test_bad_input_is_named(tmp_path, monkeypatch):
    model = make_model("v1")
    with pytest.raises(ValueError, match="training mode"):
        D.export_onnx(model.train(), tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="input_shape"):
        D.export_onnx(model.eval(), tmp_path / "m.onnx", input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="calibration"):
        D.quantize_executorch(model, [])
    monkeypatch.setitem(sys.modules, "executorch", None)  # as if it were not installed
    with pytest.raises(D.MissingRuntimeError, match="'executorch'"):
        D.export_executorch(model)


def test_int8_drop_table():
    import pandas as pd

    results = pd.DataFrame([
        {"variant": "relu6", "runtime": "onnxruntime", "precision": "fp32", "clean_accuracy": 0.5,
         "mean_corruption_accuracy": 0.4},
        {"variant": "relu6", "runtime": "onnxruntime", "precision": "int8", "clean_accuracy": 0.48,
         "mean_corruption_accuracy": 0.41},
        {"variant": "mish", "runtime": "onnxruntime", "precision": "fp32", "clean_accuracy": 0.5,
         "mean_corruption_accuracy": 0.4},
    ])
    drops = D.int8_drop(results)
    assert list(drops["variant"]) == ["relu6"]  # no int8 model: no drop, not a zero
    assert np.isclose(drops.iloc[0]["clean_accuracy_drop_points"], -2.0)
    assert np.isclose(drops.iloc[0]["mean_corruption_accuracy_drop_points"], 1.0)
    assert collections.Counter(drops["runtime"]) == {"onnxruntime": 1}


def test_int8_mish_keeps_its_values(tmp_path):
    """Mish's exported form has bounded intermediates, so ONNX Runtime's int8 observers keep it: the
    one-exponential form (intermediates up to ~1e17) quantized every Mish to 0 and its int8 models to chance."""
    from mnv2lib.layers.activations import Mish

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), Mish(), torch.nn.Conv2d(8, 4, 3, padding=1),
                                Mish(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    calibration = [3 * torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fp32 = D.export_onnx(model, tmp_path / "m.onnx")
    int8 = D.quantize_onnx(fp32.path, tmp_path / "m.int8.onnx", calibration)
    x = 3 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
    out = int8(x)
    assert (out - expected).abs().max() < 0.1 * expected.abs().max(), (out, expected)


def test_relu6_verdict_names_the_activations_that_lost_less():
    import pandas as pd

    from mnv2lib.analysis.prose import deployment as prose

    drops = pd.DataFrame([{"variant": v, "runtime": "onnxruntime", "clean_accuracy_drop_points": d}
                          for v, d in (("relu6", -0.6), ("relu", 0.2), ("mish", -47.7), ("silu", -0.2),
                                       ("hardswish", -0.8))])
    text = prose.describe_relu6(drops, test_images=2000)
    assert text.startswith("ReLU6 loses more than ReLU, SiLU ("), text
    best = drops.assign(clean_accuracy_drop_points=[0.5, 0.2, -47.7, -0.2, -0.8])
    assert prose.describe_relu6(best, test_images=2000).startswith("ReLU6 loses the least")


def test_the_quick_plan_names_what_it_leaves_out():
    from mnv2lib.analysis import deployment as X
    from mnv2lib.analysis.prose import deployment as prose

    quick = prose.left_out(X.deploy_plan("quick"))
    assert "SiLU" in quick and "Hardswish" in quick and "Triplet Attention" in quick
    assert prose.left_out(X.deploy_plan("gpu")) == ""


@pytest.mark.parametrize("relower", [True, False])
def test_a_fixed_batch_int8_program_is_lowered_again_for_the_crossover_only_when_the_sizes_allow(relower, monkeypatch):
    """Where int8 is slower at batch 1, both precisions are timed at the crossover batch; an int8 program
    of a fixed batch needs another lowering, which ``relower_for_crossover=False`` skips (both untimed)."""
    lowered, timed = [], []

    def program(precision, **batch):
        return D.DeployedModel("executorch", precision, lambda x: x.flatten(1)[:, :2], 1, **batch)

    monkeypatch.setattr(D, "quantize_executorch", lambda model, calibration, path, shape: lowered.append(shape)
                        or program("int8", fixed_batch=shape[0]))
    monkeypatch.setattr(D, "latency_ms", lambda deployed, shape, **kw: timed.append((deployed.precision, shape[0]))
                        or 1.0)
    deployed = {("executorch", "fp32"): program("fp32", max_batch=32), ("executorch", "int8"): program("int8", fixed_batch=1)}
    fp32_row, int8_row = {}, {}
    sizes = D.DeploySizes(crossover_batch=32, relower_for_crossover=relower)
    D._time_crossover(nn.Identity(), "executorch", deployed, fp32_row, int8_row, [], (1, 3, 32, 32), sizes)
    if relower:
        assert lowered == [(32, 3, 32, 32)] and timed == [("fp32", 32), ("int8", 32)]
        assert fp32_row["latency_ms_batch32"] == int8_row["latency_ms_batch32"] == 1.0
    else:
        assert lowered == [] and timed == [] and fp32_row == int8_row == {}
    with pytest.raises(D.DeployInputError, match="relower_for_crossover"):
        D.DeploySizes(relower_for_crossover="no")


def test_an_untimed_executorch_crossover_is_said_so():
    import pandas as pd

    from mnv2lib.analysis.prose import deployment as prose
    from mnv2lib.analysis.work_sizes import work_sizes

    rows = [("mish", "onnxruntime", "fp32", 2.2, 26.2), ("mish", "onnxruntime", "int8", 2.9, 34.1),
            ("mish", "executorch", "fp32", 1.5, float("nan")), ("mish", "executorch", "int8", 1.8, float("nan")),
            ("relu6", "executorch", "fp32", 0.46, float("nan")), ("relu6", "executorch", "int8", 0.27, float("nan"))]
    results = pd.DataFrame(rows, columns=["variant", "runtime", "precision", "latency_ms_batch1", "latency_ms_batch32"])
    text = prose.describe_latency(results, 32)
    assert "Mish in ONNX Runtime: int8 2.90 vs fp32 2.20 ms at batch 1, 34.10 vs 26.20 ms at batch 32" in text
    untimed = text.split("not timed at batch 32: ")[1]
    assert untimed.startswith("Mish in ExecuTorch (int8 1.80 vs fp32 1.50 ms)") and "ReLU6" not in untimed
    assert "not timed" not in prose.describe_latency(results[results["runtime"] != "executorch"], 32)
    assert D.DeploySizes(**work_sizes("quick", "deployment")["sizes"]).relower_for_crossover is False
