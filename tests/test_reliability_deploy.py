"""Issue 31, item 12: deployment inputs are checked up front.

``CASES`` is the table of bad inputs to ``mnv2lib.engine.deploy``: each must raise ``DeployInputError``
(a ``DeployError`` and a ``ValueError``) with a message that names the argument or the file (and, for
shapes, the shape allowed), before any runtime sees it. The tests after it cover what is accepted
(numpy and float64 calibration batches, numpy input, empty batches) and that both runtimes refuse a
wrong input alike. One shallow MobileNetV2 is exported to ONNX and one tiny network is lowered to
ExecuTorch (a few seconds), both once for the module.
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from mnv2lib.engine import deploy as D

from conftest import build_shallow_v2

IMAGE = (3, 32, 32)


class Ctx:
    """What a case may need: files and deployed models made once for the module, and a fresh folder."""

    def __init__(self, built: dict, tmp_path) -> None:
        self.__dict__.update(built)
        self.tmp = tmp_path
        self.dir = tmp_path / "a_folder"
        self.dir.mkdir()
        self.text = tmp_path / "notes.txt"  # a regular file: neither ONNX nor ExecuTorch, nor a folder
        self.text.write_text("not a model")
        self.empty = tmp_path / "empty.onnx"
        self.empty.write_bytes(b"")

    def quantize(self, calibration=None, **kwargs):
        kwargs.setdefault("path", self.tmp / "q.onnx")
        cal = [torch.randn(4, *IMAGE)] if calibration is None else calibration
        return D.quantize_onnx(kwargs.pop("fp32_path", self.onnx_path), kwargs.pop("path"), cal, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("deploy_inputs")
    model = build_shallow_v2(width_mult=0.25, stem="cifar_lite", num_classes=10).eval()
    onnx = D.export_onnx(model, root / "m.onnx")
    # the smallest network that lowers to XNNPACK in seconds; a bounded dynamic batch, whose program
    # once ran inputs of another height and width without a word
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    et = D.export_executorch(tiny, root / "t.pte", (1, 3, 8, 8), max_batch=4)
    return dict(model=model, onnx=onnx, onnx_path=root / "m.onnx", tiny=tiny, et=et, et_path=root / "t.pte",
                tiny_onnx=D.export_onnx(tiny, root / "tiny.onnx", (1, 3, 8, 8)))


def _dataset(**kwargs):
    return types.SimpleNamespace(**{"test_images": torch.zeros(2, *IMAGE, dtype=torch.uint8),
                                    "train_labels": torch.zeros(8, dtype=torch.long), **kwargs})


# (id, call, words the message must contain: the argument or file, and what is allowed); {tmp}, {dir},
# {text} and {onnx} in a word stand for the case's paths
CASES = [
    # quantize_onnx: calibration batches
    ("calibration_wrong_size", lambda c: c.quantize([torch.randn(4, 3, 16, 16)]),
     ["calibration[0]", "(4, 3, 16, 16)", "(N, 3, 32, 32)"]),
    ("calibration_wrong_channels", lambda c: c.quantize([torch.randn(4, 3, 32, 32), torch.randn(4, 1, 32, 32)]),
     ["calibration[1]", "(N, 3, 32, 32)"]),
    ("calibration_uint8", lambda c: c.quantize([torch.zeros(4, *IMAGE, dtype=torch.uint8)]),
     ["calibration[0]", "uint8", "floating-point"]),
    ("calibration_numpy_int", lambda c: c.quantize([np.zeros((4, *IMAGE), np.int64)]),
     ["calibration[0]", "int64", "floating-point"]),
    ("calibration_3d", lambda c: c.quantize([torch.randn(*IMAGE)]), ["calibration[0]", "(N, 3, 32, 32)"]),
    ("calibration_empty_batch", lambda c: c.quantize([torch.randn(0, *IMAGE)]), ["calibration[0]", "N >= 1"]),
    ("calibration_nan", lambda c: c.quantize([torch.full((2, *IMAGE), float("nan"))]), ["calibration[0]", "NaN"]),
    ("calibration_none", lambda c: c.quantize([]), ["calibration", "non-empty list"]),
    ("calibration_one_tensor", lambda c: c.quantize(torch.randn(4, *IMAGE)), ["calibration", "wrap it in a list"]),
    ("calibration_strings", lambda c: c.quantize(["a.png"]), ["calibration[0]", "str"]),
    # quantize_onnx: files and options
    ("quantize_not_onnx", lambda c: c.quantize(fp32_path=c.text), ["fp32_path", "{text}", "not an ONNX model"]),
    ("quantize_empty_file", lambda c: c.quantize(fp32_path=c.empty), ["fp32_path", "{tmp}/empty.onnx"]),
    ("quantize_missing", lambda c: c.quantize(fp32_path=c.tmp / "nope.onnx"), ["fp32_path", "does not exist"]),
    ("quantize_from_folder", lambda c: c.quantize(fp32_path=c.dir), ["fp32_path", "{dir}", "a directory"]),
    ("quantize_to_folder", lambda c: c.quantize(path=c.dir), ["path", "{dir}", "a directory", "model.int8.onnx"]),
    ("quantize_under_file", lambda c: c.quantize(path=c.text / "q.onnx"), ["path", "{text}", "regular file"]),
    ("quantize_onto_itself", lambda c: c.quantize(path=c.onnx_path), ["path", "fp32_path itself"]),
    ("quantize_per_channel", lambda c: c.quantize(per_channel="yes"), ["per_channel", "True or False"]),
    ("quantize_threads", lambda c: c.quantize(threads=-1), ["threads", ">= 0"]),
    # export_onnx, onnx_session, onnx_op_counts
    ("export_onnx_to_folder", lambda c: D.export_onnx(c.model, c.dir), ["path", "{dir}", "a directory"]),
    ("export_onnx_under_file", lambda c: D.export_onnx(c.model, c.text / "m.onnx"), ["path", "{text}", "regular file"]),
    ("export_onnx_tolerance", lambda c: D.export_onnx(c.model, c.tmp / "m.onnx", tolerance=float("nan")),
     ["tolerance", ">= 0"]),
    ("export_onnx_shape_number", lambda c: D.export_onnx(c.model, c.tmp / "m.onnx", input_shape=32),
     ["input_shape", "4 positive integers"]),
    ("export_onnx_path_none", lambda c: D.export_onnx(c.model, None), ["path", "a file path"]),
    ("onnx_session_not_onnx", lambda c: D.onnx_session(c.text), ["path", "{text}", "not an ONNX model"]),
    ("onnx_op_counts_not_onnx", lambda c: D.onnx_op_counts(c.text), ["path", "{text}", "not an ONNX model"]),
    ("onnx_op_counts_missing", lambda c: D.onnx_op_counts(c.tmp / "nope.onnx"), ["path", "does not exist"]),
    # the ONNX module called with a wrong input
    ("onnx_forward_wrong_size", lambda c: c.onnx(torch.randn(2, 3, 16, 16)), ["x", "(2, 3, 16, 16)", "(N, 3, 32, 32)"]),
    ("onnx_forward_wrong_channels", lambda c: c.onnx(torch.randn(2, 1, 32, 32)), ["x", "(N, 3, 32, 32)"]),
    ("onnx_forward_3d", lambda c: c.onnx(torch.randn(*IMAGE)), ["x", "(N, 3, 32, 32)"]),
    ("onnx_forward_uint8", lambda c: c.onnx(torch.zeros(1, *IMAGE, dtype=torch.uint8)), ["x", "uint8"]),
    ("onnx_forward_list", lambda c: c.onnx([[0.0]]), ["x", "list", "torch.Tensor"]),
    # the ExecuTorch module called with a wrong input (its program takes (N <= 4, 3, 8, 8))
    ("et_forward_wrong_size", lambda c: c.et(torch.randn(2, 3, 9, 9)), ["x", "(2, 3, 9, 9)", "(N, 3, 8, 8)"]),
    ("et_forward_wrong_channels", lambda c: c.et(torch.randn(2, 1, 8, 8)), ["x", "(N, 3, 8, 8)"]),
    ("et_forward_uint8", lambda c: c.et(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), ["x", "uint8"]),
    # load_executorch
    ("load_et_not_program", lambda c: D.load_executorch(c.text), ["program", "{text}", "not an ExecuTorch program"]),
    ("load_et_bytes", lambda c: D.load_executorch(b"\0" * 64), ["program", "the bytes given"]),
    ("load_et_missing", lambda c: D.load_executorch(c.tmp / "nope.pte"), ["program", "does not exist"]),
    ("load_et_folder", lambda c: D.load_executorch(c.dir), ["program", "{dir}", "a directory"]),
    ("load_et_type", lambda c: D.load_executorch(3), ["program", "int", ".pte"]),
    ("load_et_fixed_batch", lambda c: D.load_executorch(c.et_path, fixed_batch=2), ["fixed_batch", "(4, 3, 8, 8)"]),
    ("load_et_max_batch", lambda c: D.load_executorch(c.et_path, max_batch=8), ["max_batch", "max_batch=4"]),
    ("load_et_both_batches", lambda c: D.load_executorch(c.et_path, fixed_batch=4, max_batch=4),
     ["fixed_batch, max_batch", "at most one"]),
    ("load_et_precision", lambda c: D.load_executorch(c.et_path, "int4"), ["precision", "'int8'"]),
    ("load_et_threads", lambda c: D.load_executorch(c.et_path, threads=-2), ["threads", ">= 0"]),
    # export_executorch, quantize_executorch: checked before lowering
    ("export_et_to_folder", lambda c: D.export_executorch(c.tiny, c.dir, (1, 3, 8, 8)), ["path", "{dir}", "model.pte"]),
    ("export_et_under_file", lambda c: D.export_executorch(c.tiny, c.text / "m.pte", (1, 3, 8, 8)),
     ["path", "{text}", "regular file"]),
    ("export_et_max_batch", lambda c: D.export_executorch(c.tiny, None, (1, 3, 8, 8), max_batch=0), ["max_batch"]),
    ("export_et_training_mode", lambda c: D.export_executorch(nn.Conv2d(3, 3, 1), None), ["model", "eval mode"]),
    ("quantize_et_channels", lambda c: D.quantize_executorch(c.tiny, [torch.randn(2, 1, 8, 8)], None, (1, 3, 8, 8)),
     ["calibration[0]", "(N, 3, 8, 8)"]),
    ("quantize_et_numpy_int", lambda c: D.quantize_executorch(c.tiny, [np.zeros((2, 3, 8, 8), np.uint8)], None,
                                                              (1, 3, 8, 8)), ["calibration[0]", "uint8"]),
    ("quantize_et_to_folder", lambda c: D.quantize_executorch(c.tiny, [torch.randn(2, 3, 8, 8)], c.dir, (1, 3, 8, 8)),
     ["path", "{dir}", "a directory"]),
    # the measurements and the study
    ("latency_no_repeats", lambda c: D.latency_ms(c.onnx, repeats=0), ["repeats", ">= 1"]),
    ("latency_numpy_shape_ok_bad_warmup", lambda c: D.latency_ms(c.onnx, (np.int64(1), 3, 32, 32), warmup=-1),
     ["warmup", ">= 0"]),
    ("example_input_seed", lambda c: D.example_input((1, *IMAGE), seed="0"), ["seed", "integer"]),
    ("batch_consistency_batch", lambda c: D.check_batch_consistency(c.onnx, IMAGE, 0), ["batch", ">= 1"]),
    ("batch_consistency_shape", lambda c: D.check_batch_consistency(c.onnx, (1, *IMAGE), 2),
     ["sample_shape", "3 positive integers"]),
    ("sizes_severity", lambda c: D.DeploySizes(severities=(0, 3)), ["severities", "(1, 2, 3, 4, 5)"]),
    ("sizes_no_severity", lambda c: D.DeploySizes(severities=()), ["severities", "non-empty"]),
    ("sizes_test_images", lambda c: D.DeploySizes(test_images=0), ["test_images", ">= 1"]),
    ("calibration_batches_batch_size", lambda c: D.calibration_batches(_dataset(), 4, batch_size=0),
     ["batch_size", ">= 1"]),
    ("calibration_batches_images", lambda c: D.calibration_batches(_dataset(), 9), ["calibration images", "1 .. 8"]),
    ("deploy_targets_one_pair", lambda c: D.deploy_targets(c.model, [], c.tmp / "w", targets=("onnxruntime", "fp32")),
     ["targets", "wrap it in a list"]),
    ("deploy_targets_unknown", lambda c: D.deploy_targets(c.model, [], c.tmp / "w", targets=[("onnx", "fp32")]),
     ["targets", "('onnx', 'fp32')", "allowed values"]),
    ("deploy_targets_work_dir_file", lambda c: D.deploy_targets(c.model, [], c.text), ["work_dir", "{text}"]),
    ("deploy_targets_calibration", lambda c: D.deploy_targets(c.model, [torch.randn(2, 1, 32, 32)], c.tmp / "w",
                                                              targets=[("onnxruntime", "int8")]),
     ["calibration[0]", "(N, 3, 32, 32)"]),
    ("build_variant_name", lambda c: D.build_deployments({"../up": c.model}, [], c.tmp / "w"), ["variants", "'../up'"]),
    ("build_variant_model", lambda c: D.build_deployments({"v2": "model.pt"}, [], c.tmp / "w"), ["variants['v2']"]),
    ("build_targets_of", lambda c: D.build_deployments({"v2": c.model}, [], c.tmp / "w",
                                                       targets_of=lambda n: [("tflite", "int8")]),
     ["targets_of('v2')", "tflite"]),
    ("build_workers", lambda c: D.build_deployments({"v2": c.model}, [], c.tmp / "w", workers=0), ["workers", ">= 1"]),
    ("study_executorch_variants", lambda c: D.deployment_study({"v2": c.model}, _dataset(), None, work_dir=c.tmp,
                                                               executorch_variants=["v3"]),
     ["executorch_variants", "'v3'", "('v2',)"]),
    ("study_executorch_variants_str", lambda c: D.deployment_study({"v2": c.model}, _dataset(), None, work_dir=c.tmp,
                                                                   executorch_variants="v2"),
     ["executorch_variants", "sequence"]),
    ("study_input_shape", lambda c: D.deployment_study({"v2": c.model}, _dataset(), None, input_shape=(1, 3, 64, 64)),
     ["input_shape", "(N, 3, 32, 32)"]),
    ("study_no_variants", lambda c: D.deployment_study({}, _dataset(), None), ["variants", "at least one"]),
    ("study_sizes", lambda c: D.deployment_study({"v2": c.model}, _dataset(), None, sizes={"test_images": 5}),
     ["sizes", "DeploySizes"]),
    ("int8_drop_columns", lambda c: D.int8_drop(__import__("pandas").DataFrame({"variant": ["a"]})),
     ["results", "'runtime'"]),
    ("deployed_model_batches", lambda c: D.DeployedModel("onnxruntime", "fp32", lambda x: x, 0, fixed_batch=2,
                                                         max_batch=4), ["fixed_batch, max_batch"]),
    ("deployed_model_target", lambda c: D.DeployedModel("tflite", "fp32", lambda x: x, 0), ["runtime, precision"]),
]


def test_the_error_is_both_a_deploy_error_and_a_value_error():
    assert issubclass(D.DeployInputError, D.DeployError) and issubclass(D.DeployInputError, ValueError)


@pytest.mark.parametrize("call,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_by_name(call, words, built, tmp_path):
    ctx = Ctx(built, tmp_path)
    with pytest.raises(D.DeployInputError) as info:
        call(ctx)
    message = str(info.value)
    for word in words:
        word = word.format(tmp=tmp_path, dir=ctx.dir, text=ctx.text, onnx=ctx.onnx_path)
        assert word in message, (word, message)


def test_a_refused_export_leaves_nothing_behind(built, tmp_path):
    """Paths are checked before the export: no folder is created for an export that cannot be written."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(D.DeployInputError):
        D.export_executorch(built["tiny"], tmp_path / "new" / "file" / "x" / "m.pte", (1, 3, 8, 8), max_batch=0)
    assert not (tmp_path / "new").exists()


def test_numpy_and_float64_calibration_batches_are_converted(built, tmp_path):
    cal = [np.random.default_rng(0).standard_normal((4, *IMAGE)).astype(np.float32),
           torch.randn(4, *IMAGE, dtype=torch.float64)]
    int8 = D.quantize_onnx(built["onnx_path"], tmp_path / "q.onnx", cal)
    assert int8.precision == "int8" and int8.sample_shape == IMAGE
    assert torch.isfinite(int8(torch.randn(2, *IMAGE))).all()


@pytest.mark.parametrize("runtime", ["onnx", "et"])
def test_both_runtimes_take_numpy_float64_and_empty_batches(runtime, built):
    deployed, shape = (built["onnx"], IMAGE) if runtime == "onnx" else (built["et"], (3, 8, 8))
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    expected = deployed(x)
    assert torch.equal(deployed(x.numpy()), expected)
    assert torch.equal(deployed(x.double()), expected)
    assert deployed(x[:0]).shape == (0, *expected.shape[1:])


@pytest.mark.parametrize("x", [torch.randn(2, 3, 9, 9), torch.randn(2, 1, 8, 8), torch.randn(3, 8, 8)],
                         ids=["size", "channels", "rank"])
def test_both_runtimes_refuse_a_wrong_input_alike(x, built):
    """The same wrong input raises the same error type from ONNX Runtime's module as from ExecuTorch's."""
    errors = []
    for deployed in (built["tiny_onnx"], built["et"]):
        with pytest.raises(D.DeployInputError, match=r"x: got shape .* allowed: \(N, 3, 8, 8\)") as info:
            deployed(x)
        errors.append(type(info.value))
    assert errors[0] is errors[1]


def test_a_program_loaded_without_batch_arguments_takes_any_batch(built):
    """Its planned batch is read from the program (padded pieces of it), and so is its input shape."""
    loaded = D.load_executorch(built["et_path"])
    assert loaded.fixed_batch == 4 and loaded.sample_shape == (3, 8, 8)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loaded(x), built["et"](x), atol=1e-6)
    assert torch.equal(D.load_executorch(bytearray(built["et_path"].read_bytes()), max_batch=4)(x), built["et"](x))
