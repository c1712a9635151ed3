"""The sentences of notebook prose about families, generated from the numbers (computation: ``mnv2lib.analysis.families``)."""
from __future__ import annotations

import pandas as pd


def describe_costs(costs: pd.DataFrame) -> str:
    c = costs.set_index("model")
    v1, v2 = c.loc["MobileNetV1"], c.loc["MobileNetV2"]
    lines = [f"- At {int(v2['resolution'])}x{int(v2['resolution'])}, MobileNetV2 needs "
             f"{v2['multiply_adds'] / 1e6:.0f}M multiply-adds and {v2['parameters'] / 1e6:.2f}M parameters, "
             f"{v1['multiply_adds'] / v2['multiply_adds']:.1f}x fewer multiply-adds than MobileNetV1 "
             f"({v1['multiply_adds'] / 1e6:.0f}M, {v1['parameters'] / 1e6:.2f}M parameters)."]
    if "latency_ms" in c:
        lines.append(f"- Measured CPU latency at batch 1: MobileNetV1 {v1['latency_ms']:.1f} ms, MobileNetV2 "
                     f"{v2['latency_ms']:.1f} ms; fastest model here: {c['latency_ms'].idxmin()} "
                     f"({c['latency_ms'].min():.1f} ms).")
    full = "MobileNetV2 + Mish + TA + CNSN"
    if full in c.index:
        lines.append(f"- All three improvements add {(c.loc[full, 'parameters'] - v2['parameters']) / 1e3:.1f}k "
                     f"parameters and change multiply-adds by "
                     f"{100 * (c.loc[full, 'multiply_adds'] / v2['multiply_adds'] - 1):+.2f}%"
                     + (f"; latency changes by {100 * (c.loc[full, 'latency_ms'] / v2['latency_ms'] - 1):+.0f}%."
                        if "latency_ms" in c else "."))
    return "\n".join(lines)


def describe_memory(memory: pd.DataFrame) -> str:
    peak = memory.loc["max"]
    lines = [f"- Peak materialized memory: " + ", ".join(f"{name} {kb:.0f} KB" for name, kb in peak.items()) + "."]
    if {"MobileNetV1", "MobileNetV2"} <= set(peak.index):
        lines.append(f"- MobileNetV2 needs {peak['MobileNetV1'] / peak['MobileNetV2']:.1f}x less than MobileNetV1 "
                     "(the paper's Table 3 reports 1600K against 400K).")
    return "\n".join(lines)


def describe_family_accuracy(results: pd.DataFrame) -> str:
    means = results.groupby("model")["clean_accuracy"].agg(["mean", "count"])
    best = means["mean"].idxmax()
    parts = ", ".join(f"{name} {100 * row['mean']:.1f}% ({int(row['count'])} seed(s))" for name, row in means.iterrows())
    return f"- Clean accuracy within this budget: {parts}. Best: **{best}**."
