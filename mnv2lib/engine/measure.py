"""Cost measurements: parameters, multiply-adds and FLOPs, training memory, throughput, latency.

Counting is done by ``torch.utils.flop_counter`` (FLOPs; multiply-adds are half of them), which
also counts the project's ``mnv2::`` operators through their registered FLOP formulas; only timing
and memory bookkeeping are written here.
"""
from __future__ import annotations

import gc
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from .summary import summary, training_mode


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _eval_copy_input(model: nn.Module, input_size) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randn(*input_size, device=device)


def multiply_adds(model: nn.Module, input_size=(1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward pass in eval mode: half of :func:`flops` (convolutions, linear
    layers, matmuls and the ``mnv2::`` operators, whichever implementation runs)."""
    return flops(model, input_size) // 2


def flops(model: nn.Module, input_size=(1, 3, 224, 224)) -> int:
    """FLOPs of one forward pass in eval mode, from ``torch.utils.flop_counter`` (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ..ops import kernels

    for name in kernels.LIBRARIES:  # their FLOP formulas register when a library loads: before counting
        kernels.available(name)
    with training_mode(model, False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(_eval_copy_input(model, input_size))
    return int(counter.get_total_flops())


def largest_layer_bytes(model: nn.Module, input_size) -> int:
    """The largest working set of one layer in an eval forward: the bytes of a leaf module's tensor inputs
    and output together (a lower bound of peak activation memory, device-independent; the MobileNetV2
    paper's Table 3 counts the same per layer)."""
    largest = 0

    def size(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        return 0

    def record(module, args, output):
        nonlocal largest
        largest = max(largest, size(args) + size(output))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        with training_mode(model, False), torch.no_grad():
            model(_eval_copy_input(model, input_size))
    finally:
        for h in handles:
            h.remove()
    return largest


def saved_activation_bytes(model: nn.Module, input_size, loss_fn: Callable | None = None) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training forward.

    This is the activation memory of a training step, the part that the model's design
    decides (a Mish that keeps only its input, say); it is exact and device-independent.
    """
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.dtype)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    x = _eval_copy_input(model, input_size)
    with training_mode(model, True), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)  # the output is dropped at once; the hooks saw what backward would keep
    # parameters are saved by reference by every layer; they are not activation memory
    params = {(p.untyped_storage().data_ptr(), p.dtype) for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params and k[0] != x.untyped_storage().data_ptr())


def training_memory_bytes(model: nn.Module, input_size, optimizer_slots: int = 1) -> dict[str, int]:
    """Memory of a training step: activations saved for backward, parameters, gradients and
    optimizer state (``optimizer_slots`` tensors per parameter: 1 for SGD with momentum).
    On CUDA the measured peak allocation is added as ``cuda_peak``."""
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    result = {
        "activations": saved_activation_bytes(model, input_size),
        "parameters": param_bytes,
        "gradients": param_bytes,
        "optimizer_state": param_bytes * optimizer_slots,
    }
    result["total"] = sum(result.values())
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model.train()
        model(_eval_copy_input(model, input_size)).sum().backward()
        torch.cuda.synchronize(device)
        result["cuda_peak"] = torch.cuda.max_memory_allocated(device) - base
        model.zero_grad(set_to_none=True)
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 10) -> list[float]:
    """Wall-clock seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def interleaved(names: list[str], repeats: int) -> list[list[str]]:
    """The order of each repetition's steps: every name once per repetition, so that drifts in machine speed
    hit every variant alike, in seeded random orders (the same in every run; no step right after itself), so
    that no variant always runs after the same one: a step's time depends on what ran before it (in a fixed
    order, the variant right after the data step was measurably slower than the same model elsewhere)."""
    rng = random.Random(0)
    orders: list[list[str]] = []
    while len(orders) < repeats:
        order = rng.sample(names, len(names))
        if not (len(names) > 1 and orders and order[0] == orders[-1][-1]):
            orders.append(order)
    return orders


def time_interleaved(steps: dict[str, Callable[[], None]], repeats: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of ``repeats`` calls of each step, in the orders of :func:`interleaved`, with Python's garbage
    collector paused (no collector pauses inside the timed steps)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    gc.collect()
    gc.disable()
    try:
        for order in interleaved(list(steps), repeats):
            for name in order:
                sync()
                t0 = time.perf_counter()
                steps[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def make_train_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, lr: float = 0.01):
    """One SGD step (forward, backward, update) as a closure, for timing.

    The model is switched to training mode only when it is not in it: ``Module.train()`` walks
    every submodule, which would add a cost that grows with the number of modules, not with the
    computation (a Triplet Attention model has 13 more modules per block than the baseline)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        if not model.training:
            model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(batch), labels).backward()
        optimizer.step()

    return step


def make_eval_step(model: nn.Module, batch: torch.Tensor):
    """One inference forward as a closure, for timing (evaluation mode set only when needed, as above)."""
    def step() -> None:
        if model.training:
            model.eval()
        with torch.inference_mode():
            model(batch)

    return step


@dataclass
class CostReport:
    parameters: int
    multiply_adds: int
    flops: int
    train_memory_bytes: int
    activation_bytes: int
    train_images_per_s: float
    latency_ms_batch1: float
    latency_ms_batch64: float
    input_size: tuple
    device: str
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def measure_costs(model_factory: Callable[[], nn.Module], input_size=(3, 32, 32), num_classes: int = 10,
                  train_batch: int = 128, device: str | torch.device = "cpu", repeats: int = 5) -> CostReport:
    """Every cost of one model configuration; timings are medians after warm-up."""
    device = torch.device(device)
    model = model_factory().to(device)
    c, h, w = input_size
    report = dict(
        parameters=count_parameters(model),
        multiply_adds=multiply_adds(model, (1, c, h, w)),
        flops=flops(model, (1, c, h, w)),
    )
    memory = training_memory_bytes(model, (train_batch, c, h, w))
    x = torch.randn(train_batch, c, h, w, device=device)
    y = torch.randint(0, num_classes, (train_batch,), device=device)
    train_times = time_call(make_train_step(model, x, y), device, warmup=2, repeats=repeats)
    lat1 = time_call(make_eval_step(model, x[:1]), device, warmup=3, repeats=repeats * 4)
    x64 = torch.randn(64, c, h, w, device=device)
    lat64 = time_call(make_eval_step(model, x64), device, warmup=2, repeats=repeats)
    return CostReport(
        **report,
        train_memory_bytes=memory.get("cuda_peak", memory["total"]),
        activation_bytes=memory["activations"],
        train_images_per_s=train_batch / statistics.median(train_times),
        latency_ms_batch1=1000 * statistics.median(lat1),
        latency_ms_batch64=1000 * statistics.median(lat64),
        input_size=tuple(input_size),
        device=str(device),
        threads=torch.get_num_threads(),
    )
