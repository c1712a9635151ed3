"""The sentences of notebook prose about attention, generated from the numbers (computation: ``mnv2lib.analysis.attention``)."""
from __future__ import annotations

import torch

from ..attention import top_region_overlap


def describe_attention(summary) -> str:
    """Sentences from the per-branch gate statistics."""
    by_branch = summary.groupby("branch")[["mean_gate", "std_gate"]].mean()
    most_selective = by_branch["std_gate"].idxmax()
    lines = [f"- Averaged over blocks, the **{b}** gates have mean {r.mean_gate:.2f} and spread (std) "
             f"{r.std_gate:.3f}." for b, r in by_branch.iterrows()]
    lines.append(f"- The most selective branch (largest spread of its gates) is **{most_selective}**.")
    deepest = summary.groupby("block", sort=False)["std_gate"].mean()
    lines.append(f"- Gate spread is largest in block `{deepest.idxmax()}` ({deepest.max():.3f}) and smallest in "
                 f"`{deepest.idxmin()}` ({deepest.min():.3f}).")
    return "\n".join(lines)


def describe_gradcam(cams: dict[str, torch.Tensor], predictions: dict[str, list[str]], truths: list[str]) -> str:
    names = list(cams)
    lines = [f"- **{n}** classifies {sum(p == t for p, t in zip(predictions[n], truths))} of {len(truths)} shown "
             "images correctly." for n in names]
    if len(names) == 2:
        iou = top_region_overlap(cams[names[0]], cams[names[1]])
        agree = sum(a == b for a, b in zip(predictions[names[0]], predictions[names[1]]))
        lines.append(f"- The two models agree on {agree} of {len(truths)} predictions; the top-20% Grad-CAM "
                     f"regions overlap with a mean IoU of {iou.mean():.2f} (1 = same region, "
                     f"{0.2 / (2 - 0.2):.2f} = chance level for random regions).")
    return "\n".join(lines)
