"""Deployment: any eval-mode workbook model to ONNX Runtime and ExecuTorch (XNNPACK), fp32 and int8.

- :func:`export_onnx`: ``torch.onnx.export`` (the dynamo exporter by default; ``dynamo=False`` is the
  legacy TorchScript tracer) and an ONNX Runtime session.
- :func:`quantize_onnx`: ONNX Runtime static quantization (QDQ, per-channel int8 weights) calibrated
  on training images.
- :func:`export_executorch`: ``torch.export`` lowered with the XNNPACK partitioner into an ExecuTorch
  program, run by ExecuTorch's runtime.
- :func:`quantize_executorch`: PT2E quantization (``torchao.quantization.pt2e`` with ExecuTorch's
  XNNPACK quantizer: per-channel symmetric int8), calibrated on training images, lowered the same way.

Every export is checked against PyTorch on an input other than the one it was traced with (fp32:
max |diff| <= 1e-4); a mismatch raises :class:`ExportMismatchError`, so no exporter can hand back a
silently wrong file (a graph with constant-folded outputs or no inputs fails the check).

Each result is a :class:`DeployedModel`, an ``nn.Module`` whose forward runs the runtime, so the
project's own evaluation (``train.evaluate``, ``corruptions.evaluate_corruptions``) measures it
unchanged. :func:`deployment_study` runs every target for a set of trained variants and records the
exception of each one that fails, by name, in a table: nothing is skipped silently.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import logging
import numbers
import os
import statistics
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

# (runtime, precision) in the order of every table and figure
TARGETS = (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8"),
           ("executorch", "fp32"), ("executorch", "int8"))
RUNTIMES = ("pytorch", "onnxruntime", "executorch")
PARITY_TOLERANCE = 1e-4   # fp32 max |diff| against PyTorch
RUNTIME_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
                    "executorch": "executorch", "torchao": "torchao"}


class DeployError(RuntimeError):
    """A model could not be exported, quantized or run by a deployment runtime."""


class ExportMismatchError(DeployError):
    """An exported model's outputs differ from PyTorch's by more than the tolerance."""


class MissingRuntimeError(ImportError):
    """A package that a deployment runtime needs is not installed; the message names it."""


class DeployInputError(DeployError, ValueError):
    """A bad argument, file or input batch, refused before any runtime sees it; the message names the
    argument or file and what is allowed. A DeployError (as a runtime's failure) and a ValueError (as
    every other argument check of the workbook), so either ``except`` catches it."""


def _integer(value, argument: str, minimum: int, allowed: str | None = None, none_ok: bool = False) -> int | None:
    """``value`` as an int (numpy integers too) >= ``minimum``, or DeployInputError naming ``argument``."""
    if value is None and none_ok:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < minimum:
        allowed = allowed or f"{'None or ' if none_ok else ''}an integer >= {minimum}"
        raise DeployInputError(f"{argument}: got {value!r}; allowed: {allowed}")
    return int(value)


def _check_threads(threads) -> int | None:
    # 0 and None both mean torch's thread count (ONNX Runtime's convention for 0); a negative count
    # would reach the runtimes' thread pools unchecked
    return _integer(threads, "threads", 0, "None or an integer >= 0 (0, None: torch's thread count)", none_ok=True)


def _check_tolerance(tolerance) -> float:
    if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not 0 <= tolerance < float("inf"):
        raise DeployInputError(f"tolerance: got {tolerance!r}; allowed: a finite number >= 0 (max |diff| to PyTorch)")
    return float(tolerance)


def _path_arg(path, argument: str) -> Path:
    if isinstance(path, (bytes, bytearray)) or not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise DeployInputError(f"{argument}: got {path!r}; allowed: a file path (str or os.PathLike)")
    return Path(path)


def _input_file(path, argument: str, kind: str) -> Path:
    """An existing regular file, or DeployInputError naming ``argument`` and the file."""
    path = _path_arg(path, argument)
    if not path.exists():
        raise DeployInputError(f"{argument}: {path} does not exist; allowed: an existing {kind} file")
    if not path.is_file():
        raise DeployInputError(f"{argument}: {path} is {'a directory' if path.is_dir() else 'not a regular file'}; "
                               f"allowed: an existing {kind} file")
    return path


def _output_path(path, argument: str, directory: bool = False, example: str = "model") -> Path:
    """A path that can be written (as a file, or with ``directory`` as a folder): checked before any slow
    export, without creating anything, so that a bad path fails at once and by name, not as an OS error
    after minutes of lowering."""
    path = _path_arg(path, argument)
    kind = "folder" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise DeployInputError(f"{argument}: {path} is {'a directory' if path.is_dir() else 'a regular file'}; "
                               f"allowed: a {kind} path" + ("" if directory else f" (e.g. {path / example})"))
    existing = path if directory and path.exists() else path.parent
    while not existing.exists():  # the nearest existing ancestor, which the export's mkdir starts from
        existing = existing.parent
    if not existing.is_dir():
        raise DeployInputError(f"{argument}: {path} lies under {existing}, which is a regular file, not a folder; "
                               f"allowed: a {kind} path whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DeployInputError(f"{argument}: {path} cannot be written: the folder {existing} is not writable")
    return path


def _make_parent(path: Path, argument: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. a file appeared there since the check
        raise DeployInputError(f"{argument}: cannot create the folder {path.parent} ({error})") from error


def _shape_text(sample_shape, batch=None) -> str:
    dims = ["N" if batch is None else str(batch)] + ["?" if d is None else str(d) for d in sample_shape]
    return f"({', '.join(dims)})"


def _as_batch(x, argument: str, sample_shape=None, batch: int | None = None, empty_ok: bool = True,
              model: str = "the model") -> torch.Tensor:
    """``x`` as a float32 CPU tensor (N, *sample_shape) (numpy arrays converted), or DeployInputError naming
    ``argument``, what it got and the shape allowed. ``sample_shape``: the input without its batch (None
    for a dimension of any size; None altogether: any (N, C, H, W)); ``batch``: the one batch allowed."""
    expected = _shape_text(sample_shape if sample_shape is not None else ("C", "H", "W"), batch)
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise DeployInputError(f"{argument}: got a numpy array of dtype {x.dtype}; allowed: a floating-point "
                                   f"array {expected} (normalized images, as the model was trained on)")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif not isinstance(x, torch.Tensor):
        raise DeployInputError(f"{argument}: got {type(x).__name__}; allowed: a torch.Tensor or numpy array "
                               f"{expected}")
    elif not x.is_floating_point():
        raise DeployInputError(f"{argument}: got a tensor of dtype {x.dtype}; allowed: a floating-point tensor "
                               f"{expected} (normalized images, as the model was trained on; not uint8 pixels)")
    rank = 4 if sample_shape is None else 1 + len(sample_shape)
    if (x.dim() != rank or sample_shape is not None and any(d is not None and d != n for d, n in
                                                              zip(sample_shape, x.shape[1:]))
            or batch is not None and x.shape[0] != batch):
        raise DeployInputError(f"{argument}: got shape {tuple(x.shape)}; allowed: {expected}, the input of {model}")
    if not empty_ok and x.shape[0] == 0:
        raise DeployInputError(f"{argument}: got an empty batch {tuple(x.shape)}; allowed: {expected} with N >= 1")
    return x.detach().to("cpu", torch.float32).contiguous()


def _check_calibration(calibration, sample_shape, batch: int | None = None, model: str = "the model"
                       ) -> list[torch.Tensor]:
    """The calibration batches as float32 tensors, each checked up front (shape, dtype, finite values):
    the quantizers would otherwise fail deep inside a runtime, or calibrate on NaN ranges silently."""
    allowed = f"a non-empty list of {_shape_text(sample_shape, batch)} float tensors or numpy arrays"
    if isinstance(calibration, (torch.Tensor, np.ndarray, str, bytes)) or not hasattr(calibration, "__iter__"):
        raise DeployInputError(f"calibration: got {type(calibration).__name__}; allowed: {allowed} (a single batch: "
                               "wrap it in a list)")
    batches = list(calibration)
    if not batches:
        raise DeployInputError(f"calibration: got no batches; allowed: {allowed}")
    out = [_as_batch(b, f"calibration[{i}]", sample_shape, batch, empty_ok=False, model=model)
           for i, b in enumerate(batches)]
    for i, b in enumerate(out):
        if not torch.isfinite(b).all():
            raise DeployInputError(f"calibration[{i}]: has NaN or infinite values; allowed: finite normalized images "
                                   "(int8 ranges are taken from them)")
    return out


def _require(module: str, purpose: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = RUNTIME_PACKAGES.get(module.split(".")[0], module.split(".")[0])
        raise MissingRuntimeError(f"{purpose} needs the package {package!r} (pip install {package}, or "
                                  f"`make install`): importing {module} failed ({error})") from error


def check_eval_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: got {type(model).__name__}; allowed: a torch.nn.Module")
    if model.training:
        raise DeployInputError("model: got a model in training mode; allowed: eval mode (call model.eval() first: "
                               "CrossNorm and batch statistics belong to training, not to a deployed model)")


def _check_shape(input_shape, argument: str = "input_shape", length: int = 4,
                 names: str = "batch, channels, height, width") -> tuple[int, ...]:
    try:
        shape = tuple(input_shape)
    except TypeError:  # a bare number
        shape = ()
    if len(shape) != length or not all(isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_))
                                       and s >= 1 for s in shape):
        raise DeployInputError(f"{argument}: got {input_shape!r}; allowed: {length} positive integers ({names})")
    return tuple(int(s) for s in shape)


def example_input(input_shape, seed: int = 0) -> torch.Tensor:
    """Standard-normal input of ``input_shape`` (what normalized images look like), reproducible."""
    seed = _integer(seed, "seed", 0)
    return torch.randn(_check_shape(input_shape), generator=torch.Generator().manual_seed(seed))


class DeployedModel(nn.Module):
    """A model in a runtime, as an ``nn.Module`` taking and returning float32 CPU tensors.

    ``runtime``, ``precision``, ``size_bytes`` (the serialized model: .onnx file, .pte program, or the
    PyTorch state dict) and ``path`` describe it. ``fixed_batch``: the one batch size a program with
    static shapes takes (forward splits other batches and pads the last piece); ``max_batch``: the
    bound of a program whose batch dimension is dynamic up to a bound (forward splits larger batches);
    both None where any batch goes. ``parity`` is the max |diff| to PyTorch found by the export check
    (None where not checked). ``sample_shape``: the input without its batch, e.g. (3, 32, 32) (None for a
    dimension of any size), which forward checks so that every runtime refuses a wrong input alike, with
    a DeployInputError naming the shape it takes; None: any (N, C, H, W)."""

    def __init__(self, runtime: str, precision: str, run: Callable[[torch.Tensor], torch.Tensor],
                 size_bytes: int, path: Path | None = None, fixed_batch: int | None = None,
                 parity: float | None = None, max_batch: int | None = None, sample_shape=None) -> None:
        super().__init__()
        if (runtime, precision) not in TARGETS:
            raise DeployInputError(f"runtime, precision: got {(runtime, precision)!r}; allowed values are {TARGETS}")
        if not callable(run):
            raise DeployInputError(f"run: got {type(run).__name__}; allowed: a callable taking a tensor")
        fixed_batch = _integer(fixed_batch, "fixed_batch", 1, none_ok=True)
        max_batch = _integer(max_batch, "max_batch", 1, none_ok=True)
        if fixed_batch is not None and max_batch is not None:
            raise DeployInputError(f"fixed_batch, max_batch: got {fixed_batch} and {max_batch}; allowed: at most one "
                                   "(a program's batch is either static or bounded)")
        self.runtime, self.precision, self.size_bytes, self.path = runtime, precision, size_bytes, path
        self.fixed_batch, self.max_batch, self.parity = fixed_batch, max_batch, parity
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.__dict__["_run"] = run  # not a submodule: an exported graph module must not be put in eval()
        self.eval()

    def extra_repr(self) -> str:
        return f"runtime={self.runtime!r}, precision={self.precision!r}, size_bytes={self.size_bytes}"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_batch(x, "x", self.sample_shape, model=f"this {self.runtime} {self.precision} model")
        size = self.fixed_batch or self.max_batch
        if size is None or x.shape[0] == size or self.fixed_batch is None and x.shape[0] < size:
            return self._run(x)
        outputs = []
        for chunk in x.split(size):
            n = chunk.shape[0]
            if self.fixed_batch is not None and n < size:  # samples are independent in eval mode: zeros fill
                chunk = torch.cat([chunk, chunk.new_zeros(size - n, *chunk.shape[1:])])  # the program's batch
            outputs.append(self._run(chunk.contiguous())[:n])
        return torch.cat(outputs)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return (a.double() - b.double()).abs().max().item()


def check_parity(deployed: DeployedModel, model: nn.Module, inputs: torch.Tensor,
                 tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |diff| between ``deployed`` and ``model`` on ``inputs``; ExportMismatchError above ``tolerance``."""
    tolerance = _check_tolerance(tolerance)  # a negative or NaN one would fail every export as a "mismatch"
    with torch.no_grad():
        expected = model(inputs)
    try:
        got = deployed(inputs)
    except Exception as error:  # a graph that cannot take the input (no inputs, wrong shape) is wrong too
        raise ExportMismatchError(f"{deployed.runtime} {deployed.precision} export cannot run on an input of "
                                  f"shape {tuple(inputs.shape)}: {type(error).__name__}: {error}") from error
    diff = _max_abs_diff(got, expected)
    if not diff <= tolerance:  # NaN fails too
        raise ExportMismatchError(
            f"{deployed.runtime} {deployed.precision} export differs from PyTorch: max |diff| {diff:.3g} > "
            f"{tolerance:g} (output shape {tuple(got.shape)} vs {tuple(expected.shape)}, largest |output| "
            f"{expected.abs().max().item():.3g}); the exported file is not a faithful copy of the model")
    deployed.parity = diff
    return diff


def _check_inputs(input_shape, dynamic_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(trace input, check input): the check uses another input, and another batch size where the
    export takes any, so that a graph with baked-in outputs or a fixed batch cannot pass."""
    shape = _check_shape(input_shape)
    if not dynamic_batch:
        return example_input(shape, seed=0), example_input(shape, seed=1)
    # batch 2 to trace: torch.export specializes a dimension of size 1 (it cannot then be dynamic)
    return example_input((2, *shape[1:]), seed=0), example_input((3, *shape[1:]), seed=1)


# ----------------------------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------------------------

def onnx_session(path: str | os.PathLike, threads: int | None = None, argument: str = "path"):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's thread count); a
    file that is missing or that ONNX Runtime cannot open raises DeployInputError naming it."""
    ort = _require("onnxruntime", "ONNX Runtime")
    path = _input_file(path, argument, "ONNX")
    options = ort.SessionOptions()
    options.intra_op_num_threads = _check_threads(threads) or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except MemoryError:
        raise
    except Exception as error:  # onnxruntime's own classes (InvalidProtobuf, InvalidArgument, ...) name no argument
        raise DeployInputError(f"{argument}: {path} is not an ONNX model that ONNX Runtime can open "
                               f"({type(error).__name__}: {_first_line(error)})") from error


def _onnx_input(session, path: Path, argument: str, error: type = DeployInputError):
    """(name, fixed batch or None, sample shape) of a session's one float input."""
    inputs = session.get_inputs()
    if len(inputs) != 1:  # ``error``: ExportMismatchError for a file just exported
        raise error(f"{argument}: ONNX model {path} has {len(inputs)} inputs; a workbook model has one "
                    "(a traced graph without inputs computes constants)")
    dims = [d if isinstance(d, int) and d >= 1 else None for d in inputs[0].shape]  # names: dynamic dimensions
    if inputs[0].type != "tensor(float)" or len(dims) != 4:
        raise DeployInputError(f"{argument}: ONNX model {path} takes {inputs[0].type} of rank {len(dims)}; "
                               "allowed: a model of one float32 (N, C, H, W) input")
    return inputs[0].name, dims[0], tuple(dims[1:])


def _onnx_deployed(path: Path, precision: str, threads: int | None = None, argument: str = "path") -> DeployedModel:
    session = onnx_session(path, threads, argument)
    name, fixed, sample_shape = _onnx_input(session, path, argument, ExportMismatchError)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return DeployedModel("onnxruntime", precision, run, path.stat().st_size, path, fixed_batch=fixed,
                         sample_shape=sample_shape)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape=(1, 3, 32, 32), dynamo: bool = True,
                check: bool = True, tolerance: float = PARITY_TOLERANCE, threads: int | None = None) -> DeployedModel:
    """Export ``model`` (eval mode) to ONNX at ``path`` (batch dimension dynamic) and open it in ONNX Runtime.

    ``dynamo=True``: ``torch.export``-based exporter (opset 20 and up, onnxscript optimizer);
    ``dynamo=False``: the legacy TorchScript tracer. With ``check`` the file is compared with PyTorch
    on a fresh input of another batch size; ExportMismatchError above ``tolerance``."""
    check_eval_model(model)
    _require("onnx", "ONNX export")
    path = _output_path(path, "path", example="model.onnx")
    tolerance, threads = _check_tolerance(tolerance), _check_threads(threads)
    trace_input, check_input = _check_inputs(input_shape, dynamic_batch=True)
    _make_parent(path, "path")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes; failures raise
        if dynamo:
            _require("onnxscript", "The dynamo ONNX exporter")
            batch = torch.export.Dim("batch", min=1, max=4096)
            with redirect_stdout(io.StringIO()):  # its progress lines
                program = torch.onnx.export(model, (trace_input,), dynamo=True, verbose=False,
                                            dynamic_shapes=({0: batch},))
            program.save(str(path))
        else:
            torch.onnx.export(model, (trace_input,), str(path), dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    deployed = _onnx_deployed(path, "fp32", threads)
    if check:
        check_parity(deployed, model, check_input, tolerance)
    return deployed


@contextlib.contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class _Batches:
    """ONNX Runtime's CalibrationDataReader protocol over a list of float32 batches."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self._items = iter([{name: b.numpy()} for b in batches])

    def get_next(self):
        return next(self._items, None)


def quantize_onnx(fp32_path: str | os.PathLike, path: str | os.PathLike, calibration: list[torch.Tensor],
                  per_channel: bool = True, threads: int | None = None) -> DeployedModel:
    """ONNX Runtime static int8 quantization of an fp32 ONNX file: QDQ format, int8 weights (per output
    channel), uint8 activations with min-max ranges from the ``calibration`` batches (training images,
    normalized as the model sees them; never test images): tensors or numpy arrays of the file's input
    shape, of any float dtype (converted to float32). Everything is checked before ONNX Runtime runs:
    a bad file, path or batch raises DeployInputError naming it and what is allowed."""
    _require("onnxruntime", "ONNX Runtime quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path = _input_file(fp32_path, "fp32_path", "ONNX")
    path = _output_path(path, "path", example="model.int8.onnx")
    if path.exists() and path.resolve() == fp32_path.resolve():
        raise DeployInputError(f"path: {path} is fp32_path itself; allowed: another file (the fp32 model is read "
                               "while the int8 one is written)")
    if not isinstance(per_channel, (bool, np.bool_)):
        raise DeployInputError(f"per_channel: got {per_channel!r}; allowed: True or False")
    threads = _check_threads(threads)
    name, batch, sample_shape = _onnx_input(onnx_session(fp32_path, 1, "fp32_path"), fp32_path, "fp32_path")
    calibration = _check_calibration(calibration, sample_shape, batch, model=f"the ONNX model {fp32_path}")
    _make_parent(path, "path")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference and graph optimization first, as ONNX Runtime recommends before quantizing
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), warnings.catch_warnings(), \
                _quiet_root_logger():  # per-weight notes on the 1-D BatchNorm weights of SelfNorm
            warnings.simplefilter("ignore")
            quantize_static(str(prepared), str(path), _Batches(name, calibration), quant_format=QuantFormat.QDQ,
                            per_channel=bool(per_channel), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return _onnx_deployed(path, "int8", threads)


# ----------------------------------------------------------------------------------------------
# ExecuTorch (XNNPACK)
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _native_stderr():
    """Captures what C++ code writes to file descriptor 2 (ExecuTorch logs there) into a StringIO."""
    captured = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.write(sink.read().decode(errors="replace"))


def set_executorch_threads(threads: int | None = None) -> None:
    """ExecuTorch's XNNPACK thread pool size (default: torch's thread count)."""
    threads = _check_threads(threads)  # before the native pool sees a negative count
    portable = _require("executorch.extension.pybindings.portable_lib", "ExecuTorch")
    portable._unsafe_reset_threadpool(int(threads or torch.get_num_threads()))


def _check_max_batch(max_batch) -> int | None:
    return _integer(max_batch, "max_batch", 1, "None (static shapes) or an integer >= 1", none_ok=True)


def _export_program(model: nn.Module, trace_input: torch.Tensor, dynamic_batch: bool = False):
    """``torch.export`` with static shapes (one program per batch size), or with the batch dimension
    dynamic up to the trace input's batch (XNNPACK plans its memory for that bound)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not dynamic_batch:
            return torch.export.export(model, (trace_input,))
        batch = torch.export.Dim("batch", min=1, max=trace_input.shape[0])
        return torch.export.export(model, (trace_input,), dynamic_shapes=({0: batch},))


def _executorch_trace_inputs(input_shape, max_batch: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(trace input, check input) of an ExecuTorch export: static shapes trace at ``input_shape``; a
    bounded dynamic batch traces at the bound and checks at another batch size."""
    shape = _check_shape(input_shape)
    if max_batch is None or max_batch == 1:  # a bound of 1 is a static batch of 1
        return _check_inputs(shape if max_batch is None else (1, *shape[1:]), dynamic_batch=False)
    return (example_input((max_batch, *shape[1:]), seed=0),
            example_input((max(1, min(3, max_batch - 1)), *shape[1:]), seed=1))


def _lower_to_program(exported) -> bytes:
    """An exported program lowered with the XNNPACK partitioner to an ExecuTorch program (.pte bytes)."""
    _require("executorch", "ExecuTorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def load_executorch(program: bytes | str | os.PathLike, precision: str = "fp32", threads: int | None = None,
                    fixed_batch: int | None = None, max_batch: int | None = None) -> DeployedModel:
    """An ExecuTorch program (its bytes, or a .pte path) loaded in ExecuTorch's runtime as a DeployedModel;
    ``fixed_batch`` / ``max_batch`` as the program was exported (see :class:`DeployedModel`; neither: the
    program's own batch as a fixed batch, right for a static program and for a bounded one alike).
    The input shape comes from the program; a file or bytes that are not a program raise DeployInputError."""
    # long: every argument and the program itself are checked first, in the order a caller meets them
    _require("executorch", "ExecuTorch")
    from executorch.runtime import Runtime

    if precision not in ("fp32", "int8"):
        raise DeployInputError(f"precision: got {precision!r}; allowed values are ('fp32', 'int8')")
    fixed_batch = _integer(fixed_batch, "fixed_batch", 1, none_ok=True)
    max_batch = _check_max_batch(max_batch)
    if fixed_batch is not None and max_batch is not None:
        raise DeployInputError(f"fixed_batch, max_batch: got {fixed_batch} and {max_batch}; allowed: at most one")
    path, source = None, "the bytes given"
    if isinstance(program, (bytearray, memoryview)):
        program = bytes(program)
    if not isinstance(program, bytes):
        if not isinstance(program, (str, os.PathLike)):
            raise DeployInputError(f"program: got {type(program).__name__}; allowed: the bytes of an ExecuTorch "
                                   "program or the path of a .pte file")
        path = _input_file(program, "program", "ExecuTorch .pte")
        program, source = path.read_bytes(), str(path)
    set_executorch_threads(threads)
    try:
        loaded = Runtime.get().load_program(program)
        if "forward" not in loaded.method_names:
            raise DeployInputError(f"program: {source} has no forward method (methods: {sorted(loaded.method_names)})")
        method = loaded.load_method("forward")
        meta = method.metadata
        sizes = tuple(meta.input_tensor_meta(0).sizes()) if meta.num_inputs() == 1 else ()
    except DeployInputError:
        raise
    except (RuntimeError, ValueError) as error:  # the runtime names neither the argument nor the file
        raise DeployInputError(f"program: {source} is not an ExecuTorch program this runtime can load "
                               f"({_first_line(error)})") from error
    if len(sizes) != 4:
        raise DeployInputError(f"program: {source} takes {meta.num_inputs()} inputs of shape {list(sizes)}; allowed: "
                               "a program of one (N, C, H, W) input")
    # the planned input: the static batch, or the bound of a dynamic one
    if fixed_batch is not None and fixed_batch != sizes[0] or max_batch is not None and max_batch > sizes[0]:
        argument = "fixed_batch" if fixed_batch is not None else "max_batch"
        raise DeployInputError(f"{argument}: got {fixed_batch or max_batch}; the program {source} takes an input of "
                               f"{tuple(sizes)}: allowed: {argument}={sizes[0]}{'' if fixed_batch else ' or less'}, "
                               "or None")
    if fixed_batch is None and max_batch is None:
        fixed_batch = sizes[0]
    keep_alive = (program, loaded)  # the method reads the program's memory: freeing it crashes the process

    def run(x: torch.Tensor) -> torch.Tensor:
        assert keep_alive
        try:
            return method.execute([x])[0].clone()
        except RuntimeError as error:  # the reason is in the runtime's log on file descriptor 2: rerun to read it
            with _native_stderr() as log:
                try:
                    method.execute([x])
                except RuntimeError:
                    pass
            reason = "; ".join(line.split("] ", 1)[-1] for line in log.getvalue().splitlines() if "] " in line)
            raise DeployError(f"ExecuTorch XNNPACK {precision} program failed at run time on an input of shape "
                              f"{tuple(x.shape)}: {error} ({reason or 'no log'})") from error

    return DeployedModel("executorch", precision, run, len(program), path, fixed_batch=fixed_batch,
                         max_batch=max_batch, sample_shape=sizes[1:])


def _lower_executorch(exported, path: Path | None, precision: str, threads: int | None, trace_batch: int,
                      dynamic_batch: bool) -> DeployedModel:
    buffer = _lower_to_program(exported)
    if path is not None:
        _make_parent(path, "path")
        path.write_bytes(buffer)
    deployed = load_executorch(buffer, precision, threads, fixed_batch=None if dynamic_batch else trace_batch,
                               max_batch=trace_batch if dynamic_batch else None)
    deployed.path = path
    return deployed


def export_executorch(model: nn.Module, path: str | os.PathLike | None = None, input_shape=(1, 3, 32, 32),
                      check: bool = True, tolerance: float = PARITY_TOLERANCE,
                      threads: int | None = None, max_batch: int | None = None) -> DeployedModel:
    """``torch.export`` lowered with the XNNPACK partitioner to an ExecuTorch program (written to ``path``
    when given), loaded in ExecuTorch's runtime and checked against PyTorch. Static shapes (the batch of
    ``input_shape``) by default; ``max_batch``: any batch from 1 to ``max_batch`` (one program serves
    batch-1 latency and batched evaluation)."""
    check_eval_model(model)
    _require("executorch", "ExecuTorch export")
    max_batch = _check_max_batch(max_batch)
    path = None if path is None else _output_path(path, "path", example="model.pte")  # before minutes of lowering
    tolerance, threads = _check_tolerance(tolerance), _check_threads(threads)
    trace_input, check_input = _executorch_trace_inputs(input_shape, max_batch)
    dynamic = max_batch is not None and max_batch > 1
    deployed = _lower_executorch(_export_program(model, trace_input, dynamic), path, "fp32",
                                 threads, trace_input.shape[0], dynamic)
    if check:
        check_parity(deployed, model, check_input, tolerance)
    return deployed


def quantize_executorch(model: nn.Module, calibration: list[torch.Tensor], path: str | os.PathLike | None = None,
                        input_shape=(1, 3, 32, 32), threads: int | None = None,
                        max_batch: int | None = None) -> DeployedModel:
    """PT2E int8 for ExecuTorch: export, ``prepare_pt2e`` with the XNNPACK quantizer (symmetric int8,
    per-channel weights), calibration on ``calibration`` (training images), ``convert_pt2e``, then
    the same XNNPACK lowering as fp32 (``max_batch`` as in :func:`export_executorch`)."""
    check_eval_model(model)
    shape = _check_shape(input_shape)
    calibration = _check_calibration(calibration, shape[1:], model=f"the model (input_shape={shape})")
    max_batch = _check_max_batch(max_batch)
    path = None if path is None else _output_path(path, "path", example="model.int8.pte")
    threads = _check_threads(threads)
    _require("torchao", "PT2E quantization")
    _require("executorch", "ExecuTorch export")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    trace_input, _ = _executorch_trace_inputs(shape, max_batch)
    dynamic = max_batch is not None and max_batch > 1
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(_export_program(model, trace_input, dynamic).module(), quantizer)
        calibrate = DeployedModel("pytorch", "fp32", prepared, 0, fixed_batch=None if dynamic else trace_input.shape[0],
                                  max_batch=trace_input.shape[0] if dynamic else None)
        for batch in calibration:
            calibrate(batch)
        converted = convert_pt2e(prepared)
    deployed = _lower_executorch(_export_program(converted, trace_input, dynamic), path, "int8", threads,
                                 trace_input.shape[0], dynamic)
    if dynamic:
        check_batch_consistency(deployed, shape[1:], min(max_batch, 4))
    return deployed


def check_batch_consistency(deployed: DeployedModel, sample_shape, batch: int, tolerance: float = 1e-4) -> float:
    """Max |diff| between a batch through ``deployed`` and its samples one at a time; DeployError above
    ``tolerance`` (relative to the largest output). Found with ExecuTorch 1.5: XNNPACK int8 programs
    exported with a dynamic batch return wrong outputs for the first samples of a batch."""
    batch = _integer(batch, "batch", 1)
    sample_shape = _check_shape(sample_shape, "sample_shape", 3, "channels, height, width")
    tolerance = _check_tolerance(tolerance)
    x = example_input((batch, *sample_shape), seed=4)
    together = deployed(x)
    alone = torch.cat([deployed(x[i:i + 1]) for i in range(batch)])
    diff = _max_abs_diff(together, alone)
    if not diff <= tolerance * max(1.0, alone.abs().max().item()):
        raise DeployError(f"{deployed.runtime} {deployed.precision} program gives other outputs for a sample in a "
                          f"batch of {batch} than alone (max |diff| {diff:.3g}): a runtime defect with a dynamic "
                          "batch; export it with static shapes (max_batch=None)")
    return diff


# ----------------------------------------------------------------------------------------------
# PyTorch eager, and measurements
# ----------------------------------------------------------------------------------------------

def state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def pytorch_deployed(model: nn.Module) -> DeployedModel:
    """The eager model itself, as a DeployedModel (size: its saved state dict)."""
    check_eval_model(model)
    return DeployedModel("pytorch", "fp32", model, state_dict_bytes(model))


def latency_ms(deployed: nn.Module, input_shape=(1, 3, 32, 32), warmup: int = 10, repeats: int = 50) -> float:
    """Median wall time of one call on ``input_shape`` after ``warmup`` calls, in milliseconds."""
    if not callable(deployed):
        raise DeployInputError(f"deployed: got {type(deployed).__name__}; allowed: a DeployedModel or nn.Module")
    warmup, repeats = _integer(warmup, "warmup", 0), _integer(repeats, "repeats", 1)  # no median of nothing
    x = example_input(input_shape, seed=2)
    with torch.no_grad():
        for _ in range(warmup):
            deployed(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            deployed(x)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def calibration_batches(dataset, images: int = 256, batch_size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """``images`` class-mixed TRAINING images (a seeded random subset), normalized like the model's input."""
    from .data import BatchLoader

    images = _integer(images, "calibration images", 1, f"1 .. {len(dataset.train_labels)} (the training set's size)")
    if images > len(dataset.train_labels):
        raise DeployInputError(f"calibration images: got {images!r}; allowed: 1 .. {len(dataset.train_labels)} "
                               "(the training set's size)")
    batch_size = _integer(batch_size, "batch_size", 1)
    order = torch.randperm(len(dataset.train_labels), generator=torch.Generator().manual_seed(seed))[:images]
    loader = BatchLoader(dataset.train_images[order], dataset.train_labels[order], batch_size=batch_size,
                         train=False, mean=dataset.mean, std=dataset.std)
    return [x for x, _ in loader]


@dataclasses.dataclass(frozen=True)
class DeploySizes:
    """How much the deployment study evaluates (the notebook takes them from the profile)."""

    test_images: int = 1000            # clean test images (the first ones of the profile's test set)
    corruption_images: int = 100       # test images per corruption and severity
    severities: tuple = (3,)
    calibration_images: int = 256      # training images for int8 calibration
    latency_repeats: int = 50
    crossover_batch: int = 32          # where int8 is slower than fp32 at batch 1, also timed here
    # a program that cannot take crossover_batch (ExecuTorch int8: static shapes) is lowered again for it,
    # 1-3 min per program on a 2-core CPU; False leaves that crossover untimed
    relower_for_crossover: bool = True

    def __post_init__(self) -> None:
        from .corruptions import SEVERITIES

        for field in ("test_images", "corruption_images", "calibration_images", "latency_repeats", "crossover_batch"):
            object.__setattr__(self, field, _integer(getattr(self, field), field, 1))
        given = self.severities
        severities = () if isinstance(given, (str, bytes)) or not hasattr(given, "__iter__") else tuple(given)
        if not severities or not all(not isinstance(v, (bool, np.bool_)) and isinstance(v, numbers.Integral)
                                     and v in SEVERITIES for v in severities):
            raise DeployInputError(f"severities: got {given!r}; allowed: a non-empty tuple of values in {SEVERITIES}")
        object.__setattr__(self, "severities", tuple(int(v) for v in severities))
        if not isinstance(self.relower_for_crossover, (bool, np.bool_)):
            raise DeployInputError(f"relower_for_crossover: got {self.relower_for_crossover!r}; allowed values are "
                                   "True, False")


def _check_targets(targets, argument: str = "targets") -> tuple:
    """``targets`` as a tuple of (runtime, precision) pairs of TARGETS, checked before any export."""
    if isinstance(targets, (str, bytes)) or not hasattr(targets, "__iter__"):
        raise DeployInputError(f"{argument}: got {targets!r}; allowed: a sequence of pairs from {TARGETS}")
    out = tuple(tuple(t) if isinstance(t, (tuple, list)) else t for t in targets)
    for target in out:
        if target not in TARGETS:
            hint = " (one target: wrap it in a list)" if isinstance(target, str) else ""
            raise DeployInputError(f"{argument}: got {target!r}{hint}; allowed values are {TARGETS}")
    return out


def deploy_targets(model: nn.Module, calibration: list[torch.Tensor], work_dir: str | os.PathLike,
                   input_shape=(1, 3, 32, 32), targets=TARGETS,
                   max_batch: int | None = None) -> dict[tuple[str, str], DeployedModel | Exception]:
    """Every (runtime, precision) of ``targets`` for one model: the DeployedModel, or the exception that
    stopped it (export, quantization or the first run); never left out. ``max_batch``: the ExecuTorch
    fp32 program takes any batch up to it (None: the static batch of ``input_shape``, as int8 always)."""
    # arguments are checked before the first export: a bad one is the caller's error, not a target's
    check_eval_model(model)
    work_dir = _output_path(work_dir, "work_dir", directory=True)
    shape = _check_shape(input_shape)
    targets = _check_targets(targets)
    max_batch = _check_max_batch(max_batch)
    if any(precision == "int8" for _, precision in targets):
        calibration = _check_calibration(calibration, shape[1:], model=f"the model (input_shape={shape})")
    out: dict[tuple[str, str], DeployedModel | Exception] = {}
    onnx_fp32: Path | None = None
    for target in targets:
        try:
            runtime, precision = target
            if target == ("pytorch", "fp32"):
                deployed = pytorch_deployed(model)
            elif target == ("onnxruntime", "fp32"):
                deployed = export_onnx(model, work_dir / "model.onnx", shape)
                onnx_fp32 = deployed.path
            elif target == ("onnxruntime", "int8"):
                if onnx_fp32 is None:
                    onnx_fp32 = export_onnx(model, work_dir / "model.onnx", shape).path
                deployed = quantize_onnx(onnx_fp32, work_dir / "model.int8.onnx", calibration)
            elif target == ("executorch", "fp32"):
                deployed = export_executorch(model, work_dir / "model.pte", shape, max_batch=max_batch)
            else:
                # static shapes: see check_batch_consistency
                deployed = quantize_executorch(model, calibration, work_dir / "model.int8.pte", shape)
            deployed(example_input(shape, seed=3))  # it runs, or the failure is recorded here
            out[target] = deployed
        except Exception as error:  # noqa: BLE001 - recorded by name in the failures table
            out[target] = error
    return out


class BuildFailure(DeployError):
    """A target's export, quantization or first run failed in a build worker process: the original
    exception's class name and first line (exceptions of the runtimes' bindings do not all pickle)."""

    def __init__(self, error_name: str, message: str) -> None:
        super().__init__(message)
        self.error_name = error_name


def _build_in_worker(model: nn.Module, calibration, work_dir: str, input_shape, targets, max_batch,
                     threads: int) -> dict:
    """Worker process: every non-PyTorch target of one variant built into files under ``work_dir``;
    per target ("ok", path, parity, fixed batch, max batch) or ("error", exception name, first line)."""
    torch.set_num_threads(threads)  # side by side: one thread each (exporting is single-threaded Python)
    out = {}
    for target, result in deploy_targets(model, calibration, work_dir, input_shape, targets, max_batch).items():
        if isinstance(result, Exception):
            out[target] = ("error", type(result).__name__, _first_line(result))
        else:
            out[target] = ("ok", str(result.path), result.parity, result.fixed_batch, result.max_batch)
    return out


def _load_built(target, built, input_shape) -> DeployedModel | Exception:
    """A worker's file opened in its runtime here (and run once), or the failure it reported."""
    if built[0] == "error":
        return BuildFailure(built[1], built[2])
    try:
        runtime, precision = target
        _, path, parity, fixed_batch, max_batch = built
        if runtime == "onnxruntime":
            deployed = _onnx_deployed(Path(path), precision)
        else:
            deployed = load_executorch(path, precision, fixed_batch=fixed_batch, max_batch=max_batch)
        deployed.parity = parity
        deployed(example_input(input_shape, seed=3))
        return deployed
    except Exception as error:  # noqa: BLE001 - recorded by name in the failures table
        return error


def build_deployments(variants: dict[str, nn.Module], calibration: list[torch.Tensor], work_dir: str | os.PathLike,
                      input_shape=(1, 3, 32, 32), targets_of: Callable[[str], tuple] = lambda name: TARGETS,
                      max_batch: int | None = None, workers: int = 1, show_progress: bool = True,
                      ) -> dict[str, dict[tuple[str, str], DeployedModel | Exception]]:
    """:func:`deploy_targets` for every variant (files under ``work_dir/<variant>``). With ``workers`` > 1
    the exports run in that many processes side by side (exporting and lowering are single-threaded
    Python: on 2 cores two variants lower in the time of one), each target then opened here; a worker
    that dies is recorded as the failure of its variant's targets."""
    from ..utils.progress import progress

    work_dir = _output_path(work_dir, "work_dir", directory=True)
    workers = _integer(workers, "workers", 1)
    shape, max_batch = _check_shape(input_shape), _check_max_batch(max_batch)
    _check_variants(variants)
    if not callable(targets_of):
        raise DeployInputError(f"targets_of: got {type(targets_of).__name__}; allowed: a function of a variant name")
    # checked here, once: a worker would report a bad target of every variant, or leave it out of its jobs
    wanted = {name: _check_targets(targets_of(name), f"targets_of({name!r})") for name in variants}
    targets_of = wanted.__getitem__
    if any(p == "int8" for targets in wanted.values() for _, p in targets):
        calibration = _check_calibration(calibration, shape[1:], model=f"the models (input_shape={shape})")
    if workers == 1 or len(variants) == 1:
        return {name: deploy_targets(model.eval(), calibration, work_dir / name, input_shape, targets_of(name),
                                     max_batch)
                for name, model in progress(list(variants.items()), enabled=show_progress, desc="deploy",
                                            unit="variant")}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # one job per variant and runtime (ONNX Runtime's int8 model is made from its fp32 file), ExecuTorch
    # first: its lowering is the longest job, and the short ones fill in beside it
    jobs = [(name, tuple(t for t in targets_of(name) if t[0] == runtime))
            for runtime in ("executorch", "onnxruntime") for name in variants]
    jobs = [(name, job) for name, job in jobs if job]
    out: dict[str, dict] = {name: {} for name in variants}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_build_in_worker, variants[name].eval(), calibration, str(work_dir / name),
                               input_shape, job, max_batch, 1): (name, job) for name, job in jobs}
        for future in progress(as_completed(futures), enabled=show_progress, total=len(futures), desc="deploy",
                               unit="export"):
            name, job = futures[future]
            try:
                built = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. the worker process died (BrokenProcessPool)
                built = {t: ("error", type(error).__name__, _first_line(error)) for t in job}
            out[name].update({t: _load_built(t, built[t], input_shape) for t in job})
    result = {}
    for name in variants:  # the caller's order, PyTorch first as in TARGETS
        local = [t for t in targets_of(name) if t[0] == "pytorch"]
        mine = deploy_targets(variants[name].eval(), calibration, work_dir / name, input_shape, local) if local else {}
        result[name] = {t: (mine | out[name])[t] for t in targets_of(name)}
    return result


def _check_variants(variants) -> None:
    """Variant names become folder names under work_dir: refused where they are not one plain name."""
    if not isinstance(variants, dict):
        raise DeployInputError(f"variants: got {type(variants).__name__}; allowed: a dict of name -> nn.Module")
    for name, model in variants.items():
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name or "\0" in name:
            raise DeployInputError(f"variants: got the name {name!r}; allowed: a non-empty name usable as a folder "
                                   "name (no path separators, not '.' or '..')")
        if not isinstance(model, nn.Module):
            raise DeployInputError(f"variants[{name!r}]: got {type(model).__name__}; allowed: a torch.nn.Module")


def measure_deployed(deployed: DeployedModel, dataset, profile, sizes: DeploySizes,
                     input_shape=(1, 3, 32, 32)) -> dict:
    """Size, batch-1 latency, clean and mean corruption accuracy of one deployed model; the clean test
    images are the first ``sizes.test_images`` of the profile's test set, the corruption images as the
    results store's evaluation (``corruptions.evaluate_corruptions``) with the study's sizes."""
    from .corruptions import evaluate_corruptions
    from .train import evaluate

    if not isinstance(sizes, DeploySizes):
        raise DeployInputError(f"sizes: got {type(sizes).__name__}; allowed: a DeploySizes")
    shape = _check_shape(input_shape)
    n = min(sizes.test_images, len(dataset.test_labels))
    batch = min(profile.train.eval_batch_size, 256)
    clean = evaluate(deployed, dataset.test_images[:n], dataset.test_labels[:n], dataset.mean, dataset.std, batch,
                     "cpu")["accuracy"]
    per = evaluate_corruptions(deployed, dataset, profile.corruptions, sizes.severities, sizes.corruption_images,
                               batch, "cpu")
    flat = [acc for severities in per.values() for acc in severities.values()]
    return {"runtime": deployed.runtime, "precision": deployed.precision, "size_MB": deployed.size_bytes / 1e6,
            "latency_ms_batch1": latency_ms(deployed, shape, repeats=sizes.latency_repeats),
            "clean_accuracy": clean, "mean_corruption_accuracy": statistics.fmean(flat) if flat else None,
            "test_images": n, "corruption_images": sizes.corruption_images * len(flat), "parity": deployed.parity}


def _failure(variant: str, runtime: str, precision: str, error: BaseException, prefix: str = "") -> dict:
    """A failures-table row: the error's name (an export worker's original one) and its first line."""
    return {"variant": variant, "runtime": runtime, "precision": precision,
            "error": getattr(error, "error_name", type(error).__name__), "message": prefix + _first_line(error)}


def _measure_variant(name: str, model: nn.Module, deployed: dict, dataset, profile, sizes: DeploySizes, shape,
                     calibration, failures: list[dict]) -> list[dict]:
    """The measured rows of one variant's deployments (a failure of any of them is appended to ``failures``);
    where int8 is slower than fp32 at batch 1, both are timed at the crossover batch too."""
    measured = {}
    for (runtime, precision), result in deployed.items():
        if isinstance(result, Exception):
            failures.append(_failure(name, runtime, precision, result))
            continue
        try:
            measured[(runtime, precision)] = {"variant": name, **measure_deployed(result, dataset, profile, sizes,
                                                                                 shape)}
        except Exception as error:  # noqa: BLE001 - e.g. a runtime that fails on a batch size it should take
            failures.append(_failure(name, runtime, precision, error))
    for runtime in RUNTIMES:
        fp32, int8 = measured.get((runtime, "fp32")), measured.get((runtime, "int8"))
        if fp32 and int8 and int8["latency_ms_batch1"] > fp32["latency_ms_batch1"]:
            try:
                _time_crossover(model, runtime, deployed, fp32, int8, calibration, shape, sizes)
            except Exception as error:  # noqa: BLE001
                failures.append(_failure(name, runtime, "int8", error, f"batch {sizes.crossover_batch}: "))
    return list(measured.values())


def _check_study(variants, dataset, sizes, input_shape, targets, executorch_variants):
    """deployment_study's arguments checked: (input shape, targets, ExecuTorch variants or None)."""
    _check_variants(variants)
    if not variants:
        raise DeployInputError("variants: got none; allowed: a dict of name -> nn.Module with at least one variant")
    if not isinstance(sizes, DeploySizes):
        raise DeployInputError(f"sizes: got {type(sizes).__name__}; allowed: a DeploySizes")
    images = tuple(dataset.test_images.shape[1:])
    shape = (1, *images) if input_shape is None else _check_shape(input_shape)
    if shape[1:] != images:
        raise DeployInputError(f"input_shape: got {input_shape!r}; allowed: (N, {', '.join(map(str, images))}), the "
                               "dataset's images (or None)")
    targets = _check_targets(targets)
    if executorch_variants is not None:
        if isinstance(executorch_variants, (str, bytes)) or not hasattr(executorch_variants, "__iter__"):
            raise DeployInputError(f"executorch_variants: got {executorch_variants!r}; allowed: None or a sequence "
                                   f"of variant names from {tuple(variants)}")
        executorch_variants = tuple(executorch_variants)
        unknown = [n for n in executorch_variants if n not in variants]
        if unknown:  # it would be ignored silently: a name no variant has is lowered nowhere
            raise DeployInputError(f"executorch_variants: got {unknown!r}, which are not variants; allowed values "
                                   f"are {tuple(variants)}")
    return shape, targets, executorch_variants


def deployment_study(variants: dict[str, nn.Module], dataset, profile, sizes: DeploySizes = DeploySizes(),
                     work_dir: str | os.PathLike | None = None, input_shape=None, targets=TARGETS,
                     executorch_variants=None, show_progress: bool = True, workers: int | None = None):
    """(results, failures) DataFrames for every variant x target.

    results: one row per variant and (runtime, precision) that exported and ran, with the measurements
    of :func:`measure_deployed`, and where int8 is slower than fp32 of the same runtime at batch 1 the
    latencies of both at ``sizes.crossover_batch``. failures: one row per variant and target that did
    not, with the exception's name and message. ``executorch_variants``: the variants also lowered to
    ExecuTorch (None: all); the others are listed in neither table for ExecuTorch (a choice of budget,
    stated by the caller, not a failure). The ExecuTorch fp32 program takes any batch up to
    ``sizes.crossover_batch`` (latency, crossover and evaluation from one program); int8 programs have
    static shapes (see :func:`check_batch_consistency`).

    ``workers``: processes that export side by side (default: up to 4, one per core); measuring always
    runs alone in this process, after every export has finished, so that no timing shares the CPU."""
    import pandas as pd

    from ..utils.progress import progress

    shape, targets, executorch_variants = _check_study(variants, dataset, sizes, input_shape, targets,
                                                       executorch_variants)  # before minutes of exports
    calibration = calibration_batches(dataset, min(sizes.calibration_images, len(dataset.train_labels)))
    rows, failures = [], []
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="mnv2-deploy-"))
    workers = default_workers(len(variants)) if workers is None else workers

    def targets_of(name: str) -> tuple:
        return tuple(t for t in targets if t[0] != "executorch" or executorch_variants is None
                     or name in executorch_variants)

    max_batch = max(1, sizes.crossover_batch)
    built = build_deployments({name: model.eval() for name, model in variants.items()}, calibration, root, shape,
                              targets_of, max_batch, workers, show_progress)
    for name in progress(list(variants), enabled=show_progress, desc="measure", unit="variant"):
        deployed = built.pop(name)
        rows += _measure_variant(name, variants[name], deployed, dataset, profile, sizes, shape, calibration,
                                 failures)
        del deployed
    columns = ["variant", "runtime", "precision", "size_MB", "latency_ms_batch1",
               f"latency_ms_batch{sizes.crossover_batch}", "clean_accuracy", "mean_corruption_accuracy",
               "test_images", "corruption_images", "parity"]
    results = pd.DataFrame(rows).reindex(columns=columns)
    return results, pd.DataFrame(failures, columns=["variant", "runtime", "precision", "error", "message"])


def default_workers(jobs: int) -> int:
    """Export processes side by side: one per core, at most 4 (each holds a copy of torch and the
    runtimes, ~1 GB) and at most one per job."""
    return max(1, min(4, os.cpu_count() or 1, jobs))


def _time_crossover(model, runtime, deployed, fp32_row, int8_row, calibration, shape, sizes) -> None:
    """Latency of fp32 and int8 at ``sizes.crossover_batch``; an ExecuTorch program that cannot take that
    batch (static shapes) is exported again at it, or, without ``sizes.relower_for_crossover``, neither
    precision is timed there."""
    big = (sizes.crossover_batch, *shape[1:])

    def takes_big(program) -> bool:
        return program.fixed_batch in (None, big[0]) and (program.max_batch is None or program.max_batch >= big[0])

    if not sizes.relower_for_crossover and not all(takes_big(deployed[(runtime, p)]) for p in ("fp32", "int8")):
        return
    for row, precision in ((fp32_row, "fp32"), (int8_row, "int8")):
        program = deployed[(runtime, precision)]
        if not takes_big(program):
            program = (export_executorch(model, None, big, check=False) if precision == "fp32"
                       else quantize_executorch(model, calibration, None, big))
        row[f"latency_ms_batch{sizes.crossover_batch}"] = latency_ms(
            program, big, warmup=2, repeats=max(5, sizes.latency_repeats // 5))


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:limit]


def int8_drop(results) -> "pd.DataFrame":  # noqa: F821
    """Per variant and runtime: fp32 and int8 accuracies and their difference (int8 - fp32), in points."""
    import pandas as pd

    need = ["variant", "runtime", "precision", "clean_accuracy", "mean_corruption_accuracy"]
    missing = [c for c in need if c not in getattr(results, "columns", ())]
    if missing:
        raise DeployInputError(f"results: missing the columns {missing}; allowed: deployment_study's results table "
                               f"(columns {need}, ...)")
    rows = []
    for (variant, runtime), group in results.groupby(["variant", "runtime"], sort=False):
        by = group.set_index("precision")
        if "fp32" in by.index and "int8" in by.index:
            row = {"variant": variant, "runtime": runtime}
            for metric in ("clean_accuracy", "mean_corruption_accuracy"):
                row[f"{metric}_fp32"] = by.at["fp32", metric]
                row[f"{metric}_int8"] = by.at["int8", metric]
                row[f"{metric}_drop_points"] = 100 * (by.at["int8", metric] - by.at["fp32", metric])
            rows.append(row)
    return pd.DataFrame(rows)


def onnx_op_counts(path: str | os.PathLike) -> dict[str, int]:
    """How many nodes of each operator type an ONNX file's main graph has (domain-qualified outside ONNX's own)."""
    onnx = _require("onnx", "ONNX inspection")
    from collections import Counter

    path = _input_file(path, "path", "ONNX")
    try:
        graph = onnx.load(str(path)).graph
    except Exception as error:  # protobuf's DecodeError names no file
        raise DeployInputError(f"path: {path} is not an ONNX model ({type(error).__name__}: {_first_line(error)})"
                               ) from error
    return dict(Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                        for n in graph.node))


def available_runtimes() -> dict[str, str | None]:
    """Per package a deployment runtime needs: its version, or None where it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in RUNTIME_PACKAGES.values():
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def describe_failures(failures) -> str:
    if failures.empty:
        return "Every variant exported, quantized and ran in every runtime."
    parts = [f"{r.variant} / {r.runtime} {r.precision}: `{r.error}`" for r in failures.itertuples()]
    return "These did not export, quantize or run (the table below gives each message): " + "; ".join(parts) + "."
