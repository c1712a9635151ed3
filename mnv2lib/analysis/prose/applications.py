"""The sentences of notebook 08 (the variants as backbones), generated from the numbers (computation:
``mnv2lib.analysis.applications``)."""
from __future__ import annotations

import math

import pandas as pd

from ..applications import HEAD_NAMES


def _pct(ratio: float) -> str:
    return "n/a" if ratio is None or math.isnan(ratio) else f"{100 * (ratio - 1):+.0f}%"


def describe_costs(table: pd.DataFrame, relative: pd.DataFrame) -> str:
    """Per head: the baseline's costs and what each improvement changes."""
    lines = []
    for (head, resolution), rows in table.groupby(["head", "resolution"], sort=False):
        base = rows[rows["variant"] == "baseline"].iloc[0]
        onnx = "" if math.isnan(base["latency_ms_onnx"]) else f", {base['latency_ms_onnx']:.0f} ms in ONNX Runtime"
        parts = [f"**{HEAD_NAMES.get(head, head)} at {resolution}x{resolution}**: the baseline has "
                 f"{base['parameters'] / 1e6:.2f}M parameters and {base['multiply_adds'] / 1e9:.2f}B multiply-adds, "
                 f"its largest layer works on {base['largest_layer_MB']:.1f} MB, and one image takes "
                 f"{base['latency_ms_eager']:.0f} ms in eager PyTorch{onnx}."]
        rel = relative[(relative["head"] == head) & (relative["resolution"] == resolution)]
        for _, r in rel[rel["variant"] != "baseline"].iterrows():
            onnx_part = "" if math.isnan(r["latency_ms_onnx"]) else f", ONNX Runtime latency {_pct(r['latency_ms_onnx'])}"
            parts.append(f"{r['variant']}: multiply-adds {_pct(r['multiply_adds'])}, parameters "
                         f"{_pct(r['parameters'])}, eager latency {_pct(r['latency_ms_eager'])}{onnx_part}.")
        lines.append("- " + " ".join(parts))
    return "\n".join(lines)


def describe_paper_comparison(comparison: pd.DataFrame) -> str:
    """The measured baseline beside the paper's rows, and why they differ."""
    if comparison.empty:
        return ("No network of this run has the paper's width and resolution (the smoke profile measures small "
                "ones), so there is nothing to compare with the paper's tables.")
    # the settings that differ from the paper's: stated, not judged (the numbers beside them say how much)
    settings = {
        "classifier": "the same network; the paper prints 3.4M and 300M, rounded",
        "ssdlite": ("torchvision's SSDLite predicts 6 anchors at every location, the first map included, where the "
                    "paper's (TensorFlow Object Detection API) uses 3 on the first map, and counts 91 COCO classes; "
                    "the backbone taps and extra layers are the paper's (first head on the expansion of layer 15, "
                    "second on the last layer, extras 512-256-256-128)"),
        "deeplabv3": ("torchvision's DeepLabHead adds a 3x3 convolution (256 to 256 channels) after ASPP, whose "
                      "convolutions are regular 3x3 ones as in DeepLabv3; the paper does not list its head's layers; "
                      "the backbone reads the second last feature map (320 channels) at output stride 16, as the "
                      "paper's MNet V2*"),
    }
    lines = []
    for _, r in comparison.iterrows():
        lines.append(f"- {HEAD_NAMES.get(r['head'], r['head'])} at {r['resolution']}x{r['resolution']} ({r['source']}): "
                     f"{r['parameters_M']:.2f}M parameters against the paper's {r['paper_parameters_M']:.2f}M "
                     f"({100 * (r['parameters_M'] / r['paper_parameters_M'] - 1):+.0f}%), "
                     f"{r['multiply_adds_B']:.2f}B multiply-adds against {r['paper_multiply_adds_B']:.2f}B "
                     f"({100 * (r['multiply_adds_B'] / r['paper_multiply_adds_B'] - 1):+.0f}%): settings: {settings.get(r['head'], '')}.")
    return "\n".join(lines)


def describe_triplet_growth(growth: pd.DataFrame) -> str:
    """How Triplet Attention's cost grows with the map size."""
    if growth.empty:
        return "Triplet Attention was not measured in this run."
    parts = [f"{HEAD_NAMES.get(r['head'], r['head'])} at {r['resolution']}x{r['resolution']}: "
             f"{r['extra_multiply_adds_M']:.1f}M extra multiply-adds ({_pct(r['multiply_adds_ratio'])}), eager "
             f"latency {_pct(r['latency_ratio'])}" for _, r in growth.iterrows()]
    return ("Triplet Attention's gates are k x k convolutions over pooled maps of every block's output, so its "
            "multiply-adds grow with the number of pixels while the backbone's grow with pixels x channels: "
            + "; ".join(parts) + ".")
