"""MobileNet families side by side (notebook 05): costs at several resolutions, and the
MobileNetV2 paper's Table 3 memory comparison recomputed from the models."""
from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from ..engine.measure import count_parameters, make_eval_step, multiply_adds, time_call
from ..models import InvertedResidual, arch_names, build_model
from .work_sizes import work_sizes

BYTES_PER_VALUE = 2  # the paper assumes 16-bit activations


def family_entries() -> dict[str, dict]:
    """Display name -> build_model overrides, for every family registered in this version."""
    entries = {
        "MobileNetV1": {"arch": "mobilenet_v1"},
        "MobileNetV2": {},
        "MobileNetV2 + Mish": {"activation": "mish"},
        "MobileNetV2 + Mish + TA + CNSN": {"activation": "mish", "attention": "triplet", "cnsn": "cnsn"},
    }
    v4 = {"mobilenet_v4_conv_small": "MobileNetV4 conv-S", "mobilenet_v4_conv_medium": "MobileNetV4 conv-M",
          "mobilenet_v4_conv_large": "MobileNetV4 conv-L", "mobilenet_v4_hybrid_medium": "MobileNetV4 hybrid-M",
          "mobilenet_v4_hybrid_large": "MobileNetV4 hybrid-L", "mobilenet_v4_nano": "MobileNetV4 nano"}
    for arch, name in v4.items():
        if arch in arch_names():
            entries[name] = {"arch": arch}
    return entries


def cost_table(entries: dict[str, dict], resolution: int = 224, num_classes: int = 1000,
               latency_repeats: int = 5, measure_latency: bool = True) -> pd.DataFrame:
    """Parameters, multiply-adds and single-image CPU latency (median after warm-up) per model."""
    rows = []
    for name, overrides in entries.items():
        model = build_model(num_classes=num_classes, **overrides).eval()
        row = {"model": name, "resolution": resolution, "parameters": count_parameters(model),
               "multiply_adds": multiply_adds(model, (1, 3, resolution, resolution))}
        if measure_latency:
            x = torch.randn(1, 3, resolution, resolution)
            times = time_call(make_eval_step(model, x), torch.device("cpu"), warmup=2, repeats=latency_repeats)
            row["latency_ms"] = 1000 * sorted(times)[len(times) // 2]
        rows.append(row)
    return pd.DataFrame(rows)


def materialized_memory(model: nn.Module, resolution: int = 224) -> pd.DataFrame:
    """Largest tensor that must be materialized at each spatial resolution, in channels and KB (16-bit).

    As in the MobileNetV2 paper (Section 5.1, Table 3): an inverted residual block can compute
    its expansion, depthwise conv and projection channel-chunk by chunk, so only its thin input
    and output (the bottleneck tensors) are ever materialized; in any other network every
    convolution's output is. The stem output feeding the first block and the head conv feeding
    the global pool can be streamed the same way (the paper's "first layer trick"), so they
    are not counted for networks built of inverted residual blocks.
    """
    rows: list[tuple[int, int]] = []
    has_blocks = any(isinstance(m, InvertedResidual) for m in model.modules())

    def record(module, args, output):
        if isinstance(output, torch.Tensor) and output.dim() == 4:
            rows.append((output.shape[-1], output.shape[1]))

    watched = [m for m in model.modules()
               if (isinstance(m, InvertedResidual) if has_blocks else isinstance(m, nn.Conv2d))]
    handles = [m.register_forward_hook(record) for m in watched]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, model_in_channels(model), resolution, resolution))
    finally:
        for h in handles:
            h.remove()
    frame = pd.DataFrame(rows, columns=["resolution", "channels"])
    table = frame.groupby("resolution")["channels"].max().sort_index(ascending=False).to_frame()
    table["kb"] = table["channels"] * table.index.to_numpy() ** 2 * BYTES_PER_VALUE / 1000
    return table


def model_in_channels(model: nn.Module) -> int:
    return getattr(model, "in_channels", 3)


def memory_comparison(entries: dict[str, dict], resolution: int = 224) -> pd.DataFrame:
    """Table 3 style: rows = spatial resolution, columns = model, values = KB; last row the maximum."""
    columns = {}
    for name, overrides in entries.items():
        model = build_model(**overrides)
        columns[name] = materialized_memory(model, resolution)["kb"]
    table = pd.DataFrame(columns)
    table.loc["max"] = table.max()
    return table


def latency_repeats(profile) -> int:
    return work_sizes(profile, "families")["latency_repeats"]


def memory_models(entries: dict[str, dict]) -> list[str]:
    """The models of the memory comparison: V1 and V2 as in the paper (plus V4 conv-S when present)."""
    wanted = ["MobileNetV1", "MobileNetV2", "MobileNetV4 conv-S"]
    return [name for name in wanted if name in entries]


def trainable_members(entries: dict[str, dict]) -> dict[str, dict]:
    """The family members trained within the profile's budget (overrides for ``build_model``)."""
    wanted = ["MobileNetV1", "MobileNetV2", "MobileNetV2 + Mish + TA + CNSN", "MobileNetV4 nano"]
    return {name: entries[name] for name in wanted if name in entries}


def family_results(records: list[dict], members: dict[str, dict]) -> pd.DataFrame:
    """One row per finished run of a family member: accuracy and the costs measured with it."""
    rows = []
    for r in records:
        cfg = r["model_config"]
        for name, overrides in members.items():
            same_arch = cfg["arch"] == overrides.get("arch", "mobilenet_v2")
            same_options = all(cfg.get(k) == v for k, v in overrides.items()) and all(
                cfg.get(k) in (None, "relu6") or k in overrides for k in ("activation", "attention", "cnsn"))
            if same_arch and same_options:
                costs = r.get("costs") or {}
                rows.append({"model": name, "seed": r["seed"], "clean_accuracy": r["clean_accuracy"],
                             "mean_corruption_accuracy": r.get("mean_corruption_accuracy"),
                             "train_seconds": r.get("train_seconds"), "parameters": costs.get("parameters"),
                             "multiply_adds": costs.get("multiply_adds"),
                             "latency_ms_batch1": costs.get("latency_ms_batch1")})
                break
    return pd.DataFrame(rows)


