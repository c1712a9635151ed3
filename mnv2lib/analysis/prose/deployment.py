"""The sentences of notebook prose about deployment, generated from the numbers (computation: ``mnv2lib.analysis.deployment``)."""
from __future__ import annotations

import pandas as pd

from ..deployment import ACTIVATION_VARIANTS, DISPLAY, TARGET_LABELS, DeployPlan, _pp


def training_budget(profile) -> str:
    images = "all" if profile.train_size is None else f"{profile.train_size:,}"
    return (f"profile `{profile.name}`: {images} training images x {profile.train.epochs} epoch"
            f"{'s' if profile.train.epochs != 1 else ''}, width {profile.width_mult}, stem `{profile.stem}`")


def describe_int8(drops: pd.DataFrame, variants: list[str], question: str) -> str:
    """Sentences on the int8 accuracy change of ``variants`` (from deploy.int8_drop)."""
    rows = drops[drops["variant"].isin(variants)]
    if rows.empty:
        return f"{question}: no variant of this group has both an fp32 and an int8 model, so this run cannot say."
    parts = []
    for runtime, group in rows.groupby("runtime", sort=False):
        ordered = group.sort_values("clean_accuracy_drop_points")
        worst, best = ordered.iloc[0], ordered.iloc[-1]
        items = ", ".join(f"{DISPLAY.get(r.variant, r.variant)} {_pp(r.clean_accuracy_drop_points)}"
                          for r in group.itertuples())
        name = "ONNX Runtime" if runtime == "onnxruntime" else "ExecuTorch"
        parts.append(f"In {name}, int8 changes clean accuracy by: {items}. The largest loss is "
                     f"{DISPLAY.get(worst.variant, worst.variant)}'s ({_pp(worst.clean_accuracy_drop_points)}), "
                     f"the smallest {DISPLAY.get(best.variant, best.variant)}'s ({_pp(best.clean_accuracy_drop_points)}).")
    return f"**{question}** " + " ".join(parts)


def describe_relu6(drops: pd.DataFrame, test_images: int) -> str:
    """Does ReLU6 keep more accuracy in int8 than the other activations? (ONNX Runtime, where all ran.)"""
    rows = drops[(drops["runtime"] == "onnxruntime") & drops["variant"].isin(ACTIVATION_VARIANTS)]
    if "relu6" not in set(rows["variant"]) or len(rows) < 2:
        return "ReLU6 against the other activations: not every activation has an int8 model in this run."
    relu6 = rows.set_index("variant").at["relu6", "clean_accuracy_drop_points"]
    others = rows[rows["variant"] != "relu6"]
    better = others[others["clean_accuracy_drop_points"] > relu6]  # a change: the higher, the less lost
    resolution = 100 / max(test_images, 1)
    verdict = ("ReLU6 loses the least of the activations" if better.empty else
               f"ReLU6 loses more than {', '.join(DISPLAY[v] for v in better['variant'])}")
    spread = others["clean_accuracy_drop_points"].max() - others["clean_accuracy_drop_points"].min()
    return (f"{verdict} ({_pp(relu6)} against {others['clean_accuracy_drop_points'].min():+.1f} .. "
            f"{others['clean_accuracy_drop_points'].max():+.1f} for the others; one test image is "
            f"{resolution:.2f} points here, and the others spread over {spread:.1f} points).")


def describe_latency(results: pd.DataFrame, crossover_batch: int) -> str:
    parts = []
    for variant, group in results.groupby("variant", sort=False):
        by = {TARGET_LABELS[(r.runtime, r.precision)]: r.latency_ms_batch1 for r in group.itertuples()}
        fastest = min(by, key=by.get)
        eager = by.get(TARGET_LABELS[("pytorch", "fp32")])
        speedup = f", {eager / by[fastest]:.1f}x faster than PyTorch eager" if eager else ""
        parts.append(f"{DISPLAY.get(variant, variant)}: fastest in {fastest} ({by[fastest]:.2f} ms{speedup})")
    text = "Batch-1 latency, median after warm-up: " + "; ".join(parts) + "."
    column = f"latency_ms_batch{crossover_batch}"
    if column in results and results[column].notna().any():
        sentences = []
        for (variant, runtime), group in results.dropna(subset=[column]).groupby(["variant", "runtime"], sort=False):
            by = group.set_index("precision")
            if {"fp32", "int8"} <= set(by.index):
                faster = by.at["int8", column] < by.at["fp32", column]
                sentences.append(
                    f"{DISPLAY.get(variant, variant)} in {TARGET_LABELS[(runtime, 'int8')].rsplit(' ', 1)[0]}: int8 "
                    f"{by.at['int8', 'latency_ms_batch1']:.2f} vs fp32 {by.at['fp32', 'latency_ms_batch1']:.2f} ms at "
                    f"batch 1, {by.at['int8', column]:.2f} vs {by.at['fp32', column]:.2f} ms at batch "
                    f"{crossover_batch} (" + (f"int8 is faster there: the crossover lies between batch 1 and {crossover_batch})"
                                              if faster else f"int8 is still slower: any crossover lies above batch "
                                              f"{crossover_batch})"))
        if sentences:
            text += " Where int8 was slower than fp32 at batch 1: " + "; ".join(sentences) + "."
    untimed = []
    for (variant, runtime), group in results.groupby(["variant", "runtime"], sort=False):
        by = group.set_index("precision")  # ExecuTorch only: another runtime's untimed crossover is a failure
        if runtime == "executorch" and {"fp32", "int8"} <= set(by.index) and by.at["int8", "latency_ms_batch1"] > by.at["fp32", "latency_ms_batch1"] \
                and (column not in by or pd.isna(by.at["int8", column])):
            untimed.append(f"{DISPLAY.get(variant, variant)} in {TARGET_LABELS[(runtime, 'int8')].rsplit(' ', 1)[0]} "
                           f"(int8 {by.at['int8', 'latency_ms_batch1']:.2f} vs fp32 "
                           f"{by.at['fp32', 'latency_ms_batch1']:.2f} ms)")
    if untimed:
        text += (f" Slower in int8 at batch 1 and not timed at batch {crossover_batch}: {'; '.join(untimed)}: an "
                 "ExecuTorch int8 program has a fixed batch, and this profile does not lower it again for another "
                 "(the full profile does).")
    return text


def left_out(plan: DeployPlan) -> str:
    """A sentence naming the activations and ExecuTorch variants this plan leaves out, or ''."""
    activations = [DISPLAY[v] for v in ACTIVATION_VARIANTS if v not in plan.variants]
    lowered = [DISPLAY[v] for v in plan.variants if v not in plan.executorch_variants]
    parts = []
    if activations:
        parts.append(f"activations not compared at this profile: {', '.join(activations)}")
    if lowered:
        parts.append(f"not lowered to ExecuTorch: {', '.join(lowered)}")
    return ("Left out for this profile's time budget (the gpu and full profiles include them): "
            + "; ".join(parts) + ".") if parts else ""
