"""The sentences of notebook prose about cnsn, generated from the numbers (computation: ``mnv2lib.analysis.cnsn``)."""
from __future__ import annotations

import math

import pandas as pd
from torch import nn

from ..cnsn import (
    CROSSNORM_VARIANTS,
    WEAK_CORRELATION,
    _corrupted,
    _extremes,
    cnsn_modules,
    corruption_order,
    variant_label,
)


def summarize_shift(shift: pd.DataFrame, statistic: str = "mean") -> str:
    """Sentences: which corruptions move the per-channel statistics furthest from clean, against the
    train-vs-clean baseline, and how the distance grows with severity and depth."""
    s = shift[shift["statistic"] == statistic]
    corrupted = _corrupted(s)
    name = {"mean": "per-channel means", "std": "per-channel stds", "selfnorm_mean": "per-channel means after SelfNorm",
            "selfnorm_std": "per-channel stds after SelfNorm"}.get(statistic, statistic)
    if corrupted.empty:
        return f"- No corrupted test set was measured, so no shift of the {name} can be reported."
    per = corrupted.groupby("source", observed=True)["distance"].mean().sort_values(ascending=False)
    lines = [f"- Averaged over layers and severities, the {name} of corrupted test images lie a standardized "
             f"Wasserstein distance of **{per.mean():.2f}** clean-spread units from the clean ones; they move "
             f"{_extremes(per, '.2f')}."]
    train = s[s["source"] == "train"]["distance"]
    if len(train):
        ratio = per.mean() / train.mean() if train.mean() > 0 else math.inf
        relation = (f"corruption moves the statistics {ratio:.1f} times as far as the train/test difference"
                    if ratio >= 1 else
                    f"corruption moves the statistics less than the train/test difference ({ratio:.2f} times as far)")
        lines.append(f"- For comparison, training images sit {train.mean():.2f} units from clean test images: "
                     f"{relation}.")
    by_severity = corrupted.groupby("severity")["distance"].mean()
    if len(by_severity) > 1:
        lines.append(f"- The distance grows from {by_severity.iloc[0]:.2f} at severity {by_severity.index[0]} to "
                     f"{by_severity.iloc[-1]:.2f} at severity {by_severity.index[-1]}.")
    by_block = corrupted.groupby("block")["distance"].mean()
    lines.append(f"- By depth, the shift is largest at block {by_block.idxmax()} ({by_block.max():.2f}) and "
                 f"smallest at block {by_block.idxmin()} ({by_block.min():.2f}).")
    return "\n".join(lines)


def summarize_coverage(cov: pd.DataFrame) -> str:
    """Sentences: the fraction of corrupted-test statistics inside the training range, per CrossNorm variant."""
    corrupted = _corrupted(cov)
    if corrupted.empty:
        return "- No corrupted test set was measured, so coverage cannot be reported."
    per = corrupted.groupby("crossnorm", sort=False)["covered"].mean()
    clean = cov[(cov["source"] == "clean") & (cov["crossnorm"] == "off")]["covered"].mean()
    lines = [f"- Without CrossNorm, the training images' range contains **{100 * per['off']:.1f}%** of the "
             f"corrupted test images' per-channel (mean, std) pairs, against {100 * clean:.1f}% of the clean "
             "test images' (averaged over layers, corruptions and severities)."]
    others = per.drop("off")
    if len(others):
        best = others.idxmax()
        parts = ", ".join(f"{v} {100 * p:.1f}%" for v, p in others.items())
        lines.append(f"- With CrossNorm-augmented training statistics: {parts}; **{best}** covers most "
                     f"({100 * (others.max() - per['off']):+.1f} percentage points over no CrossNorm).")
        if "2-instance" in others and abs(others["2-instance"] - per["off"]) < 0.005:
            lines.append("- 2-instance CrossNorm without crops adds (almost) no coverage at its own layer: it only "
                         "hands "
                         "each image another training image's statistics, so the set of (mean, std) pairs of a "
                         "channel stays the same; crops (statistics of a box) and 1-instance exchange (another "
                         "channel's statistics) produce new ones.")
        by_corruption = corrupted[corrupted["crossnorm"] == best].groupby("source")["covered"].mean().sort_values()
        if len(by_corruption) > 1:
            lines.append(f"- With {best}, the least covered corruption is **{by_corruption.index[0]}** "
                         f"({100 * by_corruption.iloc[0]:.1f}%), the best covered **{by_corruption.index[-1]}** "
                         f"({100 * by_corruption.iloc[-1]:.1f}%).")
    return "\n".join(lines)


def summarize_gates(response: pd.DataFrame, correlation: pd.DataFrame, shift_rho: float | None = None) -> str:
    """Sentences: how much SelfNorm's gates move under corruption, and whether that grows with severity."""
    corrupted = _corrupted(response)
    if corrupted.empty:
        return "- No corrupted test set was measured, so the gates' response cannot be reported."
    per = corrupted.groupby("source")["gate_change"].mean().sort_values(ascending=False)
    clean_gate = response[response["source"] == "clean"]["mean_gate"].mean()
    lines = [f"- On clean test images the SelfNorm gates average {clean_gate:.3f}. Under corruption a channel's "
             f"mean gate moves by **{per.mean():.4f}** on average (layers, corruptions, severities); "
             f"{_extremes(per, '.4f')}."]
    by_block = corrupted.groupby("block")["gate_change"].mean()
    lines.append(f"- The gates respond most at block {by_block.idxmax()} ({by_block.max():.4f}) and least at "
                 f"block {by_block.idxmin()} ({by_block.min():.4f}).")
    rho = correlation["rho"].dropna()
    if rho.empty:
        lines.append("- This profile measures a single severity, so the correlation between gate change and "
                     "severity is not defined; run the quick or full profile for it.")
    else:
        lines.append(f"- Gate change against severity: Spearman's rho averaged over layers is **{rho.mean():.2f}** "
                     f"over the {len(rho)} corruptions (from {rho.min():.2f} for "
                     f"{correlation.loc[rho.idxmin(), 'source']} to {rho.max():.2f} for "
                     f"{correlation.loc[rho.idxmax(), 'source']}); it is positive in "
                     f"{100 * correlation['positive_layers'].dropna().mean():.0f}% of (corruption, layer) pairs.")
    if shift_rho is not None and not math.isnan(shift_rho):
        if abs(shift_rho) < WEAK_CORRELATION:
            meaning = "hardly related: the gates do not systematically move more where the statistics move more"
        elif shift_rho > 0:
            meaning = "the gates move more where the statistics move more"
        else:
            meaning = "the gates move less where the statistics move more"
        lines.append(f"- Across layers, corruptions and severities, gate change and the shift of the per-channel "
                     f"means have Spearman's rho = {shift_rho:.2f}; {meaning}.")
    return "\n".join(lines)


def describe_model(model: nn.Module, record: dict) -> str:
    """A sentence on the model under study: its CNSN modules, CrossNorm setting and accuracies."""
    modules = cnsn_modules(model)
    config = getattr(model, "config", None)
    setting = (f"CrossNorm {variant_label(config.crossnorm_mode, config.crossnorm_crop)} with probability "
               f"{config.cn_prob:g} in {config.active_num} random modules per step, SelfNorm with "
               f"{'two gates' if config.selfnorm_two_gates else 'one gate'}") if config is not None else "CNSN"
    text = (f"The model has **{len(modules)} CNSN modules** (one per inverted residual block, after the block), "
            f"trained with {setting}.")
    if record.get("clean_accuracy") is not None:
        text += f" Clean test accuracy: {100 * record['clean_accuracy']:.1f}%"
        if record.get("mean_corruption_accuracy") is not None:
            text += f"; mean accuracy over the corrupted test sets: {100 * record['mean_corruption_accuracy']:.1f}%"
        text += "."
    return text


def describe_statistics(stats: pd.DataFrame) -> str:
    """What was recorded: layers, images per source, sources and CrossNorm variants."""
    off = stats[stats["crossnorm"] == "off"]
    images = off.groupby(["source", "severity"], observed=True)["sample"].nunique()
    corruptions = corruption_order(stats)
    severities = sorted(int(s) for s in off.loc[off["source"].isin(corruptions), "severity"].unique())
    variants = [v for v in CROSSNORM_VARIANTS if v != "off" and v in set(stats["crossnorm"].astype(str))]
    count = f"{images.min()}" if images.min() == images.max() else f"{images.min()}–{images.max()}"
    return (f"Recorded {len(stats):,} (layer, image, channel) statistics: {stats['layer'].nunique()} CNSN layers, "
            f"{count} images per set; training images (plain and after "
            f"{len(variants)} CrossNorm variants: {', '.join(variants) or 'none'}), clean test images and "
            f"{len(corruptions)} corruptions ({', '.join(corruptions)}) at severit"
            f"{'y' if len(severities) == 1 else 'ies'} {', '.join(map(str, severities))}.")


def summarize_selfnorm_effect(shift: pd.DataFrame) -> str:
    """Sentences: is the shift of the per-channel statistics smaller after SelfNorm than before it?"""
    s = _corrupted(shift)
    lines = []
    for before, after, name in (("mean", "selfnorm_mean", "means"), ("std", "selfnorm_std", "stds")):
        b = s[s["statistic"] == before].set_index(["layer", "source", "severity"])["distance"]
        a = s[s["statistic"] == after].set_index(["layer", "source", "severity"])["distance"]
        b, a = b.align(a, join="inner")
        if b.empty:
            continue
        change = (a.mean() - b.mean()) / b.mean() if b.mean() > 0 else 0.0
        lines.append(f"- The shift of the per-channel {name} is {b.mean():.2f} clean-spread units entering SelfNorm "
                     f"and {a.mean():.2f} leaving it ({100 * change:+.0f}%); SelfNorm reduces it in "
                     f"{100 * (a < b).mean():.0f}% of (layer, corruption, severity) cases.")
    return "\n".join(lines) or "- No corrupted test set was measured, so SelfNorm's effect cannot be reported."
