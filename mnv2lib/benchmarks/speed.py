"""Speed benchmark: ``python -m mnv2lib.benchmarks.speed`` (``make bench``).

Builds MobileNetV2 (width 0.5, CIFAR stem, 10 classes, 32x32 inputs) with and without
each improvement, plus the straightforward reference implementations and torchvision's
model, and times training steps (batch 128) and inference (batch 64) *interleaved*
in one process after warm-up, in an order that changes every repetition (``interleaved``), so that
the ratios of medians compare like with like.
Python's garbage collector is paused while timing (as ``timeit`` does), and inference,
which is short, is timed six times as often as training. Building an augmented training
batch with ``mnv2lib.engine.data.BatchLoader`` is timed in the same loop, so the data-handling share
of a step is a ratio too. Writes ``reports/bench.json`` and ``reports/bench.md``.

On glibc, a training step at batch 128 spends about half of its time in page faults with the
system allocator's defaults (freed activation buffers go back to the kernel and come back every
step), which makes every ratio depend on how much a variant allocates. The benchmark therefore
runs with freed memory kept in the process, as training does (``mnv2lib.utils.allocator``);
``--allocator system`` measures glibc's defaults instead. The mode is recorded in the report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torchvision
from torch import nn
from torchvision.ops import misc

from ..engine.measure import make_eval_step, make_train_step, saved_activation_bytes, time_interleaved
from ..layers import norm_act
from ..models import build_model
from ..utils import allocator, paths

BASE = dict(num_classes=10, width_mult=0.5, stem="cifar")

VARIANTS = {
    "baseline": dict(),
    "mish": dict(activation="mish"),
    "mish_reference": dict(activation="mish_reference"),
    "triplet": dict(attention="triplet"),
    "triplet_reference": dict(attention="triplet_reference"),
    # default CNSN settings with CrossNorm switched on for every timed step
    "cnsn": dict(cnsn="cnsn", cn_prob=1.0),
    "selfnorm": dict(cnsn="sn"),
}

DATA = "data (batch loader)"  # timed like a variant in the training loop

# (json key, numerator variant, denominator variant, mode)
RATIOS = [
    ("mish_train_ratio", "mish", "baseline", "train"),
    ("mish_eval_ratio", "mish", "baseline", "eval"),
    ("mish_reference_train_ratio", "mish_reference", "baseline", "train"),
    ("mish_reference_eval_ratio", "mish_reference", "baseline", "eval"),
    ("triplet_train_ratio", "triplet", "baseline", "train"),
    ("triplet_eval_ratio", "triplet", "baseline", "eval"),
    ("triplet_reference_train_ratio", "triplet_reference", "baseline", "train"),
    ("triplet_reference_eval_ratio", "triplet_reference", "baseline", "eval"),
    ("cnsn_train_ratio", "cnsn", "baseline", "train"),
    ("cnsn_eval_ratio", "cnsn", "baseline", "eval"),
    ("selfnorm_eval_ratio", "selfnorm", "baseline", "eval"),
    ("baseline_vs_torchvision_train_ratio", "baseline", "torchvision", "train"),
    # the baseline against itself with torchvision's unfused Conv2dNormActivation (layers.norm_act)
    ("fused_norm_activation_train_ratio", "baseline", "baseline_unfused", "train"),
    ("baseline_vs_torchvision_eval_ratio", "baseline", "torchvision", "eval"),
    # building an augmented, normalized batch (mnv2lib.engine.data.BatchLoader) per baseline training step
    ("data_per_train_step_ratio", DATA, "baseline", "train"),
]
TARGETS = {
    "mish_train_ratio": 1.15, "mish_eval_ratio": 1.20, "triplet_train_ratio": 1.10, "triplet_eval_ratio": 1.10,
    "cnsn_train_ratio": 1.10, "selfnorm_eval_ratio": 1.05,
    # no slower than torchvision's model (it trains faster: its ReLU6 skips a copy, see layers.activations)
    "baseline_vs_torchvision_train_ratio": 1.03,
    "data_per_train_step_ratio": 0.05,
}


def torchvision_cifar_mobilenet_v2() -> nn.Module:
    """torchvision's MobileNetV2 with the same CIFAR stem (stride 1 in the stem and first stride-2 stage)."""
    model = torchvision.models.mobilenet_v2(num_classes=BASE["num_classes"], width_mult=BASE["width_mult"])
    model.features[0][0].stride = (1, 1)
    first_strided = next(b for b in model.features[1:] if getattr(b, "stride", 1) == 2)
    first_strided.conv[1][0].stride = (1, 1)
    first_strided.stride = 1
    return model


def unfused(model: nn.Module) -> nn.Module:
    """``model`` with its ``Conv2dNormActivation`` blocks running torchvision's forward (BatchNorm and activation
    apart); the same modules and weights, changed in place."""
    for module in model.modules():
        if type(module) is norm_act.Conv2dNormActivation:
            module.__class__ = misc.Conv2dNormActivation  # (the subclass adds no state, only its forward)
    return model


def build_variants(names) -> dict[str, nn.Module]:
    models = {}
    for name in names:
        torch.manual_seed(0)
        if name == "torchvision":
            models[name] = torchvision_cifar_mobilenet_v2()
        elif name == "baseline_unfused":
            models[name] = unfused(build_model(**BASE))
        else:
            models[name] = build_model(**BASE, **VARIANTS[name])
    return models


EVAL_REPEATS_FACTOR = 6  # inference steps are ~20x shorter than training steps: time them more often


def kernel_paths(device: torch.device) -> dict[str, str]:
    """Which implementation each improvement runs on ``device`` (recorded in the report)."""
    from .. import ops

    native = device.type == "cpu"
    return {name: "mnv2:: operators (C)" if native and ops.available(name) else "PyTorch ops"
            for name in ("mish", "triplet_attention", "cnsn")}


def make_data_step(train_batch: int, device: torch.device, channels_last: bool):
    """One augmented training batch from uint8 images, as the training loop gets it."""
    from ..engine.data import BatchLoader

    images = torch.randint(0, 256, (4 * train_batch, 3, 32, 32), dtype=torch.uint8)
    loader = BatchLoader(images, torch.randint(0, 10, (len(images),)), train_batch, train=True, device=device,
                         channels_last=channels_last, mean=(0.5,) * 3, std=(0.25,) * 3, drop_last=True)
    batches = iter(())

    def step():
        nonlocal batches
        batch = next(batches, None)
        if batch is None:
            batches = iter(loader)
            batch = next(batches)
        return batch

    return step


# A torch.compile'd training step of the improved model against eager mode, on a model small enough that
# compiling (inductor, a minute or two on 2 cores) fits in the benchmark.
COMPILED = dict(num_classes=10, width_mult=0.25, stem="cifar_lite", activation="mish", attention="triplet",
                cnsn="cnsn")


def compiled_train_ratio(batch: int = 64, repeats: int = 9, channels_last: bool = False) -> dict:
    """Median compiled / eager training step time of the ``COMPILED`` model (interleaved)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = build_model(**COMPILED).to(memory_format=fmt)
    steps = {"eager": make_train_step(models["eager"], x, y),
             "compiled": make_train_step(torch.compile(models["compiled"]), x, y)}
    start = time.perf_counter()
    for _ in range(2):
        steps["compiled"]()  # compiles (forward and backward)
    compile_seconds = time.perf_counter() - start
    steps["eager"]()
    medians = {k: statistics.median(v) for k, v in time_interleaved(steps, repeats).items()}
    return {"compiled_train_ratio": medians["compiled"] / medians["eager"],
            "compiled_train": {"model": COMPILED, "batch": batch, "median_seconds": medians,
                               "compile_seconds": compile_seconds}}


def run(train_batch: int = 128, eval_batch: int = 64, repeats: int = 9, warmup: int = 2,
        variants: list[str] | None = None, device: str = "cpu", channels_last: bool = False,
        compiled: bool = True, rounds: int = 1) -> dict:
    """Ratios of medians of interleaved timings; with ``rounds`` > 1 the interleaved measurement is repeated
    and each ratio is the median of its per-round values, their range reported beside it (on a shared
    machine a single measurement's ratios move by a few hundredths from one run to the next)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds: got {rounds!r}; allowed values are integers >= 1")
    names = variants or ["torchvision", "baseline_unfused", *VARIANTS]
    dev = torch.device(device)
    models = {k: m.to(dev) for k, m in build_variants(names).items()}
    if channels_last:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(train_batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (train_batch,), device=dev)
    xe = torch.randn(eval_batch, 3, 32, 32, device=dev).contiguous(memory_format=fmt)
    steps = {"train": {k: make_train_step(m, x, y) for k, m in models.items()},
             "eval": {k: make_eval_step(m, xe) for k, m in models.items()}}
    steps["train"][DATA] = make_data_step(train_batch, dev, channels_last)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    per_round: list[dict[str, dict[str, list[float]]]] = []
    start = time.time()
    for round_index in range(rounds):
        times: dict[str, dict[str, list[float]]] = {}
        for mode, fns in steps.items():
            for _ in range(warmup if round_index == 0 else 0):  # warm-up, including compiling the kernels
                for fn in fns.values():
                    fn()
            times[mode] = time_interleaved(fns, repeats * (EVAL_REPEATS_FACTOR if mode == "eval" else 1), sync)
        per_round.append(times)
    round_ratios = [_ratios({mode: {k: statistics.median(v) for k, v in per.items()} for mode, per in t.items()})
                    for t in per_round]
    pooled = {mode: {k: [s for t in per_round for s in t[mode][k]] for k in steps[mode]} for mode in steps}
    medians = {mode: {k: statistics.median(v) for k, v in per.items()} for mode, per in pooled.items()}
    ratios = _ratios(medians) if rounds == 1 else {
        key: statistics.median(r[key] for r in round_ratios) for key in round_ratios[0]}
    activation_mb = {k: saved_activation_bytes(m, (train_batch, 3, 32, 32)) / 2**20 for k, m in models.items()}
    if compiled and dev.type == "cpu":
        ratios.update(compiled_train_ratio(channels_last=channels_last, repeats=repeats))
    if dev.type == "cpu":
        ratios.update(evaluation_ratio())
    return {
        **ratios,
        "targets": TARGETS,
        "median_seconds": medians,
        "saved_activation_MiB_train_batch": activation_mb,
        **({"ratio_rounds": {key: [r[key] for r in round_ratios] for key in round_ratios[0]}} if rounds > 1 else {}),
        "config": {**BASE, "input": [3, 32, 32], "train_batch": train_batch, "eval_batch": eval_batch,
                   "train_repeats": repeats, "eval_repeats": repeats * EVAL_REPEATS_FACTOR, "warmup": warmup,
                   "rounds": rounds,
                   "channels_last": channels_last, "allocator": allocator.mode()},
        "kernels": kernel_paths(dev),
        "machine": {"device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), **cpu_description()},
        "wall_seconds": time.time() - start,
    }


def _ratios(medians: dict[str, dict[str, float]]) -> dict[str, float]:
    return {key: medians[mode][a] / medians[mode][b] for key, a, b, mode in RATIOS
            if a in medians[mode] and b in medians[mode]}


def cpu_description(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The CPU model and its widest vector unit ("avx512", "avx2" or "other"), where Linux tells: the ratios
    move by several times between AVX2 and AVX-512 machines (the kernels' register tiles differ)."""
    try:
        with open(cpuinfo) as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
    except OSError:
        return {}
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return {"cpu": fields.get("model name", "unknown"), "vector_isa": isa}


def evaluation_ratio(images: int = 1000, repeats: int = 5, old_batch: int = 500) -> dict:
    """Median seconds of ``engine.train.evaluate`` (BatchNorm folded, CPU chunks) over those of the same
    evaluation done as before (the model itself, in batches of ``old_batch``), on the quick profile's
    network (width 0.5, ``cifar_lite``, channels_last) with non-trivial BatchNorm statistics. No target:
    a speed-up of every run's evaluations, reported as measured (docs/speed.md)."""
    from ..engine.train import evaluate

    torch.manual_seed(0)
    model = build_model(num_classes=10, width_mult=0.5, stem="cifar_lite").to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    model.eval()
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (images,))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    scale = torch.tensor(std).view(1, 3, 1, 1) * 255

    @torch.no_grad()
    def before() -> None:  # evaluate() before the fold: the model itself, whole batches
        for i in range(0, images, old_batch):
            x = ((data[i:i + old_batch].float() - torch.tensor(mean).view(1, 3, 1, 1) * 255) / scale)
            model(x.contiguous(memory_format=torch.channels_last)).argmax(1)

    steps = {"before": before, "now": lambda: evaluate(model, data, labels, mean, std, old_batch, "cpu", True)}
    for fn in steps.values():
        fn()
    medians = {k: statistics.median(v) for k, v in time_interleaved(steps, repeats).items()}
    return {"evaluation_ratio": medians["now"] / medians["before"],
            "evaluation": {"images": images, "batch": old_batch, "median_seconds": medians,
                           "images_per_s": {k: images / v for k, v in medians.items()}}}


def to_markdown(result: dict) -> str:
    config = result["config"]
    machine = result["machine"]
    cpu = f", {machine['cpu']} ({machine['vector_isa']})" if "cpu" in machine else ""
    lines = [f"# Speed benchmark ({machine['device']}{cpu}, {machine['threads']} threads, "
             f"torch {machine['torch']})", "",
             "MobileNetV2 width 0.5, CIFAR stem, 32x32; training step at batch "
             f"{config['train_batch']}, inference at batch {config['eval_batch']}; "
             f"ratios of medians of interleaved runs ({config.get('train_repeats', config.get('repeats'))} training "
             f"steps, {config.get('eval_repeats', '')} inference steps per variant; allocator: "
             f"{config.get('allocator', 'system')})"
             + (f"; each ratio the median of {config['rounds']} such rounds, their range in brackets."
                if config.get("rounds", 1) > 1 else "."), "",
             "Kernels: " + ", ".join(f"{k} {v}" for k, v in result.get("kernels", {}).items()), "",
             "| ratio | measured | target |", "|---|---|---|"]
    for key, *_ in RATIOS:
        if key in result:
            target = result["targets"].get(key)
            verdict = "" if target is None else (f"<= {target}" + (" ok" if result[key] <= target else " MISSED"))
            spread = result.get("ratio_rounds", {}).get(key)
            measured = f"{result[key]:.3f}" + (f" [{min(spread):.3f}-{max(spread):.3f}]" if spread else "")
            lines.append(f"| {key} | {measured} | {verdict} |")
    lines += ["", "| variant | train step (ms) | inference (ms) | saved activations (MiB) |", "|---|---|---|---|"]
    for name in result["median_seconds"]["eval"]:
        lines.append(f"| {name} | {1000 * result['median_seconds']['train'][name]:.1f} | "
                     f"{1000 * result['median_seconds']['eval'][name]:.1f} | "
                     f"{result['saved_activation_MiB_train_batch'][name]:.1f} |")
    if DATA in result["median_seconds"]["train"]:
        lines.append(f"| {DATA} | {1000 * result['median_seconds']['train'][DATA]:.2f} | | |")
    if "evaluation_ratio" in result:
        info = result["evaluation"]
        target = result["targets"].get("evaluation_ratio")
        lines += ["", f"Evaluation of {info['images']} images (`engine.train.evaluate`: BatchNorm folded into the "
                  f"convolutions, CPU chunks) against the model itself in batches of {info['batch']}, quick "
                  f"profile's network: {info['images_per_s']['now']:.0f} against {info['images_per_s']['before']:.0f} "
                  f"images/s, evaluation_ratio {result['evaluation_ratio']:.3f}"
                  + (f" (target <= {target}: {'ok' if result['evaluation_ratio'] <= target else 'MISSED'})."
                     if target is not None else ".")]
    if "compiled_train_ratio" in result:
        info = result["compiled_train"]
        lines += ["", f"torch.compile (inductor) training step of {info['model']} at batch {info['batch']}: "
                  f"{1000 * info['median_seconds']['compiled']:.1f} ms against {1000 * info['median_seconds']['eager']:.1f} ms "
                  f"eager, compiled_train_ratio {result['compiled_train_ratio']:.3f} (compiling took "
                  f"{info['compile_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="MobileNetV2 improvements: speed ratios, interleaved.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="timed training steps per variant "
                        f"(inference: {EVAL_REPEATS_FACTOR}x as many)")
    parser.add_argument("--allocator", choices=allocator.CHOICES, default=None,
                        help="steady: keep freed memory in the process, as training does (default, or "
                             f"${allocator.ENV}); system: glibc's defaults (page faults in every step)")
    parser.add_argument("--train-batch", type=int, default=128)
    parser.add_argument("--eval-batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (kernels compile here)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved measurement; each ratio is "
                        "the median over rounds, its range reported (a few hundredths between runs here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--variants", nargs="*")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile training-step ratio")
    parser.add_argument("--output", default=str(paths.REPORTS_DIR / "bench.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator is not None:
        os.environ[allocator.ENV] = args.allocator
    allocator.keep_freed_memory()
    result = run(train_batch=args.train_batch, eval_batch=args.eval_batch, repeats=args.repeats, warmup=args.warmup,
                 variants=args.variants, device=args.device, channels_last=args.channels_last,
                 compiled=not args.no_compile, rounds=args.rounds)
    out = paths.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"written: {out}, {out.with_suffix('.md')} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
