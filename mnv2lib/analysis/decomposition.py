"""Where each improvement's effect comes from (notebook 04): the improvement taken apart into its parts and
placements, each trained under the same recipe and seeds as the ablation, compared with the baseline in
one model with seed blocks (``factorial.differences_from_reference``).

The official settings are the improvements of the ablation; every other row is named for what it
changes, and the ones that no official code has are marked as deviations.
"""
from __future__ import annotations

import pandas as pd

from .factorial import differences_from_reference
from .work_sizes import work_sizes

# part name -> (improvement, build_model overrides, deviation from the official code?)
PARTS = {
    "CNSN after the add (official)": ("cnsn", {"cnsn": "cnsn"}, False),
    "CrossNorm only": ("cnsn", {"cnsn": "cn"}, False),
    "SelfNorm only": ("cnsn", {"cnsn": "sn"}, False),
    "CNSN before the add": ("cnsn", {"cnsn": "cnsn", "cnsn_position": "residual"}, False),
    "SelfNorm before the add": ("cnsn", {"cnsn": "sn", "cnsn_position": "residual"}, False),
    "CNSN at the block input": ("cnsn", {"cnsn": "cnsn", "cnsn_position": "pre"}, False),
    "CNSN on the shortcut": ("cnsn", {"cnsn": "cnsn", "cnsn_position": "identity"}, False),
    "CNSN, SelfNorm gates start near identity": ("cnsn", {"cnsn": "cnsn", "selfnorm_gate_bias": 4.0}, True),
    "CNSN only on maps of 8x8 and larger": ("cnsn", {"cnsn": "cnsn", "cnsn_max_reduction": 4}, True),
    "CrossNorm, 1-instance mode": ("cnsn", {"cnsn": "cn", "crossnorm_mode": "1-instance"}, False),
    "CrossNorm, no crop": ("cnsn", {"cnsn": "cn", "crossnorm_crop": "neither"}, False),
    "Triplet Attention after the projection (official)": ("triplet", {"attention": "triplet"}, False),
    "Triplet Attention on the block output": ("triplet", {"attention": "triplet", "attention_position": "block_output"},
                                              False),
    "Triplet Attention after the depthwise conv": ("triplet", {"attention": "triplet",
                                                               "attention_position": "after_depthwise"}, False),
    "Mish (official: every ReLU6)": ("mish", {"activation": "mish"}, False),
}
BASELINE = "baseline"


def decomposition_plan(profile) -> dict:
    """The parts a profile trains and their seeds ("profile": the profile's, "first": one)."""
    sizes = work_sizes(profile, "decomposition")
    parts = tuple(PARTS) if sizes["parts"] == "all" else tuple(sizes["parts"])
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"parts: got {unknown}; allowed values are {tuple(PARTS)}")
    seeds = tuple(profile.seeds) if sizes["seeds"] == "profile" else tuple(profile.seeds[:1])
    return {"parts": parts, "seeds": seeds, "shape": {"width_mult": profile.width_mult, "stem": profile.stem}}


def every_part(plan: dict) -> dict:
    """``plan`` with every part of :data:`PARTS` (``make decomposition`` trains them; notebook 04 shows
    each one the store holds)."""
    return {**plan, "parts": tuple(PARTS)}


def untrained_parts(records: list[dict], plan: dict) -> list[str]:
    """The baseline and the parts of ``plan`` that no record of ``plan``'s seeds is (not in the store yet;
    the baseline first when it is missing: every difference needs it)."""
    present = {part_of(r["model_config"], plan["parts"], plan.get("shape"))
               for r in records if r.get("seed") in plan["seeds"]}
    return [p for p in (BASELINE, *plan["parts"]) if p not in present]


def part_configs(plan: dict) -> list[dict]:
    """The build_model overrides of the baseline and every part of ``plan`` (the run plan trains them)."""
    return [{}] + [dict(PARTS[p][1]) for p in plan["parts"]]


def part_of(model_config: dict, parts, shape: dict | None = None) -> str | None:
    """The part (or the baseline) a run's model config is, among ``parts``; None if it is none of them (a
    pair of improvements, another architecture, a design study's variant, or, given ``shape``, another
    width or stem). Only the model is matched: records of other profiles, recipes or datasets (a budget
    rung's) are not told apart, so pass one profile's runs of one dataset (``runs.stored_runs`` does)."""
    for name in parts:
        if all(model_config.get(k) == v for k, v in PARTS[name][1].items()) and _rest_default(
                model_config, PARTS[name][1], shape):
            return name
    return BASELINE if _rest_default(model_config, {}, shape) else None


_SET_BY_THE_RUN = {"num_classes", "dropout", "in_channels"}  # the dataset's and the profile's, never a part's


def _rest_default(config: dict, overrides: dict, shape: dict | None) -> bool:
    """Every field but the part's own (and those the run sets) at MobileNetV2's default, or ``shape``'s."""
    from ..models import ModelConfig

    default = {**ModelConfig().to_dict(), **(shape or {})}
    free = _SET_BY_THE_RUN | set(overrides) | (set() if shape else {"width_mult", "stem"})
    return all(config.get(k) == default.get(k) for k in (set(default) | set(config)) - free)


def decomposition_table(records: list[dict], plan: dict, confidence: float = 0.95) -> pd.DataFrame:
    """One row per part and metric (clean, mean corruption and final training accuracy): its mean, its
    difference from the baseline with an interval from the whole table (parts and seeds as factors)."""
    rows = []
    for r in records:
        part = part_of(r["model_config"], plan["parts"], plan.get("shape"))
        if part is None or r["seed"] not in plan["seeds"]:
            continue
        history = r.get("history") or [{}]
        rows.append({"part": part, "seed": r["seed"], "clean_accuracy": r.get("clean_accuracy"),
                     "mean_corruption_accuracy": r.get("mean_corruption_accuracy"),
                     "train_accuracy": history[-1].get("train_accuracy")})
    frame = pd.DataFrame(rows)
    if frame.empty or BASELINE not in set(frame["part"]):
        return pd.DataFrame(columns=["improvement", "part", "deviation", "metric", "mean", "difference", "ci_low",
                                     "ci_high", "significant", "seeds"])
    out = []
    for metric in ("clean_accuracy", "mean_corruption_accuracy", "train_accuracy"):
        measured = frame.dropna(subset=[metric])  # a run without this metric (an older record) is left out of it
        if BASELINE not in set(measured["part"]):
            continue
        diffs = differences_from_reference(measured, "part", metric, BASELINE, confidence=confidence).set_index("label")
        means = measured.groupby("part")[metric].mean()
        for part in [BASELINE, *plan["parts"]]:
            if part not in means:
                continue
            d = diffs.loc[part] if part in diffs.index else None
            out.append({"improvement": PARTS[part][0] if part in PARTS else BASELINE, "part": part,
                        "deviation": PARTS[part][2] if part in PARTS else False, "metric": metric,
                        "mean": float(means[part]), "difference": float(d["mean_difference"]) if d is not None else 0.0,
                        "ci_low": float(d["ci_low"]) if d is not None else float("nan"),
                        "ci_high": float(d["ci_high"]) if d is not None else float("nan"),
                        "significant": bool(d["significant"]) if d is not None else False,
                        "seeds": int((measured["part"] == part).sum())})
    return pd.DataFrame(out)


def as_differences(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The parts' rows of ``metric`` in the columns of ``ablation.model_differences`` (for its figure)."""
    rows = table[(table["metric"] == metric) & (table["part"] != BASELINE)]
    return rows.rename(columns={"part": "label", "difference": "mean_difference"})[
        ["label", "metric", "seeds", "mean_difference", "ci_low", "ci_high", "significant"]]
