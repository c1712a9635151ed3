"""Notebook 08: the variants as backbones of SSDLite detection and DeepLabv3 segmentation (and the
classifier they come from), measured side by side: parameters, multiply-adds, the largest layer's
working set, and batch-1 CPU latency in eager PyTorch (the native operators) and ONNX Runtime.

Nothing here is trained: costs belong to the architecture. The MobileNetV2 paper's own numbers for its
SSDLite (Table 6) and DeepLabv3 (Table 7) rows are kept in :data:`PAPER` to compare the baseline with.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from ..engine.measure import count_parameters, largest_layer_bytes, multiply_adds, time_interleaved
from ..models import build_model
from ..models.heads import build_deeplabv3, build_lraspp, build_ssdlite
from ..utils.progress import progress
from .work_sizes import work_sizes

VARIANTS = {"baseline": {}, "mish": {"activation": "mish"}, "triplet": {"attention": "triplet"},
            "cnsn": {"cnsn": "cnsn"}}
HEAD_NAMES = {"classifier": "ImageNet classifier", "ssdlite": "SSDLite", "deeplabv3": "DeepLabv3 (ASPP)",
              "lraspp": "LR-ASPP"}
# The MobileNetV2 paper (Sandler et al., CVPR 2018): Table 6, "MNet V2 + SSDLite" on COCO at 320x320;
# Table 7, "MNet V2*" DeepLabv3 with ASPP at output stride 16 on PASCAL VOC (513x513 inputs); and the
# 224x224 classifier (Table 4). Parameters in millions, multiply-adds in billions, as printed there.
PAPER = {
    "classifier": {"resolution": 224, "parameters_M": 3.4, "multiply_adds_B": 0.300, "source": "Table 4"},
    "ssdlite": {"resolution": 320, "parameters_M": 4.3, "multiply_adds_B": 0.8, "source": "Table 6"},
    "deeplabv3": {"resolution": 513, "parameters_M": 4.52, "multiply_adds_B": 5.8, "source": "Table 7 (OS 16, ASPP)"},
}


class DetectorNetwork(nn.Module):
    """SSDLite without its image transform, box decoding and NMS: images in, one tensor of per-anchor
    box regressions and class logits out (what the paper's multiply-adds count, and what exports)."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(list(self.backbone(x).values()))
        return torch.cat([out["bbox_regression"], out["cls_logits"]], dim=-1)


class SegmenterNetwork(nn.Module):
    """A torchvision segmentation model's ``"out"`` logits as a plain tensor."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmenter(x)["out"]


def network(head: str, overrides: dict) -> nn.Module:
    """The eval-mode network of ``head`` over ``build_model(**overrides)`` (COCO's 91 / VOC's 21 classes)."""
    if head == "classifier":
        return build_model(**overrides).eval()
    if head == "ssdlite":
        return DetectorNetwork(build_ssdlite(num_classes=91, **overrides)).eval()
    if head == "deeplabv3":
        return SegmenterNetwork(build_deeplabv3(num_classes=21, **overrides)).eval()
    if head == "lraspp":
        return SegmenterNetwork(build_lraspp(num_classes=21, **overrides)).eval()
    raise ValueError(f"head: got {head!r}; allowed values are {tuple(HEAD_NAMES)}")


def application_plan(profile) -> dict:
    """What notebook 08 measures under ``profile`` (``mnv2lib.analysis.work_sizes``)."""
    return work_sizes(profile, "applications")


def _interleaved_ms(calls: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median milliseconds of each call on ``x``, timed side by side in changing orders after one warm-up
    round: a network timed first, alone, pays the process's warm-up (thread pools, allocator, kernels)."""
    steps = {name: (lambda f=f: f(x)) for name, f in calls.items()}
    with torch.no_grad():
        for step in steps.values():
            step()
        times = time_interleaved(steps, repeats)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def measure_head(head: str, variants, resolution: int, repeats: int, onnx: bool, width_mult: float = 1.0,
                 work_dir: Path | None = None) -> list[dict]:
    """The cost table's rows of one head: parameters, multiply-adds and largest layer working set per
    variant, and batch-1 latencies timed interleaved across the variants (eager, and ONNX Runtime)."""
    shape = (1, 3, resolution, resolution)
    networks = {}
    for variant in variants:
        torch.manual_seed(0)
        networks[variant] = network(head, {**VARIANTS[variant], "width_mult": width_mult})
    rows = {v: {"head": head, "variant": v, "resolution": resolution, "width_mult": width_mult,
                "parameters": count_parameters(m), "multiply_adds": multiply_adds(m, shape),
                "largest_layer_MB": largest_layer_bytes(m, shape) / 1e6, "latency_ms_onnx": float("nan")}
            for v, m in networks.items()}
    x = torch.randn(shape)
    for v, ms in _interleaved_ms(networks, x, repeats).items():
        rows[v]["latency_ms_eager"] = ms
    if onnx:
        from ..engine.deploy import build_deployments, default_workers

        onnx_fp32 = ("onnxruntime", "fp32")
        with tempfile.TemporaryDirectory(prefix="mnv2-applications-", dir=work_dir) as folder:
            # exported side by side, one process per core (an export is single-threaded Python, 15-30 s
            # for SSDLite here), then timed here alone
            built = build_deployments(networks, [], folder, shape, lambda name: (onnx_fp32,),
                                      workers=default_workers(len(networks)), show_progress=False)
            deployed = {}
            for v, targets in built.items():
                if isinstance(targets[onnx_fp32], Exception):
                    raise targets[onnx_fp32]
                deployed[v] = targets[onnx_fp32]
            for v, ms in _interleaved_ms(deployed, x, repeats).items():
                rows[v]["latency_ms_onnx"] = ms
    return list(rows.values())


def cost_table(plan: dict, show_progress: bool = True) -> pd.DataFrame:
    """Every variant under every head of ``plan`` at its resolution (one head at a time)."""
    rows = []
    for head in progress(plan["heads"], enabled=show_progress, desc="heads", unit="head"):
        rows += measure_head(head, plan["variants"], plan["resolutions"][head], plan["latency_repeats"],
                             head in plan["onnx_heads"], plan["width_mult"])
    return pd.DataFrame(rows)


def relative_costs(table: pd.DataFrame) -> pd.DataFrame:
    """Each variant's costs as a ratio to the baseline's under the same head and resolution."""
    metrics = ["parameters", "multiply_adds", "largest_layer_MB", "latency_ms_eager", "latency_ms_onnx"]
    base = table[table["variant"] == "baseline"].set_index(["head", "resolution"])[metrics]
    out = table.set_index(["head", "resolution"])
    ratios = out[metrics] / base.reindex(out.index)
    ratios.insert(0, "variant", out["variant"])
    return ratios.reset_index()


def paper_comparison(table: pd.DataFrame) -> pd.DataFrame:
    """The baseline's parameters and multiply-adds beside the paper's, where the resolution matches."""
    rows = []
    for head, paper in PAPER.items():
        match = table[(table["head"] == head) & (table["variant"] == "baseline")
                      & (table["resolution"] == paper["resolution"]) & (table["width_mult"] == 1.0)]
        if match.empty:
            continue
        r = match.iloc[0]
        rows.append({"head": head, "resolution": paper["resolution"], "source": paper["source"],
                     "parameters_M": r["parameters"] / 1e6, "paper_parameters_M": paper["parameters_M"],
                     "multiply_adds_B": r["multiply_adds"] / 1e9, "paper_multiply_adds_B": paper["multiply_adds_B"]})
    return pd.DataFrame(rows)


def triplet_growth(table: pd.DataFrame) -> pd.DataFrame:
    """Triplet Attention's extra multiply-adds and eager latency over the baseline, per head and resolution."""
    ratios = relative_costs(table)
    rows = ratios[ratios["variant"] == "triplet"][["head", "resolution", "multiply_adds", "latency_ms_eager"]]
    extra = table[table["variant"] == "triplet"].set_index(["head", "resolution"])["multiply_adds"] - \
        table[table["variant"] == "baseline"].set_index(["head", "resolution"])["multiply_adds"]
    rows = rows.assign(extra_multiply_adds_M=[extra.get((h, r), float("nan")) / 1e6
                                              for h, r in zip(rows["head"], rows["resolution"])])
    return rows.rename(columns={"multiply_adds": "multiply_adds_ratio", "latency_ms_eager": "latency_ratio"})
