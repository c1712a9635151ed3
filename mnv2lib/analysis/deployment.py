"""The deployment study (notebook 07): which trained variants go to which runtime at which sizes, and
the sentences that state its results, generated from the numbers."""
from __future__ import annotations

import dataclasses

import pandas as pd

from ..engine.deploy import TARGETS, DeploySizes
from .work_sizes import work_sizes

# variant name -> model overrides of the results store's runs (notebook 04's ablation, the activations)
ACTIVATION_VARIANTS = {"relu6": {}, "relu": {"activation": "relu"}, "mish": {"activation": "mish"},
                       "silu": {"activation": "silu"}, "hardswish": {"activation": "hardswish"}}
IMPROVEMENT_VARIANTS = {"relu6": {}, "mish": {"activation": "mish"}, "triplet": {"attention": "triplet"},
                        "cnsn": {"cnsn": "cnsn"}}
DISPLAY = {"relu6": "ReLU6 (baseline)", "relu": "ReLU", "mish": "Mish", "silu": "SiLU", "hardswish": "Hardswish",
           "triplet": "Triplet Attention", "cnsn": "CNSN"}
TARGET_LABELS = {t: f"{'PyTorch eager' if t[0] == 'pytorch' else 'ONNX Runtime' if t[0] == 'onnxruntime' else 'ExecuTorch'}"
                 f" {t[1]}" for t in TARGETS}


@dataclasses.dataclass(frozen=True)
class DeployPlan:
    variants: tuple                 # variant names, each a key of ACTIVATION_VARIANTS or IMPROVEMENT_VARIANTS
    executorch_variants: tuple      # those also lowered to ExecuTorch (its lowering costs ~0.5-2 min each)
    sizes: DeploySizes


def deploy_plan(profile) -> DeployPlan:
    """The study's plan under ``profile`` (``mnv2lib.analysis.work_sizes``; "all": every variant above)."""
    sizes = work_sizes(profile, "deployment")
    every = tuple(dict.fromkeys([*ACTIVATION_VARIANTS, *IMPROVEMENT_VARIANTS]))
    pick = lambda names: every if names == "all" else tuple(names)  # noqa: E731
    return DeployPlan(pick(sizes["variants"]), pick(sizes["executorch_variants"]), DeploySizes(**sizes["sizes"]))


def variant_overrides(name: str) -> dict:
    table = {**ACTIVATION_VARIANTS, **IMPROVEMENT_VARIANTS}
    if name not in table:
        raise ValueError(f"variant: got {name!r}; allowed values are {tuple(table)}")
    return dict(table[name])


def results_table(results: pd.DataFrame) -> pd.DataFrame:
    """Variants x targets: size, batch-1 latency, clean and corruption accuracy (percent)."""
    table = results.copy()
    table["target"] = [TARGET_LABELS[(r, p)] for r, p in zip(table["runtime"], table["precision"])]
    for column in ("clean_accuracy", "mean_corruption_accuracy"):
        table[column] = 100 * table[column]
    keep = ["variant", "target", "size_MB", "latency_ms_batch1"] + [c for c in table if c.startswith("latency_ms_batch")
                                                                     and c != "latency_ms_batch1"] + \
           ["clean_accuracy", "mean_corruption_accuracy"]
    return table[keep].dropna(axis=1, how="all").round(3)


def _pp(x: float) -> str:
    return f"{x:+.1f} points"


